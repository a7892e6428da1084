"""BatchNorm-apply + activation + quantize in one pass (SPEC §9), and BatchNorm statistics of a float tensor.

``bn_relu_quant``: reads y once (NHWC, bfloat16 from the conv epilogue, or any float tensor) and writes
the int8 codes of ``z = act(y * a + b)`` (``bn_math.ACTIVATIONS``) straight in the layout the next convolution reads (NHWC,
channels zero-padded to a multiple of 16), or z itself as float where the next layer is not an int8
convolution. The per-channel ``bnp`` = [a, b, mean, rstd] and the float32 bits of ``max |z|`` come from
the kernel that produced the statistics (the conv epilogue of ``conv_bn``, or ``bn_stats`` below), so
the scale (SPEC §2, any mode) is known before z exists and the float z is never materialised. An optional
channel gather (``index``) is the pre-activation ResNet's ``ChannelSelection``.

``bn_stats``: per-channel statistics of a float tensor (a pre-activation BatchNorm reading the residual
stream), with the same in-kernel two-level merge and the same finalisation (``bnp``, ``max |z|``,
running statistics); it also writes the tensor rounded to bfloat16 in NHWC order: the copy that the
fused block keeps for backward, and the values its statistics and its ``bn_relu_quant`` use.

Each op: Triton kernel(s), a PyTorch reference with the same float32 operations, a ``torch.library``
custom op with a fake implementation.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._backend import use_triton
from ..._registry import aot_kernel
from ..._triton import tl, triton
from .._buffers import empty_channel_major, empty_output
from .._dispatch import absent, present
from .._launch import cdiv, BoundLaunch, ELEMENTWISE_WARPS, NO_FP_FUSION, cached_plan, elementwise_tiles, nhwc_rows
from .._reduce import (MOMENTS, ReductionSpace, finish_reduction, max_of_blocks, merge_group, moments_reference,
                       store_block_max, store_partials, tile_moments, z_slots)
from .._scale import scale_from_bits, scale_mode_code, scale_reference
from .._tl import cast_rne, decode_rows, elementwise_tile, round_half_even, to_bfloat16_rne
from .._dispatch import custom_op
from .bn_math import BNP_ROWS, act_code, bn_act, bn_act_reference, bn_finalize_channels, finalize_reference, momentum_arg

__all__ = ["bn_stats", "bn_relu_quant", "bn_stats_reference", "bn_relu_quant_reference"]


# --------------------------------------------------------------------------------------------------
# bn_stats
# --------------------------------------------------------------------------------------------------
_STATS_SIG = {"x_ptr": "*fp32", "xb_ptr": "*bf16", "part_ptr": "*fp32", "grp_ptr": "*fp32", "chan_ptr": "*fp32",
              "sem_ptr": "*i32", "gamma_ptr": "*fp32", "beta_ptr": "*fp32", "rm_ptr": "*fp32", "rv_ptr": "*fp32",
              "nbt_ptr": "*i64", "keep_ptr": "*i32", "bnp_ptr": "*fp32", "zmax_ptr": "*i32", "M": "i32", "C": "i32",
              "H": "i32", "W": "i32", "s_n": "i64", "s_c": "i64", "s_h": "i64", "s_w": "i64", "eps": "fp32",
              "momentum": "fp32", "n_f": "fp32"}


# registers per thread: at ptxas' own choice (80) the bfloat16-input build spills 24-32 bytes on sm_80 (an AOT build of
# that signature); at 128 none does, on sm_80 or sm_90
STATS_MAXNREG = 128


@aot_kernel(signature=_STATS_SIG,
            constexprs=[{"HAS_AFFINE": True, "BATCH_STATS": True, "UPDATE": True, "ACT": 1, "HAS_KEEP": k,
                         "BP": 2048 // cb, "CB": cb, "TB": merge_group(cb), "GROUP": merge_group(cb), "WRITE_XB": True,
                         "maxnreg": STATS_MAXNREG} for k, cb in ((False, 128), (True, 128), (False, 64))],
            num_warps=ELEMENTWISE_WARPS, fp_fusion=False)
@triton.jit
def bn_stats_kernel(x_ptr, xb_ptr, part_ptr, grp_ptr, chan_ptr, sem_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr,
                    keep_ptr, bnp_ptr, zmax_ptr, M, C, H, W, s_n, s_c, s_h, s_w, eps, momentum, n_f,
                    HAS_AFFINE: tl.constexpr, BATCH_STATS: tl.constexpr, UPDATE: tl.constexpr, ACT: tl.constexpr,
                    HAS_KEEP: tl.constexpr, BP: tl.constexpr, CB: tl.constexpr, TB: tl.constexpr,
                    GROUP: tl.constexpr, WRITE_XB: tl.constexpr):
    """Grid (row tiles, channel blocks) over the N·H·W × C elements of x (any strides): x rounded to
    bfloat16 into ``xb`` (NHWC), per-tile moments, the two-level merge into ``chan``, then the
    finalisation (``bn_finalize_channels``) by the merging program. ``HAS_KEEP``: only channels with
    ``keep[c] >= 0`` count towards max |z| (those a channel gather keeps). ``WRITE_XB`` false: x already is
    bfloat16 NHWC (the fused residual stream), xb would be a copy of it: not written."""
    pid_m, pid_n, m, c, m_ok, c_ok = elementwise_tile(M, C, BP, CB)
    T = tl.num_programs(0)
    n, h, w = decode_rows(m, H, W)
    offs = n.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    mask = m_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + offs[:, None] + c.to(tl.int64)[None, :] * s_c, mask=mask, other=0.0)
    xb = to_bfloat16_rne(x.to(tl.float32))
    if WRITE_XB:
        tl.store(xb_ptr + m.to(tl.int64)[:, None] * C + c[None, :], xb, mask=mask)
    cnt = tl.minimum(BP, M - pid_m * BP)
    mean, m2, mx, mn = tile_moments(xb.to(tl.float32), m_ok, cnt)
    store_partials(part_ptr, pid_m, T, C, c, c_ok, mean, m2, mx, mn, 0)
    final = finish_reduction(part_ptr, grp_ptr, chan_ptr, sem_ptr, pid_m, T, pid_n, tl.num_programs(1), M, BP, c,
                             c_ok, C, 0, GROUP, TB, CB)
    if final:
        max_ok = c_ok  # every channel gets bnp and running statistics; max |z| only over the gathered ones
        if HAS_KEEP:
            max_ok = tl.load(keep_ptr + c, mask=c_ok, other=-1) >= 0
        zbits = bn_finalize_channels(chan_ptr, C, c, c_ok, max_ok, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr, eps,
                                     momentum, n_f, bnp_ptr, HAS_AFFINE, BATCH_STATS, UPDATE, ACT)
        store_block_max(zbits, zmax_ptr, pid_n, C, CB)


def bn_stats_reference(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, batch_stats,
                       update, act, keep=None):
    """(x rounded to bfloat16 in NHWC order, chan [mean, var, max, min], bnp, zmax bits)."""
    xb = x.to(torch.bfloat16).clone(memory_format=torch.channels_last)  # a new tensor, whatever x is
    C = x.shape[1]
    chan = moments_reference(xb.permute(0, 2, 3, 1).reshape(-1, C))
    bnp, zmax = finalize_reference(chan, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                   xb.numel() // max(C, 1), batch_stats, update, act, keep)
    return xb, chan, bnp, zmax


def _bn_stats_triton(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, batch_stats,
                     update, act, keep, reuse_x=False):
    N, C, H, W = x.shape
    M = N * H * W
    write_xb = not _reuses(x, reuse_x)
    xb = empty_output((N, C, H, W) if write_xb else (0,), torch.bfloat16, x.device,
                      torch.channels_last if write_xb else torch.contiguous_format)
    BP, CB = elementwise_tiles(C, 2048)  # the fp32 input, its bf16 copy and the moments: 2K elements
    T, num_n = cdiv(M, BP), cdiv(C, CB)
    group = merge_group(CB)
    space = ReductionSpace(MOMENTS, T, num_n, C, x.device, group=group)
    bnp = empty_output((BNP_ROWS, C), torch.float32, x.device)
    zmax = torch.empty(z_slots(C), dtype=torch.int32, device=x.device)  # max |z| bits per 16 channels
    dummy = space.out
    bn_stats_kernel[(T, num_n)](
        x, xb if write_xb else x, space.part, space.grp, space.out, space.sem, weight if weight is not None else dummy,
        bias if bias is not None else dummy, running_mean if running_mean is not None else dummy,
        running_var if running_var is not None else dummy,
        num_batches_tracked if num_batches_tracked is not None else zmax, keep if keep is not None else zmax,
        bnp, zmax, M, C, H, W, *nhwc_rows(x), float(eps), momentum_arg(momentum), float(M),
        HAS_AFFINE=weight is not None, BATCH_STATS=batch_stats, UPDATE=update, ACT=act_code(act), HAS_KEEP=keep is not None,
        BP=BP, CB=CB, TB=group, GROUP=group, WRITE_XB=write_xb, num_warps=ELEMENTWISE_WARPS, maxnreg=STATS_MAXNREG,
        **NO_FP_FUSION)
    return xb, space.out, bnp, zmax


def _reuses(x: torch.Tensor, reuse_x: bool) -> bool:
    """Whether x serves as its own xb: allowed (``reuse_x``) and already what ``bn_stats`` would round it to
    (bfloat16, dense NHWC)."""
    return reuse_x and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)




@custom_op("ebkernels::bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 running_mean: torch.Tensor, running_var: torch.Tensor,
                 num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float], eps: float,
                 batch_stats: bool, update: bool, act: str, keep: Optional[torch.Tensor], reuse_x: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # running_mean / running_var: ``absent`` when the BatchNorm keeps none (a mutable argument is never optional)
    running_mean, running_var = present(running_mean), present(running_var)
    if use_triton(x) and x.numel() < 2**31:
        return _bn_stats_triton(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                batch_stats, update, act, keep, reuse_x)
    xb, chan, bnp, zmax = bn_stats_reference(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                             eps, batch_stats, update, act, keep)
    return xb if not _reuses(x, reuse_x) else xb.new_empty((0,)), chan, bnp, zmax.repeat(z_slots(x.shape[1]))


@_bn_stats_op.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, batch_stats, update, act,
      keep, reuse_x=False):
    C = x.shape[1]
    xb = (torch.empty(x.shape, dtype=torch.bfloat16, device=x.device, memory_format=torch.channels_last)
          if not _reuses(x, reuse_x) else x.new_empty((0,), dtype=torch.bfloat16))
    return (xb, x.new_empty((4, C), dtype=torch.float32), x.new_empty((BNP_ROWS, C), dtype=torch.float32),
            x.new_empty((z_slots(C),), dtype=torch.int32))


def bn_stats(x, weight=None, bias=None, running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1,
             eps=1e-5, batch_stats=True, update=False, act="relu", keep=None, reuse_x=False):
    """Statistics of ``x`` (N, C, H, W) per channel: ``(xb, chan, bnp, zmax_bits)`` with ``xb`` = x in
    bfloat16 (NHWC; x itself, not a copy, when it already is that and ``reuse_x``: nothing modifies x in place
    while xb is needed), ``chan`` = [mean, biased var, max, min] of xb, ``bnp`` = [a, b, mean, rstd] from
    the batch statistics (``batch_stats``) or the running ones, and the float32 bits of max |z| over the
    channels with ``keep[c] >= 0`` (all when ``keep`` is None) as int32 [ceil(C / 16)], per 16
    channels the max of their channel block (``_reduce.store_block_max``; max |z| is their max). ``update``: move the running statistics
    as ``nn.BatchNorm2d`` in training (``num_batches_tracked`` is incremented by ``bn_relu_quant``). ``act``: the
    activation after the BatchNorm (``bn_math.ACTIVATIONS``), which max |z| is of."""
    xb, chan, bnp, zmax = _bn_stats_op(x, weight, bias, absent(x) if running_mean is None else running_mean,
                                       absent(x, 1) if running_var is None else running_var, num_batches_tracked,
                                       None if momentum is None else float(momentum), float(eps), bool(batch_stats),
                                       bool(update), _act(act), keep, bool(reuse_x))
    return (x if _reuses(x, reuse_x) else xb), chan, bnp, zmax  # x already bf16 NHWC: no copy


def _act(act) -> str:
    act_code(act)  # refuses an unknown activation by name
    return act


# --------------------------------------------------------------------------------------------------
# bn_relu_quant
# --------------------------------------------------------------------------------------------------
_APPLY_SIG = {"y_ptr": "*bf16", "bnp_ptr": "*fp32", "zmax_ptr": "*i32", "index_ptr": "*i64", "out_ptr": "*i8",
              "scale_ptr": "*fp32", "nbt_ptr": "*i64", "M": "i32", "K": "i32", "Kp": "i32", "C": "i32", "H": "i32",
              "W": "i32", "s_n": "i64", "s_c": "i64", "s_h": "i64", "s_w": "i64", "cm_ptr": "*i8", "NZ": "i32"}


@aot_kernel(signature=_APPLY_SIG,
            constexprs=[{"BITS": 8, "SCALE_MODE": m, "ACT": 1, "HAS_INDEX": i, "CODES": True,
                         "UPDATE_NBT": True, "BP": 32, "CB": 128, "CM": cm}
                        for i, cm in ((False, False), (True, False), (False, True)) for m in (0, 2)]
            + [{"BITS": 8, "SCALE_MODE": 0, "ACT": a, "HAS_INDEX": False, "CODES": c, "UPDATE_NBT": True,
                "BP": 32, "CB": 128, "CM": False} for a, c in ((0, False), (1, False), (3, True))],
            num_warps=ELEMENTWISE_WARPS, fp_fusion=False)
@triton.jit
def bn_relu_quant_kernel(y_ptr, bnp_ptr, zmax_ptr, index_ptr, out_ptr, scale_ptr, nbt_ptr, M, K, Kp, C, H, W, s_n,
                         s_c, s_h, s_w, cm_ptr, NZ, BITS: tl.constexpr, SCALE_MODE: tl.constexpr, ACT: tl.constexpr,
                         HAS_INDEX: tl.constexpr, CODES: tl.constexpr, UPDATE_NBT: tl.constexpr, BP: tl.constexpr,
                         CB: tl.constexpr, CM: tl.constexpr):
    """Grid (row tiles, output-channel blocks): output channel k of pixel m is ``z`` of input channel
    ``index[k]`` (or k); ``CODES``: int8 codes at ``m * Kp + k`` (NHWC, channels K..Kp-1 written 0) with
    the scale of max |z| (the max of ``zmax``'s ``NZ`` block maxima) in ``SCALE_MODE`` (``_scale``; stored by program (0, 0)); else z at ``m * K + k`` in out's dtype."""
    pid_m, pid_n, m, k, m_ok, k_ok = elementwise_tile(M, K, BP, CB)
    if HAS_INDEX:
        src = tl.load(index_ptr + k, mask=k_ok, other=0).to(tl.int32)
    else:
        src = k
    a = tl.load(bnp_ptr + src, mask=k_ok, other=0.0)
    b = tl.load(bnp_ptr + C + src, mask=k_ok, other=0.0)
    n, h, w = decode_rows(m, H, W)
    offs = n.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    y = tl.load(y_ptr + offs[:, None] + src.to(tl.int64)[None, :] * s_c, mask=m_ok[:, None] & k_ok[None, :],
                other=0.0).to(tl.float32)
    z = bn_act(y, a[None, :], b[None, :], ACT)
    first = (pid_m == 0) & (pid_n == 0)
    if CODES:
        S: tl.constexpr = 2.0 ** (BITS - 1)
        scale = scale_from_bits(max_of_blocks(zmax_ptr, NZ), SCALE_MODE, BITS)
        q = tl.math.div_rn(z, scale) * S
        q = round_half_even(tl.minimum(tl.maximum(q, -(S - 1.0)), S - 1.0))
        q = tl.where((q != q) | ~k_ok[None, :], 0.0, q)
        tl.store(out_ptr + m.to(tl.int64)[:, None] * Kp + k[None, :], q.to(tl.int8),
                 mask=m_ok[:, None] & (k < Kp)[None, :])
        if CM:  # the same codes channel-major ([Kp, M]: the K-major operand of a 1×1 weight-grad)
            tl.store(cm_ptr + k.to(tl.int64)[None, :] * M + m[:, None], q.to(tl.int8),
                     mask=m_ok[:, None] & (k < Kp)[None, :])
        if first:
            tl.store(scale_ptr, scale)
    else:
        tl.store(out_ptr + m.to(tl.int64)[:, None] * K + k[None, :], cast_rne(z, out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])
        if first:  # the scale of a float result: 1 (written here rather than by a fill launch)
            tl.store(scale_ptr, 1.0)
    if UPDATE_NBT:
        if first:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


def _codes_reference(z: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    S = float(2 ** (bits - 1))
    q = (z / scale) * S
    q = torch.round(q.clamp(-(S - 1), S - 1))
    return torch.nan_to_num(q, nan=0.0).to(torch.int8)


def bn_relu_quant_reference(y, bnp, zmax_bits, num_batches_tracked, index, bits, scale_mode, act, pad_to,
                            out_dtype, cm=None):
    """``bn_relu_quant`` in PyTorch: (codes (N, Kp, H, W) NHWC, scale) or (z in out_dtype NHWC, 1)."""
    z = bn_act_reference(y, bnp, act)
    if index is not None:
        z = z.index_select(1, index)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if out_dtype is not None:
        return z.to(out_dtype).contiguous(memory_format=torch.channels_last), z.new_ones(())
    scale = scale_reference(zmax_bits.max().reshape(1).view(torch.float32).reshape(()), scale_mode, bits)
    codes = _codes_reference(z, scale, bits)
    N, K, H, W = codes.shape
    Kp = _padded(K, pad_to)
    out = torch.zeros((N, H, W, Kp), dtype=torch.int8, device=y.device).permute(0, 3, 1, 2)
    out[:, :K] = codes
    if cm is not None:
        cm.copy_(out)
    return out, scale


def _padded(K: int, pad_to: int) -> int:
    return K if pad_to <= 1 else -(-K // pad_to) * pad_to


@cached_plan
def _quant_plan(shape, y_rows, K: int, Kp: int, has_index: bool, bits: int, scale_mode: str, act: str, codes: bool,
                update_nbt: bool, has_cm: bool) -> tuple:
    """(launch, ints) of ``bn_relu_quant_kernel`` for a geometry and a call's flags: once per shape."""
    N, C, H, W = shape
    M = N * H * W
    BP, CB = elementwise_tiles(Kp)
    launch = BoundLaunch(bn_relu_quant_kernel, (cdiv(M, BP), cdiv(Kp, CB)), BITS=bits,
                         SCALE_MODE=scale_mode_code(scale_mode), ACT=act_code(act), HAS_INDEX=has_index, CODES=codes,
                         UPDATE_NBT=update_nbt, BP=BP, CB=CB, CM=has_cm, num_warps=ELEMENTWISE_WARPS, **NO_FP_FUSION)
    return launch, (M, K, Kp, C, H, W, *y_rows)


def _bn_relu_quant_triton(y, bnp, zmax_bits, num_batches_tracked, index, bits, scale_mode, act, pad_to,
                          out_dtype, cm=None):
    N, C, H, W = y.shape
    K = C if index is None else index.numel()
    codes = out_dtype is None
    Kp = _padded(K, pad_to) if codes else K
    launch, ints = _quant_plan(y.shape, y.stride(), K, Kp, index is not None, bits, scale_mode, act, codes,
                               num_batches_tracked is not None, cm is not None)
    out = empty_output((N, Kp, H, W), torch.int8 if codes else out_dtype, y.device, torch.channels_last)
    scale = empty_output((), torch.float32, y.device)  # (a float result: 1, stored by the kernel)
    launch(y, bnp, zmax_bits, index if index is not None else zmax_bits, out, scale,
           num_batches_tracked if num_batches_tracked is not None else zmax_bits, *ints,
           cm if cm is not None else out, zmax_bits.numel())
    return out, scale


@custom_op("ebkernels::bn_relu_quant", mutates_args=("num_batches_tracked", "cm"))
def _bn_relu_quant_op(y: torch.Tensor, bnp: torch.Tensor, zmax_bits: torch.Tensor,
                      num_batches_tracked: torch.Tensor, index: Optional[torch.Tensor], bits: int,
                      scale_mode: str, act: str, pad_to: int, out_dtype: Optional[torch.dtype],
                      cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # cm: an int8 (N, Kp, H, W) tensor with channel-major memory that gets the codes too (same pass); cm and
    # num_batches_tracked: ``absent`` for none (a mutable argument is never optional)
    num_batches_tracked, cm = present(num_batches_tracked), present(cm)
    if use_triton(y, bnp) and y.numel() < 2**31:
        return _bn_relu_quant_triton(y, bnp, zmax_bits, num_batches_tracked, index, bits, scale_mode, act, pad_to,
                                     out_dtype, cm)
    return bn_relu_quant_reference(y, bnp, zmax_bits, num_batches_tracked, index, bits, scale_mode, act, pad_to,
                                   out_dtype, cm)


@_bn_relu_quant_op.register_fake
def _(y, bnp, zmax_bits, num_batches_tracked, index, bits, scale_mode, act, pad_to, out_dtype, cm):
    N, C, H, W = y.shape
    K = C if index is None else index.shape[0]
    if out_dtype is not None:
        return (torch.empty((N, K, H, W), dtype=out_dtype, device=y.device, memory_format=torch.channels_last),
                y.new_empty((), dtype=torch.float32))
    out = torch.empty((N, _padded(K, pad_to), H, W), dtype=torch.int8, device=y.device,
                      memory_format=torch.channels_last)
    return out, y.new_empty((), dtype=torch.float32)


def bn_relu_quant(y, bnp, zmax_bits, num_batches_tracked=None, index=None, bits=8, scale_mode="shift", act="relu",
                  pad_to=16, out_dtype=None, channel_major=False):
    """``z = act(y * a + b)`` per channel (``bnp`` rows a, b; ``act`` one of ``bn_math.ACTIVATIONS``; signed codes
    unless it is ReLU / ReLU6), optionally gathered (``index``: output channel k is input channel index[k]).
    ``out_dtype`` None: int8 codes (N, Kp, H, W) in NHWC order, Kp = K rounded up to ``pad_to`` (pad channels 0),
    with the scale of ``zmax_bits`` in ``scale_mode`` ("shift", "wage" or "absmax": ``ops._scale``, the rule
    ``quantize`` applies to z); returns ``(codes, scale)``. Else ``(z, None)`` in that dtype, NHWC (and a scale
    of 1). ``num_batches_tracked``: incremented by one (training step of a BatchNorm that tracks).
    ``channel_major`` (codes only): ``(codes, scale, codes_cm)``, the same codes also with channel-major memory
    ([Kp, N, H, W]: the K-major operand of a 1×1 weight-grad) from the same pass."""
    act_code(act)  # refuses an unknown activation by name
    cm = None
    if channel_major:
        N, _, H, W = y.shape
        K = y.shape[1] if index is None else index.numel()
        cm = empty_channel_major((N, _padded(K, pad_to), H, W), torch.int8, y.device)
    out = _bn_relu_quant_op(y, bnp, zmax_bits, absent(y) if num_batches_tracked is None else num_batches_tracked,
                            index, int(bits), str(scale_mode), str(act), int(pad_to), out_dtype,
                            absent(y, 1) if cm is None else cm)
    return (*out, cm) if channel_major else out
