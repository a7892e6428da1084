"""The fused int8 block (SPEC §9): [BatchNorm → act →] conv → [BatchNorm → act → [max-pool]] as one
autograd function, carrying int8 codes from block to block. This is the entry point of ``ops.fused``; its
sibling for a BatchNorm + activation with no conv after it is ``bn_act`` (re-exported here).

``act`` is one of ``bn_math.ACTIVATIONS``: identity (signed codes), ReLU, ReLU6, SiLU, Hardswish; the next
layer's scale follows from the per-channel extremes (exactly for the first three; for SiLU / Hardswish with
their interior minimum as the bound, see ``bn_math``).

One block = one ``BlockSpec``: a ``QConv2d``, what feeds it (``BlockInput``), what follows it. Inputs:

- ``CODES``: the int8 codes and scale of the previous block (``Int8Activation``);
- ``FLOAT``: a float tensor, quantized per tensor like ``QConv2d`` does (the first layer);
- ``BN``: a float tensor through a pre-activation BatchNorm (+ activation, + channel gather): the residual
  stream of a pre-activation ResNet. Its statistics and codes come from ``bn_stats`` / ``bn_relu_quant`` (the
  statistics, where the stream was written by the previous block's last conv, from that conv's own launch:
  ``spec.next_bn``, ``BlockLinks.stats_to``); the block keeps the input rounded to bfloat16 (2 bytes per
  element, the values the BatchNorm saw; the input itself when it already is that) and recomputes the codes in
  backward.

Outputs (``BlockOutput``): the codes (NHWC, channels padded to 16) + scale of ``act(bn(conv))``
(optionally max-pooled on the codes) for the next block, or a float tensor (the conv output, or
``act(bn(conv))``) in ``spec.out_dtype`` for a layer that is not an int8 convolution.

Forward and backward run with autocast off (``gemm.host.no_autocast``): what the kernels compute does not
depend on the caller's ``torch.autocast``; under it, ``fusion`` asks for bfloat16 float outputs.

``FusedBlockFunction`` only sequences the named stages of ``stages`` — forward: input, weight codes,
conv (+ BatchNorm statistics), output; backward: output (E's codes), conv (input-grad, weight-grad),
input (the pre-activation BatchNorm) — as the Triton layer-norm tutorial and Liger-Kernel's ops do.

What backward keeps (SPEC §9): the block's int8 input codes (the previous block's output: no new
storage; channel-major instead where its weight-grad reads them so), the per-channel ``bnp``, the scales
and, for a weight of at most ``weight_batch.KEEP_CODES_NUMEL`` elements, its codes in both GEMM layouts (2 bytes
per weight, from the model's weight batch: no weight launch in backward; a larger weight's codes are re-derived in
one launch, as they would outweigh the layer's int8 activations at small batches). y is recomputed
bit-identically inside the GEMM that also forms the BatchNorm-backward sums (``conv_bn``), except in
compute-bound layers, which keep y in bfloat16 (``keeps_y``, ``config.KernelSettings.y_policy``: there the
tensors are small and the extra GEMM is not).

Numerics that differ from the per-layer path (``QConv2d`` + ``nn.BatchNorm2d`` + the activation), all
documented where they happen: the conv output y and the error dz between blocks are held in bfloat16;
a pre-activation BatchNorm reads its input rounded to bfloat16; the max-pool routes gradients to the
first maximum of the codes; a conv bias directly followed by a training-mode BatchNorm gets the exact
gradient 0 (the BatchNorm removes it); a float output is rounded once to ``spec.out_dtype`` (bfloat16 in the
int8 region of ``fusion``), where the per-layer path rounds each layer's output to the input's dtype; so is a
conv's output with the residual its epilogue adds (the per-layer path rounds the conv, then the sum); and a
gradient handed over by a ``GradLink`` is added to the input-grad in float32 before its one rounding, where
autograd sums rounded gradients.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ...config import kernel_settings
from .._launch import MAX_TERMS
from .._dispatch import direct_scope
from ..gemm.host import no_autocast, refuse_double_backward, weight_layout
from . import stages
from .bn_act import bn_act
from .bn_math import ACTIVATIONS
from .spec import BlockInput, BlockLinks, BlockOutput, BlockSpec, BnActSpec, BnSource, GradLink, Int8Activation

__all__ = ["BlockInput", "BlockOutput", "BlockSpec", "BlockLinks", "BnActSpec", "BnSource", "GradLink", "Int8Activation",
           "fused_block", "bn_act",
           "FusedBlockFunction", "CARRIER_DTYPE", "ACTIVATIONS", "keeps_y", "supports"]

CARRIER_DTYPE = stages.CARRIER_DTYPE

# "auto" y policy: the GEMM and memory peaks of the target GPU (SPEC §5, H100: int8 1979 TOPS, HBM 3.35 TB/s)
INT8_OPS_PER_S, HBM_BYTES_PER_S = 1979e12, 3.35e12


def keeps_y(cin: int, cout: int, kh: int, kw: int, hw_in: int, hw_out: int, policy: str | None = None) -> bool:
    """The y policy for a conv (per image: ``hw_in`` input pixels, ``hw_out`` output pixels): ``policy``,
    default ``KernelSettings.y_policy``. "auto": keep y when the three int8 GEMMs of the layer take longer
    at peak than its fused-block traffic (4 bytes per input element, 19 per output element when y is kept)
    at peak bandwidth: there the recompute GEMM would cost time and the tensors are small."""
    policy = policy or kernel_settings().y_policy
    if policy != "auto":
        return policy == "keep"
    gemm_s = 3 * 2 * cout * cin * kh * kw * hw_out / INT8_OPS_PER_S
    bytes_s = (4 * cin * hw_in + 19 * cout * hw_out) / HBM_BYTES_PER_S
    return gemm_s >= bytes_s


def supports(conv: nn.Module) -> Optional[str]:
    """Why a fused block cannot compute this QConv2d exactly as the per-layer path does, or None when it can
    (what ``fusion`` asks before it fuses a chain)."""
    qc = conv.qconfig
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convolutions run the per-layer path)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / padding_mode {conv.padding_mode!r} (zero padding given as ints only)"
    if None in (qc.bits_a, qc.bits_w, qc.bits_e, qc.bits_g):
        return "a float operand (bits_* = None)"
    if qc.mode == "wage" and qc.alpha != 1.0:
        return f"WAGE alpha={qc.alpha} (fused blocks need alpha == 1)"
    if conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] > MAX_TERMS:
        return "a reduction of more than 2^17 terms per output (Cin·KH·KW)"
    return None


class BlockGrads(NamedTuple):
    """The differentiable arguments of ``FusedBlockFunction`` by name, in its argument order (which of them
    ``needs_input_grad``; its backward returns their gradients in the same order)."""

    x: object = None
    weight: object = None
    bias: object = None
    bn_weight: object = None
    bn_bias: object = None
    bn_in_weight: object = None
    bn_in_bias: object = None
    residual: object = None


class FusedBlockFunction(torch.autograd.Function):
    """One fused block (see the module docstring): the forward and backward stages in order."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x, in_codes, in_scale, in_codes_cm, weight, bias, bn_w, bn_b, bnin_w, bnin_b,
                residual, links, *source):
        if spec.pool is not None and spec.output is not BlockOutput.CODES:
            raise ValueError("a fused block max-pools its output codes only (output CODES)")
        if spec.residual and (residual is None or spec.output is not BlockOutput.FLOAT):
            raise ValueError("a residual block needs a float output and the residual tensor")
        ctx.n_source, ctx.res_dtype = len(source), None if residual is None else residual.dtype
        ctx.links = links or BlockLinks()
        # one dispatcher check for all of the block's ops (``direct_scope``), of its tensors
        with no_autocast(weight), direct_scope(x, in_codes, in_scale, in_codes_cm, weight, bias, bn_w, bn_b, bnin_w,
                                               bnin_b, residual, *source):
            return FusedBlockFunction._forward(ctx, spec, x, in_codes, in_scale, in_codes_cm, weight, bias, source,
                                              residual)

    @staticmethod
    def _forward(ctx, spec: BlockSpec, x, in_codes, in_scale, in_codes_cm, weight, bias, source, residual):
        qc = spec.conv.qconfig
        saved = stages.Saved(weight=weight, bias=bias)
        qx, sx, cin = stages.input_forward(spec, x, in_codes, in_scale, qc, saved, source, in_codes_cm,
                                           _taken_stats(ctx.links, x))
        qw, sw = stages.weight_forward(weight, qc, qx, cin, saved)
        if spec.bn is not None:
            y, bnp, zmax, nbt = stages.conv_bn_forward(spec, x.shape, qx, qw, sx, sw, bias, qc, saved)
            out = stages.output_forward(spec, y, bnp, zmax, nbt, qc, stages.float_dtype(spec, x, weight), saved,
                                        residual)
            if keeps_y(weight.shape[1], weight.shape[0], weight.shape[2], weight.shape[3],
                       x.shape[2] * x.shape[3], y.shape[2] * y.shape[3]):
                saved.y = y  # backward forms the sums from it instead of recomputing the GEMM
        elif _hands_stats(spec, ctx.links, residual, stages.float_dtype(spec, x, weight)):
            y, bnp, zmax = stages.conv_next_bn_forward(spec, qx, qw, sx, sw, bias, qc, residual)
            ctx.links.stats_to.put((y, bnp, zmax))  # the next block's BatchNorm takes them with y as its input
            out = (y, None, None, None)
        else:
            out = (stages.conv_forward(spec, qx, qw, sx, sw, bias, qc, stages.float_dtype(spec, x, weight),
                                       residual if spec.residual else None), None, None, None)
        ctx.set_materialize_grads(False)  # the codes and scale get no gradient: no zero tensors for them
        ctx.spec, ctx.device = spec, weight.device
        ctx.meta = stages.Meta(tuple(x.shape), x.dtype, cin, x.is_contiguous(memory_format=torch.channels_last),
                               weight_layout(weight))
        saved.save(ctx, spec)
        main, out_codes, out_scale, out_cm = out
        if out_codes is not None:
            ctx.mark_non_differentiable(out_codes, out_scale, *((out_cm,) if out_cm is not None else ()))
        return main, out_codes, out_scale, out_cm

    @staticmethod
    def backward(ctx, g_main, _g_codes, _g_scale, _g_cm):
        refuse_double_backward()
        with no_autocast(ctx.device), direct_scope(g_main):
            return FusedBlockFunction._backward(ctx, g_main)

    @staticmethod
    def _backward(ctx, g_main):
        spec, meta = ctx.spec, ctx.meta
        qc = spec.conv.qconfig
        n = ctx.needs_input_grad
        need = BlockGrads(n[1], n[5], n[6], n[7], n[8], n[9], n[10], n[11])
        saved = stages.Saved.load(ctx)
        stages.restore_bn_input(spec.bn_source, saved)
        qx = stages.input_codes_backward(spec, saved, qc, meta)
        qw_f, qw_d = stages.weight_backward(saved, qc, qx)
        e = stages.output_backward(spec, g_main, saved, qc, qx, qw_f, meta, need, _taken_amax(ctx.links, g_main))
        gx, gw = stages.conv_backward(spec, e, saved, qc, qx, qw_d, meta, need)
        links = ctx.links
        gx, g_in_w, g_in_b, amax = stages.input_backward(
            spec, gx, saved, meta, need, links.grad_from.take() if links.grad_from is not None else None,
            None if links.amax_to is None else links.amax_to.stochastic)
        if amax is not None:  # gx's max for the block that quantizes it as its E (GradLink)
            links.amax_to.put((gx, amax))
        g_res = stages.cast(e.g_residual, ctx.res_dtype) if need.residual and e.g_residual is not None else None
        if links.grad_to is not None and g_res is not None:  # the block reading the residual adds it (GradLink)
            links.grad_to.put(g_res)
            g_res = None
        # forward's arguments in order: spec, x, codes, scale, codes_cm, BlockGrads' tensors after x, links, source
        return (None, gx if need.x else None, None, None, None, gw, e.g_bias, e.g_bn_w, e.g_bn_b, g_in_w, g_in_b, g_res,
                None) + (None,) * ctx.n_source


def _hands_stats(spec: BlockSpec, links: BlockLinks, residual, out_dtype) -> bool:
    """Whether this last conv of a pre-activation block forms the next block's BatchNorm statistics too
    (``spec.next_bn``, a ``stats_to`` link): its output and residual bfloat16 channels-last, the next block's
    gather keeping every channel."""
    select = spec.next_select
    return (spec.next_bn is not None and links.stats_to is not None and spec.residual and residual is not None
            and out_dtype == torch.bfloat16 and residual.dtype == torch.bfloat16
            and residual.is_contiguous(memory_format=torch.channels_last)
            and (select is None or select.indices.numel() == residual.shape[1]))


def _taken_stats(links: BlockLinks, x):
    """``(bnp, zmax)`` of this block's ``BN`` input ``x`` that the block producing x formed, or None."""
    if links.stats_from is None:
        return None
    got = links.stats_from.take()
    if got is None:
        return None
    y, bnp, zmax = got
    if y.data_ptr() != x.data_ptr() or y.shape != x.shape or y.stride() != x.stride() or y.dtype != x.dtype:
        raise RuntimeError("fusion: a BatchNorm's statistics were formed for another tensor than its input")
    return bnp, zmax


def _taken_amax(links: BlockLinks, g_main):
    """The ``[bits, ticket]`` of ``g_main`` its producer handed over, or None (no link, or another tensor)."""
    if links.amax_from is None:
        return None
    got = links.amax_from.take()
    return got[1] if got is not None and got[0] is g_main else None


def fused_block(spec: BlockSpec, x, source: tuple = (), residual=None, links: Optional[BlockLinks] = None):
    """Run one fused block. ``x``: an ``Int8Activation`` (input ``CODES``) or a float tensor; ``source``: what
    may rebuild a ``BN`` input in backward (``spec.bn_source``; ``stages.keep_bn_input``); ``residual``: the
    tensor a ``spec.residual`` block adds (before its activation, or in the conv's epilogue). ``links``: the
    block's ``GradLink``s (``BlockLinks``: gradients handed between blocks of one forward instead of summed by
    autograd, and a gradient's max handed to the block that quantizes it). Returns an
    ``Int8Activation`` (output ``CODES``) or a float tensor."""
    bn, bn_in = spec.bn, spec.bn_in
    args = (x.carrier, x.codes, x.scale, x.codes_cm) if spec.input is BlockInput.CODES else (x, None, None, None)
    out = FusedBlockFunction.apply(spec, *args, *stages.weight_bias(spec.conv),
                                   *(stages.weight_bias(bn) if bn is not None else (None, None)),
                                   *(stages.weight_bias(bn_in) if bn_in is not None else (None, None)), residual, links,
                                   *source)
    if spec.output is BlockOutput.CODES:
        main, codes, scale, codes_cm = out
        return Int8Activation(main, codes, scale, main.shape[1], codes_cm)
    return out[0]
