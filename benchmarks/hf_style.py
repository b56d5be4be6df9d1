"""A MetaLM run the way a Hugging Face-style implementation runs it: the end-to-end baseline.

Same module, same weights: every function here reads the parameters of a
:class:`~metalm_fast.models.MetaLM` (``block.attention.qkv``, ``block.mlp``,
the norms, the connector, the tied embedding) and never copies them; what
changes is how the forward pass is organised, as in ``transformers`` models
(LLaMA/BERT attention in ``attn_implementation="sdpa"``, LLaVA's merge of
encoder features):

- decoder input: ``F.embedding`` of the token ids, then ``masked_scatter`` of
  the connector rows into the positions the encoder covers (LLaVA-style);
- decoder attention: one packed row ``[1, T]`` with ``position_ids`` restarting
  at every document (what HF's flattening collator feeds) and a dense
  ``[1, 1, T, T]`` boolean mask built per batch from the document and span
  structure (block-diagonal causal; semi-causal for the single-stack variant),
  then ``F.scaled_dot_product_attention`` (HF's default "sdpa" attention);
- encoder (spans, variable length): padded into ``[S, Lmax]`` with an
  ``attention_mask``, expanded to a ``[S, 1, Lmax, Lmax]`` key-padding mask
  (``_prepare_4d_attention_mask_for_sdpa``), as HF encoders (BERT, RoBERTa) take
  a batch of different-length items; the real rows are gathered back in span
  order for the connector;
- images (when the model has a vision encoder): all images share a size, so the
  ViT runs on a dense ``[I, P, Dv]`` batch with no mask (CLIP/SigLIP-style) and its
  connector rows are ``masked_scatter``-ed into the image placeholders;
- generation: a left-padded ``[B, Lmax]`` batch of prompts with an
  ``attention_mask``, ``position_ids = cumsum(attention_mask) - 1``, a per-layer
  KV cache ``[B, Hkv, L, D]`` grown by ``torch.cat`` every step, dense boolean
  masks (fully masked rows of left padding unmasked, as HF's
  ``_unmask_unattended`` does, so SDPA never sees an empty row), logits for the
  last position only (``logits_to_keep=1``) and greedy decoding.

Every projection is ``F.linear`` on the module's weight and bias (what HF's
``nn.Linear`` layers run), never the module's own forward: the fast path's
decoder layers are DecodeLinear, whose few-row calls run metalm_fast's
decode_linear kernel, which the baseline must not borrow.

Rotary embedding uses HF's ``q * cos + rotate_half(q) * sin`` in the
activation dtype, with the model's own ``inv_freq``; grouped-query heads are
repeated (``repeat_kv``). Everything runs in the weights' dtype on their device.

Nothing here uses metalm_fast's ops (span_attention, embed_scatter, the paged
cache): this is the baseline the fast path is measured against
(benchmarks/bench_end_to_end.py, benchmarks/gpu/e2e_cases.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "hf_style_generate",
    "hf_style_logits",
    "hf_style_loss",
    "left_pad",
]


# ----------------------------------------------------------------------------- layers
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """HF's rotary embedding: cos and sin [B, 1, L, D] (fp32 angles, cast to the activations)."""
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D] (HF's repeat_kv)."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return (
        x[:, :, None]
        .expand(batch, heads, groups, length, dim)
        .reshape(batch, heads * groups, length, dim)
    )


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """An nn.Linear-style projection: F.linear on the layer's weight and bias."""
    return F.linear(x, layer.weight, layer.bias)


def mlp(module, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP (GELU or SwiGLU), HF-style: the weights of metalm_fast.nn.MLP."""
    hidden = linear(module.up, x)
    if module.kind == "swiglu":
        gate, value = hidden.chunk(2, dim=-1)
        return linear(module.down, F.silu(gate) * value)
    return linear(module.down, F.gelu(hidden))


def attention(
    module,
    x: torch.Tensor,
    position_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """HF-style self-attention with the weights of a SpanSelfAttention.

    x [B, L, Dm], position_ids [B, L], mask bool [B or 1, 1, L, L_past + L] or None.
    Returns (out [B, L, Dm], (keys, values) [B, Hkv, L_past + L, D]).
    """
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    fused = linear(module.qkv, x)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    q = fused[..., :q_width].view(batch, length, heads, head_dim).transpose(1, 2)
    k = fused[..., q_width : q_width + kv_width].view(batch, length, kv_heads, head_dim)
    v = fused[..., q_width + kv_width :].view(batch, length, kv_heads, head_dim)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if module.rotary is not None:
        cos, sin = rotary_cos_sin(module.rotary.inv_freq, position_ids, x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    if past is not None:  # the KV cache grows by concatenation, one copy per step
        k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
    groups = heads // kv_heads
    out = F.scaled_dot_product_attention(
        q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask
    )
    return linear(module.out, out.transpose(1, 2).reshape(batch, length, q_width)), (k, v)


def stack_forward(
    stack,
    x: torch.Tensor,
    position_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    past: list | None = None,
):
    """A TransformerStack's blocks and final norm, HF-style. Returns (hidden, new cache)."""
    cache = []
    for index, block in enumerate(stack.blocks):
        attended, kv = attention(
            block.attention,
            block.attention_norm(x),
            position_ids,
            mask,
            None if past is None else past[index],
        )
        x = x + attended
        x = x + mlp(block.mlp, block.mlp_norm(x))
        cache.append(kv)
    return stack.norm(x), cache


# ----------------------------------------------------------------------------- masks
def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [T]: the document each packed token belongs to."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True) - 1


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """bool [1, 1, T, T]: same document and key <= query (block-diagonal causal)."""
    doc = document_ids(cu_seqlens, total)
    positions = torch.arange(total, device=doc.device)
    mask = (doc[:, None] == doc[None, :]) & (positions[None, :] <= positions[:, None])
    return mask[None, None]


def packed_semi_causal_mask(cu_seqlens, span_starts, span_ends, total: int) -> torch.Tensor:
    """bool [1, 1, T, T]: causal within each document, bidirectional inside each span."""
    mask = packed_causal_mask(cu_seqlens, total)[0, 0]
    positions = torch.arange(total, device=mask.device)
    starts, ends = span_starts.to(mask.device), span_ends.to(mask.device)
    if starts.numel() == 0:
        return mask[None, None]
    index = torch.searchsorted(starts, positions, right=True) - 1  # last span starting <= t
    inside = (index >= 0) & (positions < ends[index.clamp(min=0)])
    span = torch.where(inside, index + 1, 0)  # 0: in no span
    same_span = (span[:, None] == span[None, :]) & (span[:, None] > 0)
    return (mask | same_span)[None, None]


def padding_mask_4d(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """attention_mask [B, Lk] -> bool [B, 1, Lq, Lk] (key padding; HF's 4D expansion)."""
    batch, key_len = attention_mask.shape
    return attention_mask.bool()[:, None, None, :].expand(batch, 1, query_len, key_len)


# ----------------------------------------------------------------------------- training forward
def pad_spans(batch, pad_id: int = 0):
    """The encoder spans as a padded batch: ids [S, Lmax], attention_mask [S, Lmax]."""
    lengths = batch.encoder_cu_seqlens.diff()
    longest = int(lengths.max()) if lengths.numel() else 0
    columns = torch.arange(longest, device=lengths.device)
    attention_mask = (columns[None, :] < lengths[:, None]).to(torch.int64)
    ids = torch.full(attention_mask.shape, pad_id, dtype=torch.int64, device=lengths.device)
    ids[attention_mask.bool()] = batch.encoder_ids.to(lengths.device)  # row-major = span order
    return ids, attention_mask


def encode_spans(model, batch) -> torch.Tensor:
    """Connector rows of the span tokens [N, Dm], through a padded encoder batch."""
    if model.connector.kind == "resampler":
        raise NotImplementedError("the HF-style path covers the linear and mlp connectors")
    ids, attention_mask = pad_spans(batch)
    weight = model.encoder_embedding.weight
    if ids.numel() == 0:
        return weight.new_zeros(0, model.config.decoder_dim)
    hidden = F.embedding(ids.to(weight.device), weight)
    position_ids = torch.arange(ids.shape[1], device=weight.device).expand_as(ids)
    mask = padding_mask_4d(attention_mask.to(weight.device), ids.shape[1])
    hidden, _ = stack_forward(model.encoder, hidden, position_ids, mask)
    return model.connector(hidden[attention_mask.to(weight.device).bool()])


def encode_images(model, batch) -> torch.Tensor | None:
    """Vision connector rows [I * P, Dm] (CLIP-style dense ViT), or None without images.

    The patch embedding is a Conv2d with kernel and stride p (the same map as
    the model's Linear over flattened (C, py, px) patches, weights viewed as
    [Dv, C, p, p]); every image has P patches, so no padding and no mask.
    """
    images = getattr(batch, "images", None)
    if images is None or images.shape[0] == 0:
        return None
    if getattr(model, "vision_encoder", None) is None:
        raise ValueError("the batch has images but the model has no vision encoder")
    if model.vision_connector.kind == "resampler":
        raise NotImplementedError("the HF-style path covers the linear and mlp connectors")
    encoder = model.vision_encoder
    weight = encoder.patch_embedding.weight
    patch, channels = encoder.patch_size, encoder.image_channels
    kernel = weight.view(weight.shape[0], channels, patch, patch)
    patches = F.conv2d(
        images.to(device=weight.device, dtype=weight.dtype),
        kernel,
        encoder.patch_embedding.bias,
        stride=patch,
    )  # [I, Dv, S/p, S/p]
    hidden = patches.flatten(2).transpose(1, 2) + encoder.position_embedding  # [I, P, Dv]
    hidden, _ = stack_forward(encoder.transformer, hidden, None, None)
    return model.vision_connector(hidden.reshape(-1, hidden.shape[-1]))


def decoder_inputs(model, batch) -> torch.Tensor:
    """[T, Dm]: F.embedding of the ids, then masked_scatter of encoder (and vision) rows."""
    embedding = model.embedding
    hidden = F.embedding(batch.input_ids, embedding.weight, embedding.padding_idx)
    if embedding.scale != 1.0:
        hidden = hidden * embedding.scale
    if model.config.variant == "two_stack" and batch.encoder_ids.numel():
        if getattr(model, "encoder", None) is None:
            raise ValueError("the batch has spans but the model has no text encoder")
        features = encode_spans(model, batch).to(hidden.dtype)
        is_span = (batch.feature_index >= 0)[:, None].expand_as(hidden)
        hidden = hidden.masked_scatter(is_span, features)
    vision = encode_images(model, batch)
    if vision is not None:
        is_image = (batch.image_index >= 0)[:, None].expand_as(hidden)
        hidden = hidden.masked_scatter(is_image, vision.to(hidden.dtype))
    return hidden


def hf_style_logits(model, batch) -> torch.Tensor:
    """[T, vocab] next-token logits of a packed SemiCausalBatch, computed HF-style."""
    total = batch.input_ids.numel()
    hidden = decoder_inputs(model, batch)[None]  # [1, T, Dm]
    device = hidden.device
    cu = batch.cu_seqlens.to(device)
    if model.config.variant == "single_stack":
        mask = packed_semi_causal_mask(cu, batch.span_starts, batch.span_ends, total)
    else:
        mask = packed_causal_mask(cu, total)
    position_ids = (torch.arange(total, device=device) - cu[document_ids(cu, total)])[None]
    hidden, _ = stack_forward(model.decoder, hidden, position_ids, mask)
    return linear(model.lm_head, hidden[0])


def hf_style_loss(model, batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the scored positions, as ``MetaLM.forward`` defines it."""
    logits = hf_style_logits(model, batch)
    if not bool((batch.labels != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), batch.labels, reduction=reduction)


# ----------------------------------------------------------------------------- generation
def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """input_ids [B, Lmax] left-padded with ``pad_id``, attention_mask [B, Lmax]."""
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt) :] = 1
    return ids.to(device), attention_mask.to(device)


def prefill_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L]: causal and not padding; rows with no key (left padding) unmasked."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | ~mask.any(dim=-1, keepdim=True)  # HF's _unmask_unattended: no NaN rows


@torch.no_grad()
def hf_style_generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy decoding, HF-style: left padding, a KV cache grown by torch.cat, dense masks.

    Returns the new tokens of each prompt (a sequence stops after emitting ``eos_id``;
    HF keeps stepping it with pad tokens until every sequence is done, as here).
    """
    weight = model.embedding.weight
    ids, attention_mask = left_pad(prompts, pad_id, weight.device)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    mask = prefill_mask(attention_mask)
    past = None
    generated: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=weight.device)
    for _ in range(max_new_tokens):
        hidden = F.embedding(ids, weight, model.embedding.padding_idx)
        if model.embedding.scale != 1.0:
            hidden = hidden * model.embedding.scale
        hidden, past = stack_forward(model.decoder, hidden, position_ids, mask, past)
        logits = linear(model.lm_head, hidden[:, -1])  # logits_to_keep=1
        next_ids = logits.argmax(dim=-1)
        next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        for row, (token, finished) in enumerate(zip(next_ids.tolist(), done.tolist())):
            if not finished:  # one host transfer per step, as HF's stopping criteria
                generated[row].append(token)
        if eos_id is not None:
            done |= next_ids == eos_id
            if bool(done.all()):
                break
        ids = next_ids[:, None]
        attention_mask = torch.cat((attention_mask, torch.ones_like(ids)), dim=1)
        position_ids = position_ids[:, -1:] + 1
        mask = padding_mask_4d(attention_mask, 1)
    return generated
