"""Host-side plumbing of the int8 GEMM and convolution ops (``linear``, ``conv`` and the fused conv-BN
ops): the epilogue's scale factor, result buffers, the split of long reductions into int32-exact chunks,
exact integer sums on the CPU reference path, W / G quantization, the double-backward refusal, the autocast
context of the autograd functions and the code layouts the conv autograd function chooses.

Kernels and their index math live in ``mainloop``; this module is host-side Python only.
"""
from __future__ import annotations

import contextlib

from typing import Optional

import torch

from ..._backend import use_triton
from ...config import QConfig
from .._buffers import empty_channel_major, empty_output
from .._launch import CHANNEL_PAD, cdiv, code_channels, padded_channels, reads_codes_channel_major
from ..quantize import _check_args, _quantize_op, _seed_args, quantize, quantize_dequantize
from . import tiles, wgrad_tiles

__all__ = ["split_reduction", "inv_code_scales", "result_and_scale", "F32_EXACT_SUM", "MAX_F32_CHUNKS", "f32_exact_terms",
           "f32_chunks", "exact_int_sums", "quantize_weight", "quantize_weight_grad", "quantize_two_layouts",
           "refuse_double_backward", "no_autocast", "autocast_dtype", "code_pad_multiple", "x_channel_major", "wgrad_uses_tma",
           "is_channels_last", "weight_layout"]


def split_reduction(length: int, n_tiles: int, BK: int, device: torch.device, max_terms: int, min_iters: int = 8):
    """(splits, terms per split) for a reduction of ``length`` terms: every split at most ``max_terms``
    terms (int32-exact) and a multiple of BK; on a GPU, more splits when there are too few output tiles
    to fill the SMs (one rule with the convolution weight-grad: ``wgrad_tiles.wgrad_splits``), each at least
    ``min_iters`` K steps."""
    return wgrad_tiles.wgrad_splits(length, n_tiles, tiles.device_sms(device) if tiles.on_gpu(device) else None,
                                    max_terms, BK, min_iters)


def inv_code_scales(bits_a: int, bits_b: int) -> float:
    """``1 / (S_a · S_b)``, a power of two (exact in fp32)."""
    return 1.0 / float(2 ** (bits_a - 1) * 2 ** (bits_b - 1))


def result_and_scale(shape, sa, out_dtype, bits_a, bits_b, device,
                     memory_format=torch.contiguous_format):
    """A launcher's result buffer and its epilogue's ``1 / (S_a·S_b)``; without scales (``sa`` None) the
    exact integer sums: an int64 buffer and 0.0."""
    if sa is None:
        return empty_output(shape, torch.int64, device, memory_format), 0.0
    return empty_output(shape, out_dtype, device, memory_format), inv_code_scales(bits_a, bits_b)


# ----- exact integer sums on the CPU reference path -------------------------------------------------
# A partial sum of k products of codes with |a| <= A, |b| <= B is an integer of magnitude <= k·A·B;
# every integer of magnitude <= 2^24 is a float32, so when k·A·B <= 2^24 each addition (in any order,
# blocked or FMA) is exact and float32 gives the same sums as float64 (e.g. |codes| <= 127: k <= 1040).
# Longer reductions are cut into such chunks, each summed in float32, the chunks added in float64
# (exact: |sum| < 2^53). The float64 oracles (``fast=False``) stay as they were.
F32_EXACT_SUM = 2 ** 24
MAX_F32_CHUNKS = 64  # more chunks than this: one float64 product instead


def _code_bound(t: torch.Tensor) -> int:
    """max |code| of an int8 tensor (int arithmetic: -128 counts as 128)."""
    return max(-int(t.min()), int(t.max())) if t.numel() else 0


def f32_exact_terms(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many products of a code of ``a`` and one of ``b`` float32 sums exactly (every partial sum an
    integer of magnitude <= 2^24), from the codes' actual magnitudes."""
    p = _code_bound(a) * _code_bound(b)
    return F32_EXACT_SUM // p if p else 2 ** 62


def f32_chunks(total: int, unit_terms: int, exact_terms: int) -> Optional[int]:
    """Size (in units of ``unit_terms`` products each) of the chunks of a reduction over ``total`` units
    that float32 sums exactly, or None when that takes no chunk at all or more than ``MAX_F32_CHUNKS``
    (then float64)."""
    per = exact_terms // max(unit_terms, 1)
    if per < 1 or cdiv(total, per) > MAX_F32_CHUNKS:
        return None
    return per


def exact_int_sums(total: int, per: Optional[int], f32_part, f64_full) -> torch.Tensor:
    """The integer sums: ``f32_part(u0, u1)`` (float32, units [u0, u1) of the reduction) when one chunk
    covers ``total``; their float64 sum over chunks of ``per`` units; ``f64_full()`` when ``per`` is None."""
    if per is None:
        return f64_full()
    if total <= per:
        return f32_part(0, total)
    acc = None
    for u0 in range(0, total, per):
        part = f32_part(u0, min(u0 + per, total)).double()
        acc = part if acc is None else acc.add_(part)
    return acc


# --------------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, qc: QConfig, channels_last: bool = False, pad_channels_to: int = 0):
    """W codes and its scale: ``Shift(max|W|)`` (mode shift), ``1 · alpha`` (mode wage) or ``max|W|·S/(S-1)``
    (mode absmax);
    ``channels_last``: 4-D codes in OHWI memory order (the convolution's K-major weight operand);
    ``pad_channels_to``: Cin zero-padded to that multiple (see ``quantize``)."""
    codes, s = quantize(weight, qc.bits_w, "nearest", qc.mode, channels_last=channels_last,
                        pad_channels_to=pad_channels_to)
    return codes, _weight_scale(s, qc)


def _weight_scale(s, qc: QConfig):
    """W's scale as the layers use it: WAGE's ``alpha`` applied (a device op: no synchronisation)."""
    return s * qc.alpha if qc.mode == "wage" and qc.alpha != 1.0 else s


def quantize_weight_transposed(weight: torch.Tensor, qc: QConfig):
    """``quantize_weight`` of a 2-D (out, in) weight that also writes the codes in the transposed memory order
    (an (out, in) view of (in, out) row-major memory: the input-grad ``E · W``'s K-major operand) in the same
    pass, instead of a ``.t().contiguous()`` copy of the codes in every backward: ``(codes, codes_t, scale)``."""
    _check_args(weight, qc.bits_w, "nearest", qc.mode, None, False, 0)
    codes_t = empty_output((weight.shape[1], weight.shape[0]), torch.int8, weight.device).t()
    seed_arg, rng = _seed_args(False, None, weight.device)
    codes, s = _quantize_op(weight, qc.bits_w, False, qc.mode, seed_arg, False, 0, False, rng, codes_t)
    return codes, codes_t, _weight_scale(s, qc)


def quantize_two_layouts(x: torch.Tensor, bits: int, rounding: str, mode: str = "shift", pad_channels_to: int = 0,
                         amax: Optional[torch.Tensor] = None):
    """``quantize(x, ..., channels_last=True, pad_channels_to)`` of a 4-D tensor that also writes the codes
    channel-major (memory [Cp, N, H, W]: the K-major operand of a weight-grad) in the same pass, instead of a
    ``permute(1, 0, 2, 3).contiguous()`` copy afterwards: ``(codes NHWC, codes channel-major, scale)``, the
    same codes (and noise) as ``quantize``; ``amax``: x's ``[bits of max |x|, ticket]`` from its producer
    (``bn_relu_bwd(mode="float_absmax")``): the codes pass only."""
    _check_args(x, bits, rounding, mode, None, True, pad_channels_to)
    N, C, H, W = x.shape
    cm = empty_channel_major((N, padded_channels(C, pad_channels_to), H, W), torch.int8, x.device)
    stochastic = rounding == "stochastic"
    seed_arg, rng = _seed_args(stochastic, None, x.device)
    codes, s = _quantize_op(x, bits, stochastic, mode, seed_arg, True, pad_channels_to, False, rng, cm, amax)
    return codes, cm, s


def quantize_weight_grad(grad_w: torch.Tensor, qc: QConfig, mode: str | None = None) -> torch.Tensor:
    """G quantization of the weight gradient (scale mode ``mode``, default ``qc.mode_eg``: ``Shift(max|G|)``,
    or absmax; rounding ``qc.rounding_g``, stochastic by default), returned dequantized in the gradient's
    dtype; unchanged when ``bits_g`` is None."""
    if qc.bits_g is None:
        return grad_w
    return quantize_dequantize(grad_w, qc.bits_g, qc.rounding_g, mode or qc.mode_eg)


def no_autocast(t):
    """The context every int8 autograd function runs its forward and backward in: autocast off on the device
    of ``t`` (a tensor or a device). Their float parts (the reference path's float32 convolutions of integer codes, exact by SPEC §2)
    must not be cast to bfloat16 by a caller's ``torch.autocast``; what they hand on follows it instead
    (``autocast_dtype``)."""
    dev = (t.device if isinstance(t, torch.Tensor) else torch.device(t)).type
    if not torch.is_autocast_enabled(dev):  # already off: nothing to turn off (torch.autocast costs ~6 µs a use)
        return _AUTOCAST_OFF
    return torch.autocast(dev, enabled=False)


_AUTOCAST_OFF = contextlib.nullcontext()


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` gives float results on ``t``'s device, or None outside autocast."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def refuse_double_backward() -> None:
    """Called first in the backward of every int8 autograd function: with ``create_graph=True`` its
    gradients would silently be constants (the int8 kernels have no backward of their own)."""
    if torch.is_grad_enabled():
        raise RuntimeError("double backward is not supported by int8 layers (QConv2d, QLinear and the fused "
                           "int8 blocks): their gradients are computed by int8 kernels that are not "
                           "differentiable themselves; run this part in float (ebkernels.dequantize_model) or "
                           "call backward without create_graph=True")


# ----- layouts the conv autograd function chooses -------------------------------------------------------
def code_pad_multiple(t: torch.Tensor, groups: int, channels: int) -> int:
    """``CHANNEL_PAD`` when the int8 Triton kernels will see ``channels`` and ``code_channels`` pads it (then
    the quantizer writes zero-padded channels), else 0 (no padding: e.g. the reference path)."""
    return CHANNEL_PAD if groups == 1 and code_channels(channels) != channels and use_triton(t) else 0


def x_channel_major(x, weight, stride, padding, groups) -> bool:
    """Whether the weight-grad reads the input codes channel-major: a 1×1 kernel, stride 1, no padding
    (X̃ = X, row m = pixel m), on the Triton path."""
    return groups == 1 and reads_codes_channel_major(weight.shape[2:], stride, padding) and use_triton(x)


def wgrad_uses_tma(gy, xa, w_shape, stride, padding, pad_e) -> bool:
    """Whether the weight-grad runs rule 8's TMA kernel (it reads its own copy of the E codes)."""
    N, C, H, W = xa.shape
    return bool(wgrad_tiles.wgrad_tma_plan(gy.device, N, C, H, W, padded_channels(gy.shape[1], pad_e),
                                           *gy.shape[2:], *w_shape[2:], stride, padding))


def is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def weight_layout(weight: torch.Tensor) -> bool:
    """Whether a weight is stored channels-last (OHWI) and not also contiguous (a 1×1 weight is both): its
    gradient is then written channels-last, so that autograd accumulates it with no copy."""
    return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
