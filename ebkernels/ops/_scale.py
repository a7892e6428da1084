"""The per-tensor scale rule of SPEC §2, once for the kernels and once for the references (a leaf).

Three modes (``SCALE_MODES``: the name in Python, the number a kernel's ``SCALE_MODE`` constexpr takes):

- ``shift`` (0): ``s = Shift(max|x|) = 2**round(log2(max|x|))``, computed exactly from the float's exponent
  and mantissa (``log2(m)`` rounds up exactly when the mantissa exceeds sqrt(2)); a float ``log2``
  followed by ``round`` can misround next to ``sqrt(2)·2^e``. Exponent clamped to [-126, 127].
- ``wage`` (1): the fixed scale 1 (WAGE's W and A).
- ``absmax`` (2): ``s = max|x|·S/(S−1)`` (S = 2**(bits−1)), so that max|x| maps to code S−1 and nothing
  saturates. Why not a power of two: ``Shift`` rounds max|x| to the nearest power of two, so up to 29 %
  of the range above ``s·(S−1)/S`` is clipped (measured: 4.9 % of conv1's weights, 7 % of its inputs);
  ``ceil`` instead would waste up to one bit. Float32 arithmetic, the same in kernel and reference: one
  correctly rounded division ``amax / ((S−1)/S)`` (``(S−1)/S`` is exact in float32; the quotient equals
  the correctly rounded ``(amax·S)/(S−1)``, without the overflow of ``amax·S``), clamped to
  [2^-126, FLT_MAX]. The codes ``round(clip(fl(x/s)·S))`` then put ±max|x| at ±(S−1) exactly (the
  quotient is within 2 ulp of (S−1)/S, far from a rounding boundary).

Every mode: an all-zero tensor gets ``s = 1`` (codes 0); NaN / inf pass through as the scale (then
dequantized values are NaN/inf, never silently finite).

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

__all__ = ["SCALE_MODES", "scale_mode_code", "shift_scale_reference", "absmax_scale_reference", "scale_reference",
           "scale_from_bits", "codes_of"]

SCALE_MODES = {"shift": 0, "wage": 1, "absmax": 2}
_MANT_SQRT2 = 0x3504F3  # mantissa bits of float32(sqrt(2)) = 1.41421354 < sqrt(2)
_MIN_NORMAL = 2.0 ** -126
_FLT_MAX = 3.4028234663852886e38


def scale_mode_code(mode: str) -> int:
    """The kernels' ``SCALE_MODE`` of a mode name."""
    return SCALE_MODES[mode]


def shift_scale_reference(amax: torch.Tensor) -> torch.Tensor:
    """``2**round(log2(amax))`` as float32, exactly; 0 -> 1; NaN/inf pass through."""
    amax = amax.float()
    frac, exp = torch.frexp(amax)  # amax = frac * 2**exp, frac in [0.5, 1)
    k = exp - 1 + (2.0 * frac.double() > math.sqrt(2.0)).to(exp.dtype)
    s = torch.ldexp(torch.ones_like(amax), k.clamp(-126, 127))
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return torch.where(torch.isfinite(amax), s, amax)


def absmax_scale_reference(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """``amax·S/(S−1)`` in float32 (one correctly rounded division), clamped to [2^-126, FLT_MAX];
    0 -> 1; NaN/inf pass through."""
    amax = amax.float()
    S = 2.0 ** (bits - 1)
    s = amax / torch.tensor((S - 1.0) / S, dtype=torch.float32, device=amax.device)
    s = s.clamp(_MIN_NORMAL, _FLT_MAX)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return torch.where(torch.isfinite(amax), s, amax)


def scale_reference(amax: torch.Tensor, mode: str = "shift", bits: int = 8) -> torch.Tensor:
    """The scale of a tensor whose max |x| is ``amax`` in ``mode`` (module docstring)."""
    if mode == "wage":
        return torch.where(torch.isfinite(amax), torch.ones_like(amax), amax)
    if mode == "absmax":
        return absmax_scale_reference(amax, bits)
    return shift_scale_reference(amax)


@triton.jit
def scale_from_bits(bits, SCALE_MODE: tl.constexpr, BITS: tl.constexpr):
    """``scale_reference`` from the float32 bits of a non-negative amax. ``SCALE_MODE`` 0 (shift):
    ``round(log2)`` from exponent and mantissa (up exactly when the mantissa exceeds sqrt(2)), exponent
    clamped to [-126, 127]; 1 (wage): 1; 2 (absmax): ``div_rn(amax, (S−1)/S)`` clamped to [2^-126,
    FLT_MAX]. 0 -> 1 and NaN/inf pass through in every mode."""
    amax = bits.to(tl.float32, bitcast=True)
    finite = (bits >> 23) < 255
    if SCALE_MODE == 1:
        scale = tl.where(finite, 1.0, amax)
    elif SCALE_MODE == 2:
        S: tl.constexpr = 2.0 ** (BITS - 1)
        R: tl.constexpr = (S - 1.0) / S  # exact in float32
        scale = tl.math.div_rn(amax, R)  # "/" is approximate on NVIDIA GPUs
        scale = tl.minimum(tl.maximum(scale, 1.1754943508222875e-38), 3.4028234663852886e38)
        scale = tl.where(bits == 0, 1.0, scale)
        scale = tl.where(finite, scale, amax)
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
