"""Convolution weight codes in both GEMM layouts from the float weight and its scale, and the jit pieces
``weight_batch`` builds its kernels from. One launch writes both layouts, each with its zero padding:

- ``fwd``: (Cout, Cin_p, KH, KW) in OHWI memory order, Cin zero-padded: the forward's K-major operand,
  read again by the recompute GEMM of ``fused.conv_bn``;
- ``dgrad``: (Cout_p, Cin, KH, KW) with Cout contiguous (memory [kh][kw][ci][co]), Cout zero-padded:
  the input-grad's K-major operand (before: a transposing copy of the forward codes).

Codes are the quantizer's (``ops.quantize``): ``round_half_even(clip(w / s * S))``, NaN -> 0.

The forward's codes of both layouts come from ``weight_batch`` (every weight of a model in two multi-program
launches) and are kept; this launch, from a given scale, re-derives them where a caller keeps only the scale.
"""
from __future__ import annotations

import torch

from .._backend import use_triton
from .._registry import aot_kernel
from .._triton import tl, triton
from ._buffers import empty_output
from ._launch import cdiv, padded_channels
from ._tl import round_half_even
from ._dispatch import custom_op

__all__ = ["weight_codes", "weight_codes_reference"]

_SIG = {"w_ptr": "*fp32", "scale_ptr": "*fp32", "fwd_ptr": "*i8", "dgrad_ptr": "*i8", "CO": "i32", "CI": "i32",
        "COp": "i32", "CIp": "i32", "KHW": "i32", "sw_o": "i64", "sw_i": "i64", "sw_t": "i64", "n": "i32"}


@triton.jit
def _load_weight_block(w_ptr, idx, CO, CI, CIp, KHW, sw_o, sw_i, sw_t, n):
    """Decode a block of the padded index space (COp, CIp, KH·KW), fwd order, and load the weights there
    (0 in the padding): (in range, co, ci, tap, real element, w)."""
    ok = idx < n
    ci = idx % CIp
    r = idx // CIp
    t = r % KHW
    co = r // KHW
    real = ok & (co < CO) & (ci < CI)
    w = tl.load(w_ptr + co.to(tl.int64) * sw_o + ci.to(tl.int64) * sw_i + t.to(tl.int64) * sw_t, mask=real,
                other=0.0).to(tl.float32)
    return ok, co, ci, t, real, w


@triton.jit
def _block_weight_codes(w_ptr, scale, fwd_ptr, dgrad_ptr, idx, CO, CI, COp, CIp, KHW, sw_o, sw_i, sw_t, n,
                        BITS: tl.constexpr):
    """The codes of one block of the padded index space (COp, CIp, KH·KW) in fwd order: w[co, ci, t] (0 in
    the padding) into ``fwd`` at ``(co * KHW + t) * CIp + ci`` (co < CO) and ``dgrad`` at
    ``(t * CI + ci) * COp + co`` (ci < CI)."""
    S: tl.constexpr = 2.0 ** (BITS - 1)
    ok, co, ci, t, real, w = _load_weight_block(w_ptr, idx, CO, CI, CIp, KHW, sw_o, sw_i, sw_t, n)
    q = tl.math.div_rn(w, scale) * S
    q = round_half_even(tl.minimum(tl.maximum(q, -(S - 1.0)), S - 1.0))
    q = tl.where((q != q) | ~real, 0.0, q).to(tl.int8)
    tl.store(fwd_ptr + (co * KHW + t).to(tl.int64) * CIp + ci, q, mask=ok & (co < CO))
    tl.store(dgrad_ptr + (t * CI + ci).to(tl.int64) * COp + co, q, mask=ok & (ci < CI))


@aot_kernel(signature=_SIG, constexprs={"BITS": 8, "BLOCK": 1024}, num_warps=4)
@triton.jit
def weight_codes_kernel(w_ptr, scale_ptr, fwd_ptr, dgrad_ptr, CO, CI, COp, CIp, KHW, sw_o, sw_i, sw_t, n,
                        BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Both layouts from a given scale (backward), one block per program."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _block_weight_codes(w_ptr, tl.load(scale_ptr), fwd_ptr, dgrad_ptr, idx, CO, CI, COp, CIp, KHW, sw_o, sw_i,
                        sw_t, n, BITS)


def _layouts(CO, CI, KH, KW, pad, device, empty):
    COp, CIp = padded_channels(CO, pad), padded_channels(CI, pad)
    fwd = empty((CO, CIp, KH, KW), torch.int8, device, torch.channels_last)
    dgrad = empty((KH, KW, CI, COp), torch.int8, device, torch.contiguous_format).permute(3, 2, 0, 1)
    return fwd, dgrad


def weight_codes_reference(weight, scale, bits, pad):
    CO, CI, KH, KW = weight.shape
    S = float(2 ** (bits - 1))
    q = torch.round(((weight.float() / scale) * S).clamp(-(S - 1), S - 1))
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8)
    fwd, dgrad = _layouts(CO, CI, KH, KW, pad, weight.device,
                          lambda s, d, dev, f: torch.zeros(s, dtype=d, device=dev).contiguous(memory_format=f))
    fwd[:, :CI] = q
    dgrad[:CO] = q
    return fwd, dgrad


def _launch_args(weight, pad):
    """(weight, fwd, dgrad, kernel arguments after the scale pointer) of both kernels."""
    CO, CI, KH, KW = weight.shape
    if KH > 1 and KW > 1 and weight.stride(2) != KW * weight.stride(3):
        weight = weight.contiguous()  # the kernels walk the KH·KW taps with one stride
    fwd, dgrad = _layouts(CO, CI, KH, KW, pad, weight.device, empty_output)
    COp, CIp = dgrad.shape[0], fwd.shape[1]
    n = COp * CIp * KH * KW
    args = (CO, CI, COp, CIp, KH * KW, weight.stride(0), weight.stride(1),
            weight.stride(3) if KW > 1 or KH == 1 else weight.stride(2), n)
    return weight, fwd, dgrad, args


@custom_op("ebkernels::weight_codes", mutates_args=())
def _op(weight: torch.Tensor, scale: torch.Tensor, bits: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(weight, scale):
        return weight_codes_reference(weight, scale, bits, pad)
    weight, fwd, dgrad, args = _launch_args(weight, pad)
    if args[-1]:
        weight_codes_kernel[(cdiv(args[-1], 1024),)](weight, scale, fwd, dgrad, *args, BITS=bits, BLOCK=1024,
                                                            num_warps=4)
    return fwd, dgrad


@_op.register_fake
def _(weight, scale, bits, pad):
    CO, CI, KH, KW = weight.shape
    return _layouts(CO, CI, KH, KW, pad, weight.device,
                    lambda s, d, dev, f: torch.empty(s, dtype=d, device=dev).contiguous(memory_format=f))


def weight_codes(weight, scale, bits=8, pad=16):
    """Codes of ``weight`` (Cout, Cin, KH, KW) with the given ``scale``: ``(fwd, dgrad)``,
    see the module docstring. ``pad``: channel multiple of the int8 buffers (16; <= 1: none)."""
    return _op(weight, scale, int(bits), int(pad))
