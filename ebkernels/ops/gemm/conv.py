"""Int8 tensor-core Conv2d for WAGE-style training (SPEC §2, §8): implicit-GEMM forward, input-grad
(transposed convolution with the same weight codes) and weight-grad, no materialised im2col.

Activations and errors are int8 codes in NHWC memory order (the quantizer writes them so), weights
int8 codes viewed as [Cout, KH·KW·Cin]. All three kernels share the index decode, the main loop and
the epilogue of ``mainloop``; their tiles come from the per-shape table of ``tiles``:

- ``conv2d_int8_fwd_dgrad_kernel`` (in ``conv_fwd_dgrad`` with its launchers): forward ``Y[N·OH·OW, Cout] = X̃ · Wᵀ`` (reduction over (kh, kw, ci)),
  or, with ``TRANSPOSED``, input-grad ``dX[N·H·W, Cin] = Ẽ · W`` as stride_h·stride_w dense phases, each
  reading only the taps whose output pixel ``(ih + pad - kh·dil) / stride`` exists (any stride, padding,
  dilation);
- ``conv2d_int8_wgrad_kernel`` (in ``conv_wgrad``, and on sm_90 ``conv_wgrad_tma``): ``dW[Cout, (kh, kw, ci)]
  = Eᵀ · X̃``, the reduction over N·OH·OW split into chunks of at most 2^17 terms whose exact int32 sums
  are added in int64 (no overflow at any batch size), then scaled and G-quantized in the same launch.

Scales are read from device tensors in the epilogue (no host synchronisation); the bias is fused there
too; outputs are written straight into the input's memory format (NCHW or channels-last). groups > 1
runs the PyTorch reference path (one warning). Public: ``qconv2d``; lower level the custom ops
``ebkernels::conv2d_int8_{fwd,dgrad,wgrad}`` (``conv2d_int8_*_op``) and their float64 oracles
``conv2d_int8_*_reference``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ... import _rng
from ..._backend import use_triton
from ..._checks import check_same_device, check_tensor
from ...config import QConfig, as_qconfig
from .._launch import MAX_TERMS, conv2d_output_size, memory_format
from ..quantize import dequantize, quantize
from .conv_fwd_dgrad import _dgrad_triton, _fwd_triton, check_residual
from .conv_reference import conv2d_int8_dgrad_reference, conv2d_int8_fwd_reference, conv2d_int8_wgrad_reference
from .conv_wgrad import _wgrad_triton
from .pointwise import PointwiseConv2dFunction, is_pointwise_on_pixels
from .._dispatch import custom_op
from .host import (autocast_dtype, code_pad_multiple, is_channels_last, no_autocast, quantize_two_layouts,
                   quantize_weight, quantize_weight_grad, refuse_double_backward, weight_layout, wgrad_uses_tma,
                   x_channel_major)

__all__ = ["qconv2d", "QConv2dFunction", "conv2d_int8_fwd", "conv2d_int8_dgrad", "conv2d_int8_wgrad",
           "conv2d_int8_fwd_reference", "conv2d_int8_dgrad_reference", "conv2d_int8_wgrad_reference",
           "conv2d_output_size"]

# --------------------------------------------------------------------------------------------------
# Custom ops: Triton kernels where they apply, the reference otherwise
# --------------------------------------------------------------------------------------------------
_warned_groups = False


def _triton_applies(groups: int, channels: int, *tensors) -> bool:
    global _warned_groups
    if not use_triton(*tensors):
        return False
    if groups != 1:
        if not _warned_groups:
            warnings.warn("ebkernels.qconv2d: groups > 1 (grouped/depthwise convolution) has no int8 Triton "
                          "kernel yet; it runs the PyTorch reference path (same numbers, slower)",
                          stacklevel=4)
            _warned_groups = True
        return False
    return channels <= MAX_TERMS  # one tap's reduction must fit an int32-exact chunk


def _cpu(t: torch.Tensor) -> bool:
    """The float32 fast path is for CPU tensors only (a GPU convolution may use TF32: not exact)."""
    return t.device.type == "cpu"


@custom_op("ebkernels::conv2d_int8_fwd", mutates_args=())
def conv2d_int8_fwd_op(qx: torch.Tensor, qw: torch.Tensor, sx: Optional[torch.Tensor],
                        sw: Optional[torch.Tensor], bias: Optional[torch.Tensor], stride: list[int],
                        padding: list[int], dilation: list[int], groups: int, bits_a: int, bits_w: int,
                        out_dtype: torch.dtype, channels_last: bool, max_terms: int,
                        residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_residual(residual, qx, qw, sx, stride, padding, dilation)
    if _triton_applies(groups, qx.shape[1], qx, qw):
        return _fwd_triton(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, out_dtype,
                           channels_last, max_terms, residual)
    return conv2d_int8_fwd_reference(qx, qw, sx, sw, bias, stride, padding, dilation, groups, bits_a, bits_w,
                                     out_dtype, channels_last, fast=_cpu(qx), residual=residual)


@conv2d_int8_fwd_op.register_fake
def _(qx, qw, sx, sw, bias, stride, padding, dilation, groups, bits_a, bits_w, out_dtype, channels_last,
      max_terms, residual=None):
    OH, OW = conv2d_output_size(qx.shape[2], qx.shape[3], qw.shape[2], qw.shape[3], stride, padding, dilation)
    return torch.empty((qx.shape[0], qw.shape[0], OH, OW), dtype=torch.int64 if sx is None else out_dtype,
                       device=qx.device, memory_format=memory_format(channels_last))


@custom_op("ebkernels::conv2d_int8_dgrad", mutates_args=())
def conv2d_int8_dgrad_op(qe: torch.Tensor, qw: torch.Tensor, se: Optional[torch.Tensor],
                          sw: Optional[torch.Tensor], input_hw: list[int], stride: list[int],
                          padding: list[int], dilation: list[int], groups: int, bits_e: int, bits_w: int,
                          out_dtype: torch.dtype, channels_last: bool, max_terms: int) -> torch.Tensor:
    if _triton_applies(groups, qe.shape[1], qe, qw):
        return _dgrad_triton(qe, qw, se, sw, input_hw, stride, padding, dilation, bits_e, bits_w, out_dtype,
                             channels_last, max_terms)
    return conv2d_int8_dgrad_reference(qe, qw, se, sw, input_hw, stride, padding, dilation, groups, bits_e,
                                       bits_w, out_dtype, channels_last, fast=_cpu(qe))


@conv2d_int8_dgrad_op.register_fake
def _(qe, qw, se, sw, input_hw, stride, padding, dilation, groups, bits_e, bits_w, out_dtype, channels_last,
      max_terms):
    return torch.empty((qe.shape[0], qw.shape[1] * groups, *input_hw), dtype=torch.int64 if se is None else out_dtype,
                       device=qe.device, memory_format=memory_format(channels_last))


@custom_op("ebkernels::conv2d_int8_wgrad", mutates_args=("rng",))
def conv2d_int8_wgrad_op(qe: torch.Tensor, qx: torch.Tensor, se: Optional[torch.Tensor],
                          sx: Optional[torch.Tensor], kernel_hw: list[int], stride: list[int],
                          padding: list[int], dilation: list[int], groups: int, bits_e: int, bits_a: int,
                          out_dtype: torch.dtype, max_terms: int, bits_g: int, rounding_g: str,
                          out_channels: Optional[list[int]], rng: torch.Tensor,
                          channels_last: bool = False, mode_g: str = "shift") -> torch.Tensor:
    # bits_g > 0: the result is the G-quantized gradient (dequantized values, scale mode ``mode_g``) of its
    # real part [:out_channels[0], :out_channels[1]] (padded code channels dropped); rng: the device random
    # state its stochastic rounding advances; channels_last: the result in OHWI memory order (the weight's: autograd
    # then accumulates it without a layout copy)
    with _rng.bound(rng):
        return _wgrad_impl(qe, qx, se, sx, kernel_hw, stride, padding, dilation, groups, bits_e, bits_a, out_dtype,
                           max_terms, bits_g, rounding_g, out_channels, channels_last, mode_g)


def _wgrad_impl(qe, qx, se, sx, kernel_hw, stride, padding, dilation, groups, bits_e, bits_a, out_dtype, max_terms,
                bits_g, rounding_g, out_channels, channels_last, mode_g):
    cout, cin = out_channels if out_channels else (qe.shape[1], qx.shape[1] // groups)
    gq = (bits_g, rounding_g, cout, cin, mode_g) if bits_g > 0 else None
    fmt = memory_format(channels_last)
    if _triton_applies(groups, 0, qe, qx):
        out, done = _wgrad_triton(qe, qx, se, sx, kernel_hw, stride, padding, dilation, bits_e, bits_a, out_dtype,
                                  max_terms, gq, fmt)
    else:
        out, done = conv2d_int8_wgrad_reference(qe, qx, se, sx, kernel_hw, stride, padding, dilation, groups,
                                                bits_e, bits_a, out_dtype, fast=_cpu(qe)), False
    if out.shape[0] != cout or out.shape[1] != cin or not out.is_contiguous(memory_format=fmt):
        out = out[:cout, :cin].contiguous(memory_format=fmt)
    if gq is not None and not done:
        out = quantize_weight_grad(out, QConfig(bits_g=bits_g, rounding_g=rounding_g), mode_g)
    return out


@conv2d_int8_wgrad_op.register_fake
def _(qe, qx, se, sx, kernel_hw, stride, padding, dilation, groups, bits_e, bits_a, out_dtype, max_terms, bits_g,
      rounding_g, out_channels, rng, channels_last=False, mode_g="shift"):
    cout, cin = out_channels if out_channels else (qe.shape[1], qx.shape[1] // groups)
    return torch.empty((cout, cin, *kernel_hw), dtype=torch.int64 if se is None else out_dtype, device=qe.device,
                       memory_format=memory_format(channels_last))


def weight_grad_op(qe, qx, se, sx, kernel_hw, stride, padding, dilation, groups, qc: QConfig, out_channels,
                   channels_last: bool = False):
    """The weight-grad of the autograd functions: integer GEMM, scales, and G quantization (``qc``) in one
    op; ``out_channels`` [Cout, Cin/groups]: the real part of padded code channels; ``channels_last``: in the
    weight's OHWI memory order (``weight_layout``)."""
    return conv2d_int8_wgrad_op(qe, qx, se, sx, kernel_hw, stride, padding, dilation, groups, qc.bits_e, qc.bits_a,
                                 torch.float32, MAX_TERMS, qc.bits_g or 0, qc.rounding_g, list(out_channels),
                                 _rng.device_state(qe.device),
                                 channels_last, qc.mode_eg)


def _pair(name, value, minimum):
    """An int or a pair of ints, each >= minimum, as a list of two."""
    v = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) and e >= minimum for e in v)):
        raise ValueError(f"{name}={value!r} is not supported; accepted: an int >= {minimum} or a pair of them")
    return [int(v[0]), int(v[1])]


def _check_codes(**named):
    for k, t in named.items():
        check_tensor(k, t, (torch.int8,))
        if t.dim() != 4:
            raise ValueError(f"{k} must be 4-D, got shape {tuple(t.shape)}")


def conv2d_int8_fwd(qx, qw, sx=None, sw=None, bias=None, stride=1, padding=0, dilation=1, groups=1, bits_a=8,
                    bits_w=8, out_dtype=torch.float32, channels_last=None, max_terms=MAX_TERMS, residual=None):
    """Convolution of int8 codes ``qx`` (N, Cin, H, W; NHWC memory order is fastest) with ``qw`` (Cout,
    Cin/groups, KH, KW). With scales: ``acc · sx·sw / (S_a·S_w) + bias [+ residual]`` in ``out_dtype``
    (the residual, of the result's shape, added in fp32 before the one rounding; in the epilogue when it
    has the result's memory format); with ``sx=None``: the exact integer sums (int64). Output memory
    format: channels-last when ``channels_last`` (default: as ``qx``)."""
    _check_codes(qx=qx, qw=qw)
    if channels_last is None:
        channels_last = is_channels_last(qx)
    return conv2d_int8_fwd_op(qx, qw, sx, sw, bias, _pair("stride", stride, 1), _pair("padding", padding, 0),
                               _pair("dilation", dilation, 1), groups, bits_a, bits_w, out_dtype,
                               channels_last, max_terms, residual)


def conv2d_int8_dgrad(qe, qw, input_hw, se=None, sw=None, stride=1, padding=0, dilation=1, groups=1,
                      bits_e=8, bits_w=8, out_dtype=torch.float32, channels_last=None, max_terms=MAX_TERMS):
    """Input gradient (transposed convolution of ``qe`` with the same weight codes ``qw``) of an input
    of spatial size ``input_hw``; scaled as ``conv2d_int8_fwd`` (``se=None``: exact int64 sums)."""
    _check_codes(qe=qe, qw=qw)
    if channels_last is None:
        channels_last = is_channels_last(qe)
    return conv2d_int8_dgrad_op(qe, qw, se, sw, [int(v) for v in input_hw], _pair("stride", stride, 1),
                                 _pair("padding", padding, 0), _pair("dilation", dilation, 1), groups, bits_e,
                                 bits_w, out_dtype, channels_last, max_terms)


def conv2d_int8_wgrad(qe, qx, kernel_hw, se=None, sx=None, stride=1, padding=0, dilation=1, groups=1,
                      bits_e=8, bits_a=8, out_dtype=torch.float32, max_terms=MAX_TERMS):
    """Weight gradient ``sum over N·OH·OW of E ⊗ X̃`` (Cout, Cin/groups, KH, KW), contiguous; reductions
    longer than ``max_terms`` (2^17, int32-safe) are chunked and combined in int64."""
    _check_codes(qe=qe, qx=qx)
    return conv2d_int8_wgrad_op(qe, qx, se, sx, [int(v) for v in kernel_hw], _pair("stride", stride, 1),
                                 _pair("padding", padding, 0), _pair("dilation", dilation, 1), groups, bits_e,
                                 bits_a, out_dtype, max_terms, 0, "nearest", None, _rng.device_state(qe.device))


# --------------------------------------------------------------------------------------------------
# Autograd function and public op
# --------------------------------------------------------------------------------------------------
class QConv2dFunction(torch.autograd.Function):
    """WAGE-style Conv2d. Forward quantizes W and A (A written as NHWC int8 codes) and saves only their
    codes and scales; backward quantizes E, runs input-grad and weight-grad on the int8 kernels, then
    G-quantizes the weight gradient. An operand whose bits is None stays float: every product involving
    it runs as a float32 torch convolution on the (dequantized) operands instead of the int8 kernels.

    Layouts for the int8 kernels (Triton path): channel counts that are not multiples of 16 are zero-padded
    in the code buffers (A and W: Cin; E: Cout), so every kernel takes its aligned path; the weight-grad
    gets channel-major E codes (and, for a 1×1 / stride-1 / unpadded kernel, channel-major A codes), its
    K-major MMA operands. Zero padding adds exactly 0 to every integer sum.

    ``out_dtype``: the output's dtype (``qconv2d`` passes autocast's under ``torch.autocast``, else x's); forward
    and backward run with autocast off (``host.no_autocast``), so the integer sums stay exact either way."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, qc: QConfig, out_dtype=None):
        with no_autocast(x):
            return QConv2dFunction._forward(ctx, x, weight, bias, stride, padding, dilation, groups, qc,
                                            out_dtype or x.dtype)

    @staticmethod
    def _forward(ctx, x, weight, bias, stride, padding, dilation, groups, qc: QConfig, out_dtype):
        channels_last = is_channels_last(x)
        qx = sx = qw = sw = None
        # SPEC §8: Cin not a multiple of 16 (first layer, Cin = 3) -> A and W codes with Cin zero-padded, so
        # the int8 kernels run their aligned path (16-byte loads, big tile); the padding adds 0 to every sum
        pad = code_pad_multiple(x, groups, x.shape[1]) if qc.bits_a is not None and qc.bits_w is not None else 0
        xa = None
        if qc.bits_a is not None and qc.bits_w is not None and x_channel_major(x, weight, stride, padding, groups):
            # 1×1, stride 1, no padding: the weight-grad reads X̃ = X channel-major (K-major): the quantizer
            # writes that layout too (saved for backward; the forward GEMM reads the NHWC codes)
            qx, xa, sx = quantize_two_layouts(x, qc.bits_a, "nearest", qc.mode, pad)
        elif qc.bits_a is not None:
            qx, sx = quantize(x, qc.bits_a, "nearest", qc.mode, channels_last=True, pad_channels_to=pad)
        if qc.bits_w is not None:  # OHWI codes: Cin contiguous, the forward's K-major weight operand
            codes, sw = quantize_weight(weight, qc, channels_last=True, pad_channels_to=pad)
            qw = codes
        if qx is not None and qw is not None:
            y = conv2d_int8_fwd_op(qx, qw, sx, sw, bias, stride, padding, dilation, groups, qc.bits_a,
                                    qc.bits_w, out_dtype, channels_last, MAX_TERMS)
        else:
            xf = dequantize(qx, sx, qc.bits_a) if qx is not None else x.float()
            wf = dequantize(qw, sw, qc.bits_w) if qw is not None else weight.float()
            y = F.conv2d(xf, wf, None if bias is None else bias.float(), stride, padding, dilation, groups)
            y = y.to(out_dtype).contiguous(memory_format=memory_format(channels_last))
        ctx.qc = qc
        ctx.conv = (stride, padding, dilation, groups)
        ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.dtype, channels_last,
                    tuple(x.shape), tuple(weight.shape), weight_layout(weight))
        ctx.save_for_backward(xa if xa is not None else qx if qx is not None else x, sx, qw if qw is not None else weight,
                              sw)
        return y

    @staticmethod
    def backward(ctx, gy):
        refuse_double_backward()
        with no_autocast(gy):
            return QConv2dFunction._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        qc = ctx.qc
        stride, padding, dilation, groups = ctx.conv
        x_dtype, w_dtype, b_dtype, channels_last, x_shape, w_shape, w_cl = ctx.meta
        xa, sx, wa, sw = ctx.saved_tensors
        cin, cout = x_shape[1], w_shape[0]
        gx = gw = gb = None
        qe = se = None
        qe_cm = None
        if qc.bits_e is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            # Cout not a multiple of 16: E codes with Cout zero-padded (the dgrad reduction, the wgrad rows)
            pad_e = code_pad_multiple(gy, groups, cout)
            if ctx.needs_input_grad[1] and sx is not None and groups == 1 and use_triton(gy) and not wgrad_uses_tma(
                    gy, xa, w_shape, stride, padding, pad_e):
                # the weight-grad reduces over N·OH·OW: channel-major E codes ([Cout, M], rows contiguous) are
                # its K-major int8 MMA operand; the quantizer writes them in the same pass as the NHWC ones
                qe, qe_cm, se = quantize_two_layouts(gy, qc.bits_e, qc.rounding_e, qc.mode_eg, pad_e)
            else:
                qe, se = quantize(gy, qc.bits_e, qc.rounding_e, qc.mode_eg, channels_last=True, pad_channels_to=pad_e)

        def as_float(t, s, bits, channels):
            return (dequantize(t, s, bits) if s is not None else t.float())[:, :channels]

        def e_float():
            return as_float(qe, se, qc.bits_e, cout) if qe is not None else gy.float()

        if ctx.needs_input_grad[0]:
            if qe is not None and sw is not None:
                qw_d = wa[:, :cin]  # the dgrad result has the real Cin channels (its launcher copies W anyway)
                if qe.shape[1] != cout:  # zero rows for the padded E channels
                    qw_d = F.pad(qw_d, (0, 0, 0, 0, 0, 0, 0, qe.shape[1] - cout))
                gx = conv2d_int8_dgrad_op(qe, qw_d, se, sw, list(x_shape[2:]), stride, padding, dilation, groups,
                                           qc.bits_e, qc.bits_w, x_dtype, channels_last, MAX_TERMS)
            else:
                gx = torch.nn.grad.conv2d_input(x_shape, as_float(wa, sw, qc.bits_w, cin), e_float(), stride,
                                                padding, dilation, groups)
                gx = gx.to(x_dtype).contiguous(memory_format=memory_format(channels_last))
        if ctx.needs_input_grad[1]:
            if qe is not None and sx is not None:
                # channel-major E (above) and, for a 1×1 stride-1 layer, channel-major input codes (saved so by
                # the forward): both K-major, written by their quantizer passes; padded rows/columns (exactly 0)
                # dropped; G quantization fused into the kernel
                gw = weight_grad_op(qe_cm if qe_cm is not None else qe, xa, se, sx, list(w_shape[2:]), stride,
                                    padding, dilation, groups, qc, [cout, cin // groups], w_cl)
            else:
                gw = torch.nn.grad.conv2d_weight(as_float(xa, sx, qc.bits_a, cin), w_shape, e_float(), stride,
                                                 padding, dilation, groups)
                gw = quantize_weight_grad(gw, qc)
            gw = gw.to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3), dtype=torch.float32).to(b_dtype)  # the float E (no fp32 copy), not its codes
        return gx, gw, gb, None, None, None, None, None, None


def _resolve_padding(padding, weight_hw, dilation, stride):
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding == "same":
            if stride != [1, 1]:
                raise ValueError(f"padding='same' needs stride 1, got stride={tuple(stride)}")
            total = [d * (k - 1) for d, k in zip(dilation, weight_hw)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' with an even effective kernel size pads asymmetrically; "
                                 "not supported, pass explicit padding")
            return [t // 2 for t in total]
        raise ValueError(f"padding={padding!r} is not supported; accepted: an int >= 0, a pair of them, "
                         "'valid' or 'same'")
    return _pair("padding", padding, 0)


def qconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
            dilation=1, groups: int = 1, qconfig: QConfig | None = None) -> torch.Tensor:
    """``F.conv2d`` with W, A quantized to int8 codes (SPEC §2) and int8 tensor-core implicit GEMMs for the
    forward, input-grad and weight-grad; E is quantized on the way into backward and the weight
    gradient is G-quantized (stochastic rounding). ``x``: (N, Cin, H, W) contiguous or channels-last
    (the output keeps that memory format); ``weight``: (Cout, Cin/groups, KH, KW); ``stride``,
    ``padding`` (also 'valid'/'same'), ``dilation``: int or pair. ``groups > 1`` runs the PyTorch
    reference path (same numbers, one warning). An operand with ``bits_* = None`` stays float and the
    products involving it run as float32 torch convolutions. CUDA tensors (or CPU under
    TRITON_INTERPRET=1) use the Triton kernels, other CPU tensors the PyTorch reference. Under
    ``torch.autocast`` the result comes in autocast's dtype (bfloat16) and only int8 codes are kept for
    backward, so an int8 layer never keeps more than the bfloat16 layer it replaces."""
    qc = as_qconfig(qconfig)
    check_tensor("x", x)
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (Cout, Cin/groups, KH, KW), got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r} is not supported; accepted: a positive int")
    if weight.shape[1] * groups != x.shape[1] or weight.shape[0] % groups:
        raise ValueError(f"x has {x.shape[1]} channels and weight shape {tuple(weight.shape)} with groups={groups}: "
                         f"need weight.shape[1] * groups == C_in and C_out divisible by groups")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    check_same_device(x=x, weight=weight, bias=bias)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    padding = _resolve_padding(padding, weight.shape[2:], dilation, stride)
    OH, OW = conv2d_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding,
                                dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"the (dilated) kernel does not fit the padded input: output size would be {OH}x{OW} "
                         f"for input {tuple(x.shape[2:])}, kernel "
                         f"{tuple(weight.shape[2:])}, stride {stride}, padding {padding}, dilation {dilation}")
    if x.numel() == 0 or weight.numel() == 0:
        # nothing to quantize: nn.Conv2d's own result for empty inputs / layers (shapes, bias, gradients)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    ac = autocast_dtype(x)
    out_dtype = ac if ac is not None and x.dtype != torch.float64 else x.dtype
    if is_pointwise_on_pixels(x, weight, padding, groups):  # a Linear of the channels (SE blocks): its path
        return PointwiseConv2dFunction.apply(x, weight, bias, qc, out_dtype)
    return QConv2dFunction.apply(x, weight, bias, stride, padding, dilation, groups, qc, out_dtype)
