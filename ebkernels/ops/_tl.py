"""``@triton.jit`` leaves every kernel shares (imports nothing of ops): index decode, divisibility hints,
exact casts and rounding. Host-side facts live in ``_launch``; reductions in ``_reduce``; the scale rule in
``_scale``.

Integer division here only ever sees non-negative operands (negative coordinates are clamped before
dividing), so C-style truncation on the GPU and in the interpreter agree with floor division.
"""
from __future__ import annotations

from .._triton import tl, triton

__all__ = ["assume_multiple", "assume_conv_operands", "to_bfloat16_rne", "cast_rne", "round_half_even",
           "decode_rows", "decode_tap", "tap_input_coord", "strided_offsets_4d", "elementwise_tile"]


@triton.jit
def assume_multiple(x, A: tl.constexpr):
    """``x``, which the launcher guarantees to be a multiple of ``A``, written as ``x // A * A`` (the same
    value) so the compiler knows its divisibility even for a kernel argument. ``A = 1``: unchanged."""
    if A > 1:
        x = x // A * A
    return x


@triton.jit
def assume_conv_operands(R, s_n, s_h, s_w, sw_col, sw_h, sw_w, ALIGN: tl.constexpr):
    """``assume_multiple`` on what every implicit-GEMM convolution launcher aligns: the source's channels
    per tap R, its pixel strides, the weight's column and tap strides."""
    return (assume_multiple(R, ALIGN), assume_multiple(s_n, ALIGN), assume_multiple(s_h, ALIGN),
            assume_multiple(s_w, ALIGN), assume_multiple(sw_col, ALIGN), assume_multiple(sw_h, ALIGN),
            assume_multiple(sw_w, ALIGN))


@triton.jit
def to_bfloat16_rne(x):
    """float32 -> bfloat16, round to nearest even (as ``torch.Tensor.to``; NaN -> the canonical quiet NaN).
    Spelled out in integer arithmetic: the interpreter's own cast truncates, a GPU's rounds; this gives
    the same bits on both."""
    bits = x.to(tl.uint32, bitcast=True)
    hi = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    hi = tl.where(x != x, 0x7FC0, hi).to(tl.uint16)
    return hi.to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """float32 ``x`` in ``dtype``, bfloat16 rounded to nearest even on every backend (``to_bfloat16_rne``)."""
    if dtype == tl.bfloat16:
        return to_bfloat16_rne(x)
    return x.to(dtype)


@triton.jit
def round_half_even(y):
    """``torch.round`` in float arithmetic that is exact for any float32 (no libdevice needed)."""
    r = tl.floor(y)
    frac = y - r  # exact
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def decode_rows(r, D1, D2):
    """Flat index ``r`` over a (D0, D1, D2) grid, last fastest -> (i0, i1, i2)."""
    i2 = r % D2
    t = r // D2
    return t // D1, t % D1, i2


@triton.jit
def decode_tap(t, KW):
    """Kernel tap index ``t`` (row-major over KH×KW) -> (kh, kw)."""
    kh = t // KW
    return kh, t - kh * KW


@triton.jit
def tap_input_coord(o, t, stride, pad, dil):
    """Input coordinate read by output coordinate ``o`` at kernel tap ``t`` (may fall in the padding)."""
    return o * stride - pad + t * dil


@triton.jit
def strided_offsets_4d(idx, d1, d2, d3, s0, s1, s2, s3):
    """Memory offsets of linear indices ``idx`` over a (d0, d1, d2, d3) view with strides s0..s3."""
    i3 = idx % d3
    t = idx // d3
    i2 = t % d2
    t = t // d2
    i1 = t % d1
    i0 = t // d1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def elementwise_tile(M, C, BP: tl.constexpr, CB: tl.constexpr):
    """This program's tile of a (rows, channels) grid: (pid_m, pid_n, rows, channels, row mask, channel mask)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BP + tl.arange(0, BP)
    c = pid_n * CB + tl.arange(0, CB)
    return pid_m, pid_n, m, c, m < M, c < C
