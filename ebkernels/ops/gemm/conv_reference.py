"""Float64 oracles of the int8 convolution (``conv``): the exact integer sums of the codes (SPEC §2:
every sum is an integer that float64 holds exactly) with the kernels' float32 epilogue. ``fast=True`` is
the CPU reference path: float32 sums in chunks short enough to stay exact (``host.exact_int_sums``), the
same numbers in a fraction of the time."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._launch import memory_format
from .host import exact_int_sums, f32_chunks, f32_exact_terms, inv_code_scales

__all__ = ["conv2d_int8_fwd_reference", "conv2d_int8_dgrad_reference", "conv2d_int8_wgrad_reference"]


def _epilogue_reference(acc, sa, sb, bias, bits_a, bits_b, out_dtype, channels_last, residual=None):
    if sa is None:
        y = acc.to(torch.int64)
    else:
        y = acc.float() * (sa.float() * sb.float() * inv_code_scales(bits_a, bits_b))
        if bias is not None:
            y = y + bias.float().view(1, -1, 1, 1)
        if residual is not None:  # in fp32, one rounding for the conv and the add (the kernel's epilogue)
            y = y + residual.float()
        y = y.to(out_dtype)
    return y.contiguous(memory_format=memory_format(channels_last))


def _f32_conv(fn):
    """Run a float32 convolution for ``exact_int_sums`` with NNPACK off (its Winograd/FFT algorithms do
    not sum the products one by one; oneDNN and the native paths do)."""
    def run(u0, u1):
        with torch.backends.nnpack.flags(enabled=False):
            return fn(u0, u1)
    return run


def _chunk_plan(groups, total, unit_terms, exact_terms):
    """``f32_chunks`` for a reduction chunked over ``total`` channels; with groups > 1 only unchunked."""
    if groups != 1:
        return f32_chunks(1, total // groups * unit_terms, exact_terms) and total
    return f32_chunks(total, unit_terms, exact_terms)


def conv2d_int8_fwd_reference(qx, qw, sx, sw, bias, stride, padding, dilation, groups, bits_a, bits_w,
                              out_dtype, channels_last, fast: bool = False, residual=None):
    """Oracle (float64 sums); ``fast`` (the CPU path): float32 chunks over Cin where exact; ``residual``
    added to the scaled result in fp32."""
    def f64():
        return F.conv2d(qx.double(), qw.double(), None, stride, padding, dilation, groups)

    if fast:
        C, taps = qx.shape[1], qw.shape[2] * qw.shape[3]
        per = _chunk_plan(groups, C, taps, f32_exact_terms(qx, qw))
        acc = exact_int_sums(C, per, _f32_conv(lambda c0, c1: F.conv2d(
            qx[:, c0:c1].float(), qw[:, c0:c1].float(), None, stride, padding, dilation, groups)), f64)
    else:
        acc = f64()
    return _epilogue_reference(acc, sx, sw, bias, bits_a, bits_w, out_dtype, channels_last, residual)


def conv2d_int8_dgrad_reference(qe, qw, se, sw, input_hw, stride, padding, dilation, groups, bits_e, bits_w,
                                out_dtype, channels_last, fast: bool = False):
    """Oracle (float64 sums); ``fast`` (the CPU path): float32 chunks over Cout where exact."""
    size = (qe.shape[0], qw.shape[1] * groups, *input_hw)

    def f64():
        return torch.nn.grad.conv2d_input(size, qw.double(), qe.double(), stride, padding, dilation, groups)

    if fast:
        CO, taps = qe.shape[1], qw.shape[2] * qw.shape[3]
        per = _chunk_plan(groups, CO, taps, f32_exact_terms(qe, qw))
        acc = exact_int_sums(CO, per, _f32_conv(lambda c0, c1: torch.nn.grad.conv2d_input(
            size, qw[c0:c1].float(), qe[:, c0:c1].float(), stride, padding, dilation, groups)), f64)
    else:
        acc = f64()
    return _epilogue_reference(acc, se, sw, None, bits_e, bits_w, out_dtype, channels_last)


def conv2d_int8_wgrad_reference(qe, qx, se, sx, kernel_hw, stride, padding, dilation, groups, bits_e,
                                bits_a, out_dtype, fast: bool = False):
    """Oracle (float64 sums); ``fast`` (the CPU path): float32 chunks over the batch where exact."""
    size = (qe.shape[1], qx.shape[1] // groups, *kernel_hw)

    def f64():
        return torch.nn.grad.conv2d_weight(qx.double(), size, qe.double(), stride, padding, dilation, groups)

    if fast:
        N, pixels = qe.shape[0], qe.shape[2] * qe.shape[3]
        per = f32_chunks(N, pixels, f32_exact_terms(qe, qx))
        acc = exact_int_sums(N, per, _f32_conv(lambda n0, n1: torch.nn.grad.conv2d_weight(
            qx[n0:n1].float(), size, qe[n0:n1].float(), stride, padding, dilation, groups)), f64)
    else:
        acc = f64()
    return _epilogue_reference(acc, se, sx, None, bits_e, bits_a, out_dtype, False)
