"""The fused int8 block (SPEC §9): [BatchNorm → ReLU →] conv → [BatchNorm → ReLU → [max-pool]] as one
autograd function, carrying int8 codes from block to block.

One block = one ``BlockSpec``: a ``QConv2d``, what feeds it (``input``), what follows it. Inputs:

- ``"codes"``: the int8 codes and scale of the previous block (``Int8Activation``);
- ``"float"``: a float tensor, quantized per tensor like ``QConv2d`` does (the first layer);
- ``"bn"``: a float tensor through a pre-activation BatchNorm (+ ReLU, + channel gather): the residual
  stream of a pre-activation ResNet. Its statistics and codes come from ``bn_stats`` /
  ``bn_relu_quant``; the block keeps the input rounded to bfloat16 (2 bytes per element, the values the
  BatchNorm saw) and recomputes the codes in backward.

Outputs: the codes (NHWC, channels padded to 16) + scale of ``relu(bn(conv))`` (optionally max-pooled on
the codes) for the next block, or a float tensor (the conv output, or ``bn(conv)`` with or without ReLU)
for a layer that is not an int8 convolution.

What backward keeps (SPEC §9): the block's int8 input codes (the previous block's output: no new
storage), the per-channel ``bnp`` and the scales; the float weight is a Parameter. y is recomputed
bit-identically inside the GEMM that also forms the BatchNorm-backward sums (``conv2d_bn``), except in
compute-bound layers, which keep y in bfloat16 (``Y_POLICY``: there the tensors are small and the extra
GEMM is not). Backward re-derives the weight codes (``weight_codes``, one launch for both layouts),
then E in two passes (``bn_relu_bwd``), the input-grad and the weight-grad on the int8 kernels and the
G quantization fused into the weight-grad.

Numerics that differ from the per-layer path (``QConv2d`` + ``nn.BatchNorm2d`` + ``nn.ReLU``), all
documented where they happen: the conv output y and the error dz between blocks are held in bfloat16;
a pre-activation BatchNorm reads its input rounded to bfloat16; the max-pool routes gradients to the
first maximum of the codes; a conv bias directly followed by a training-mode BatchNorm gets the exact
gradient 0 (the BatchNorm removes it).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ..config import QConfig
from ._gemm import quantize_weight, refuse_double_backward
from .bn_relu_bwd import bn_relu_bwd, bn_relu_bwd_reduce
from .bn_relu_quant import bn_relu_quant, bn_stats
from .conv2d_bn import conv2d_int8_bn_bwd_reduce, conv2d_int8_bn_fwd
from .conv2d_int8 import CHANNEL_PAD, _conv2d_int8_dgrad_op, _conv2d_int8_fwd_op, conv2d_output_size, weight_grad_op
from .maxpool_int8 import maxpool2d_int8, maxpool2d_int8_backward
from .quantize import SMALL_NUMEL, quantize
from .weight_codes import weight_codes, weight_quant_small
from .._backend import use_triton
from ._igemm import MAX_TERMS

__all__ = ["Int8Activation", "BlockSpec", "fused_block", "FusedBlockFunction", "CARRIER_DTYPE", "Y_POLICY", "keeps_y"]

# The dtype in which the gradient w.r.t. a block's codes travels (see Int8Activation).
CARRIER_DTYPE = torch.bfloat16

# Recompute y in backward, or keep it (bfloat16, 2 bytes per element)? "auto": keep it exactly where the
# layer is compute-bound on the target GPU (SPEC §5, H100: int8 1979 TOPS, HBM 3.35 TB/s), there the
# recompute GEMM would cost time and the tensors are small; recompute where the layer is memory-bound,
# there the activations are large and one more int8 GEMM is nearly free. "recompute" / "keep": always.
# Measured on CPU (saved bytes) and modelled (the former benchmarks/predict.py, "y policy"; now
# benchmarks/cost_model.py): see benchmarks/NOTES.md.
Y_POLICY = "auto"
INT8_OPS_PER_S, HBM_BYTES_PER_S = 1979e12, 3.35e12


def keeps_y(cin: int, cout: int, kh: int, kw: int, hw_in: int, hw_out: int, policy: str | None = None) -> bool:
    """The y policy for a conv (per image: ``hw_in`` input pixels, ``hw_out`` output pixels). "auto":
    keep y when the three int8 GEMMs of the layer take longer at peak than its fused-block traffic
    (4 bytes per input element, 19 per output element when y is kept) at peak bandwidth."""
    policy = policy or Y_POLICY
    if policy != "auto":
        return policy == "keep"
    gemm_s = 3 * 2 * cout * cin * kh * kw * hw_out / INT8_OPS_PER_S
    bytes_s = (4 * cin * hw_in + 19 * cout * hw_out) / HBM_BYTES_PER_S
    return gemm_s >= bytes_s


class Int8Activation(NamedTuple):
    """What one fused block hands the next: ``codes`` (N, Cp, H, W) int8 NHWC with ``channels`` real
    channels, their ``scale`` (0-dim float32), and ``carrier``: an (N, channels, H, W) bfloat16 tensor
    with a single element of storage (stride 0) whose only job is to carry the gradient w.r.t. these
    codes from the next block's backward to this block's (autograd needs a differentiable tensor of the
    right shape; int8 tensors cannot require grad)."""

    carrier: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    channels: int


@dataclasses.dataclass
class BlockSpec:
    """A fused block. ``conv`` is a QConv2d (groups 1, zero padding); ``bn``/``relu``/``pool`` follow it
    (``pool``: (kernel, stride, padding, ceil_mode) pairs); ``input``: "codes", "float" or "bn" (then
    ``bn_in``/``relu_in`` and the gather ``select`` (int64 indices, None = all) precede the conv);
    ``output``: "codes" (quantized with ``out_qconfig``'s bits_a/mode) or "float"."""

    conv: nn.Module
    input: str = "codes"
    bn: Optional[nn.Module] = None
    relu: bool = False
    pool: Optional[tuple] = None
    output: str = "float"
    out_qconfig: Optional[QConfig] = None
    bn_in: Optional[nn.Module] = None
    relu_in: bool = False
    select: Optional[nn.Module] = None

    def conv_geometry(self):
        c = self.conv
        return list(c.stride), list(c.padding), list(c.dilation)


def _bn_mode(bn: nn.Module):
    """(batch_stats, update) of a BatchNorm as ``nn.BatchNorm2d.forward`` decides them."""
    batch_stats = bn.training or not bn.track_running_stats
    update = bn.training and bn.track_running_stats
    return batch_stats, update


def _momentum(bn: nn.Module):
    return bn.momentum


def _check_bn_batch(bn: nn.Module, shape) -> None:
    batch_stats, _ = _bn_mode(bn)
    if batch_stats and shape[0] * shape[2] * shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(shape)}")


def _pad_of(channels: int, x: torch.Tensor) -> int:
    return CHANNEL_PAD if use_triton(x) and channels % CHANNEL_PAD else 0


def _index_maps(select, C: int, device):
    """(index, inv): the gather's int64 indices (None when it keeps all channels) and its inverse map."""
    if select is None or select.indices.numel() == C:
        return None, None
    idx = select.indices.to(device)
    inv = torch.full((C,), -1, dtype=torch.int32, device=device)
    inv[idx] = torch.arange(idx.numel(), dtype=torch.int32, device=device)
    return idx, inv


class FusedBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: BlockSpec, x, in_codes, in_scale, weight, bias, bn_w, bn_b, bnin_w, bnin_b):
        qc = spec.conv.qconfig
        stride, padding, dilation = spec.conv_geometry()
        fixed = qc.mode == "wage"
        saved = {}
        # a float result comes in the float input's dtype, after int8 codes in the weight's
        float_dtype = weight.dtype if spec.input == "codes" else x.dtype
        # ---- the conv's int8 input ------------------------------------------------------------------
        if spec.input == "codes":
            qx, sx = in_codes, in_scale
            cin = x.shape[1]
        elif spec.input == "float":
            cin = x.shape[1]
            qx, sx = quantize(x, qc.bits_a, "nearest", qc.mode, channels_last=True,
                              pad_channels_to=_pad_of(cin, x))
        else:
            bn_in = spec.bn_in
            _check_bn_batch(bn_in, x.shape)
            batch_in, update_in = _bn_mode(bn_in)
            index, inv = _index_maps(spec.select, x.shape[1], x.device)
            cin = x.shape[1] if index is None else index.numel()
            xb, _, bnp_in, zmax_in = bn_stats(x, bn_in.weight, bn_in.bias, bn_in.running_mean, bn_in.running_var,
                                              bn_in.num_batches_tracked, _momentum(bn_in), bn_in.eps, batch_in,
                                              update_in, spec.relu_in, inv)
            qx, sx = bn_relu_quant(xb, bnp_in, zmax_in, bn_in.num_batches_tracked if update_in else None, index,
                                   qc.bits_a, fixed, spec.relu_in, _pad_of(cin, x))
            saved.update(xb=xb, bnp_in=bnp_in, zmax_in=zmax_in, index=index, inv=inv, batch_in=batch_in)
        # ---- weight codes: small weights in one launch, kept for backward; large ones not kept
        # (backward re-derives them from the Parameter and sw) ----------------------------------------
        if qc.mode == "wage" and qc.alpha != 1.0:
            raise ValueError("fused blocks need alpha == 1 in mode 'wage'")
        if weight.numel() <= SMALL_NUMEL:
            qw, qw_d, sw = weight_quant_small(weight, qc.bits_w, fixed, CHANNEL_PAD if use_triton(qx) else 0)
            saved.update(qw_f=qw, qw_d=qw_d)
        else:
            pad_in = qx.shape[1] if qx.shape[1] != cin else 0
            qw, sw = quantize_weight(weight, qc, channels_last=True, pad_channels_to=CHANNEL_PAD if pad_in else 0)
        # ---- conv (+ BatchNorm statistics) -> output -----------------------------------------------
        bn = spec.bn
        out_codes = out_scale = pos = None
        if bn is not None:
            _check_bn_batch(bn, (x.shape[0], 1) + tuple(conv2d_output_size(*x.shape[2:], *weight.shape[2:],
                                                                               stride, padding, dilation)))
            batch_stats, update = _bn_mode(bn)
            y, _, bnp, zmax = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, stride, padding, dilation, qc.bits_a,
                                                 qc.bits_w, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                 bn.num_batches_tracked, _momentum(bn), bn.eps, batch_stats, update,
                                                 spec.relu)
            nbt = bn.num_batches_tracked if update else None
            if spec.output == "codes":
                oq = spec.out_qconfig or qc
                out_codes, out_scale = bn_relu_quant(y, bnp, zmax, nbt, None, oq.bits_a, oq.mode == "wage", spec.relu,
                                                     _pad_of(y.shape[1], y))
                pre_pool_hw = out_codes.shape[2:]
                if spec.pool is not None:
                    k, s, p, ceil = spec.pool
                    out_codes, pos = maxpool2d_int8(out_codes, k, s, p, ceil)
                main = y.new_empty((), dtype=CARRIER_DTYPE).expand(
                    out_codes.shape[0], y.shape[1], *out_codes.shape[2:])
                saved.update(pre_pool_hw=tuple(pre_pool_hw), pos=pos)
            else:
                main, _ = bn_relu_quant(y, bnp, zmax, nbt, None, 8, False, spec.relu, 0, out_dtype=float_dtype)
            saved.update(bnp=bnp, batch_stats=batch_stats)
            if keeps_y(weight.shape[1], weight.shape[0], weight.shape[2], weight.shape[3],
                       x.shape[2] * x.shape[3], y.shape[2] * y.shape[3]):
                saved["y"] = y  # backward forms the sums from it instead of recomputing the GEMM
        else:
            main = _conv2d_int8_fwd_op(qx, qw, sx, sw, bias, stride, padding, dilation, 1, qc.bits_a, qc.bits_w,
                                       float_dtype, True, MAX_TERMS)
        ctx.set_materialize_grads(False)  # the codes and scale get no gradient: no zero tensors for them
        ctx.spec = spec
        ctx.meta = (tuple(x.shape), x.dtype, cin, bias is not None, x.is_contiguous(memory_format=torch.channels_last))
        # every tensor backward needs goes through save_for_backward (saved-tensor hooks see them, autograd
        # checks their versions); qx is the previous block's output (no new storage) or, for "bn" inputs,
        # recomputed in backward from the bfloat16 input
        keep_qx = qx if spec.input != "bn" else sx.new_empty(0, dtype=torch.int8)
        names = sorted(k for k, v in saved.items() if isinstance(v, torch.Tensor))
        ctx.flags = {k: v for k, v in saved.items() if not isinstance(v, torch.Tensor)}
        ctx.names = names
        ctx.save_for_backward(keep_qx, sx, weight, sw, bias, *(saved[k] for k in names))
        if out_codes is not None:
            ctx.mark_non_differentiable(out_codes, out_scale)
            return main, out_codes, out_scale
        return main, None, None

    @staticmethod
    def backward(ctx, g_main, _g_codes, _g_scale):
        refuse_double_backward()
        spec = ctx.spec
        qc = spec.conv.qconfig
        stride, padding, dilation = spec.conv_geometry()
        x_shape, x_dtype, cin, has_bias, x_cl = ctx.meta
        qx, sx, weight, sw, bias, *rest = ctx.saved_tensors
        saved = dict(ctx.flags, **dict(zip(ctx.names, rest)))
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        need_bn = spec.bn is not None and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7])
        need_bn_in = spec.input == "bn" and (ctx.needs_input_grad[8] or ctx.needs_input_grad[9])
        if spec.input == "bn":
            qx, _ = bn_relu_quant(saved["xb"], saved["bnp_in"], saved["zmax_in"], None, saved["index"], qc.bits_a,
                                  qc.mode == "wage", spec.relu_in, _pad_of(cin, saved["xb"]))
        cout = weight.shape[0]
        pad_out = _pad_of(cout, qx)
        # the kernels' buffers pad channels to 16 (forward: Cin, the codes qx already are; dgrad: Cout)
        if "qw_f" in saved:  # a small weight: its codes were kept
            qw_f, qw_d = saved["qw_f"], saved["qw_d"]
        else:
            qw_f, qw_d = weight_codes(weight, sw, qc.bits_w, CHANNEL_PAD if use_triton(qx) else 0)
        dz = g_main
        g_bn_w = g_bn_b = g_bias = None
        stochastic = qc.rounding_e == "stochastic"
        if spec.bn is not None:
            if spec.pool is not None:
                k, s, p, ceil = spec.pool
                dz = maxpool2d_int8_backward(dz, saved["pos"], saved["pre_pool_hw"], cout, k, s, p, ceil)
            if "y" in saved:  # kept from the forward (compute-bound layer)
                y = saved["y"]
                sums = bn_relu_bwd_reduce(dz, y, saved["bnp"], None, spec.relu)
            else:  # recomputed, bit-identical, in the GEMM that also forms the sums
                y, sums = conv2d_int8_bn_bwd_reduce(qx, qw_f, sx, sw, bias, stride, padding, dilation, qc.bits_a,
                                                    qc.bits_w, dz, saved["bnp"], spec.relu)
            s_dy = sums if saved["batch_stats"] else None
            amax, = bn_relu_bwd(dz, y, saved["bnp"], s_dy, None, spec.relu, "absmax", qc.bits_e, stochastic)
            qe, qe_cm, se = bn_relu_bwd(dz, y, saved["bnp"], s_dy, None, spec.relu, "codes", qc.bits_e, stochastic,
                                        pad_out, amax)
            if need_bn:
                g_bn_w, g_bn_b = sums[1].to(spec.bn.weight.dtype), sums[0].to(spec.bn.bias.dtype)
            if has_bias and ctx.needs_input_grad[5]:
                # train-mode BatchNorm right after: the bias has exactly no effect; eval: Σ dy = a·Σ g
                g_bias = (torch.zeros_like(bias) if saved["batch_stats"] else (saved["bnp"][0] * sums[0]).to(bias.dtype))
        else:
            qe, se = quantize(dz, qc.bits_e, qc.rounding_e, "shift", channels_last=True, pad_channels_to=pad_out)
            qe_cm = qe.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
            if has_bias and ctx.needs_input_grad[5]:
                g_bias = dz.float().sum((0, 2, 3)).to(bias.dtype)
        gx = None
        if need_x or need_bn_in:
            out_dtype = x_dtype if spec.input == "float" else CARRIER_DTYPE
            gx = _conv2d_int8_dgrad_op(qe, qw_d[:qe.shape[1], :cin], se, sw, list(x_shape[2:]), stride, padding,
                                       dilation, 1, qc.bits_e, qc.bits_w, out_dtype, True, MAX_TERMS)
        gw = None
        if need_w:
            qx_w = qx
            if tuple(weight.shape[2:]) == (1, 1) and stride == [1, 1] and padding == [0, 0] and use_triton(qx):
                qx_w = qx.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # both wgrad operands K-major
            gw = weight_grad_op(qe_cm, qx_w, se, sx, list(weight.shape[2:]), stride, padding, dilation, 1, qc,
                                [cout, weight.shape[1]]).to(weight.dtype)
        g_in_w = g_in_b = None
        if spec.input == "bn" and gx is not None:
            xb, bnp_in, inv = saved["xb"], saved["bnp_in"], saved["inv"]
            sums_in = bn_relu_bwd_reduce(gx, xb, bnp_in, inv, spec.relu_in)
            gx, = bn_relu_bwd(gx, xb, bnp_in, sums_in if saved["batch_in"] else None, inv, spec.relu_in, "float",
                              out_dtype=x_dtype, channels_last_out=x_cl)
            if need_bn_in and spec.bn_in.weight is not None:
                g_in_w, g_in_b = sums_in[1].to(spec.bn_in.weight.dtype), sums_in[0].to(spec.bn_in.bias.dtype)
        return (None, gx if need_x else None, None, None, gw, g_bias, g_bn_w, g_bn_b, g_in_w, g_in_b)


def fused_block(spec: BlockSpec, x):
    """Run one fused block. ``x``: an ``Int8Activation`` (input "codes") or a float tensor. Returns an
    ``Int8Activation`` (output "codes") or a float tensor."""
    conv, bn, bn_in = spec.conv, spec.bn, spec.bn_in
    if spec.input == "codes":
        args = (x.carrier, x.codes, x.scale)
    else:
        args = (x, None, None)
    out = FusedBlockFunction.apply(spec, *args, conv.weight, conv.bias, bn.weight if bn is not None else None,
                                   bn.bias if bn is not None else None, bn_in.weight if bn_in is not None else None,
                                   bn_in.bias if bn_in is not None else None)
    if spec.output == "codes":
        main, codes, scale = out
        return Int8Activation(main, codes, scale, main.shape[1])
    return out[0]
