"""The row-wise part of the fused linear cross-entropy, in Triton: loss and grad_logits in place.

The op (``metalm_fast.ops.fused_linear_cross_entropy``) runs the matmuls in
torch (cuBLAS) one row chunk at a time; for each ``[rows, V]`` fp32 logits
chunk this kernel computes, per row ``r`` with label ``y``::

    z   = logits[r] + bias                       (HAS_BIAS)
    x   = softcap * tanh(z / softcap)            (HAS_SOFTCAP; else x = z)
    lse = log sum_j exp(x_j)
    loss[r] = lse - (1 - eps) x_y - (eps / V) sum_j x_j + z_loss lse^2
    logits[r, j] <- grad_scale * dloss/dz_j      (WRITE_GRAD)
                  = grad_scale * (p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j = y])
                               * (1 - (x_j / softcap)^2)          (the tanh chain, HAS_SOFTCAP)

with ``p = softmax(x)`` and ``eps`` the label smoothing (F.cross_entropy's
definition). One program per row: a first sweep over V in BLOCK_V blocks keeps
an online max and rescaled sum (and the sum of x for smoothing); a second
sweep rewrites each block of the row with its gradient, so the chunk buffer is
the gradient buffer and no second [rows, V] tensor exists. The row's loss is
combined from its scalars (m, s, x_y, sum x) in fp64 and rounded once.

Non-finite values follow the float math of the formula above: a NaN or +inf
logit in a row makes that row's loss and gradients NaN (the exponentials of
inf - inf), as eager ``F.cross_entropy`` does; a -inf logit only contributes
exp(-inf) = 0. Rows never mix, so a bad row touches no other row.

``tanh`` is written with ``exp`` (plus an odd Taylor polynomial near 0, where
``1 - exp(-2|u|)`` would cancel): libdevice's tanh does not run under the
Triton interpreter that the CPU test suite uses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import KernelConfig, triton_signature

#: (BLOCK_V, num_warps) the launcher picks: small vocabularies take the small block
#: (less masked work); large ones the wide block (fewer sweep iterations).
SMALL_VOCAB = 4096
BLOCKS = {"small": (1024, 4), "large": (2048, 8)}


#: Taylor coefficients of tanh(a) / a in a^2 (from the Bernoulli numbers): nine terms
#: leave < 5e-9 relative error for |a| < TANH_POLY_LIMIT, under fp32's 6e-8.
#: (constexpr: a @triton.jit function may read only constexpr globals.)
TANH_POLY_LIMIT = tl.constexpr(0.55)
C1 = tl.constexpr(-1.0 / 3.0)
C2 = tl.constexpr(2.0 / 15.0)
C3 = tl.constexpr(-17.0 / 315.0)
C4 = tl.constexpr(62.0 / 2835.0)
C5 = tl.constexpr(-1382.0 / 155925.0)
C6 = tl.constexpr(21844.0 / 6081075.0)
C7 = tl.constexpr(-929569.0 / 638512875.0)
C8 = tl.constexpr(6404582.0 / 10854718875.0)


@triton.jit
def _tanh(u):
    """tanh(u) in fp32 from exp, to about an ulp, with no libdevice.

    Far from 0, (1 - e) / (1 + e) with e = exp(-2|u|); near 0, where 1 - e would
    cancel (|u| < 0.55: e > 1/3), the odd Taylor polynomial.
    """
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    poly = C8
    poly = poly * a2 + C7
    poly = poly * a2 + C6
    poly = poly * a2 + C5
    poly = poly * a2 + C4
    poly = poly * a2 + C3
    poly = poly * a2 + C2
    poly = poly * a2 + C1
    near = a + a * (a2 * poly)
    t = tl.where(a < TANH_POLY_LIMIT, near, far)
    return tl.where(u < 0, -t, t)


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """(x, t): the logits after the cap, and tanh(z / softcap) (1 when no cap)."""
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        return softcap * t, t
    else:
        return z, z


@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    labels_ptr,
    bias_ptr,
    loss_ptr,
    vocab,
    stride_row,
    label_smoothing,
    z_loss,
    softcap,
    grad_scale,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: loss[row] and (WRITE_GRAD) the row's grad_logits over its logits."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)  # in [0, V): the op checks labels on the host
    offsets = tl.arange(0, BLOCK_V)

    # Sweep 1: online max m and sum s of exp(x - m); m_safe keeps -inf - -inf out.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    sum_x = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offsets
        inside = cols < vocab
        z = tl.load(base + cols, mask=inside, other=0.0)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=inside, other=0.0)
        x, _ = _capped(z, softcap, HAS_SOFTCAP)
        x = tl.where(inside, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
        sum_x += tl.sum(tl.where(inside, x, 0.0), axis=0)

    z_label = tl.load(base + label)
    if HAS_BIAS:
        z_label += tl.load(bias_ptr + label)
    x_label, _ = _capped(z_label, softcap, HAS_SOFTCAP)
    # loss = log(s) + (1 - eps)(m - x_y) + eps (m - mean x) + z lse^2: a few scalars per
    # row, combined in fp64 and rounded once (fp32 would round each of the four terms).
    m64 = m.to(tl.float64)
    log_s = tl.log(s.to(tl.float64))
    lse64 = m64 + log_s
    loss = log_s + (1.0 - label_smoothing) * (m64 - x_label.to(tl.float64))
    loss += z_loss * lse64 * lse64
    if label_smoothing > 0:  # 0 * sum_x would turn a -inf logit into NaN
        loss += label_smoothing * (m64 - sum_x.to(tl.float64) / vocab)
    lse = lse64.to(tl.float32)
    tl.store(loss_ptr + row, loss.to(tl.float32))

    if WRITE_GRAD:
        # Sweep 2: overwrite each block with its gradient (read before written);
        # p = exp(x - m) / s, not exp(x - lse): lse's rounding would scale every p.
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p_scale = (1.0 + 2.0 * z_loss * lse) * grad_scale / s
        uniform = grad_scale * label_smoothing / vocab
        onehot = grad_scale * (1.0 - label_smoothing)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            inside = cols < vocab
            z = tl.load(base + cols, mask=inside, other=0.0)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=inside, other=0.0)
            x, t = _capped(z, softcap, HAS_SOFTCAP)
            grad = tl.exp(x - m_safe) * p_scale - uniform
            grad -= tl.where(cols == label, onehot, 0.0)
            if HAS_SOFTCAP:
                grad *= 1.0 - t * t
            tl.store(base + cols, grad, mask=inside)


# --------------------------------------------------------------------------- launcher
def block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary: one of ``BLOCKS``, nothing else."""
    return BLOCKS["small"] if vocab <= SMALL_VOCAB else BLOCKS["large"]


def cross_entropy_rows_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    loss: torch.Tensor,
    *,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: float,
    write_grad: bool,
) -> None:
    """Row losses into ``loss`` and, with ``write_grad``, grad_logits over ``logits``.

    logits : fp32 [R, V], unit stride in V (overwritten when ``write_grad``).
    labels : int64 [R], every entry in [0, V). bias : fp32 [V] or None.
    loss : fp32 [R], written. Inputs are checked by the caller.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    block_v, num_warps = block_config(vocab)
    _ce_rows_kernel[(rows,)](
        logits,
        labels,
        bias if bias is not None else loss,  # never read without HAS_BIAS
        loss,
        vocab,
        logits.stride(0),
        float(label_smoothing),
        float(z_loss),
        float(softcap or 0.0),
        float(grad_scale),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


# --------------------------------------------------------------------------- AOT configs
_POINTERS = {"labels_ptr": "*i64"}  # logits, bias and loss are fp32 whatever the inputs
_SCALARS = {name: "fp32" for name in ("label_smoothing", "z_loss", "softcap", "grad_scale")}


def shipped_configs() -> list[KernelConfig]:
    """Every (BLOCK_V, num_warps) x bias x softcap x grad variant, for sm_80 and sm_90.

    The kernel only ever sees fp32 buffers (the op widens bias and accumulates the
    logits in fp32), so there is one dtype; no tl.dot (the matmuls are torch's).
    """
    signature = triton_signature(
        _ce_rows_kernel, torch.float32, pointers=_POINTERS, scalars=_SCALARS
    )
    configs = []
    for arch in (80, 90):
        for block_v, num_warps in BLOCKS.values():
            for has_bias in (False, True):
                for has_softcap in (False, True):
                    for write_grad in (True, False):
                        constexprs = {
                            "HAS_BIAS": has_bias,
                            "HAS_SOFTCAP": has_softcap,
                            "WRITE_GRAD": write_grad,
                            "BLOCK_V": block_v,
                        }
                        flags = [
                            name
                            for name, on in (
                                ("bias", has_bias),
                                ("softcap", has_softcap),
                                ("grad", write_grad),
                            )
                            if on
                        ]
                        configs.append(
                            KernelConfig(
                                kernel=_ce_rows_kernel,
                                op="fused_linear_cross_entropy",
                                pass_name="fwd_grad" if write_grad else "fwd",
                                arch=arch,
                                signature=signature,
                                constexprs=constexprs,
                                num_warps=num_warps,
                                num_stages=1,
                                uses_matmul=False,
                                label=f"fp32 BLOCK_V={block_v} warps={num_warps} "
                                + ("+".join(flags) or "plain"),
                            )
                        )
    return configs
