"""``attn_implementation="metalm_span"``: span_attention inside unmodified transformers models.

:func:`register` adds two entries to transformers (5.x):

- ``AttentionInterface[name]`` = :func:`span_attention_forward`, the attention
  function every ``modeling_*.py`` calls as
  ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``;
- ``AttentionMaskInterface[name]`` = :func:`padding_mask`, what ``create_causal_mask``
  and friends return to the model. Like flash attention's, it is the 2-D padding mask
  or ``None``, never the dense ``[B, 1, Sq, Sk]`` mask that sdpa builds: the
  attention function turns it into a :class:`~metalm_fast.SpanMask` in O(B * S).

How a call's mask is decided (first match wins):

1. ``span_mask=SpanMask`` passed to the model's forward (it reaches the attention
   function through ``**kwargs``, as flash attention's varlen kwargs do): the whole
   mask, over the batch flattened row-major (query ``b * Sq + i``, key ``b * Sk + j``).
   It replaces everything below, padding included: prefix-LM, semi-causal spans,
   anything the interval mask expresses. It is a kwarg, not ``attention_mask``,
   because transformers' mask preparation reads ``attention_mask`` as a tensor
   before any attention implementation sees it. E.g. a prefix-LM batch of two rows
   of 16 tokens::

       mask = SpanMask.prefix_lm(torch.tensor([0, 16, 32]), prefix_lens=[5, 9])
       model(input_ids, span_mask=mask, use_cache=False)

2. a 2-D padding mask (``attention_mask`` given to the model): each row's real
   tokens must be one contiguous run (left or right padding);
3. ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``DataCollatorWithFlattening(
   return_flash_attn_kwargs=True)``, passed to the model as they come): packed
   documents over the flattened batch (``max_length_*`` are accepted and unused);
4. ``position_ids`` [B or 1, S] of a self-attention call with ``Sq == Sk > 1``: a
   document starts wherever a position is not its predecessor + 1
   (``DataCollatorWithFlattening``'s restarting positions; the rule of transformers'
   ``find_packed_sequence_indices``). This holds for encoders too, where sdpa
   ignores positions: BERT given restarting positions attends within documents;
5. otherwise every row is one sequence.

Causal or not comes from the ``is_causal`` kwarg, else ``module.is_causal`` (BERT's
encoder layers are not causal); a sliding window from the ``sliding_window`` kwarg,
else ``module.sliding_window``. Queries sit at the end of their row's keys
(bottom-right alignment, as with a KV cache). The padding mask covers keys only, as
sdpa's does: a padding query attends the real keys its causal interval holds, and a
query with none (left padding) gets exact zeros, not NaN.

Not supported, with a ValueError: attention dropout while the module trains
(span_attention has none: set ``attention_dropout`` / ``attention_probs_dropout_prob``
to 0; in eval the rate is ignored, as no dropout applies there), ``softcap``,
attention sinks (``s_aux``), ``position_bias``, a non-causal sliding window, and
masks that models overlay with ``or_mask_function`` / ``and_mask_function`` (image
tokens, e.g. Gemma 3) unless a ``span_mask`` is given. A prepared 4-D mask is a
TypeError. Attention weights are never returned (``None``).

Importing this module does not import transformers; :func:`register` does.
"""

from __future__ import annotations

import torch

from metalm_fast.checks import index_vector
from metalm_fast.masks import SpanMask
from metalm_fast.ops.span_attention import span_attention

__all__ = ["DEFAULT_NAME", "SPAN_MASK_KWARG", "padding_mask", "register", "span_attention_forward"]

#: The name under which :func:`register` installs the implementation by default.
DEFAULT_NAME = "metalm_span"
#: The forward kwarg that carries a user's SpanMask to every attention layer.
SPAN_MASK_KWARG = "span_mask"


# ----------------------------------------------------------------------------- registration
def register(name: str = DEFAULT_NAME) -> str:
    """Make ``attn_implementation=name`` run :func:`span_attention_forward` in transformers.

    Registers the attention function in ``transformers.AttentionInterface`` and the
    mask function :func:`padding_mask` in ``transformers.masking_utils.AttentionMaskInterface``
    (both are global mappings, so every model sees them). Calling it again is harmless.

    Parameters
    ----------
    name : str
        The implementation's name, default ``"metalm_span"``.

    Returns
    -------
    str
        ``name``, for ``from_pretrained(..., attn_implementation=register())``.

    Example
    -------
    >>> import torch
    >>> import metalm_fast.hf
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
    ...                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> name = metalm_fast.hf.register()
    >>> model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    >>> model.config._attn_implementation
    'metalm_span'
    >>> ids = torch.tensor([[5, 6, 7, 8, 9, 10]])   # two packed documents: 3 + 3 tokens
    >>> cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    >>> out = model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
    >>> out.logits.shape
    torch.Size([1, 6, 64])
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name or "/" in name or name.startswith("paged|"):
        # transformers reads "org/repo" as a hub kernel and "paged|..." as its paged cache.
        raise ValueError(
            f"name must be a plain non-empty name without '/' or 'paged|', got {name!r}"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, span_attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name


# ----------------------------------------------------------------------------- mask function
class _OverlaidMask:
    """What :func:`padding_mask` returns for a mask pattern it cannot carry (see there)."""

    def __repr__(self) -> str:
        return "<metalm_span: overlaid mask pattern>"


_OVERLAID = _OverlaidMask()


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The mask a model hands its attention layers: the 2-D padding mask, or ``None``.

    Called by transformers' ``create_causal_mask``, ``create_bidirectional_mask`` and
    ``create_sliding_window_causal_mask`` with the same arguments as ``sdpa_mask``.
    The causal / bidirectional / sliding pattern is not materialised: the attention
    function knows it from the module (see the module docstring), so only padding
    needs to travel.

    Parameters
    ----------
    batch_size, q_length, kv_length, q_offset, kv_offset : int
        Sizes of the attention call (only ``kv_length`` is used).
    mask_function : callable
        transformers' pattern; not evaluated (that would cost B * Sq * Sk).
    attention_mask : Tensor [B, >= kv_length] bool, optional
        The padding mask (True = real token).

    Returns
    -------
    Tensor [B, kv_length] bool, or None when nothing is padded. A pattern overlaid
    with ``or_mask_function`` / ``and_mask_function`` (transformers sets
    ``use_vmap=True`` exactly then) returns a marker that the attention function
    rejects unless a ``span_mask`` replaces it.
    """
    del batch_size, q_length, q_offset, kv_offset, mask_function
    if kwargs.get("use_vmap", False):
        return _OVERLAID
    if attention_mask is None:
        return None
    # Sliding and chunked layers keep the last kv_length keys; a static cache has a
    # mask narrower than kv_length (its unused slots), which must travel.
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# ----------------------------------------------------------------------------- mask cache
class _MaskCache:
    """The last few SpanMasks, keyed on the identity of the tensors they came from.

    Every layer of one forward passes the same padding mask / cu_seq_lens /
    position_ids objects, so the mask (and its host syncs, which stall a GPU's
    queue) is built once per forward, not once per layer. Each entry holds its
    source tensors, so their ids cannot be reused while it lives; the version
    counter catches in-place edits.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.entries: dict = {}

    @staticmethod
    def _identity(tensor: torch.Tensor):
        # Inference tensors keep no version counter; they cannot change outside
        # inference mode, and inside it a fresh tensor per forward is the norm.
        version = None if tensor.is_inference() else tensor._version
        return id(tensor), version

    def get(self, sources: tuple, params: tuple, build):
        key = (tuple(self._identity(t) for t in sources), params)
        if key in self.entries:
            return self.entries[key][1]
        mask = build()
        if len(self.entries) >= self.capacity:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (sources, mask)
        return mask


_CACHE = _MaskCache()


# ----------------------------------------------------------------------------- mask builders
def _intervals(seq_start, seq_end, position, causal: bool, window: int | None):
    """(kv_start, kv_end) from each query's key segment [seq_start, seq_end) and its own key.

    causal: ``[seq_start, min(position + 1, seq_end))``, narrowed to the last
    ``window`` keys; bidirectional: the whole segment. A query before its
    segment (left padding) gets an empty interval.
    """
    start, end = seq_start, seq_end
    if causal:
        end = torch.minimum(position + 1, seq_end)
        if window is not None:
            start = torch.maximum(start, position - window + 1)
    return torch.minimum(start, end), end


def _padded_mask(padding, batch, q_len, kv_len, causal, window, device) -> SpanMask:
    """Intervals of a padded batch: row b's real keys are one run [first_b, end_b)."""
    if padding is None:
        first = torch.zeros(batch, dtype=torch.int64, device=device)
        end = torch.full((batch,), kv_len, dtype=torch.int64, device=device)
        width = kv_len
    else:
        padding = padding.to(device=device, dtype=torch.bool)
        width = padding.shape[1]
        count = padding.sum(1)
        first = padding.to(torch.uint8).argmax(1)  # the first True (first maximum)
        end = width - padding.flip(1).to(torch.uint8).argmax(1)
        empty = count == 0
        first = torch.where(empty, 0, first)
        end = torch.where(empty, 0, end)
        if not bool((end - first == count).all()):
            row = int(torch.nonzero(end - first != count)[0, 0])
            raise ValueError(
                f"attention_mask row {row} has padding between real tokens; metalm_span needs "
                "each row's real tokens to be one contiguous run (left or right padding), or "
                f"pass {SPAN_MASK_KWARG}=SpanMask(...)"
            )
    if causal and width < q_len:
        raise ValueError(
            f"attention_mask covers {width} keys but there are {q_len} queries; a causal "
            "layer's queries are the last of its keys"
        )
    rows = torch.arange(batch, device=device, dtype=torch.int64)[:, None] * kv_len
    # Query i of a row is key (width - q_len + i): bottom-right alignment, as with a cache.
    position = rows + (width - q_len) + torch.arange(q_len, device=device, dtype=torch.int64)
    shape = (batch, q_len)
    start, stop = _intervals(
        (rows + first[:, None]).expand(shape),
        (rows + end[:, None]).expand(shape),
        position,
        causal,
        window,
    )
    return SpanMask.from_intervals(start.flatten(), stop.flatten(), batch * kv_len)


def _packed_mask(cu_seqlens, total, causal, window) -> SpanMask:
    """Packed documents (cu_seqlens over the flattened batch), through SpanMask's constructors."""
    if window is not None:
        return SpanMask.sliding_window(cu_seqlens, window, num_tokens=total)
    if causal:
        return SpanMask.causal(cu_seqlens, num_tokens=total)
    return SpanMask.bidirectional(cu_seqlens, num_tokens=total)


def _cu_from_positions(position_ids: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """cu_seqlens of the documents that position_ids [B or 1, S] mark (row starts included)."""
    position_ids = position_ids.expand(batch, seq)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = torch.nonzero(starts.flatten()).flatten()
    end = torch.tensor([batch * seq], device=offsets.device, dtype=offsets.dtype)
    return torch.cat([offsets, end])


def _reads_as_packing(position_ids, batch: int, q_len: int, kv_len: int) -> bool:
    """Whether position_ids can mark documents: [B or 1, S] integers of a self-attention.

    Other layouts (Qwen2-VL's [3, B, S] multimodal positions) are positions, not
    boundaries, and are left alone, as is a decode step (one query) or a cached
    prefill (fewer queries than keys), whose positions do not start at 0.
    """
    return (
        isinstance(position_ids, torch.Tensor)
        and q_len == kv_len > 1
        and position_ids.dim() == 2
        and position_ids.shape[0] in (1, batch)
        and position_ids.shape[1] == q_len
        and not position_ids.dtype.is_floating_point
    )


def _check_cu(name: str, cu, total: int) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(cu).__name__}")
    cu = index_vector(cu, name)
    if cu.numel() < 2 or int(cu[-1]) != total:
        raise ValueError(
            f"{name} must run from 0 to the {total} tokens of the flattened batch, got "
            f"{cu.tolist() if cu.numel() <= 8 else tuple(cu.shape)}"
        )
    return cu


def _varlen_mask(kwargs, batch, q_len, kv_len, causal, window, device) -> SpanMask:
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k
    if q_len != kv_len:
        raise ValueError(
            f"cu_seq_lens_q/cu_seq_lens_k describe packed self-attention; got {q_len} queries "
            f"and {kv_len} keys per row"
        )

    def build():
        cu = _check_cu("cu_seq_lens_q", cu_q, batch * q_len)
        if cu_k is not cu_q and not torch.equal(
            cu, _check_cu("cu_seq_lens_k", cu_k, batch * kv_len)
        ):
            raise ValueError("metalm_span needs cu_seq_lens_q == cu_seq_lens_k (self-attention)")
        return _packed_mask(cu.to(device), batch * q_len, causal, window)

    sources = (cu_q,) if cu_k is cu_q else (cu_q, cu_k)
    return _CACHE.get(sources, ("varlen", batch, q_len, causal, window, device), build)


def _mask_of_call(attention_mask, kwargs, batch, q_len, kv_len, causal, window, device):
    """The SpanMask of one attention call (module docstring: the order of precedence)."""
    user = kwargs.get(SPAN_MASK_KWARG)
    if user is None and isinstance(attention_mask, SpanMask):
        user = attention_mask
    if user is not None:
        return _checked_user_mask(user, batch, q_len, kv_len, device)
    if attention_mask is _OVERLAID:
        raise ValueError(
            "this model overlays its mask with a custom pattern (or_mask_function / "
            "and_mask_function, e.g. bidirectional image tokens) that a padding mask cannot "
            f"carry; pass the whole mask as {SPAN_MASK_KWARG}=SpanMask(...) or use another "
            "attn_implementation"
        )
    params = (batch, q_len, kv_len, causal, window, device)
    if attention_mask is not None:
        _check_padding(attention_mask, batch, kv_len)
        return _CACHE.get(
            (attention_mask,),
            ("padded",) + params,
            lambda: _padded_mask(attention_mask, batch, q_len, kv_len, causal, window, device),
        )
    if kwargs.get("cu_seq_lens_q") is not None:
        return _varlen_mask(kwargs, batch, q_len, kv_len, causal, window, device)
    position_ids = kwargs.get("position_ids")
    if _reads_as_packing(position_ids, batch, q_len, kv_len):
        return _CACHE.get(
            (position_ids,),
            ("positions",) + params,
            lambda: _packed_mask(
                _cu_from_positions(position_ids.to(device), batch, q_len),
                batch * q_len,
                causal,
                window,
            ),
        )
    # One sequence per row: a function of the sizes alone, so no source tensor.
    return _CACHE.get(
        (),
        ("rows",) + params,
        lambda: _padded_mask(None, batch, q_len, kv_len, causal, window, device),
    )


def _check_padding(attention_mask, batch: int, kv_len: int) -> None:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            "attention_mask must be a 2-D padding mask tensor, a SpanMask or None, got "
            f"{type(attention_mask).__name__}"
        )
    if attention_mask.dim() != 2:
        raise TypeError(
            f"metalm_span takes a 2-D padding mask [batch, keys], got a {attention_mask.dim()}-D "
            f"attention_mask {tuple(attention_mask.shape)}; express other patterns as "
            f"{SPAN_MASK_KWARG}=SpanMask(...)"
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(
            f"attention_mask must be bool or integer (1 = real token), got {attention_mask.dtype}"
        )
    rows, width = attention_mask.shape
    if rows != batch or width > kv_len:
        raise ValueError(
            f"attention_mask must be [{batch}, <= {kv_len}] (batch, keys), got {(rows, width)}"
        )


def _checked_user_mask(mask, batch, q_len, kv_len, device) -> SpanMask:
    if not isinstance(mask, SpanMask):
        raise TypeError(f"{SPAN_MASK_KWARG} must be a SpanMask, got {type(mask).__name__}")
    if mask.num_queries != batch * q_len or mask.num_keys != batch * kv_len:
        raise ValueError(
            f"{SPAN_MASK_KWARG} must cover the flattened batch: {batch} x {q_len} = "
            f"{batch * q_len} queries and {batch} x {kv_len} = {batch * kv_len} keys, got "
            f"{mask.num_queries} queries and {mask.num_keys} keys"
        )
    return mask if mask.device == device else mask.to(device)


# ----------------------------------------------------------------------------- attention
_UNSUPPORTED = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
}


def _check_call(module, query, key, value, dropout, kwargs) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim]")
    if key.shape[0] != query.shape[0] or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} must share the batch, and key/value their heads and length"
        )
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"metalm_span does not support {what} ({name})")
    if kwargs.get("cache") is not None:
        raise ValueError("metalm_span does not support the paged cache of continuous batching")
    # Llama 4's chunked layers attend within fixed chunks: a mask this module does not build.
    chunk = getattr(getattr(module, "config", None), "attention_chunk_size", None)
    if chunk is not None:
        raise ValueError(
            f"metalm_span does not support chunked attention (attention_chunk_size={chunk})"
        )
    if dropout and getattr(module, "training", False):
        raise ValueError(
            f"metalm_span has no attention dropout, but the module trains with dropout={dropout}; "
            "set the config's attention dropout (attention_dropout, attention_probs_dropout_prob) "
            "to 0.0"
        )


def _window(module, kwargs) -> int | None:
    # Mistral passes the window as a kwarg; Qwen2 and Gemma also set it on the layer
    # (None on their full-attention layers).
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {window!r}")
    return window


def span_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function, computed by :func:`metalm_fast.span_attention`.

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention layer (read: ``is_causal``, ``sliding_window``, ``training``).
    query : Tensor [B, Hq, Sq, D]
    key, value : Tensor [B, Hkv, Sk, D]; Hq a multiple of Hkv (GQA runs natively, no
        repeat of key/value).
    attention_mask : Tensor [B, <= Sk] (bool/int padding mask), SpanMask or None
        What :func:`padding_mask` returned.
    scaling : float, optional
        Softmax scale; default ``1 / sqrt(D)``.
    dropout : float
        Must be 0 while the module trains.
    **kwargs
        ``span_mask`` (SpanMask over the flattened batch), ``cu_seq_lens_q`` /
        ``cu_seq_lens_k`` (``max_length_*`` are not needed), ``position_ids``,
        ``is_causal``, ``sliding_window``; others are ignored.

    Returns
    -------
    attn_output : Tensor [B, Sq, Hq, D]
    attn_weights : None
    """
    _check_call(module, query, key, value, dropout, kwargs)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    window = _window(module, kwargs)
    if window is not None and not causal:
        raise ValueError("metalm_span supports sliding windows on causal layers only")
    mask = _mask_of_call(attention_mask, kwargs, batch, q_len, kv_len, causal, window, query.device)
    # [B, H, S, D] -> [B * S, H, D]: a view whenever the layout allows (B == 1 always);
    # span_attention needs only the last dim contiguous.
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = span_attention(q, k, v, mask, scale=scaling)
    return out.view(batch, q_len, out.shape[1], out.shape[2]), None
