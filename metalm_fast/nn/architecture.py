"""BlockArchitecture: how the blocks of a transformer stack compute, as configuration.

One TransformerBlock class serves every architecture the engine loads (the
native MetaLM stacks, Llama/Mistral, Qwen2, GPT-NeoX/Pythia, GPT-2, BERT,
RoBERTa, ELECTRA, ViT, CLIP, SigLIP): what differs between them is a handful of
choices, and each is a field here rather than a new class. The defaults are the
native MetaLM block (GPT-NeoX with sequential residuals, rotary over the whole
head, no attention bias, GELU MLP with bias, LayerNorm eps 1e-5).

Sizes (width, heads, layers, MLP width) are not here: they are the stack's
arguments. A field the engine does not implement is refused by
:meth:`BlockArchitecture.__post_init__` with the field's name, never silently
replaced by something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["BlockArchitecture", "MLP_KINDS", "NORMS", "POSITIONS", "make_norm"]

NORMS = ("layernorm", "rmsnorm")
#: "rotary": rotate q and k by packed positions; "learned": a table of absolute position
#: embeddings added to the stack's input (GPT-2); "none": the stack adds no positions
#: (encoders whose embeddings hold them: BERT, ViT).
POSITIONS = ("rotary", "learned", "none")
#: swiglu is gated (``down(silu(gate) * up)``); the others are ``down(act(up))``.
MLP_KINDS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "swiglu")
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class BlockArchitecture:
    """The computation of a transformer stack's blocks.

    Attributes
    ----------
    norm, norm_eps, norm_bias : "layernorm" (with a bias unless ``norm_bias=False``)
        or "rmsnorm", and its epsilon.
    post_norm : BERT's order, ``x = norm(x + attn(x))`` then ``x = norm(x + mlp(x))``;
        default pre-norm, ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.
    parallel_residual : GPT-NeoX/Pythia, ``x + attn(norm1(x)) + mlp(norm2(x))``.
    final_norm : a norm after the last block (pre-norm stacks; BERT has none).
    positions : one of :data:`POSITIONS`.
    rotary_base, rotary_fraction : rotary's base and the fraction of each head's
        dims it rotates (GPT-NeoX's rotary_pct; the first ``fraction * D`` dims).
    rope_scaling : None, or a dict with ``rope_type`` "default" or "llama3" (and for
        llama3: factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings), as in transformers' config.
    max_positions : rows of the learned position table (positions "learned").
    qkv_bias, out_bias : biases of the fused qkv and of the output projection.
    mlp_kind, mlp_bias : one of :data:`MLP_KINDS`, and the MLP projections' bias.
    head_dim : D, when it is not ``dim // num_heads``.
    sliding_window : Mistral's window w (causal stacks): query t attends its
        document's keys in ``[t - w + 1, t]``.
    """

    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    post_norm: bool = False
    parallel_residual: bool = False
    final_norm: bool = True
    positions: str = "rotary"
    rotary_base: float = 10000.0
    rotary_fraction: float = 1.0
    rope_scaling: dict | None = field(default=None, hash=False)
    max_positions: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_kind: str = "gelu"
    mlp_bias: bool = True
    head_dim: int | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        _choice("norm", self.norm, NORMS)
        _choice("positions", self.positions, POSITIONS)
        _choice("mlp_kind", self.mlp_kind, MLP_KINDS)
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.post_norm and self.parallel_residual:
            raise ValueError("post_norm and parallel_residual cannot both be set")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
        if self.positions == "learned" and not _positive_int(self.max_positions):
            raise ValueError(
                f"max_positions must be a positive int with positions='learned', "
                f"got {self.max_positions!r}"
            )
        for name in ("head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def rotary(self) -> bool:
        return self.positions == "rotary"

    def rotary_dim(self, head_dim: int) -> int:
        """How many leading dims of each head rotary turns (even)."""
        rotated = int(head_dim * self.rotary_fraction)
        return rotated - rotated % 2

    def inverse_frequencies(self, head_dim: int) -> torch.Tensor:
        """float64 [rotary_dim / 2]: plane i turns by ``position * inv_freq[i]``."""
        rotated = self.rotary_dim(head_dim)
        # On the CPU, even under a meta device context: the rotary memo key reads it.
        planes = torch.arange(0, rotated, 2, dtype=torch.float64, device="cpu")
        base = torch.tensor(float(self.rotary_base), dtype=torch.float64, device="cpu")
        inv_freq = base.pow(-planes / rotated)
        scaling = self.rope_scaling or {}
        if _rope_type(scaling) == "llama3":
            inv_freq = _llama3_frequencies(inv_freq, scaling)
        return inv_freq


def make_norm(architecture: BlockArchitecture, dim: int) -> nn.Module:
    """The architecture's norm over ``dim`` features."""
    if architecture.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=architecture.norm_eps)
    return nn.LayerNorm(dim, eps=architecture.norm_eps, bias=architecture.norm_bias)


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def _check_rope_scaling(scaling) -> None:
    if not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling must be None or a dict, got {type(scaling).__name__}")
    rope_type = _rope_type(scaling)
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling rope_type {rope_type!r} is not implemented "
            f"(implemented: {', '.join(ROPE_TYPES)})"
        )
    if rope_type == "llama3":
        needed = ("factor", "low_freq_factor", "high_freq_factor")
        needed += ("original_max_position_embeddings",)
        missing = [key for key in needed if key not in scaling]
        if missing:
            raise ValueError(f"rope_scaling (llama3) lacks {', '.join(missing)}")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency scaling: long wavelengths slowed by ``factor``, short ones
    kept, the band between interpolated smoothly."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    slowed = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, blended, slowed)
