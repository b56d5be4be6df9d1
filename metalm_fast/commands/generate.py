"""``metalm-fast generate``: prompt text and optional images to text, through the paged KV cache.

Each ``--prompt`` is one sequence of the batch (prompts of different lengths
are decoded together). ``<image>`` in a prompt marks where an image goes; the
images come from ``--image``, consumed in order over all prompts: ``digit:N``
is held-out digit N of the embedded scikit-learn digits, anything else a path
to a ``.npy`` array [H, W] or [C, H, W] scaled to [0, 1].

Example::

    metalm-fast generate --checkpoint runs/demo/finetuned \\
        --prompt "<image> question: what digit is this? answer:" --image digit:0 \\
        --prompt "the for statement" --max-new-tokens 20 --top-p 0.9 --seed 0

``runs/demo/finetuned`` is the demo's finetuned checkpoint (``demo --out
runs/demo``), the one that answers questions about digits; ``runs/demo`` holds
the pretrained one, which continues text.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from metalm_fast.commands._checkpoint import checkpoint_model
from metalm_fast.commands._options import add_runtime_options, check_seed, runtime_device
from metalm_fast.data.collator import build_batch
from metalm_fast.data.digits import load_digits
from metalm_fast.data.tokenizer import Tokenizer
from metalm_fast.models.generation import RequestTooLargeError, generate
from metalm_fast.training.pretrained import run_tokenizer
from metalm_fast.training.runtime import autocast, move_batch

__all__ = ["add_arguments", "encode_prompt", "load_image", "main", "run"]

IMAGE_MARKER = "<image>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint to run: a run directory (train/demo --out, its latest "
        "step; runs/demo/finetuned answers digit questions) or a step-N "
        "directory",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="a prompt; repeat for a batch; '<image>' marks an image",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        help="digit:N (held-out digit N) or a .npy path; consumed in order",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="most tokens generated per prompt; <eos> stops earlier (default 32)",
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling with this p (default: greedy)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature, with --top-p (default 1.0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    add_runtime_options(parser)


def load_image(spec: str, config) -> torch.Tensor:
    """float [C, H, W] from ``digit:N`` or a .npy path, checked against the model's image shape."""
    if spec.startswith("digit:"):
        test = load_digits("test")
        number = spec.split(":", 1)[1]
        if not number.isdigit():
            raise ValueError(f"--image {spec}: expected digit:N with N a held-out digit index")
        index = int(number)
        if not 0 <= index < len(test.labels):
            raise ValueError(f"--image {spec}: held-out digits are 0..{len(test.labels) - 1}")
        image = test.images[index]
    else:
        image = _read_npy(spec)
        if image.dim() == 2:
            image = image.unsqueeze(0)
    if config.vision_encoder is not None:  # a pretrained encoder preprocesses any size
        if image.dim() != 3 or image.shape[0] not in (1, config.image_channels):
            raise ValueError(
                f"--image {spec}: shape {tuple(image.shape)}, expected [1 or "
                f"{config.image_channels}, H, W] with values in [0, 1]"
            )
        return image
    expected = (config.image_channels, config.image_size, config.image_size)
    if tuple(image.shape) != expected:
        raise ValueError(f"--image {spec}: shape {tuple(image.shape)}, the model reads {expected}")
    return image


def _read_npy(spec: str) -> torch.Tensor:
    """float tensor of the .npy file ``spec``; ValueError naming ``--image`` when the
    file is missing, unreadable, not an .npy array, or not numbers."""
    try:
        array = np.load(spec)  # allow_pickle=False: a pickled object is refused, not run
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(
            f"--image {spec}: expected digit:N or the path of a .npy array ({error})"
        ) from error
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"--image {spec}: expected a numeric .npy array, got {type(array)}")
    return torch.from_numpy(array.astype(np.float32))


def encode_prompt(tokenizer: Tokenizer, text: str, tokens_per_image: int) -> tuple[list[int], int]:
    """[bos] + text tokens with an image run per ``<image>``; returns (tokens, image count)."""
    pieces = text.split(IMAGE_MARKER)
    tokens = [tokenizer.bos_id]
    for i, piece in enumerate(pieces):
        if i:
            tokens += [tokenizer.image_id] * tokens_per_image
        tokens += tokenizer.encode(piece) if piece else []
    return tokens, len(pieces) - 1


def run(
    model,
    tokenizer: Tokenizer,
    prompts: list[str],
    images: list[torch.Tensor],
    *,
    max_new_tokens: int,
    top_p: float | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Generated text for each prompt."""
    per_image = model.config.tokens_per_image
    documents, needed = [], 0
    for text in prompts:
        tokens, count = encode_prompt(tokenizer, text, per_image)
        documents.append(tokens)
        needed += count
    if needed != len(images):
        raise ValueError(
            f"the prompts hold {needed} '<image>' markers but {len(images)} "
            "--image were given; they must be equal"
        )
    batch = build_batch(
        documents,
        [],
        [],
        images=torch.stack(images) if images else None,
        image_token_id=tokenizer.image_id,
        tokens_per_image=per_image,
    )
    batch = move_batch(batch, next(model.parameters()).device)
    sampling = top_p is not None
    try:
        outputs = generate(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            top_p=top_p if sampling else 1.0,
            temperature=temperature,
            eos_id=tokenizer.eos_id,
            generator=torch.Generator(batch.input_ids.device).manual_seed(seed),
        )
    except RequestTooLargeError as error:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens}: {error.problem}; lower --max-new-tokens "
            "or give fewer --prompt"
        ) from error
    return [tokenizer.decode(tokens) for tokens in outputs]


def _check_arguments(args: argparse.Namespace) -> None:
    """The flags' rules, named as the user typed them (generate() names its parameters)."""
    check_seed(args.seed)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.top_p is not None and not args.temperature > 0.0:
        raise ValueError(f"--temperature must be > 0 with --top-p, got {args.temperature}")


def _check_model_reads_images(model, args: argparse.Namespace) -> None:
    if args.image and model.config.vision_layers == 0:
        raise ValueError(
            f"--image {args.image[0]}: the model of --checkpoint {args.checkpoint} has no "
            "vision encoder (vision_layers=0); it reads text only"
        )


def main(args: argparse.Namespace) -> int:
    _check_arguments(args)
    device = runtime_device(args)
    model = checkpoint_model(args.checkpoint).to(device).eval()
    _check_model_reads_images(model, args)
    tokenizer = run_tokenizer(args.checkpoint, model.config.vocab_size)
    images = [load_image(spec, model.config) for spec in args.image]
    with torch.no_grad(), autocast(device, args.dtype):
        texts = run(
            model,
            tokenizer,
            args.prompt,
            images,
            max_new_tokens=args.max_new_tokens,
            top_p=args.top_p,
            temperature=args.temperature,
            seed=args.seed,
        )
    specs = iter(args.image)
    for prompt, text in zip(args.prompt, texts, strict=True):
        labels = [_digit_label(next(specs)) for _ in range(prompt.count(IMAGE_MARKER))]
        known = [label for label in labels if label is not None]
        truth = f"   (image labelled {', '.join(known)})" if known else ""
        print(f"> {prompt}{truth}\n{text}\n")
    return 0


def _digit_label(spec: str) -> str | None:
    """The label of a ``digit:N`` image, so the reader can check the answer; None
    for an image file."""
    if not spec.startswith("digit:"):
        return None
    return str(int(load_digits("test").labels[int(spec.split(":", 1)[1])]))
