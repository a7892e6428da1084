"""The stages of a fused int8 block (``block``), each a named ``*_forward`` / ``*_backward`` helper over the
kernels of this package, in the order ``FusedBlockFunction`` runs them:

forward:  ``input_forward``   the conv's int8 input: codes as given, a float tensor quantized, or the
                              pre-activation BatchNorm (+ ReLU, + gather) of the residual stream;
          ``weight_forward``  W's codes (a small weight's, in both GEMM layouts, kept for backward);
          ``conv_bn_forward`` the conv with the BatchNorm statistics in its epilogue (``conv_bn``), or
          ``conv_forward``    the plain conv (no BatchNorm after it);
          ``output_forward``  BatchNorm + ReLU → the next block's codes (+ max-pool on codes), or a float.
backward: ``input_codes_backward``, ``weight_backward``  the input / weight codes again, ``output_backward`` (max-pool,
                              BatchNorm + ReLU backward → E's codes), ``conv_backward`` (input-grad, weight-grad
                              with G quantization), ``input_backward`` (the pre-activation BatchNorm's backward).

What a stage keeps for backward goes into one ``Saved`` record (``saved``), saved through ``save_for_backward`` in
its declared field order (saved-tensor hooks see every tensor; autograd checks their versions).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ..._backend import use_triton
from ...config import QConfig
from .._launch import CHANNEL_PAD, MAX_TERMS, conv2d_output_size, leading
from ..gemm.conv import conv2d_int8_dgrad_op, conv2d_int8_fwd_op, weight_grad_op
from ..gemm.host import quantize_two_layouts
from ..quantize import quantize
from ..weight_batch import KEEP_CODES_NUMEL, WeightItem, weight_quant
from ..weight_step import batched_backward_codes, batched_weight_codes, reserve_zero_grad, zero_grad_of
from ..weight_codes import weight_codes
from .bn_add_act import bn_add_act
from .bn_relu_bwd import bn_relu_bwd, bn_relu_bwd_reduce
from .bn_relu_quant import bn_relu_quant, bn_stats
from .conv_bn import conv2d_int8_bn_bwd_reduce, conv2d_int8_bn_fwd
from .layouts import channel_major_input, input_pad, pad_of
from .maxpool import maxpool2d_int8, maxpool2d_int8_backward
from .saved import Error, Meta, Saved
from .spec import BlockInput, BlockOutput, BlockSpec

__all__ = ["CARRIER_DTYPE", "cast", "Saved", "Meta", "Error", "bn_mode", "check_bn_batch", "index_maps", "float_dtype",
           "keep_bn_input", "restore_bn_input", "input_forward",
           "weight_forward",
           "conv_bn_forward", "conv_forward", "conv_next_bn_forward", "output_forward", "input_codes_backward", "weight_backward",
           "output_backward", "conv_backward", "input_backward"]

# The dtype in which the gradient w.r.t. a block's codes travels (see spec.Int8Activation).
CARRIER_DTYPE = torch.bfloat16


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` has that dtype already (a gradient in its parameter's float32:
    ~300 no-op calls a PreResNet-101 step, issue 20 item 5)."""
    return t if t.dtype == dtype else t.to(dtype)


def weight_bias(m: nn.Module) -> tuple:
    """(weight, bias) of a conv or BatchNorm, from its parameter dict where both are registered there (what
    attribute access finds, without ``nn.Module.__getattr__``: ~0.5 µs each, several per block: issue 20 item 5);
    by attribute otherwise (a parametrized weight, say)."""
    p = m._parameters
    if "weight" in p and "bias" in p:
        return p["weight"], p["bias"]
    return m.weight, m.bias


def bn_tensors(bn: nn.Module) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked) of a BatchNorm, as ``weight_bias`` finds
    them (None where it keeps none)."""
    b = bn._buffers
    if "running_mean" in b and "running_var" in b and "num_batches_tracked" in b:
        return (*weight_bias(bn), b["running_mean"], b["running_var"], b["num_batches_tracked"])
    return (*weight_bias(bn), bn.running_mean, bn.running_var, bn.num_batches_tracked)


def bn_mode(bn: nn.Module):
    """(batch_stats, update) of a BatchNorm as ``nn.BatchNorm2d.forward`` decides them."""
    batch_stats = bn.training or not bn.track_running_stats
    update = bn.training and bn.track_running_stats
    return batch_stats, update


def check_bn_batch(bn: nn.Module, shape) -> None:
    batch_stats, _ = bn_mode(bn)
    if batch_stats and shape[0] * shape[2] * shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(shape)}")


def index_maps(select, C: int, device):
    """(index, inv): the gather's int64 indices (None when it keeps all channels) and its inverse map."""
    if select is None or select.indices.numel() == C:
        return None, None
    idx = select.indices.to(device)
    inv = torch.full((C,), -1, dtype=torch.int32, device=device)
    inv[idx] = torch.arange(idx.numel(), dtype=torch.int32, device=device)
    return idx, inv


def float_dtype(spec: BlockSpec, x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """A float result comes in ``spec.out_dtype``; without one in the float input's dtype, after int8 codes
    in the weight's."""
    if spec.out_dtype is not None:
        return spec.out_dtype
    return weight.dtype if spec.input is BlockInput.CODES else x.dtype


# ----- forward ------------------------------------------------------------------------------------------
def keep_bn_input(bn_source, keep_input: bool, x, xb, source: tuple, saved: Saved) -> None:
    """What backward gets a pre-activation BatchNorm's bfloat16 input ``xb`` from (``spec.BnSource``): the
    concatenation's pieces or the residual's codes and ``xprev`` (``source``) when they are bfloat16, so that
    rebuilding gives exactly xb; the input itself when it is bfloat16 channels-last (xb equals it) and may be
    kept; else xb."""
    bf16, cl = CARRIER_DTYPE, torch.channels_last
    kind = bn_source.kind if bn_source is not None and source else ""
    if kind == "cat" and all(p.dtype == bf16 for p in source):
        saved.source, saved.source_kind = tuple(source), kind
    elif kind == "residual" and x.dtype == bf16 and source[2].dtype == bf16 and source[2].is_contiguous(
            memory_format=cl):  # xprev is what the block before keeps (itself): no new storage
        # the replayed conv's weight codes as its block got them now (the step's batch: a small weight's codes are
        # the ones that block keeps, a large one's come back with the batch's other large weights): no weight
        # quantization of its own in backward
        codes, _, _, weight, _ = source
        replay = Saved()
        weight_forward(weight, bn_source.conv.conv.qconfig, codes, weight.shape[1], replay)
        saved.source, saved.source_kind = (*source, replay.qw_f, replay.sw), kind
        saved.source_again = replay.codes_again
    elif keep_input and x.dtype == bf16 and x.is_contiguous(memory_format=cl):
        saved.xb = x
    else:
        saved.xb = xb


def restore_bn_input(bn_source, saved: Saved) -> None:
    """``saved.xb`` back from ``saved.source`` (``keep_bn_input``), bit-identical to the forward's: the pieces
    concatenated again, or the conv on codes replayed (the same int8 GEMM and epilogue, ``xprev`` added in it)."""
    if saved.source_kind == "cat":
        saved.xb = torch.cat(saved.source, 1).contiguous(memory_format=torch.channels_last)
    elif saved.source_kind == "residual":
        codes, scale, xprev, weight, bias, qw_f, sw = saved.source
        conv = bn_source.conv
        qc = conv.conv.qconfig
        qw, _ = weight_backward(Saved(weight=weight, sw=sw, qw_f=qw_f, codes_again=saved.source_again), qc, codes)
        saved.xb = conv_forward(conv, codes, qw, scale, sw, bias, qc, CARRIER_DTYPE, xprev)


def input_forward(spec: BlockSpec, x, in_codes, in_scale, qc: QConfig, saved: Saved, source: tuple = (),
                  in_codes_cm=None, stats=None):
    """(qx, sx, cin): the conv's int8 input codes, their scale, its real channel count (``source``: what may
    rebuild a ``BN`` input in backward, ``keep_bn_input``). ``in_codes_cm``: the same codes channel-major (the
    previous block wrote them for this conv's weight-grad): kept instead of the NHWC ones where backward needs
    no recompute of y, else as well."""
    if spec.input is BlockInput.CODES:
        saved.qx, saved.sx = in_codes, in_scale
        if in_codes_cm is not None:
            if spec.bn is None:
                saved.qx = in_codes_cm
            else:
                saved.qx_cm = in_codes_cm
        return in_codes, in_scale, x.shape[1]
    if spec.input is BlockInput.FLOAT:
        cin = x.shape[1]
        qx, sx = quantize(x, qc.bits_a, "nearest", qc.mode, channels_last=True,
                          pad_channels_to=input_pad(spec, cin, x))
        saved.qx, saved.sx = qx, sx
        return qx, sx, cin
    bn_in = spec.bn_in
    check_bn_batch(bn_in, x.shape)
    batch_in, update_in = bn_mode(bn_in)
    index, inv = index_maps(spec.select, x.shape[1], x.device)
    cin = x.shape[1] if index is None else index.numel()
    tensors = bn_tensors(bn_in)
    if stats is not None:  # formed with x by the previous block's last conv (``conv_next_bn_forward``): x is xb
        xb, (bnp_in, zmax_in) = x, stats
    else:
        xb, _, bnp_in, zmax_in = bn_stats(x, *tensors, bn_in.momentum, bn_in.eps, batch_in, update_in,
                                          spec.act_in, inv, reuse_x=spec.keep_input)
    qx, sx = bn_relu_quant(xb, bnp_in, zmax_in, tensors[4] if update_in else None, index, qc.bits_a,
                           qc.mode, spec.act_in, pad_of(cin, x))
    keep_bn_input(spec.bn_source, spec.keep_input, x, xb, source, saved)
    saved.sx, saved.bnp_in, saved.zmax_in = sx, bnp_in, zmax_in
    saved.index, saved.inv, saved.batch_in = index, inv, batch_in
    return qx, sx, cin


def weight_forward(weight, qc: QConfig, qx, cin: int, saved: Saved):
    """(qw, sw): W's codes in the forward layout (Cin padded like qx) and scale: from the step's weight batch
    (``ops.weight_step``), or, outside one or for a weight changed since, its own two launches. Backward keeps the
    scale and the codes of a small weight (``weight_batch.KEEP_CODES_NUMEL``); a larger one's are derived again
    (``weight_step.BackwardCodes``: all in one launch), as 2 bytes per weight would outweigh a large layer's int8
    activations at small batches."""
    if qc.mode == "wage" and qc.alpha != 1.0:
        raise ValueError("fused blocks need alpha == 1 in mode 'wage'")
    item = WeightItem(weight, qc.bits_w, qc.mode, CHANNEL_PAD if qx.shape[1] != cin else 0,
                      CHANNEL_PAD if use_triton(qx) else 0)
    codes = batched_weight_codes(item)
    qw, qw_d, sw = codes if codes is not None else weight_quant(item)
    if weight.numel() <= KEEP_CODES_NUMEL:
        saved.qw_f, saved.qw_d = qw, qw_d
    else:  # all large weights' codes again in one launch when backward first needs them
        saved.codes_again = batched_backward_codes(item)
    saved.sw = sw
    return qw, sw


def conv_bn_forward(spec: BlockSpec, x_shape, qx, qw, sx, sw, bias, qc: QConfig, saved: Saved):
    """(y bfloat16, bnp, zmax bits, num_batches_tracked to bump or None): the conv with the BatchNorm's
    statistics, parameters and running-statistics update in its epilogue."""
    bn = spec.bn
    stride, padding, dilation = spec.conv_geometry()
    oh_ow = conv2d_output_size(*x_shape[2:], *qw.shape[2:], stride, padding, dilation)
    check_bn_batch(bn, (x_shape[0], 1) + tuple(oh_ow))
    batch_stats, update = bn_mode(bn)
    tensors = bn_tensors(bn)
    y, _, bnp, zmax = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, stride, padding, dilation, qc.bits_a, qc.bits_w,
                                         *tensors, bn.momentum, bn.eps, batch_stats, update, spec.act)
    saved.bnp, saved.batch_stats = bnp, batch_stats
    if bias is not None and batch_stats:  # its gradient is exactly zero: a slice of the step's zero buffer
        saved.zero_bias = reserve_zero_grad(bias)
    return y, bnp, zmax, tensors[4] if update else None


def conv_forward(spec: BlockSpec, qx, qw, sx, sw, bias, qc: QConfig, out_dtype, residual=None):
    """The plain conv (no BatchNorm follows): its float output, plus ``residual`` (``spec.residual``: the
    pre-activation ResNet's shortcut) added in the GEMM's epilogue before the one rounding."""
    stride, padding, dilation = spec.conv_geometry()
    return conv2d_int8_fwd_op(qx, qw, sx, sw, bias, stride, padding, dilation, 1, qc.bits_a, qc.bits_w, out_dtype,
                              True, MAX_TERMS, residual)


def conv_next_bn_forward(spec: BlockSpec, qx, qw, sx, sw, bias, qc: QConfig, residual):
    """``conv_forward`` of a pre-activation block's last conv (bfloat16 output, the residual added in the epilogue)
    that, in the same launch, forms the next block's BatchNorm statistics of that output (``spec.next_bn``,
    ``conv_bn``): (y, bnp, zmax), the running statistics moved as ``bn_stats`` would have; y bit for bit
    ``conv_forward``'s (what backward replays)."""
    bn = spec.next_bn
    stride, padding, dilation = spec.conv_geometry()
    oh_ow = conv2d_output_size(*qx.shape[2:], *qw.shape[2:], stride, padding, dilation)
    check_bn_batch(bn, (qx.shape[0], 1) + tuple(oh_ow))
    batch, update = bn_mode(bn)
    y, _, bnp, zmax = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, stride, padding, dilation, qc.bits_a, qc.bits_w,
                                         *bn_tensors(bn), bn.momentum, bn.eps, batch, update, spec.next_act,
                                         residual=residual)
    return y, bnp, zmax


def output_forward(spec: BlockSpec, y, bnp, zmax, nbt, qc: QConfig, out_dtype, saved: Saved, residual=None):
    """(main, codes, scale, codes_cm): for ``CODES`` the next block's codes (max-pooled if asked; also
    channel-major when ``spec.out_channel_major`` and no pool) and a gradient carrier as ``main``; for ``FLOAT``
    ``act(bn(y))`` (``spec.residual``: ``act(bn(y) + residual)``, its mask kept) in ``out_dtype`` and no codes
    (a max-pool only pools codes)."""
    if spec.residual:
        main, mask = bn_add_act(y, bnp, residual, nbt, spec.act, out_dtype)
        saved.mask = mask if mask.numel() else None
        return main, None, None, None
    if spec.output is BlockOutput.FLOAT:
        main, _ = bn_relu_quant(y, bnp, zmax, nbt, None, 8, "shift", spec.act, 0, out_dtype=out_dtype)
        return main, None, None, None
    oq = spec.out_qconfig or qc
    cm = None
    if spec.out_channel_major and spec.pool is None and use_triton(y):
        codes, scale, cm = bn_relu_quant(y, bnp, zmax, nbt, None, oq.bits_a, oq.mode, spec.act,
                                         pad_of(y.shape[1], y), channel_major=True)
    else:
        codes, scale = bn_relu_quant(y, bnp, zmax, nbt, None, oq.bits_a, oq.mode, spec.act,
                                     pad_of(y.shape[1], y))
    saved.pre_pool_hw = tuple(codes.shape[2:])
    if spec.pool is not None:
        k, s, p, ceil = spec.pool
        codes, saved.pos = maxpool2d_int8(codes, k, s, p, ceil)
    # no storage: one element seen at every index (one allocation op, no expand)
    main = torch.empty_strided((codes.shape[0], y.shape[1], *codes.shape[2:]), (0, 0, 0, 0), dtype=CARRIER_DTYPE,
                               device=y.device)
    return main, codes, scale, cm


# ----- backward -----------------------------------------------------------------------------------------
def input_codes_backward(spec: BlockSpec, saved: Saved, qc: QConfig, meta: Meta):
    """The conv's input codes: kept, or (``BN`` input) recomputed from the bfloat16 input, bit-identical (and
    channel-major in the same pass into ``saved.qx_cm`` where the weight-grad reads them so)."""
    if spec.input is not BlockInput.BN:
        return saved.qx
    args = (saved.xb, saved.bnp_in, saved.zmax_in, None, saved.index, qc.bits_a, qc.mode, spec.act_in,
            pad_of(meta.cin, saved.xb))
    if channel_major_input(spec.conv) and use_triton(saved.xb):
        qx, _, saved.qx_cm = bn_relu_quant(*args, channel_major=True)
    else:
        qx, _ = bn_relu_quant(*args)
    return qx


def weight_backward(saved: Saved, qc: QConfig, qx):
    """(forward-layout, input-grad-layout) weight codes: kept (small weights), from the step's ``BackwardCodes``,
    or derived again in one launch (buffers pad channels to 16: forward Cin, as qx; input-grad Cout)."""
    if saved.qw_f is not None:
        return saved.qw_f, saved.qw_d
    codes = saved.codes_again[0].codes(saved.codes_again[1]) if saved.codes_again is not None else None
    return codes if codes is not None else weight_codes(saved.weight, saved.sw, qc.bits_w, CHANNEL_PAD if use_triton(qx) else 0)


def output_backward(spec: BlockSpec, g_main, saved: Saved, qc: QConfig, qx, qw_f, meta: Meta, need,
                    amax=None) -> Error:
    """E's codes from the gradient of the block's output: through the max-pool (or, after a residual add,
    through the activation's mask: that is also the residual's gradient), then the BatchNorm + activation
    backward (y kept or recomputed in the GEMM that also forms the BatchNorm sums) in two passes (absmax,
    then codes); without a BatchNorm, the gradient quantized as ``QConv2d`` does (``amax``: its max and
    ticket from its producer, ``BlockLinks.amax_from``: the codes pass only)."""
    cout = saved.weight.shape[0]
    pad_out = pad_of(cout, qx)
    bias = saved.bias
    g_bn_w = g_bn_b = g_bias = None
    if spec.bn is None:  # both layouts from the quantizer's one codes pass (no copy)
        qe, qe_cm, se = quantize_two_layouts(g_main, qc.bits_e, qc.rounding_e, qc.mode_eg, pad_out, amax)
        if bias is not None and need.bias:
            g_bias = cast(g_main.sum((0, 2, 3), dtype=torch.float32), bias.dtype)
        # a residual added in the epilogue gets the output's gradient as it is
        return Error(qe, qe_cm, se, None, None, g_bias, g_main if spec.residual else None)
    dz, act, g_res = g_main, spec.act, None
    if spec.pool is not None:
        k, s, p, ceil = spec.pool
        dz = maxpool2d_int8_backward(dz, saved.pos, saved.pre_pool_hw, cout, k, s, p, ceil)
    if spec.residual:  # the activation came after the add: its mask, then the BatchNorm alone
        dz = g_res = dz if saved.mask is None else torch.where(saved.mask, dz, 0.0)
        act = "identity"
    if saved.y is not None:  # kept from the forward (compute-bound layer)
        y = saved.y
        sums = bn_relu_bwd_reduce(dz, y, saved.bnp, None, act)
    else:  # recomputed, bit-identical, in the GEMM that also forms the sums
        stride, padding, dilation = spec.conv_geometry()
        y, sums = conv2d_int8_bn_bwd_reduce(qx, qw_f, saved.sx, saved.sw, bias, stride, padding, dilation, qc.bits_a,
                                            qc.bits_w, dz, saved.bnp, act)
    s_dy = sums if saved.batch_stats else None
    stochastic = qc.rounding_e == "stochastic"
    amax, = bn_relu_bwd(dz, y, saved.bnp, s_dy, None, act, "absmax", qc.bits_e, stochastic)
    qe, qe_cm, se = bn_relu_bwd(dz, y, saved.bnp, s_dy, None, act, "codes", qc.bits_e, stochastic, pad_out, amax,
                                scale_mode=qc.mode_eg)
    if need.bn_weight or need.bn_bias:
        s_g, s_gx = sums.unbind(0)  # one view op for both rows
        g_bn_w, g_bn_b = cast(s_gx, spec.bn.weight.dtype), cast(s_g, spec.bn.bias.dtype)
    if bias is not None and need.bias:
        # train-mode BatchNorm right after: the bias has exactly no effect; eval: Σ dy = a·Σ g
        g_bias = zero_grad_of(saved.zero_bias, bias) if saved.batch_stats else cast(saved.bnp[0] * sums[0], bias.dtype)
    return Error(qe, qe_cm, se, g_bn_w, g_bn_b, g_bias, g_res)


def conv_backward(spec: BlockSpec, e: Error, saved: Saved, qc: QConfig, qx, qw_d, meta: Meta, need):
    """(gx, gw): the input-grad (bfloat16 towards codes and the pre-activation BatchNorm, the input's dtype
    towards a float input) and the weight-grad with its G quantization, on the int8 kernels."""
    stride, padding, dilation = spec.conv_geometry()
    weight = saved.weight
    gx = gw = None
    need_bn_in = spec.input is BlockInput.BN and (need.bn_in_weight or need.bn_in_bias)
    if need.x or need_bn_in:
        out_dtype = meta.x_dtype if spec.input is BlockInput.FLOAT else CARRIER_DTYPE
        gx = conv2d_int8_dgrad_op(e.qe, leading(qw_d, e.qe.shape[1], meta.cin), e.se, saved.sw, list(meta.x_shape[2:]),
                                  stride, padding, dilation, 1, qc.bits_e, qc.bits_w, out_dtype, True, MAX_TERMS)
    if need.weight:
        # a 1×1 layer's channel-major codes where their producer wrote them (both operands K-major); else (a float
        # input: SE's product in EfficientNet) the NHWC codes, read as every 3×3 layer's are: no copy in a step
        qx_w = saved.qx_cm if saved.qx_cm is not None else qx
        gw = cast(weight_grad_op(e.qe_cm, qx_w, e.se, saved.sx, list(weight.shape[2:]), stride, padding, dilation, 1,
                                 qc, [weight.shape[0], weight.shape[1]], meta.weight_channels_last), weight.dtype)
    return gx, gw


def input_backward(spec: BlockSpec, gx, saved: Saved, meta: Meta, need, addend=None, amax_stochastic=None):
    """(gx, g_bn_in_weight, g_bn_in_bias, amax): through the pre-activation BatchNorm (+ ReLU, + gather) of a
    ``BN`` input, plus ``addend`` (the input's other gradient: the shortcut's, or a dense block's later readers',
    whose channel prefix it is: ``spec.GradLink``) in the same kernel, and (``amax_stochastic`` not None) gx's
    ``[bits of max, ticket]``; unchanged otherwise."""
    if spec.input is not BlockInput.BN or gx is None:
        return gx, None, None, None
    sums_in = bn_relu_bwd_reduce(gx, saved.xb, saved.bnp_in, saved.inv, spec.act_in)
    if addend is not None and addend.shape[1] != saved.xb.shape[1]:  # a dense block's: a channel prefix
        addend = addend[:, :saved.xb.shape[1]]
    gx, *amax = bn_relu_bwd(gx, saved.xb, saved.bnp_in, sums_in if saved.batch_in else None, saved.inv, spec.act_in,
                            "float" if amax_stochastic is None else "float_absmax", stochastic=bool(amax_stochastic),
                            out_dtype=meta.x_dtype, channels_last_out=meta.channels_last, addend=addend)
    g_in_w = g_in_b = None
    if (need.bn_in_weight or need.bn_in_bias) and spec.bn_in.weight is not None:
        s_g, s_gx = sums_in.unbind(0)
        g_in_w, g_in_b = cast(s_gx, spec.bn_in.weight.dtype), cast(s_g, spec.bn_in.bias.dtype)
    return gx, g_in_w, g_in_b, amax[0] if amax else None
