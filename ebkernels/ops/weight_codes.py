"""Convolution weight codes for backward, recomputed from the float weight and its saved scale.

The fused conv block keeps no weight codes between forward and backward (one byte per weight less in
memory: 14 MiB for VGG16): the float weight is a Parameter, unchanged until the optimizer steps, and its
scale is saved, so backward recomputes the codes bit for bit. One launch writes both layouts backward
needs, each with its zero padding:

- ``fwd``: (Cout, Cin_p, KH, KW) in OHWI memory order, Cin zero-padded: the forward's K-major operand,
  read again by the recompute GEMM of ``conv2d_bn``;
- ``dgrad``: (Cout_p, Cin, KH, KW) with Cout contiguous (memory [kh][kw][ci][co]), Cout zero-padded:
  the input-grad's K-major operand (before: a transposing copy of the forward codes).

Codes are the quantizer's (``ops.quantize``): ``round_half_even(clip(w / s * S))``, NaN -> 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import use_triton
from .._registry import aot_kernel
from . import _igemm
from .quantize import padded_channels, round_half_even

__all__ = ["weight_codes", "weight_codes_reference"]

_SIG = {"w_ptr": "*fp32", "scale_ptr": "*fp32", "fwd_ptr": "*i8", "dgrad_ptr": "*i8", "CO": "i32", "CI": "i32",
        "COp": "i32", "CIp": "i32", "KHW": "i32", "sw_o": "i64", "sw_i": "i64", "sw_t": "i64", "n": "i32"}


@aot_kernel(signature=_SIG, constexprs={"BITS": 8, "BLOCK": 1024}, num_warps=4)
@triton.jit
def weight_codes_kernel(w_ptr, scale_ptr, fwd_ptr, dgrad_ptr, CO, CI, COp, CIp, KHW, sw_o, sw_i, sw_t, n,
                        BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Over the padded index space (COp, CIp, KH·KW) in fwd order: the code of w[co, ci, t] (0 in the
    padding) into ``fwd`` at ``(co * KHW + t) * CIp + ci`` (co < CO) and ``dgrad`` at
    ``(t * CI + ci) * COp + co`` (ci < CI)."""
    S: tl.constexpr = 2.0 ** (BITS - 1)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    ci = idx % CIp
    r = idx // CIp
    t = r % KHW
    co = r // KHW
    real = ok & (co < CO) & (ci < CI)
    w = tl.load(w_ptr + co.to(tl.int64) * sw_o + ci.to(tl.int64) * sw_i + t.to(tl.int64) * sw_t, mask=real,
                other=0.0).to(tl.float32)
    q = tl.math.div_rn(w, tl.load(scale_ptr)) * S
    q = round_half_even(tl.minimum(tl.maximum(q, -(S - 1.0)), S - 1.0))
    q = tl.where((q != q) | ~real, 0.0, q).to(tl.int8)
    tl.store(fwd_ptr + (co * KHW + t).to(tl.int64) * CIp + ci, q, mask=ok & (co < CO))
    tl.store(dgrad_ptr + (t * CI + ci).to(tl.int64) * COp + co, q, mask=ok & (ci < CI))


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


@torch.library.custom_op("ebkernels::weight_codes", mutates_args=())
def _op(weight: torch.Tensor, scale: torch.Tensor, bits: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(weight, scale):
        return weight_codes_reference(weight, scale, bits, pad)
    CO, CI, KH, KW = weight.shape
    if KH > 1 and KW > 1 and weight.stride(2) != KW * weight.stride(3):
        weight = weight.contiguous()  # the kernel walks the KH·KW taps with one stride
    fwd, dgrad = _layouts(CO, CI, KH, KW, pad, weight.device, _igemm.empty_output)
    COp, CIp = dgrad.shape[0], fwd.shape[1]
    n = COp * CIp * KH * KW
    if n:
        weight_codes_kernel[(triton.cdiv(n, 1024),)](
            weight, scale, fwd, dgrad, CO, CI, COp, CIp, KH * KW, weight.stride(0), weight.stride(1),
            weight.stride(3) if KW > 1 or KH == 1 else weight.stride(2), n, BITS=bits, BLOCK=1024, num_warps=4)
    return fwd, dgrad


@_op.register_fake
def _(weight, scale, bits, pad):
    CO, CI, KH, KW = weight.shape
    return _layouts(CO, CI, KH, KW, pad, weight.device,
                    lambda s, d, dev, f: torch.empty(s, dtype=d, device=dev).contiguous(memory_format=f))


def weight_codes(weight, scale, bits=8, pad=16):
    """Codes of ``weight`` (Cout, Cin, KH, KW) with the given power-of-two ``scale``: ``(fwd, dgrad)``,
    see the module docstring. ``pad``: channel multiple of the int8 buffers (16; <= 1: none)."""
    return _op(weight, scale, int(bits), int(pad))
