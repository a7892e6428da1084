"""The per-tensor scale rule of SPEC §2, once for the kernels and once for the references (a leaf).

``s = Shift(max|x|) = 2**round(log2(max|x|))``, or the fixed scale 1 (WAGE mode). Shift is computed exactly
from the float's exponent and mantissa (``log2(m)`` rounds up exactly when the mantissa exceeds sqrt(2));
a float ``log2`` followed by ``round`` can misround next to ``sqrt(2)·2^e``. The exponent of ``s`` is
clamped to [-126, 127] so every finite input has a finite, normal scale; an all-zero tensor gets
``s = 1``; NaN / inf pass through (then dequantized values are NaN/inf, never silently finite).

``codes_of``: the codes of values with a given scale (nearest or stochastic), for every kernel that writes
codes the quantizer could have written.

The kernels carry max|x| as float32 *bits* (non-negative floats order like their bits, NaN above inf):
an integer max is order-free and propagates NaN.
"""
from __future__ import annotations

import math

import torch

from .._rng import uniform
from .._triton import tl, triton
from ._tl import round_half_even

__all__ = ["shift_scale_reference", "scale_reference", "shift_scale_from_bits", "codes_of"]

_MANT_SQRT2 = 0x3504F3  # mantissa bits of float32(sqrt(2)) = 1.41421354 < sqrt(2)


def shift_scale_reference(amax: torch.Tensor) -> torch.Tensor:
    """``2**round(log2(amax))`` as float32, exactly; 0 -> 1; NaN/inf pass through."""
    amax = amax.float()
    frac, exp = torch.frexp(amax)  # amax = frac * 2**exp, frac in [0.5, 1)
    k = exp - 1 + (2.0 * frac.double() > math.sqrt(2.0)).to(exp.dtype)
    s = torch.ldexp(torch.ones_like(amax), k.clamp(-126, 127))
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return torch.where(torch.isfinite(amax), s, amax)


def scale_reference(amax: torch.Tensor, fixed_scale: bool) -> torch.Tensor:
    """The scale of a tensor whose max |x| is ``amax``: ``shift_scale_reference``, or 1 (``fixed_scale``;
    NaN/inf still pass)."""
    if fixed_scale:
        return torch.where(torch.isfinite(amax), torch.ones_like(amax), amax)
    return shift_scale_reference(amax)


@triton.jit
def shift_scale_from_bits(bits, FIXED_SCALE: tl.constexpr):
    """``scale_reference`` from the float32 bits of a non-negative amax: ``round(log2)`` from exponent and
    mantissa (up exactly when the mantissa exceeds sqrt(2)), exponent clamped to [-126, 127]; 0 -> 1,
    NaN/inf pass through. ``FIXED_SCALE``: 1 (NaN/inf still pass)."""
    amax = bits.to(tl.float32, bitcast=True)
    finite = (bits >> 23) < 255
    if FIXED_SCALE:
        scale = tl.where(finite, 1.0, amax)
    else:
        k = (bits >> 23) - 127 + ((bits & 0x7FFFFF) > 0x3504F3).to(tl.int32)
        k = tl.minimum(tl.maximum(k, -126), 127)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(bits == 0, 1.0, scale)
        scale = tl.where(finite, scale, amax)
    return scale


@triton.jit
def codes_of(x, scale, seed, ticket, lidx, BITS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The codes (as float32 integers) of values ``x`` with scale ``scale``: ``round(clip(x / s) * S)``, or
    ``floor(clip(x / s) * S + u)`` with u the Philox number of (seed, ticket) at the logical row-major index
    ``lidx`` (``STOCHASTIC``); NaN -> 0. Every kernel that writes codes of a tensor the quantizer could
    have written uses this (the weight-grad's fused G quantization too)."""
    S: tl.constexpr = 2.0 ** (BITS - 1)
    y = tl.math.div_rn(x.to(tl.float32), scale) * S
    y = tl.minimum(tl.maximum(y, -(S - 1.0)), S - 1.0)
    if STOCHASTIC:
        y = tl.floor(y + uniform(seed, ticket, lidx))
    else:
        y = round_half_even(y)
    return tl.where(y != y, 0.0, y)  # NaN -> 0 (min/max above may or may not have kept it)
