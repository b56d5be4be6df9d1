"""lm-evaluation-harness adapter: a MetaLM checkpoint as lm-eval's model ``"metalm-fast"``.

Importing this module registers the model (``lm_eval.api.registry.register_model``).
lm-eval 0.4.13 discovers models only through its registry (no entry points, and
``--include_path`` loads task YAMLs, not models), so the registration must be
imported before lm-eval looks the name up::

    python -m metalm_fast.evaluation.lm_eval --model metalm-fast \\
        --model_args checkpoint=runs/tiny --tasks hellaswag --limit 10

runs lm-eval's own command line (every flag of ``lm_eval``) after the import; from
Python::

    import lm_eval
    import metalm_fast.evaluation.lm_eval  # noqa: F401  (registers "metalm-fast")

    results = lm_eval.simple_evaluate(
        model="metalm-fast", model_args="checkpoint=runs/tiny", tasks=["hellaswag"]
    )

``import metalm_fast`` never imports this module (nor lm_eval): lm-eval is an
optional extra.

model_args
----------
checkpoint : a run directory (its latest step) or a ``step-N`` directory, read with
    ``training.checkpoint.load_model`` and the tokenizer the run trained with
    (``training.pretrained.run_tokenizer``). Required.
batch_tokens : int, the most tokens of one packed forward (default 4096); a request
    longer than that runs alone.
max_length : int, the most tokens the model reads per request (default: a learned
    position table's rows, else the ``max_position_embeddings`` of the transformers
    decoder a run started from, else 2048, lm-eval's default for HF models).
device : ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; refused when it cannot run. Without
    it the harness's ``--device`` is used where it can run (the CLI passes ``cuda:0``
    by default), else ``auto``, as lm-eval's HF model treats it.
add_bos_token : bool (default True): every document the model reads starts with the
    tokenizer's bos token, as MetaLM's training documents do.
max_gen_toks : int, generate_until's default number of new tokens (default 256).
batch_size, max_batch_size : accepted (the harness always passes them) and unused:
    requests are packed by tokens, not counted.

What each request computes
--------------------------
loglikelihood : tokenized as lm-eval's HF model does (``TemplateLM``: context and
    continuation encoded together and split at the context's length, the context's
    trailing spaces moved to the continuation; an empty context is the bos token).
    Truncation: a request of more than ``max_length + 1`` tokens keeps its last
    ``max_length + 1`` (the oldest context tokens go); the model reads all but the
    last, so a continuation of more than ``max_length`` tokens is refused. Requests
    are sorted by length (longest first) and packed, one causal document each and
    no padding, into forwards of at most ``batch_tokens`` tokens: one
    ``MetaLM.logits`` call per pack. The score is the sum of the continuation's
    log-probabilities (log_softmax in fp32, summed in fp64); ``is_greedy`` says
    whether argmax picks every continuation token. An empty continuation scores
    ``(0.0, True)``.
loglikelihood_rolling : the string's tokens in disjoint windows of ``max_length``
    (``lm_eval.utils.get_rolling_token_windows``, the first window after the bos
    token), each a loglikelihood request; the windows' sum.
generate_until : greedy, or sampling when the gen_kwargs ask (``do_sample`` with a
    temperature > 0, ``top_p``; draws from torch's global generator, which
    ``simple_evaluate`` seeds), through ``models.generation.generate`` (the paged KV
    cache) for packs of prompts of at most ``batch_tokens`` prompt + new tokens. The
    context keeps its last ``max_length - max_gen_toks`` tokens. Generation stops at
    eos or ``max_gen_toks``; the text is then cut at the first of the ``until``
    strings (generate has no stop-string hook, so the tokens after a stop string are
    computed and dropped).

Only the text decoder runs (``MetaLM.decoder_only``): lm-eval requests carry no
spans and no images, so the encoders would add nothing. Results are returned in the
requests' order, and each is handed to lm-eval's request cache (``--use_cache``);
nothing else is cached.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import lm_eval.models  # noqa: F401  (the built-in models' lazy entries; see _register)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from metalm_fast.checks import integer
from metalm_fast.data.collator import build_batch
from metalm_fast.models.generation import generate
from metalm_fast.training.checkpoint import load_model
from metalm_fast.training.pretrained import run_tokenizer
from metalm_fast.training.runtime import move_batch

__all__ = ["MODEL_NAME", "MetaLMEval", "main", "pack_by_tokens", "resolve_device"]

#: The name lm-eval knows the adapter by (``--model metalm-fast``).
MODEL_NAME = "metalm-fast"
#: lm-eval's default context length for a HF model whose config names none.
DEFAULT_MAX_LENGTH = 2048
#: Config fields of a transformers decoder that hold its context length, in lm-eval's order.
_CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")
#: The gen_kwargs generate_until understands (after lm-eval's normalize_gen_kwargs).
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")

logger = logging.getLogger(__name__)

#: A token-level scoring request: (tokens the model reads, targets). The last
#: ``len(targets)`` positions of the tokens predict the targets.
Scored = tuple[list[int], list[int]]


# ----------------------------------------------------------------------------- helpers
def resolve_device(device: str | None, harness_device: str | None = None) -> torch.device:
    """The device to run on.

    Parameters
    ----------
    device : the ``device`` model_arg: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``
        or None (not given). A device that cannot run raises ValueError.
    harness_device : lm-eval's own ``--device`` (its CLI passes ``"cuda:0"`` unless told
        otherwise); used when ``device`` is None and it can run, else ignored with a
        log line (lm-eval's HF model treats it so).

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None:
        if harness_device is not None:
            try:
                return _checked_device(str(harness_device), "the harness's --device")
            except ValueError as error:
                logger.info("%s; running on the auto device instead", error)
        device = "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _checked_device(device, "device")


def _checked_device(device, name: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}={device!r}: expected cpu, cuda, cuda:N or auto")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r}: CUDA is not available here; use cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={device!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    return parsed


def pack_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into packs of at most ``budget`` tokens, in order.

    Greedy over the given order (sort first to pack tightly); an item longer than
    the budget gets a pack of its own.

    >>> pack_by_tokens([5, 4, 3, 2, 9], 9)
    [[0, 1], [2, 3], [4]]
    """
    packs: list[list[int]] = []
    used = 0
    for index, length in enumerate(lengths):
        if not packs or used + length > budget:
            packs.append([])
            used = 0
        packs[-1].append(index)
        used += length
    return packs


def _longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by descending length (stable): an out-of-memory shows on the first pack,
    and packs of similar lengths fill the budget evenly."""
    return sorted(range(len(lengths)), key=lambda index: -lengths[index])


def _context_length(model) -> int:
    """The rows of a learned position table (no position past them exists), else the
    context length of the transformers decoder a run started from, else lm-eval's
    default for HF models."""
    architecture = model.config.decoder_architecture
    if architecture.positions == "learned":
        return architecture.max_positions
    config = (model.hf_source or {}).get("config") or {}
    config = config.get("text_config") or config
    for name in _CONTEXT_FIELDS:
        if isinstance(config.get(name), int) and not isinstance(config.get(name), bool):
            return config[name]
    return DEFAULT_MAX_LENGTH


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


# ----------------------------------------------------------------------------- the model
class MetaLMEval(TemplateLM):
    """A MetaLM checkpoint as an lm-eval model (the module docstring has the rules).

    Parameters
    ----------
    checkpoint : run directory or ``step-N`` directory (required).
    batch_tokens, max_length, device, add_bos_token, max_gen_toks : see the module
        docstring's model_args.
    batch_size, max_batch_size : what the harness passes; unused (packing is by tokens).
    harness_device : the harness's ``--device``, put here by :meth:`create_from_arg_obj`.

    Raises
    ------
    ValueError : a missing or unreadable checkpoint, a bad device or model_arg, named.
    TypeError : a model_arg of the wrong type, named.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        batch_tokens: int = 4096,
        max_length: int | None = None,
        device: str | None = None,
        add_bos_token: bool = True,
        max_gen_toks: int = 256,
        batch_size=None,
        max_batch_size=None,
        harness_device: str | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args {sorted(unknown)}; metalm-fast takes checkpoint, "
                "batch_tokens, max_length, device, add_bos_token, max_gen_toks"
            )
        if checkpoint is None or str(checkpoint) == "":
            raise ValueError(
                "checkpoint: missing; pass model_args checkpoint=DIR (a run directory or "
                "a step-N directory)"
            )
        self._batch_tokens = integer(batch_tokens, "batch_tokens", minimum=1)
        self._max_gen_toks = integer(max_gen_toks, "max_gen_toks", minimum=1)
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self._device = resolve_device(device, harness_device)
        self.checkpoint = str(checkpoint)
        self.model, self.tokenizer = self._load(self.checkpoint)
        if max_length is None:
            max_length = _context_length(self.model)
        self._max_length = integer(max_length, "max_length", minimum=1)
        if batch_size not in (None, 1) or max_batch_size is not None:
            logger.info(
                "metalm-fast packs requests by tokens (batch_tokens=%d); batch_size=%s and "
                "max_batch_size=%s are not used",
                self._batch_tokens,
                batch_size,
                max_batch_size,
            )

    def _load(self, checkpoint: str):
        """The checkpoint's text decoder on the device, in eval mode, and its tokenizer."""
        if not Path(checkpoint).exists():
            raise ValueError(f"checkpoint={checkpoint}: no such directory")
        try:
            model = load_model(checkpoint)
        except (ValueError, OSError) as error:  # CheckpointError is a ValueError
            raise ValueError(f"checkpoint={checkpoint}: {error}") from error
        tokenizer = run_tokenizer(checkpoint, model.config.vocab_size)
        return model.decoder_only().to(self._device).eval(), tokenizer

    # ------------------------------------------------------------------ harness plumbing
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """From ``--model_args`` (``"checkpoint=DIR,batch_tokens=4096"``)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """From model_args and the harness's own settings (batch_size, max_batch_size,
        device). model_args win: lm-eval passes both, and the base class would refuse
        ``device`` given twice; the harness's device becomes ``harness_device``."""
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        harness_device = harness.pop("device", None)
        options = {**harness, **arg_dict}
        if harness_device is not None and "device" not in arg_dict:
            options["harness_device"] = harness_device
        return cls(**options)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # the token an empty context (and the first rolling window) conditions on
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_tokens(self) -> int:
        return self._batch_tokens

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"metalm-fast-{self.tokenizer.vocab_size}"

    def get_model_info(self) -> dict:
        """What simple_evaluate records in its results' config."""
        return {
            "checkpoint": self.checkpoint,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "max_length": self.max_length,
            "batch_tokens": self.batch_tokens,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        """Token ids of ``string``, after the bos token when ``add_special_tokens`` (None:
        ``add_bos_token``) says so."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer.encode(string)
        return [self.tokenizer.bos_id, *ids] if bos else ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _scored(self, context: list[int], continuation: list[int]) -> Scored:
        """What the model reads for (context, continuation) tokens, truncated from the left."""
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens exceeds max_length="
                f"{self.max_length}; raise max_length"
            )
        tokens = (context + continuation)[-(self.max_length + 1) :]
        return tokens[:-1], continuation

    @torch.inference_mode()
    def _score_pack(self, items: list[Scored]) -> list[tuple[float, bool]]:
        """(sum of target log-probs, all targets greedy) per item, from one packed forward."""
        documents = [tokens for tokens, _ in items]
        batch = move_batch(build_batch(documents, [], []), self.device)
        logits = self.model.logits(batch)  # [T, V]
        rows, targets, owner = [], [], []
        start = 0
        for item, (tokens, target) in enumerate(items):
            end = start + len(tokens)
            # the last len(target) positions of the document predict the targets
            rows += range(end - len(target), end)
            targets += target
            owner += [item] * len(target)
            start = end
        rows_t = torch.tensor(rows, device=self.device)
        targets_t = torch.tensor(targets, device=self.device)
        owner_t = torch.tensor(owner, device=self.device)
        scored = logits[rows_t].float()  # [R, V]: only the scored rows are normalised
        picked = torch.log_softmax(scored, dim=-1).gather(1, targets_t[:, None])[:, 0]
        missed = (scored.argmax(dim=-1) != targets_t).to(torch.int64)
        totals = torch.zeros(len(items), dtype=torch.float64, device=self.device)
        totals.index_add_(0, owner_t, picked.double())
        misses = torch.zeros(len(items), dtype=torch.int64, device=self.device)
        misses.index_add_(0, owner_t, missed)
        return [(t, m == 0) for t, m in zip(totals.tolist(), misses.tolist(), strict=True)]

    def score_tokens(
        self, items: Sequence[Scored], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(log-prob, is_greedy) per (tokens, targets) item, packed longest first into
        forwards of at most ``batch_tokens`` tokens; in the items' order."""
        results: list[tuple[float, bool] | None] = [None] * len(items)
        scorable = []
        for index, (_, targets) in enumerate(items):
            if targets:
                scorable.append(index)
            else:
                results[index] = (0.0, True)  # log 1: the empty string is certain
        order = [scorable[i] for i in _longest_first([len(items[i][0]) for i in scorable])]
        packs = pack_by_tokens([len(items[i][0]) for i in order], self.batch_tokens)
        with tqdm(total=len(order), disable=disable_tqdm, desc="metalm-fast scoring") as bar:
            for pack in packs:
                indices = [order[p] for p in pack]
                for index, result in zip(
                    indices, self._score_pack([items[i] for i in indices]), strict=True
                ):
                    results[index] = result
                bar.update(len(indices))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """lm-eval's token-level hook: ``[(request strings or None, context, continuation)]``."""
        items = [self._scored(context, continuation) for _, context, continuation in requests]
        results = self.score_tokens(items, disable_tqdm=disable_tqdm)
        for (strings, _, _), result in zip(requests, results, strict=True):
            if strings is not None:  # rolling windows are cached per string instead
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihoods, over disjoint windows of ``max_length`` tokens."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for index, (string,) in enumerate(request.args for request in requests):
            # no bos from tok_encode: the first window starts after prefix_token_id
            tokens = self.tok_encode(string, add_special_tokens=False)
            pairs = get_rolling_token_windows(
                token_list=tokens,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(
            owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm), strict=True
        ):
            totals[index] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _generation_options(self, gen_kwargs: dict) -> dict:
        """lm-eval's gen_kwargs as generate()'s options, plus ``until`` (a list)."""
        if not isinstance(gen_kwargs, dict):
            raise TypeError(f"gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise ValueError(
                f"gen_kwargs {unknown}: not supported by metalm-fast (it reads "
                f"{', '.join(_GEN_KWARGS)})"
            )
        until = kwargs["until"]
        if not all(isinstance(stop, str) for stop in until):
            raise TypeError(f"gen_kwargs until must be strings, got {until!r}")
        temperature = float(kwargs.get("temperature", 0.0))
        sample = bool(kwargs.get("do_sample")) and temperature > 0.0  # temperature 0: greedy
        return {
            "until": until,
            "max_new_tokens": integer(kwargs["max_gen_toks"], "max_gen_toks", minimum=1),
            "do_sample": sample,
            "temperature": temperature if sample else 1.0,
            "top_p": float(kwargs.get("top_p", 1.0)),
        }

    def _prompt(self, context: str, max_new_tokens: int) -> list[int]:
        """The context's tokens, left-truncated to leave room for the new tokens."""
        room = self.max_length - max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_gen_toks={max_new_tokens} leaves no room for a prompt within "
                f"max_length={self.max_length}"
            )
        tokens = self.tok_encode(context)[-room:]
        return tokens or [self.prefix_token_id]  # generate() needs a token to start from

    def _uses_cache(self, prompts: list[list[int]], max_new_tokens: int) -> bool:
        """False where a sliding window would refuse the cached path: its decode steps
        attend the whole prefix, so longer sequences are recomputed under the window."""
        window = self.model.config.decoder_architecture.sliding_window
        longest = max(len(prompt) for prompt in prompts) + max_new_tokens - 1
        return window is None or max_new_tokens <= 1 or longest <= window

    def _generate_pack(self, prompts: list[list[int]], options: dict) -> list[list[int]]:
        return generate(
            self.model,
            prompts,
            max_new_tokens=options["max_new_tokens"],
            do_sample=options["do_sample"],
            top_p=options["top_p"],
            temperature=options["temperature"],
            eos_id=self.eot_token_id,
            use_cache=self._uses_cache(prompts, options["max_new_tokens"]),
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text generated for each (context, gen_kwargs) request, cut at the first stop
        string; requests with equal gen_kwargs run together, packed longest first."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        results: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="metalm-fast generating") as bar:
            for indices in groups.values():
                options = self._generation_options(requests[indices[0]].args[1])
                for index, text in self._generate_group(requests, indices, options):
                    results[index] = text
                    bar.update(1)
        return results

    def _generate_group(self, requests, indices: list[int], options: dict):
        """(request index, text) for requests sharing one set of gen_kwargs."""
        new = options["max_new_tokens"]
        prompts = {i: self._prompt(requests[i].args[0], new) for i in indices}
        order = [indices[i] for i in _longest_first([len(prompts[i]) for i in indices])]
        # a pack's KV pool holds every prompt and its new tokens
        packs = pack_by_tokens([len(prompts[i]) + new for i in order], self.batch_tokens)
        for pack in packs:
            members = [order[p] for p in pack]
            outputs = self._generate_pack([prompts[i] for i in members], options)
            for index, tokens in zip(members, outputs, strict=True):
                text = postprocess_generated_text(
                    self.tok_decode(tokens), stop=options["until"], think_end_token=None
                )
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
                yield index, text


def _register() -> None:
    """Register :class:`MetaLMEval` as ``"metalm-fast"``.

    Importing ``lm_eval.models`` above first keeps the built-in models visible: lm-eval
    adds their lazy entries only when it finds its registry empty. Run as ``python -m``,
    this file is ``__main__`` and registers nothing: its ``main`` imports the module
    under its real name, which registers the one class lm-eval will see (a second
    class under the same name would be refused).
    """
    if __name__ != "__main__":
        register_model(MODEL_NAME)(MetaLMEval)


_register()


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (``lm_eval ...``, every flag) with "metalm-fast" registered."""
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's parser reads sys.argv itself (and inserts its "run" subcommand there)
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    from metalm_fast.evaluation.lm_eval import main as registered_main

    registered_main()
