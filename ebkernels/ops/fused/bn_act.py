"""A BatchNorm (+ channel gather) + activation on a float tensor with no convolution after it, as one autograd
function (SPEC §9): the float chains of ``fusion`` that end before a layer that is not an int8 convolution
(a depthwise convolution, a squeeze-excitation, the global pool before the classifier).

Forward: ``bn_stats`` (statistics, running statistics, the input rounded to bfloat16 in NHWC: ``xb``) and one
``bn_relu_quant`` pass writing ``act(bn(x))`` in ``spec.out_dtype``. Backward: ``bn_relu_bwd_reduce`` (the sums)
and ``bn_relu_bwd`` in float mode. Kept for backward: ``xb`` and the per-channel ``bnp``, 2 bytes per element,
where ``nn.BatchNorm2d`` + an activation keep the BatchNorm's input and the activation's input or output (4
bytes per element in bfloat16). Numerics as a pre-activation input of ``block``: the BatchNorm reads its input
rounded to bfloat16.
"""
from __future__ import annotations

import torch

from ..gemm.host import no_autocast, refuse_double_backward
from .bn_relu_bwd import bn_relu_bwd, bn_relu_bwd_reduce
from .bn_relu_quant import bn_relu_quant, bn_stats
from .spec import BnActSpec
from .stages import Saved, bn_mode, check_bn_batch, index_maps, keep_bn_input, restore_bn_input

__all__ = ["BnActFunction", "bn_act"]


class BnActFunction(torch.autograd.Function):
    """``act(bn(x))`` (gathered by ``spec.select``) with the BatchNorm's semantics (batch or running
    statistics, running-statistics update, ``num_batches_tracked``)."""

    @staticmethod
    def forward(ctx, spec: BnActSpec, x, weight, bias, *source):
        bn = spec.bn
        check_bn_batch(bn, x.shape)
        batch, update = bn_mode(bn)
        with no_autocast(x):
            index, inv = index_maps(spec.select, x.shape[1], x.device)
            xb, _, bnp, zmax = bn_stats(x, weight, bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                        bn.momentum, bn.eps, batch, update, spec.act, inv, reuse_x=spec.keep_input)
            z, _ = bn_relu_quant(xb, bnp, zmax, bn.num_batches_tracked if update else None, index, 8, "shift", spec.act,
                                 0, out_dtype=spec.out_dtype or x.dtype)
        saved = Saved()
        keep_bn_input(spec.bn_source, spec.keep_input, x, xb, source, saved)
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.batch, ctx.n_source, ctx.kind = spec, batch, len(source), saved.source_kind
        ctx.meta = (x.dtype, x.is_contiguous(memory_format=torch.channels_last))
        ctx.save_for_backward(saved.xb, bnp, inv, *saved.source)
        return z

    @staticmethod
    def backward(ctx, gz):
        refuse_double_backward()
        none = (None,) * ctx.n_source
        if gz is None:
            return (None, None, None, None) + none
        xb, bnp, inv, *source = ctx.saved_tensors
        saved = Saved(xb=xb, source=tuple(source), source_kind=ctx.kind)
        with no_autocast(bnp):
            restore_bn_input(ctx.spec.bn_source, saved)
        xb = saved.xb
        x_dtype, channels_last = ctx.meta
        act = ctx.spec.act
        with no_autocast(bnp):
            sums = bn_relu_bwd_reduce(gz, xb, bnp, inv, act)
            gx, = bn_relu_bwd(gz, xb, bnp, sums if ctx.batch else None, inv, act, "float", out_dtype=x_dtype,
                              channels_last_out=channels_last)
        gw = gb = None
        bn = ctx.spec.bn
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            gw, gb = sums[1].to(bn.weight.dtype), sums[0].to(bn.bias.dtype)
        return (None, gx if ctx.needs_input_grad[1] else None, gw, gb) + none


def bn_act(spec: BnActSpec, x: torch.Tensor, source: tuple = ()) -> torch.Tensor:
    """Run ``spec`` on the float tensor ``x`` (N, C, H, W); returns ``act(bn(x))`` NHWC in ``spec.out_dtype``
    (None: x's dtype). ``source``: as ``block.fused_block``'s."""
    return BnActFunction.apply(spec, x, spec.bn.weight, spec.bn.bias, *source)
