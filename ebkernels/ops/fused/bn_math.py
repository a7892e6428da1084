"""The per-channel and per-element BatchNorm + activation math of the fused int8 flow (SPEC §9), written
twice side by side: as Triton device functions for the kernels and as PyTorch for the references.
Both evaluate the same float32 operations in the same order, each rounded once (no fused
multiply-add: the kernels compile with fp fusion off), so the codes they produce are bit-identical
given the same per-channel inputs (SiLU's ``exp`` excepted: the kernels' and torch's may differ by one
float32 rounding, so a SiLU code may differ by one where z sits on a rounding boundary).

Per channel c (statistics of the conv output y over the N·H·W pixels, or the running ones in eval):

    rstd = 1 / sqrt(var + eps)        a = gamma * rstd        b = beta - mean * a
    t    = y * a + b                  z = act(t)

``act`` is one of ``ACTIVATIONS`` (the kernels' ``ACT`` constexpr is its index): identity, ReLU and ReLU6
(NaN kept, as torch's), SiLU ``t / (1 + exp(-t))`` and Hardswish ``t * clamp(t + 3, 0, 6) / 6``.

The scale of the next layer's codes from the per-channel extremes (``act_extreme``): rounding is
monotone, so over channel c the pre-activation t spans [tlo, thi], reached at ``ymin``/``ymax`` (swapped
when ``a < 0``). ReLU and ReLU6 are non-decreasing: ``max |z| = act(thi)`` exactly. Identity: ``max(|tlo|,
|thi|)`` exactly. SiLU and Hardswish fall to one interior minimum (SiLU at t = -1.27846, value -0.27846;
Hardswish at t = -1.5, value -0.375) and rise on both sides of it, so ``max |z|`` is the larger of
``|act(tlo)|``, ``|act(thi)|`` and, when the minimum lies inside [tlo, thi], its depth: exact except when
that depth is the largest and no element sits at the minimum; then it is an upper bound (codes never
saturate; the Shift scale differs only if the whole tensor's max |z| is below 2^-1.5, i.e. every element of
every channel is tiny; the absmax scale of SPEC §2 follows the bound, a little coarser than the tensor's own). The per-channel parameters travel as one float32 tensor ``bnp``
``[a, b, mean, rstd]`` (4, C).

Backward (batch statistics; ``n`` = N·H·W; eval: m1 = m2 = 0), with ``g = dz · act'(t)`` by torch's rules
(ReLU: ``threshold_backward``, NaN passes; ReLU6: ``hardtanh_backward``, 0 < t < 6; SiLU:
``s·(1 + t·(1 - s))`` with s = sigmoid(t); Hardswish: 0 below -3, ``t/3 + 1/2`` up to 3, 1 above),
``xhat = (y - mean) * rstd``:

    sums = [Σ g, Σ g·xhat]   (= dbeta, dgamma)      m1 = sums[0] / n      m2 = sums[1] / n
    dy   = a * ((g - m1) - xhat * m2)
"""
from __future__ import annotations

import torch

from ..._triton import tl, triton


__all__ = ["BNP_ROWS", "ACTIVATIONS", "act_code", "bn_finalize_channels", "bn_params", "act_apply", "act_grad",
           "bn_act", "act_extreme", "bn_grad_in", "momentum_arg", "bn_params_reference", "act_reference",
           "act_grad_reference", "bn_act_reference", "act_absmax_reference", "bn_grad_in_reference",
           "finalize_reference"]

BNP_ROWS = 4  # a, b, mean, rstd
# The activations a fused block applies after its BatchNorm; the position is the kernels' ACT constexpr.
ACTIVATIONS = ("identity", "relu", "relu6", "silu", "hardswish")
# Where SiLU / Hardswish reach their minimum (t, -value); ``act_extreme`` spells the same literals.
SILU_MIN_T, SILU_MIN_DEPTH = -1.2784645, 0.27846455
HARDSWISH_MIN_T, HARDSWISH_MIN_DEPTH = -1.5, 0.375


def act_code(act: str) -> int:
    """The kernels' ``ACT`` constexpr of an activation name (ValueError for an unknown one)."""
    try:
        return ACTIVATIONS.index(act)
    except ValueError:
        raise ValueError(f"activation {act!r} is not supported; accepted: {', '.join(ACTIVATIONS)}") from None


# ----- device functions -----------------------------------------------------------------------------
@triton.jit
def bn_params(mean, var, gamma, beta, eps):
    """(a, b, rstd) of ``z = y * a + b`` (float32, one rounding per operation)."""
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))  # plain "/" is approximate on NVIDIA GPUs
    a = gamma * rstd
    b = beta - mean * a
    return a, b, rstd


@triton.jit
def act_apply(t, ACT: tl.constexpr):
    """z = act(t) (see ``ACTIVATIONS``); NaN stays NaN."""
    if ACT == 1:
        z = tl.where(t < 0.0, 0.0, t)
    elif ACT == 2:
        z = tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t))
    elif ACT == 3:
        z = tl.math.div_rn(t, 1.0 + tl.exp(-t))  # plain "/" is approximate on NVIDIA GPUs
    elif ACT == 4:
        z = tl.math.div_rn(t * tl.minimum(tl.maximum(t + 3.0, 0.0), 6.0), 6.0)
    else:
        z = t
    return z


@triton.jit
def act_grad(t, dz, ACT: tl.constexpr):
    """dz · act'(t) by torch's backward rules (module docstring)."""
    if ACT == 1:
        g = tl.where(~(t <= 0.0), dz, 0.0)  # threshold_backward: NaN passes
    elif ACT == 2:
        g = tl.where((t > 0.0) & (t < 6.0), dz, 0.0)
    elif ACT == 3:
        s = tl.math.div_rn(1.0, 1.0 + tl.exp(-t))
        g = dz * (s * (1.0 + t * (1.0 - s)))
    elif ACT == 4:
        g = tl.where(t < -3.0, 0.0, tl.where(t <= 3.0, dz * (tl.math.div_rn(t, 3.0) + 0.5), dz))
    else:
        g = dz
    return g


@triton.jit
def bn_act(y, a, b, ACT: tl.constexpr):
    return act_apply(y * a + b, ACT)


@triton.jit
def act_extreme(ymax, ymin, a, b, ACT: tl.constexpr):
    """Per channel: the largest |z| over the channel, from its extremes (module docstring)."""
    thi = tl.where(a >= 0.0, ymax, ymin) * a + b
    if ACT == 1 or ACT == 2:
        z = act_apply(thi, ACT)
    else:
        tlo = tl.where(a >= 0.0, ymin, ymax) * a + b
        z = tl.maximum(tl.abs(act_apply(thi, ACT)), tl.abs(act_apply(tlo, ACT)))
        if ACT == 3:  # SILU_MIN_T, SILU_MIN_DEPTH (literals: Triton reads no Python globals)
            z = tl.where((tlo <= -1.2784645) & (thi >= -1.2784645), tl.maximum(z, 0.27846455), z)
        elif ACT == 4:  # HARDSWISH_MIN_T, HARDSWISH_MIN_DEPTH
            z = tl.where((tlo <= -1.5) & (thi >= -1.5), tl.maximum(z, 0.375), z)
        z = tl.where((a != a) | (b != b) | (ymax != ymax), float("nan"), z)
    return z


@triton.jit
def bn_grad_in(dz, y, a, b, mean, rstd, m1, m2, ACT: tl.constexpr):
    """(dy, g, xhat): the BatchNorm(+activation) input gradient and the two terms its sums are made of."""
    g = act_grad(y * a + b, dz, ACT)
    xhat = (y - mean) * rstd
    dy = a * ((g - m1) - xhat * m2)
    return dy, g, xhat


@triton.jit
def bn_finalize_channels(chan_ptr, C, col, col_ok, max_ok, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr, eps,
                         momentum, n, bnp_ptr, HAS_AFFINE: tl.constexpr, BATCH_STATS: tl.constexpr,
                         UPDATE: tl.constexpr, ACT: tl.constexpr):
    """Run once per channel by the program that merged the final statistics ``chan`` [mean, var, max,
    min] (4, C): writes ``bnp`` [a, b, mean, rstd] of the channels ``col_ok`` and returns the float32 bits
    of the largest ``act_extreme`` of those also in ``max_ok`` (the ones a channel gather keeps): the
    caller stores it for its column block (``_reduce.store_block_max``; the consumer takes the max: NaN wins). With ``UPDATE`` it moves
    the running statistics the way ``nn.BatchNorm2d`` does (``momentum < 0``: None, the cumulative average over
    ``num_batches_tracked + 1``; the counter itself is incremented by the apply kernel, which runs later)."""
    ymax = tl.load(chan_ptr + 2 * C + col, mask=col_ok, other=0.0)
    ymin = tl.load(chan_ptr + 3 * C + col, mask=col_ok, other=0.0)
    if BATCH_STATS:
        mean = tl.load(chan_ptr + col, mask=col_ok, other=0.0)
        var = tl.load(chan_ptr + C + col, mask=col_ok, other=1.0)
    else:
        mean = tl.load(rm_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + col, mask=col_ok, other=1.0).to(tl.float32)
    if HAS_AFFINE:
        gamma = tl.load(gamma_ptr + col, mask=col_ok, other=1.0).to(tl.float32)
        beta = tl.load(beta_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    else:
        gamma = tl.full(mean.shape, 1.0, tl.float32)
        beta = tl.zeros(mean.shape, tl.float32)
    a, b, rstd = bn_params(mean, var, gamma, beta, eps)
    tl.store(bnp_ptr + col, a, mask=col_ok)
    tl.store(bnp_ptr + C + col, b, mask=col_ok)
    tl.store(bnp_ptr + 2 * C + col, mean, mask=col_ok)
    tl.store(bnp_ptr + 3 * C + col, rstd, mask=col_ok)
    z = tl.where(col_ok & max_ok, act_extreme(ymax, ymin, a, b, ACT), 0.0)
    zbits = tl.max(tl.abs(z).to(tl.int32, bitcast=True), axis=0)
    if UPDATE:
        if momentum < 0:
            f = 1.0 / (tl.load(nbt_ptr) + 1).to(tl.float32)
        else:
            f = momentum
        unbiased = var * (n / tl.maximum(n - 1.0, 1.0))
        rm = tl.load(rm_ptr + col, mask=col_ok, other=0.0)
        rv = tl.load(rv_ptr + col, mask=col_ok, other=0.0)
        tl.store(rm_ptr + col, (f * mean + (1.0 - f) * rm.to(tl.float32)).to(rm.dtype), mask=col_ok)
        tl.store(rv_ptr + col, (f * unbiased + (1.0 - f) * rv.to(tl.float32)).to(rv.dtype), mask=col_ok)
    return zbits


def momentum_arg(momentum) -> float:
    """A BatchNorm's ``momentum`` as the kernels take it: -1 for None (cumulative average)."""
    return -1.0 if momentum is None else float(momentum)


# ----- PyTorch twins ---------------------------------------------------------------------------------
def bn_params_reference(mean, var, gamma, beta, eps: float) -> torch.Tensor:
    """``bnp`` = [a, b, mean, rstd] (4, C) float32, as ``bn_params``."""
    f32 = torch.float32
    mean, var = mean.to(f32), var.to(f32)
    # sqrt in float64 then rounded: the correctly rounded float32 sqrt (torch's CPU float32 sqrt is not
    # always), as the kernels' sqrt_rn
    rstd = 1.0 / torch.sqrt((var + torch.tensor(eps, dtype=f32)).double()).float()
    a = gamma.to(f32) * rstd
    b = beta.to(f32) - mean * a
    return torch.stack([a, b, mean, rstd])


def _col(v: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return v.view(shape)


def act_reference(t: torch.Tensor, act: str) -> torch.Tensor:
    """``act_apply`` in PyTorch (float32 in, float32 out, the same operations)."""
    if act == "relu":
        return torch.where(t < 0, torch.zeros_like(t), t)
    if act == "relu6":
        return torch.where(t < 0, torch.zeros_like(t), torch.where(t > 6, torch.full_like(t, 6.0), t))
    if act == "silu":
        return t / (1.0 + torch.exp(-t))
    if act == "hardswish":
        return t * torch.clamp(t + 3.0, 0.0, 6.0) / 6.0
    act_code(act)
    return t


def act_grad_reference(t: torch.Tensor, dz: torch.Tensor, act: str) -> torch.Tensor:
    """``act_grad`` in PyTorch."""
    zero = torch.zeros_like(dz)
    if act == "relu":
        return torch.where(~(t <= 0), dz, zero)
    if act == "relu6":
        return torch.where((t > 0) & (t < 6), dz, zero)
    if act == "silu":
        s = 1.0 / (1.0 + torch.exp(-t))
        return dz * (s * (1.0 + t * (1.0 - s)))
    if act == "hardswish":
        return torch.where(t < -3, zero, torch.where(t <= 3, dz * (t / 3.0 + 0.5), dz))
    act_code(act)
    return dz


def bn_act_reference(y: torch.Tensor, bnp: torch.Tensor, act: str, channel_dim: int = 1) -> torch.Tensor:
    """z (float32) from y of any float dtype, channel dim ``channel_dim``."""
    a, b = (_col(bnp[i], y.dim(), channel_dim) for i in (0, 1))
    return act_reference(y.float() * a + b, act)


_INTERIOR_MINIMUM = {"silu": (SILU_MIN_T, SILU_MIN_DEPTH), "hardswish": (HARDSWISH_MIN_T, HARDSWISH_MIN_DEPTH)}


def act_absmax_reference(ymax, ymin, bnp: torch.Tensor, act: str, keep=None) -> torch.Tensor:
    """0-dim float32: max over channels (those with ``keep >= 0`` when given) of ``act_extreme`` (NaN if
    any of them is NaN)."""
    a, b = bnp[0], bnp[1]
    if keep is not None:
        sel = keep >= 0
        ymax, ymin, a, b = ymax[sel], ymin[sel], a[sel], b[sel]
    thi = torch.where(a >= 0, ymax, ymin) * a + b
    if act in ("relu", "relu6"):
        z = act_reference(thi, act)
    else:
        tlo = torch.where(a >= 0, ymin, ymax) * a + b
        z = torch.maximum(act_reference(thi, act).abs(), act_reference(tlo, act).abs())
        if act in _INTERIOR_MINIMUM:
            t_min, depth = (torch.tensor(v, dtype=torch.float32) for v in _INTERIOR_MINIMUM[act])
            z = torch.where((tlo <= t_min) & (thi >= t_min), torch.maximum(z, depth), z)
        z = torch.where(a.isnan() | b.isnan() | ymax.isnan(), torch.full_like(z, float("nan")), z)
    if z.isnan().any():  # torch.amax propagates NaN too; spelled out for clarity
        return torch.tensor(float("nan"), device=z.device)
    return z.amax() if z.numel() else z.new_zeros(())


def bn_grad_in_reference(dz, y, bnp, sums, n: int, act: str, channel_dim: int = 1):
    """(dy float32, g, xhat) as ``bn_grad_in``; ``sums`` None: eval (m1 = m2 = 0)."""
    a, b, mean, rstd = (_col(bnp[i], y.dim(), channel_dim) for i in range(4))
    yf, dzf = y.float(), dz.float()
    g = act_grad_reference(yf * a + b, dzf, act)
    xhat = (yf - mean) * rstd
    if sums is None:
        m1 = m2 = torch.zeros((), dtype=torch.float32, device=y.device)
    else:
        m1 = _col(sums[0] / float(n), y.dim(), channel_dim)
        m2 = _col(sums[1] / float(n), y.dim(), channel_dim)
    dy = a * ((g - m1) - xhat * m2)
    return dy, g, xhat


def finalize_reference(chan, gamma, beta, running_mean, running_var, num_batches_tracked, momentum, eps: float,
                       n: int, batch_stats: bool, update: bool, act: str, keep=None):
    """``bn_finalize_channels`` in PyTorch: (bnp, zmax bits as int32 [1]); updates the running
    statistics in place when ``update`` (``num_batches_tracked`` is left to the apply step)."""
    C = chan.shape[1]
    if batch_stats:
        mean, var = chan[0], chan[1]
    else:
        mean, var = running_mean.float(), running_var.float()
    gamma = gamma if gamma is not None else torch.ones(C, device=chan.device)
    beta = beta if beta is not None else torch.zeros(C, device=chan.device)
    bnp = bn_params_reference(mean, var, gamma, beta, eps)
    zmax = act_absmax_reference(chan[2], chan[3], bnp, act, keep).abs().reshape(1).float()
    if update:
        f = (1.0 / (num_batches_tracked.double() + 1)) if momentum is None else float(momentum)
        unbiased = var.double() * (n / max(n - 1, 1))
        running_mean.copy_((f * mean.double() + (1 - f) * running_mean.double()).to(running_mean.dtype))
        running_var.copy_((f * unbiased + (1 - f) * running_var.double()).to(running_var.dtype))
    return bnp, zmax.view(torch.int32)
