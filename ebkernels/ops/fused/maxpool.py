"""Max-pool over int8 codes (SPEC §9) and its backward.

Quantization with one positive per-tensor scale (any mode) is monotone, so ``maxpool(q(z)) == q(maxpool(z))``:
pooling the codes reads 1 byte per element instead of 4 and yields exactly the next layer's codes.

Gradient routing: to the *first maximum of the codes* in each window, in row-major window order
(PyTorch's rule for floats, applied to the codes). Where distinct float values of a window round to
the same largest code, the gradient goes to the first of them, not necessarily to the float argmax;
both are valid subgradients of the quantized network. The forward stores that position (one int8 per
pooled element: 1/4 byte per input element for 2×2 windows, instead of keeping the input codes), the
backward gathers: every input element sums, in a fixed order, the pooled gradients of the windows
that picked it (no atomics: deterministic).

Any kernel size, stride, padding and ``ceil_mode`` of ``nn.MaxPool2d`` with dilation 1. References:
``F.max_pool2d`` / its backward on the codes as floats, with the same first-maximum rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._backend import use_triton
from ..._registry import aot_kernel
from ..._triton import tl, triton
from .._buffers import empty_output
from .._launch import cdiv, ELEMENTWISE_WARPS, elementwise_tiles
from .._tl import cast_rne, decode_rows
from .._dispatch import custom_op

__all__ = ["maxpool2d_int8", "maxpool2d_int8_backward", "maxpool2d_int8_reference",
           "maxpool2d_int8_backward_reference", "pool_output_size"]


def pool_output_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """``nn.MaxPool2d``'s output length (dilation 1): with ceil_mode, the last window must start inside
    the input or the left padding."""
    num = size + 2 * p - k
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


_FWD_SIG = {"x_ptr": "*i8", "out_ptr": "*i8", "arg_ptr": "*i8", "P": "i32", "Cp": "i32", "H": "i32", "W": "i32",
            "OH": "i32", "OW": "i32", "s_n": "i64", "s_c": "i64", "s_h": "i64", "s_w": "i64", "sh": "i32", "sw": "i32",
            "ph": "i32", "pw": "i32"}


@aot_kernel(signature=_FWD_SIG, constexprs={"KH": 2, "KW": 2, "BP": 32, "CB": 128}, num_warps=ELEMENTWISE_WARPS)
@triton.jit
def maxpool2d_int8_kernel(x_ptr, out_ptr, arg_ptr, P, Cp, H, W, OH, OW, s_n, s_c, s_h, s_w, sh, sw, ph, pw,
                          KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, CB: tl.constexpr):
    """Grid (pooled pixel tiles, channel blocks): the max code of each window and its first position
    ``kh * KW + kw``, both written NHWC (``p * Cp + c``)."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * CB + tl.arange(0, CB)
    p_ok = p < P
    c_ok = c < Cp
    n, oh, ow = decode_rows(p, OH, OW)
    best = tl.full((BP, CB), -129, tl.int32)
    arg = tl.zeros((BP, CB), tl.int32)
    for kh in tl.static_range(KH):
        ih = oh * sh - ph + kh
        for kw in tl.static_range(KW):
            iw = ow * sw - pw + kw
            ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offs = n.to(tl.int64) * s_n + ih.to(tl.int64) * s_h + iw.to(tl.int64) * s_w
            v = tl.load(x_ptr + offs[:, None] + c.to(tl.int64)[None, :] * s_c, mask=ok[:, None] & c_ok[None, :],
                        other=-128).to(tl.int32)
            v = tl.where(ok[:, None], v, -129)  # outside the input: never the max
            better = v > best  # strict: the first maximum wins
            best = tl.where(better, v, best)
            arg = tl.where(better, kh * KW + kw, arg)
    mask = p_ok[:, None] & c_ok[None, :]
    offs = p.to(tl.int64)[:, None] * Cp + c[None, :]
    tl.store(out_ptr + offs, best.to(tl.int8), mask=mask)
    tl.store(arg_ptr + offs, arg.to(tl.int8), mask=mask)


_BWD_SIG = {"dp_ptr": "*bf16", "arg_ptr": "*i8", "dx_ptr": "*bf16", "M": "i32", "C": "i32", "Cp": "i32", "H": "i32",
            "W": "i32", "OH": "i32", "OW": "i32", "sd_n": "i64", "sd_c": "i64", "sd_h": "i64", "sd_w": "i64",
            "sh": "i32", "sw": "i32", "ph": "i32", "pw": "i32"}


@aot_kernel(signature=_BWD_SIG, constexprs={"KH": 2, "KW": 2, "WH": 1, "WW": 1, "BP": 32, "CB": 128}, num_warps=ELEMENTWISE_WARPS)
@triton.jit
def maxpool2d_int8_bwd_kernel(dp_ptr, arg_ptr, dx_ptr, M, C, Cp, H, W, OH, OW, sd_n, sd_c, sd_h, sd_w, sh, sw, ph, pw,
                              KH: tl.constexpr, KW: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                              BP: tl.constexpr, CB: tl.constexpr):
    """Grid (input pixel tiles, channel blocks): ``dx`` (NHWC, C channels) = the sum of the pooled
    gradients of the windows (at most WH×WW of them, ``ceil(K/stride)``) whose stored first maximum is
    this element."""
    m = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * CB + tl.arange(0, CB)
    m_ok = m < M
    c_ok = c < C
    n, ih, iw = decode_rows(m, H, W)
    # the first window (in each dimension) that can contain ih: oh >= (ih + ph - KH + 1) / sh
    oh0 = tl.maximum(ih + ph - KH + 1 + sh - 1, 0) // sh
    ow0 = tl.maximum(iw + pw - KW + 1 + sw - 1, 0) // sw
    acc = tl.zeros((BP, CB), tl.float32)
    for i in tl.static_range(WH):
        oh = oh0 + i
        kh = ih + ph - oh * sh
        for j in tl.static_range(WW):
            ow = ow0 + j
            kw = iw + pw - ow * sw
            ok = m_ok & (oh < OH) & (ow < OW) & (kh >= 0) & (kh < KH) & (kw >= 0) & (kw < KW)
            p = (n.to(tl.int64) * OH + oh) * OW + ow
            mask = ok[:, None] & c_ok[None, :]
            a = tl.load(arg_ptr + p[:, None] * Cp + c[None, :], mask=mask, other=-1).to(tl.int32)
            hit = mask & (a == (kh * KW + kw)[:, None])
            offs = n.to(tl.int64) * sd_n + oh.to(tl.int64) * sd_h + ow.to(tl.int64) * sd_w
            g = tl.load(dp_ptr + offs[:, None] + c.to(tl.int64)[None, :] * sd_c, mask=hit, other=0.0)
            acc += g.to(tl.float32)
    tl.store(dx_ptr + m.to(tl.int64)[:, None] * C + c[None, :], cast_rne(acc, dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------------
def _window_position(idx: torch.Tensor, W: int, OH: int, OW: int, k, s, p) -> torch.Tensor:
    """PyTorch's flat input index of each window's max -> its position kh * KW + kw in the window."""
    oh = torch.arange(OH, device=idx.device).view(1, 1, -1, 1)
    ow = torch.arange(OW, device=idx.device).view(1, 1, 1, -1)
    kh = idx // W - (oh * s[0] - p[0])
    kw = idx % W - (ow * s[1] - p[1])
    return (kh * k[1] + kw).to(torch.int8)


def maxpool2d_int8_reference(codes, kernel_size, stride, padding, ceil_mode):
    """(pooled codes, first-max positions), both (N, Cp, OH, OW) NHWC, via ``F.max_pool2d`` on floats."""
    pooled, idx = F.max_pool2d(codes.float(), kernel_size, stride, padding, 1, ceil_mode, return_indices=True)
    pos = _window_position(idx, codes.shape[3], pooled.shape[2], pooled.shape[3], kernel_size, stride, padding)
    cl = torch.channels_last
    return pooled.to(torch.int8).contiguous(memory_format=cl), pos.contiguous(memory_format=cl)


def maxpool2d_int8_backward_reference(dp, pos, input_hw, channels, kernel_size, stride, padding, ceil_mode):
    """dx (N, C, H, W) NHWC in dp's dtype: the pooled gradient at each window's first maximum."""
    N, _, OH, OW = pos.shape
    H, W = input_hw
    pos = pos[:, :channels].long()
    oh = torch.arange(OH, device=pos.device).view(1, 1, -1, 1)
    ow = torch.arange(OW, device=pos.device).view(1, 1, 1, -1)
    ih = oh * stride[0] - padding[0] + pos // kernel_size[1]
    iw = ow * stride[1] - padding[1] + pos % kernel_size[1]
    idx = ih * W + iw
    dx = torch.ops.aten.max_pool2d_with_indices_backward(
        dp.double(), torch.zeros((N, channels, H, W), dtype=torch.float64, device=dp.device), kernel_size, stride,
        padding, [1, 1],
        ceil_mode, idx)
    return dx.to(dp.dtype).contiguous(memory_format=torch.channels_last)


def _fwd_triton(codes, k, s, p, ceil_mode):
    N, Cp, H, W = codes.shape
    OH = pool_output_size(H, k[0], s[0], p[0], ceil_mode)
    OW = pool_output_size(W, k[1], s[1], p[1], ceil_mode)
    out = empty_output((N, Cp, OH, OW), torch.int8, codes.device, torch.channels_last)
    pos = empty_output((N, Cp, OH, OW), torch.int8, codes.device, torch.channels_last)
    P = N * OH * OW
    BP, CB = elementwise_tiles(Cp)
    maxpool2d_int8_kernel[(cdiv(P, BP), cdiv(Cp, CB))](
        codes, out, pos, P, Cp, H, W, OH, OW, codes.stride(0), codes.stride(1), codes.stride(2), codes.stride(3),
        s[0], s[1], p[0], p[1], KH=k[0], KW=k[1], BP=BP, CB=CB, num_warps=ELEMENTWISE_WARPS)
    return out, pos


def _bwd_triton(dp, pos, input_hw, channels, k, s, p):
    pos = pos.contiguous(memory_format=torch.channels_last)  # the kernel reads positions NHWC
    N, Cp, OH, OW = pos.shape
    H, W = input_hw
    dx = empty_output((N, channels, H, W), dp.dtype, dp.device, torch.channels_last)
    M = N * H * W
    BP, CB = elementwise_tiles(channels)
    maxpool2d_int8_bwd_kernel[(cdiv(M, BP), cdiv(channels, CB))](
        dp, pos, dx, M, channels, Cp, H, W, OH, OW, dp.stride(0), dp.stride(1), dp.stride(2), dp.stride(3), s[0], s[1],
        p[0], p[1], KH=k[0], KW=k[1], WH=-(-k[0] // s[0]), WW=-(-k[1] // s[1]), BP=BP, CB=CB, num_warps=ELEMENTWISE_WARPS)
    return dx


@custom_op("ebkernels::maxpool2d_int8", mutates_args=())
def _fwd_op(codes: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
            ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(codes) and codes.numel() < 2**31:
        return _fwd_triton(codes, kernel_size, stride, padding, ceil_mode)
    return maxpool2d_int8_reference(codes, kernel_size, stride, padding, ceil_mode)


@_fwd_op.register_fake
def _(codes, kernel_size, stride, padding, ceil_mode):
    N, Cp, H, W = codes.shape
    OH = pool_output_size(H, kernel_size[0], stride[0], padding[0], ceil_mode)
    OW = pool_output_size(W, kernel_size[1], stride[1], padding[1], ceil_mode)
    out = torch.empty((N, Cp, OH, OW), dtype=torch.int8, device=codes.device, memory_format=torch.channels_last)
    return out, torch.empty_like(out)


@custom_op("ebkernels::maxpool2d_int8_backward", mutates_args=())
def _bwd_op(dp: torch.Tensor, pos: torch.Tensor, input_hw: list[int], channels: int, kernel_size: list[int],
            stride: list[int], padding: list[int], ceil_mode: bool) -> torch.Tensor:
    if use_triton(dp, pos) and pos.numel() < 2**31:
        return _bwd_triton(dp, pos, input_hw, channels, kernel_size, stride, padding)
    return maxpool2d_int8_backward_reference(dp, pos, input_hw, channels, kernel_size, stride, padding, ceil_mode)


@_bwd_op.register_fake
def _(dp, pos, input_hw, channels, kernel_size, stride, padding, ceil_mode):
    return torch.empty((dp.shape[0], channels, *input_hw), dtype=dp.dtype, device=dp.device,
                       memory_format=torch.channels_last)


def maxpool2d_int8(codes, kernel_size, stride, padding=(0, 0), ceil_mode=False):
    """Max-pool of int8 codes (N, Cp, H, W): ``(pooled codes, first-max positions)`` (N, Cp, OH, OW), NHWC."""
    return _fwd_op(codes, list(kernel_size), list(stride), list(padding), bool(ceil_mode))


def maxpool2d_int8_backward(dp, pos, input_hw, channels, kernel_size, stride, padding=(0, 0), ceil_mode=False):
    """The input gradient (N, channels, H, W), NHWC, of ``maxpool2d_int8`` from the pooled gradient ``dp``."""
    return _bwd_op(dp, pos, list(input_hw), int(channels), list(kernel_size), list(stride), list(padding),
                   bool(ceil_mode))
