"""WAGE-style per-tensor quantizer (SPEC §2): absmax -> power-of-two scale -> int8 codes.

``q = round(clip(x / s) * S)`` with ``S = 2**(bits-1)``, ``clip`` to ``±(1 - 1/S)``, so the codes lie in
``[-(S-1), S-1]``; ``s = Shift(max|x|) = 2**round(log2(max|x|))`` or the fixed scale 1 (``fixed_scale``,
WAGE mode). The value a code stands for is ``q * s / S``.

Shift is computed exactly from the float's exponent and mantissa (``log2(m)`` rounds up exactly when
the mantissa exceeds sqrt(2)); a float ``log2`` followed by ``round`` can misround next to
``sqrt(2)·2^e``. The exponent of ``s`` is clamped to [-126, 127] so every finite input has a finite,
normal scale; an all-zero tensor gets ``s = 1``.

Non-finite input: ``max|x|`` is NaN when ``x`` holds a NaN and +inf when it holds an inf (as
``torch.amax`` gives), and the scale takes that value, in every mode; codes are 0 wherever ``x / s``
is NaN. Dequantizing then yields NaN/inf instead of silently finite numbers.

Two implementations, one contract: ``quantize_reference`` (PyTorch; the oracle and the CPU path) and
two Triton kernels (absmax with an integer atomic max, then scale + codes). The scale stays a device
tensor: nothing is read back to the host.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import use_triton
from .._checks import check_bits, check_choice, check_tensor
from .._registry import aot_kernel

__all__ = ["quantize", "dequantize", "padded_channels", "quantize_reference", "quantize_triton", "shift_scale_reference"]

_MANT_SQRT2 = 0x3504F3  # mantissa bits of float32(sqrt(2)) = 1.41421354 < sqrt(2)


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch)
# --------------------------------------------------------------------------------------------------
def shift_scale_reference(amax: torch.Tensor) -> torch.Tensor:
    """``2**round(log2(amax))`` as float32, exactly; 0 -> 1; NaN/inf pass through."""
    amax = amax.float()
    frac, exp = torch.frexp(amax)  # amax = frac * 2**exp, frac in [0.5, 1)
    k = exp - 1 + (2.0 * frac.double() > math.sqrt(2.0)).to(exp.dtype)
    s = torch.ldexp(torch.ones_like(amax), k.clamp(-126, 127))
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return torch.where(torch.isfinite(amax), s, amax)


def _codes_reference(v: torch.Tensor, bits: int, noise: torch.Tensor | None) -> torch.Tensor:
    """Codes from ``v = x / s`` (float32)."""
    S = float(2 ** (bits - 1))
    y = (v * S).clamp(-(S - 1), S - 1)
    y = torch.floor(y + noise) if noise is not None else torch.round(y)
    return torch.nan_to_num(y, nan=0.0).to(torch.int8)


def quantize_reference(x: torch.Tensor, bits: int = 8, stochastic: bool = False,
                       fixed_scale: bool = False, seed: int = 0):
    """PyTorch reference: ``(codes int8 like x, scale 0-dim float32)``."""
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    if fixed_scale:
        s = torch.where(torch.isfinite(amax), torch.ones_like(amax), amax)
    else:
        s = shift_scale_reference(amax)
    noise = None
    if stochastic:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.rand(xf.shape, generator=gen, device=x.device, dtype=torch.float32)
    codes = _codes_reference(xf / s, bits, noise)
    return codes, s


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
def _block(linear: bool) -> int:
    """Elements per program: the strided index decode needs int64 registers per element, so the
    strided variants take half the block of the linear ones (no register spills at 8 warps)."""
    return 2048 if linear else 1024


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
def round_half_even(y):
    """``torch.round`` in float arithmetic that is exact for any float32 (no libdevice needed)."""
    r = tl.floor(y)
    frac = y - r  # exact
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@aot_kernel(signature={"x_ptr": "*fp32", "amax_bits_ptr": "*i32", "n": "i64", "d1": "i64",
                       "d2": "i64", "d3": "i64", "s0": "i64", "s1": "i64", "s2": "i64", "s3": "i64"},
            constexprs=[{"DENSE": True, "BLOCK": 2048}, {"DENSE": False, "BLOCK": 1024}],
            num_warps=8, aligned=("x_ptr",))
@triton.jit
def quantize_absmax_kernel(x_ptr, amax_bits_ptr, n, d1, d2, d3, s0, s1, s2, s3, DENSE: tl.constexpr,
                           BLOCK: tl.constexpr):
    """``max|x|`` of a strided tensor as float32 bits, combined across programs by an int atomic max.

    The bits of a non-negative float order like the float itself, and NaN's bits exceed inf's, so the
    integer max propagates NaN the way ``torch.amax`` does.
    """
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    if DENSE:  # any order is fine for a max: read the storage linearly
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    else:
        x = tl.load(x_ptr + strided_offsets_4d(idx, d1, d2, d3, s0, s1, s2, s3), mask=mask, other=0.0)
    bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)
    tl.atomic_max(amax_bits_ptr, tl.max(bits, axis=0))


@aot_kernel(signature={"x_ptr": "*fp32", "amax_bits_ptr": "*i32", "codes_ptr": "*i8",
                       "scale_ptr": "*fp32", "n": "i64", "d1": "i64", "d2": "i64", "d3": "i64",
                       "s0": "i64", "s1": "i64", "s2": "i64", "s3": "i64", "o0": "i64", "o1": "i64",
                       "o2": "i64", "o3": "i64", "seed": "i32"},
            constexprs=[{"BITS": 8, "STOCHASTIC": s, "FIXED_SCALE": False, "SAME_ORDER": o,
                         "BLOCK": _block(o)}
                        for s in (False, True) for o in (True, False)],
            num_warps=8, aligned=("x_ptr", "codes_ptr"))
@triton.jit
def quantize_codes_kernel(x_ptr, amax_bits_ptr, codes_ptr, scale_ptr, n, d1, d2, d3, s0, s1, s2, s3,
                          o0, o1, o2, o3, seed, BITS: tl.constexpr, STOCHASTIC: tl.constexpr,
                          FIXED_SCALE: tl.constexpr, SAME_ORDER: tl.constexpr, BLOCK: tl.constexpr):
    """Scale from the absmax bits, then codes written in the output's own (possibly NHWC) layout."""
    S: tl.constexpr = 2.0 ** (BITS - 1)
    bits = tl.load(amax_bits_ptr)
    amax = bits.to(tl.float32, bitcast=True)
    finite = (bits >> 23) < 255
    if FIXED_SCALE:
        scale = tl.where(finite, 1.0, amax)
    else:
        # round(log2(amax)) from exponent and mantissa: up exactly when mantissa > sqrt(2)
        k = (bits >> 23) - 127 + ((bits & 0x7FFFFF) > 0x3504F3).to(tl.int32)
        k = tl.minimum(tl.maximum(k, -126), 127)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(bits == 0, 1.0, scale)
        scale = tl.where(finite, scale, amax)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(scale_ptr, scale)

    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    if SAME_ORDER:  # input and output dense in one order: no index decode
        x_offs = idx
        out_offs = idx
    else:
        x_offs = strided_offsets_4d(idx, d1, d2, d3, s0, s1, s2, s3)
        out_offs = strided_offsets_4d(idx, d1, d2, d3, o0, o1, o2, o3)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    y = tl.math.div_rn(x.to(tl.float32), scale) * S
    y = tl.minimum(tl.maximum(y, -(S - 1.0)), S - 1.0)
    if STOCHASTIC:
        y = tl.floor(y + tl.rand(seed, idx))
    else:
        y = round_half_even(y)
    y = tl.where(y != y, 0.0, y)  # NaN -> 0 (min/max above may or may not have kept it)
    tl.store(codes_ptr + out_offs, y.to(tl.int8), mask=mask)


def _as_4d(t: torch.Tensor):
    """Sizes and strides of ``t`` padded to 4 dims (leading 1s); ``None`` if it has more dims."""
    if t.dim() > 4:
        return None
    pad = 4 - t.dim()
    return [1] * pad + list(t.shape), [0] * pad + list(t.stride())


def _is_dense(sizes, strides) -> bool:
    """True when (sizes, strides), dims ordered outermost first, is a contiguous row-major block."""
    expect = 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


def quantize_triton(x: torch.Tensor, bits: int = 8, stochastic: bool = False, fixed_scale: bool = False,
                    seed: int = 0, out: torch.Tensor | None = None):
    """Triton path. ``out``: an int8 tensor of x's shape with any strides (e.g. channels-last, or a view
    into a channel-padded buffer) to write the codes into."""
    if out is None:
        out = torch.empty_like(x, dtype=torch.int8)
    if x.dim() > 4:
        if not (x.is_contiguous() and out.is_contiguous()):
            raise ValueError("quantize: tensors with more than 4 dims must be contiguous")
        x, out_view = x.view(-1), out.view(-1)
    else:
        out_view = out
    n = x.numel()
    scale = torch.empty((), device=x.device, dtype=torch.float32)
    amax_bits = torch.zeros(1, device=x.device, dtype=torch.int32)
    if n == 0:
        scale.fill_(1.0)
        return out, scale
    # iterate in the output's memory order so the int8 stores are contiguous
    sizes, xs = _as_4d(x)
    _, os_ = _as_4d(out_view)
    order = sorted(range(4), key=lambda d: (-os_[d], -d)) if out_view.dim() else [0, 1, 2, 3]
    sizes = [sizes[d] for d in order]
    xs = [xs[d] for d in order]
    os_ = [os_[d] for d in order]
    dense = _is_dense(sizes, xs)
    same_order = dense and _is_dense(sizes, os_) and xs == os_
    block = _block(dense)
    quantize_absmax_kernel[(triton.cdiv(n, block),)](x, amax_bits, n, sizes[1], sizes[2], sizes[3], *xs,
                                                     DENSE=dense, BLOCK=block, num_warps=8)
    block = _block(same_order)
    quantize_codes_kernel[(triton.cdiv(n, block),)](x, amax_bits, out_view, scale, n, sizes[1], sizes[2],
                                                    sizes[3], *xs, *os_, seed, BITS=bits,
                                                    STOCHASTIC=stochastic, FIXED_SCALE=fixed_scale,
                                                    SAME_ORDER=same_order, BLOCK=block, num_warps=8)
    return out, scale


# --------------------------------------------------------------------------------------------------
# Public op (registered with torch.library so torch.compile can trace it)
# --------------------------------------------------------------------------------------------------
def _empty_codes(shape, device) -> torch.Tensor:
    """The channel-padded NHWC code buffer (the tests poison it: the pad must be written explicitly)."""
    return torch.empty(shape, dtype=torch.int8, device=device, memory_format=torch.channels_last)


def padded_channels(channels: int, multiple: int) -> int:
    """``channels`` rounded up to a multiple of ``multiple`` (unchanged for ``multiple <= 1``)."""
    return channels if multiple <= 1 else -(-channels // multiple) * multiple


@torch.library.custom_op("ebkernels::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, bits: int, stochastic: bool, fixed_scale: bool, seed: int,
                 channels_last: bool, pad_channels_to: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if pad_channels_to > 1:  # (N, Cp, H, W) NHWC codes, Cp = C rounded up; channels >= C are 0
        N, C, H, W = x.shape
        codes = _empty_codes((N, padded_channels(C, pad_channels_to), H, W), x.device)
        real = codes[:, :C]
        if use_triton(x):
            _, s = quantize_triton(x, bits, stochastic, fixed_scale, seed, out=real)
        else:
            q, s = quantize_reference(x, bits, stochastic, fixed_scale, seed)
            real.copy_(q)
        codes[:, C:].zero_()  # after (and outside) the absmax over the real tensor: 0 adds 0 to every sum
        return codes, s
    if use_triton(x):
        out = None
        if channels_last:
            out = torch.empty_like(x, dtype=torch.int8, memory_format=torch.channels_last)
        return quantize_triton(x, bits, stochastic, fixed_scale, seed, out=out)
    codes, s = quantize_reference(x, bits, stochastic, fixed_scale, seed)
    if channels_last:
        codes = codes.contiguous(memory_format=torch.channels_last)
    return codes, s


@_quantize_op.register_fake
def _(x, bits, stochastic, fixed_scale, seed, channels_last, pad_channels_to=0):
    if pad_channels_to > 1:
        N, C, H, W = x.shape
        codes = torch.empty((N, padded_channels(C, pad_channels_to), H, W), dtype=torch.int8, device=x.device,
                            memory_format=torch.channels_last)
        return codes, x.new_empty((), dtype=torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    codes = torch.empty_like(x, dtype=torch.int8, memory_format=fmt)
    return codes, x.new_empty((), dtype=torch.float32)


def quantize(x: torch.Tensor, bits: int = 8, rounding: str = "nearest", mode: str = "shift",
             seed: int | None = None, channels_last: bool = False, pad_channels_to: int = 0):
    """Quantize ``x`` to ``bits``-bit integer codes with a power-of-two scale (SPEC §2).

    Returns ``(codes, scale)``: int8 codes of x's shape and a 0-dim float32 tensor on x's device.
    ``rounding``: "nearest" (half to even) or "stochastic" (``floor(x*S/s + u)``, u ~ U[0,1), drawn from
    ``seed``; the same seed gives the same codes). ``mode``: "shift" (``s = Shift(max|x|)``) or "wage"
    (``s = 1``). ``channels_last=True`` writes the codes of a 4-D tensor in NHWC memory order.
    ``pad_channels_to`` (> 1, needs ``channels_last``): the codes come back as (N, Cp, H, W) in NHWC order
    with ``Cp`` = C rounded up to that multiple and channels ``>= C`` equal to 0 (the scale is the one of
    x itself): 16-byte aligned pixel rows for the int8 kernels, at ``Cp - C`` extra bytes per pixel.
    """
    check_tensor("x", x)
    check_bits("bits", bits)
    check_choice("rounding", rounding, ("nearest", "stochastic"))
    check_choice("mode", mode, ("shift", "wage"))
    if channels_last and x.dim() != 4:
        raise ValueError(f"channels_last=True needs a 4-D tensor, got {x.dim()}-D shape {tuple(x.shape)}")
    if isinstance(pad_channels_to, bool) or not isinstance(pad_channels_to, int) or pad_channels_to < 0:
        raise ValueError(f"pad_channels_to={pad_channels_to!r} is not supported; accepted: an int >= 0")
    if pad_channels_to > 1 and not channels_last:
        raise ValueError("pad_channels_to needs channels_last=True (a 4-D tensor written in NHWC order)")
    stochastic = rounding == "stochastic"
    if seed is None:
        # drawn on the host generator: no device synchronisation
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if stochastic else 0
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed!r} is not supported; accepted: None or an int in [0, 2**31)")
    if pad_channels_to > 1:
        return _quantize_op(x, bits, stochastic, mode == "wage", seed, channels_last, pad_channels_to)
    return _quantize_op(x, bits, stochastic, mode == "wage", seed, channels_last)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``codes * scale / 2**(bits-1)`` as float32."""
    check_tensor("codes", codes, (torch.int8,))
    check_bits("bits", bits)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), device=codes.device)
    if scale.device != codes.device:
        raise ValueError(f"codes on {codes.device} and scale on {scale.device}; they must share a device")
    return codes.float() * (scale.float() / 2 ** (bits - 1))
