"""Int8 implicit-GEMM convolution with a BatchNorm epilogue (SPEC §9): the conv forward that also
produces the BatchNorm statistics of its output, and the same GEMM in backward, recomputing y exactly
to form the BatchNorm-backward sums.

Both run the forward convolution of ``gemm.conv`` (same main loop, ``conv_forward_tile``)
and the same first step of the epilogue: ``y = acc * sx*sw/S² (+ bias)`` in float32, rounded to
bfloat16 (the value BatchNorm sees, in forward and backward) and stored NHWC. Then:

- ``conv2d_int8_bn_fwd``: per-tile moments of y per channel, the two-level in-kernel merge of
  ``_reduce`` into [mean, var, max, min], and the BatchNorm finalisation of ``bn_math`` by the
  merging program: ``bnp`` = [a, b, mean, rstd], the bits of max |z| (the next quantizer's absmax,
  exact), the running statistics. One launch instead of conv + statistics + finalise.
- ``conv2d_int8_bn_bwd_reduce``: y is recomputed from the saved int8 codes (an exact integer GEMM: the
  same bits as in forward), the incoming dz tile is loaded, ``g = dz·act'(t)`` (``bn_math``), ``xhat =
  (y - mean) * rstd``, and the sums [Σ g, Σ g·xhat] are merged in the kernel. y is stored again for
  the elementwise backward passes (``bn_relu_bwd``); nothing of y was kept from the forward.

The tile is the per-layer forward's (``tiles.conv_fwd_plan``: narrow BN for small Cout, BM by grid fill,
K packed across taps (``FLAT``) below 64 channels per tap, BM = 64 for unaligned 128-column tiles), but
always one split: the epilogue needs each output's whole sum, so where the table splits K (rule 7, an
underfilled grid) this kernel runs the plan's tile unsplit. Split-K with the last split doing the BatchNorm
epilogue (``split_fixup``) is not done: it would carry an int64 [BM, BN] sum into an epilogue that
already holds 236-255 registers at 128×128, and only small-batch layers would gain. The statistics merge
depends on the tile only through BM (rows per partial: ``span``) and the row / column tile counts, which
``ReductionSpace`` is sized from; its ``GROUP`` (row tiles per merge) and ``TB`` (partials per merge step)
do not depend on BM or BN.

Only whole reductions (Cin·KH·KW within one int32-exact chunk, every real layer) and groups = 1 come
here; the fused block checks that. References: the float64-exact integer conv of ``gemm.conv_reference`` with
the kernel's float32 epilogue, then the float64 statistics / sums of ``_reduce``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..._backend import use_triton
from ..._registry import aot_kernel
from ..._triton import tl, triton
from .._buffers import empty_output
from .._dispatch import absent, present
from ...config import kernel_settings
from .._launch import (cdiv, MAX_TERMS, NO_FP_FUSION, BoundLaunch, alignment, cached_plan, conv2d_output_size,
                       geometry, offsets_fit_int32)
from .._reduce import (GROUP as STATS_GROUP, MOMENTS, SUMS, TB as STATS_TB, ReductionSpace, finish_reduction,
                       moments_reference, store_block_max, store_partials, tile_moments, tile_sums, z_slots)
from .._tl import assume_conv_operands, decode_rows, to_bfloat16_rne
from ..gemm import tiles
from ..gemm.conv import conv2d_int8_fwd_reference
from ..gemm.host import inv_code_scales
from ..gemm.mainloop import conv_forward_tile, grouped_tile_ids, k_steps
from .._dispatch import custom_op
from .bn_math import BNP_ROWS, act_code, bn_finalize_channels, bn_grad_in, finalize_reference, momentum_arg

__all__ = ["conv2d_int8_bn_fwd", "conv2d_int8_bn_bwd_reduce", "conv2d_int8_bn_fwd_reference",
           "conv2d_int8_bn_bwd_reduce_reference"]

_SIG = {"src_ptr": "*i8", "w_ptr": "*i8", "y_ptr": "*bf16", "ss_ptr": "*fp32", "sw_ptr": "*fp32",
        "bias_ptr": "*fp32", "dz_ptr": "*bf16", "part_ptr": "*fp32", "grp_ptr": "*fp32", "chan_ptr": "*fp32",
        "sem_ptr": "*i32", "gamma_ptr": "*fp32", "beta_ptr": "*fp32", "rm_ptr": "*fp32", "rv_ptr": "*fp32",
        "nbt_ptr": "*i64", "bnp_ptr": "*fp32", "zmax_ptr": "*i32", "P": "i32", "Q": "i32", "R": "i32",
        "OP": "i32", "OQ": "i32", "NCOL": "i32", "KW": "i32", "M": "i32", "taps": "i32", "stride_h": "i32",
        "stride_w": "i32", "pad_h": "i32", "pad_w": "i32", "dil_h": "i32", "dil_w": "i32", "s_n": "i32",
        "s_h": "i32", "s_w": "i32", "s_r": "i32", "sw_col": "i32", "sw_h": "i32", "sw_w": "i32", "sw_r": "i32",
        "sd_n": "i32", "sd_h": "i32", "sd_w": "i32", "sd_c": "i32", "inv_ss": "fp32", "eps": "fp32",
        "momentum": "fp32", "n_f": "fp32", "res_ptr": "*bf16"}
# AOT configurations = GPU launches: every tile of the per-layer forward's table (``tiles.IGEMM_TILES``, its
# warps / stages), MODE 0 at unit stride (the JIT specialises arguments equal to 1) and at a runtime stride,
# MODE 1 at unit stride; the flat tiles the unpadded Cin = 3 first layer gets (R % 16: no 128×128) also
# unaligned (ALIGN=1), both modes.
_COMMON = {"s_r": 1, "sw_r": 1, "sd_c": 1, "I64": False, "ALIGN": 16, "HAS_BIAS": False, "HAS_AFFINE": True,
           "ACT": 1, "TB": STATS_TB, "GROUP": STATS_GROUP, "DZ_LIKE_Y": True, "HAS_RES": False}
_UNIT = {"stride_h": 1, "stride_w": 1, "dil_h": 1, "dil_w": 1}
# the register cap of a launch (``.maxnreg``): without one, ptxas aims below the per-thread budget and spilled
# 12-104 B on sm_80 in the statistics epilogue (MODE 0 at 64×64, 128×16 flat, 128×64: 96-168 registers used);
# with the whole budget it keeps everything in 112-218 registers
MAXNREG = 255


def _bn_aot(t, mode, **kw):
    return {**t.aot(), "FLAT": t.flat, **_COMMON, "MODE": mode, "BATCH_STATS": True, "UPDATE": mode == 0,
            "dil_h": 1, "dil_w": 1, "maxnreg": MAXNREG, **kw}


_AOT = ([cfg for t in tiles.IGEMM_TILES for cfg in (_bn_aot(t, 0, **_UNIT), _bn_aot(t, 0), _bn_aot(t, 1, **_UNIT))]
        + [_bn_aot(t, mode, **_UNIT, ALIGN=1) for t in tiles.IGEMM_TILES if t.flat and t.BM * t.BN < 128 * 128
           for mode in (0, 1)]
        + [_bn_aot(t, 0, **_UNIT, HAS_RES=True) for t in tiles.IGEMM_TILES if t.BM * t.BN < 128 * 128])


@aot_kernel(signature=_SIG, constexprs=_AOT, int8_mma=True, aligned=("src_ptr", "w_ptr", "y_ptr"), fp_fusion=False)
@triton.jit
def conv2d_int8_bn_kernel(src_ptr, w_ptr, y_ptr, ss_ptr, sw_ptr, bias_ptr, dz_ptr, part_ptr, grp_ptr, chan_ptr,
                          sem_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr, bnp_ptr, zmax_ptr, P, Q, R, OP, OQ,
                          NCOL, KW, M, taps, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, s_n, s_h, s_w, s_r,
                          sw_col, sw_h, sw_w, sw_r, sd_n, sd_h, sd_w, sd_c, inv_ss, eps, momentum, n_f, res_ptr,
                          MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr,
                          BATCH_STATS: tl.constexpr, UPDATE: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, FLAT: tl.constexpr,
                          ALIGN: tl.constexpr, I64: tl.constexpr, TB: tl.constexpr, GROUP: tl.constexpr,
                          DZ_LIKE_Y: tl.constexpr, HAS_RES: tl.constexpr):
    """Forward convolution of int8 codes (rows: output pixels (n, op, oq), columns: NCOL output channels,
    all KH·KW taps in one program) with the bfloat16 y stored NHWC (``m * NCOL + col``), then
    ``MODE`` 0: BatchNorm statistics + finalisation; ``MODE`` 1: BatchNorm-backward sums of the bfloat16
    ``dz`` (strides sd_*; ``DZ_LIKE_Y``: laid out like y) with ``bnp`` as input. ``ALIGN``, ``I64``: as
    ``conv2d_int8_fwd_dgrad_kernel``; ``FLAT``: K packed across taps (the table's tile)."""
    R, s_n, s_h, s_w, sw_col, sw_h, sw_w = assume_conv_operands(R, s_n, s_h, s_w, sw_col, sw_h, sw_w, ALIGN)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(NCOL, BN)
    pid_m, pid_n = grouped_tile_ids(tl.program_id(0), num_m, num_n, GROUP_M)
    m = pid_m * BM + tl.arange(0, BM)
    col = pid_n * BN + tl.arange(0, BN)
    m_ok = m < M
    col_ok = col < NCOL
    n, op, oq = decode_rows(m, OP, OQ)
    acc = conv_forward_tile(src_ptr, w_ptr, n, op, oq, m_ok, col, col_ok, 0, k_steps(taps, R, BK, FLAT), taps // KW,
                            KW, P, Q, R, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, s_n, s_h, s_w, s_r, sw_col,
                            sw_h, sw_w, sw_r, BM, BN, BK, FLAT, I64)
    y = acc.to(tl.float32) * (tl.load(ss_ptr) * tl.load(sw_ptr) * inv_ss)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & col_ok[None, :]
    if I64:
        y_offs = m.to(tl.int64)[:, None] * NCOL + col[None, :]
    else:
        y_offs = m[:, None] * NCOL + col[None, :]
    if HAS_RES:  # the residual (laid out as y) added before the one rounding, as gemm.mainloop's epilogue does
        y = y + tl.load(res_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    yb = to_bfloat16_rne(y)
    tl.store(y_ptr + y_offs, yb, mask=mask)
    yv = yb.to(tl.float32)
    if MODE == 0:
        cnt = tl.minimum(BM, M - pid_m * BM)
        mean, m2, mx, mn = tile_moments(yv, m_ok, cnt)
        store_partials(part_ptr, pid_m, num_m, NCOL, col, col_ok, mean, m2, mx, mn, 0)
        final = finish_reduction(part_ptr, grp_ptr, chan_ptr, sem_ptr, pid_m, num_m, pid_n, num_n, M, BM, col,
                                 col_ok, NCOL, 0, GROUP, TB, BN)
        if final:
            zbits = bn_finalize_channels(chan_ptr, NCOL, col, col_ok, col_ok, gamma_ptr, beta_ptr, rm_ptr, rv_ptr,
                                         nbt_ptr, eps, momentum, n_f, bnp_ptr, HAS_AFFINE, BATCH_STATS, UPDATE, ACT)
            store_block_max(zbits, zmax_ptr, pid_n, NCOL, BN)
    else:
        if DZ_LIKE_Y:  # dz in y's own NHWC layout (what the kernels produce): no second offset tile
            d_offs = y_offs
        elif I64:
            d_offs = (n.to(tl.int64) * sd_n + op.to(tl.int64) * sd_h + oq.to(tl.int64) * sd_w)[:, None] + \
                col.to(tl.int64)[None, :] * sd_c
        else:
            d_offs = (n * sd_n + op * sd_h + oq * sd_w)[:, None] + (col * sd_c)[None, :]
        dz = tl.load(dz_ptr + d_offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(bnp_ptr + col, mask=col_ok, other=0.0)[None, :]
        b = tl.load(bnp_ptr + NCOL + col, mask=col_ok, other=0.0)[None, :]
        mean = tl.load(bnp_ptr + 2 * NCOL + col, mask=col_ok, other=0.0)[None, :]
        rstd = tl.load(bnp_ptr + 3 * NCOL + col, mask=col_ok, other=0.0)[None, :]
        _, g, xhat = bn_grad_in(dz, yv, a, b, mean, rstd, 0.0, 0.0, ACT)
        s0, s1 = tile_sums(g, g * xhat, m_ok)
        store_partials(part_ptr, pid_m, num_m, NCOL, col, col_ok, s0, s1, s0, s1, 1)
        finish_reduction(part_ptr, grp_ptr, chan_ptr, sem_ptr, pid_m, num_m, pid_n, num_n, M, BM, col, col_ok, NCOL,
                         1, GROUP, TB, BN)


# --------------------------------------------------------------------------------------------------
# Launchers and references
# --------------------------------------------------------------------------------------------------
def _y_bf16_reference(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, residual=None):
    y = conv2d_int8_fwd_reference(qx, qw, sx, sw, bias, stride, padding, dilation, 1, bits_a, bits_w, torch.float32,
                                  True, fast=qx.device.type == "cpu", residual=residual)
    return y.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N·H·W, C) view of an NHWC-ordered (N, C, H, W) tensor."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def conv2d_int8_bn_fwd_reference(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, weight, beta,
                                 running_mean, running_var, num_batches_tracked, momentum, eps, batch_stats, update,
                                 act, residual=None):
    y = _y_bf16_reference(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, residual)
    chan = moments_reference(_rows(y))
    bnp, zmax = finalize_reference(chan, weight, beta, running_mean, running_var, num_batches_tracked, momentum, eps,
                                   y.numel() // y.shape[1], batch_stats, update, act)
    return y, chan, bnp, zmax


def conv2d_int8_bn_bwd_reduce_reference(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, dz, bnp,
                                        act):
    from .bn_math import bn_grad_in_reference
    y = _y_bf16_reference(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w)
    _, g, xhat = bn_grad_in_reference(dz, y, bnp, None, 1, act)
    sums = torch.stack([_rows(g).double().sum(0), _rows(g * xhat).double().sum(0)]).float()
    return y, sums


@dataclasses.dataclass(frozen=True)
class ConvBnLaunch:
    """What a ``conv2d_int8_bn`` launch decides from its operands' geometry (``conv_bn_launch``)."""

    OH: int
    OW: int
    M: int
    x_strides: tuple  # s_n, s_h, s_w, s_r
    w_strides: tuple  # stride(0), stride(2), stride(3), stride(1)
    align: int
    tile: object  # tiles.Tile
    num_m: int
    num_n: int
    i64: bool
    dz_strides: tuple
    dz_like_y: bool
    launch: Optional[BoundLaunch] = None  # the kernel with its grid and constexprs (``conv_bn_call``)
    ints: tuple = ()  # its run-time integer arguments after the tensors (geometry, strides) and the codes' scale


@cached_plan
def conv_bn_launch(x_geom, w_geom, dz_geom, stride, padding, dilation, has_res, device, settings) -> ConvBnLaunch:
    """The launch plan of ``_launch`` for codes, weight codes and (backward) dz of geometry ``(shape, strides,
    16-byte aligned)`` (``dz_geom`` None in forward), once per geometry (issue 20 item 5: host time);
    ``settings``: the ``KernelSettings`` in force (the SM count follows them). The tile alone: ``_tile``."""
    (N, C, H, W), (s_n, s_r, s_h, s_w), x16 = x_geom
    (CO, _, KH, KW), (w0, w1, w2, w3), w16 = w_geom
    OH, OW = conv2d_output_size(H, W, KH, KW, stride, padding, dilation)
    M = N * OH * OW
    align = alignment((C, s_n, s_h, s_w, w0, w2, w3)) if x16 and w16 else 1
    tile = tiles.conv_fwd_plan(N, C, H, W, CO, KH, KW, stride, padding, dilation, sms=tiles.device_sms(device)).tile
    if has_res and tile.BM * tile.BN >= 128 * 128:
        # the residual tile on top of the statistics epilogue spills at 128×128 (452-720 B, AOT): fewer rows
        rows = 128 if tile.BN <= 64 else 64
        tile = next(t for t in tiles.IGEMM_TILES if (t.BM, t.BN, t.BK, t.flat) == (rows, tile.BN, tile.BK, tile.flat))
    y_shape = (N, CO, OH, OW)
    y_strides = (OH * OW * CO, 1, OW * CO, CO)  # y: bfloat16 NHWC
    i64 = not offsets_fit_int32(x_geom[:2], (y_shape, y_strides)) or (
        dz_geom is not None and not offsets_fit_int32(dz_geom[:2]))
    if dz_geom is not None:
        d = dz_geom[1]
        dz_strides, dz_like_y = (d[0], d[2], d[3], d[1]), tuple(d) == y_strides
    else:
        dz_strides, dz_like_y = (0, 0, 0, 1), False
    return ConvBnLaunch(OH, OW, M, (s_n, s_h, s_w, s_r), (w0, w2, w3, w1), align, tile, cdiv(M, tile.BM),
                        cdiv(CO, tile.BN), i64, dz_strides, dz_like_y)


@cached_plan
def conv_bn_call(x_geom, w_geom, dz_geom, stride, padding, dilation, has_res, device, settings, mode, flags, act,
                 bits) -> ConvBnLaunch:
    """``conv_bn_launch`` with the launch bound for one call site's ``mode``, ``flags`` (has bias, has affine,
    batch statistics, update) and ``act``, and the integer arguments worked out: per call only the tensors and
    the BatchNorm's eps and momentum are passed."""
    p = conv_bn_launch(x_geom, w_geom, dz_geom, stride, padding, dilation, has_res, device, settings)
    (N, C, H, W), _, _ = x_geom
    (CO, _, KH, KW), _, _ = w_geom
    tile = p.tile
    has_bias, has_affine, batch_stats, update = flags
    launch = BoundLaunch(conv2d_int8_bn_kernel, (p.num_m * p.num_n,), MODE=mode, HAS_BIAS=has_bias,
                         HAS_AFFINE=has_affine, BATCH_STATS=batch_stats, UPDATE=update, ACT=act_code(act), BM=tile.BM,
                         BN=tile.BN, BK=tile.BK, GROUP_M=tile.GROUP_M, FLAT=tile.flat, ALIGN=p.align, I64=p.i64,
                         TB=STATS_TB, GROUP=STATS_GROUP, DZ_LIKE_Y=p.dz_like_y, HAS_RES=has_res,
                         num_warps=tile.num_warps, num_stages=tile.num_stages, maxnreg=MAXNREG, **NO_FP_FUSION)
    ints = (H, W, C, p.OH, p.OW, CO, KW, p.M, KH * KW, stride[0], stride[1], padding[0], padding[1], dilation[0],
            dilation[1], *p.x_strides, *p.w_strides, *p.dz_strides, inv_code_scales(*bits))
    return dataclasses.replace(p, launch=launch, ints=ints)


def _launch(mode, qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, dz=None, bnp=None, weight=None,
            beta=None, running_mean=None, running_var=None, num_batches_tracked=None, momentum=None, eps=0.0,
            batch_stats=True, update=False, act="relu", residual=None):
    N, C = qx.shape[0], qx.shape[1]
    CO = qw.shape[0]
    if qw.stride(1) != 1 and C > 1:  # K-major weight operand (OHWI)
        qw = qw.contiguous(memory_format=torch.channels_last)
    plan = conv_bn_call(geometry(qx), geometry(qw), None if dz is None else geometry(dz), tuple(stride),
                        tuple(padding), tuple(dilation), residual is not None, qx.device, kernel_settings(), mode,
                        (bias is not None, weight is not None, batch_stats, update), act, (bits_a, bits_w))
    y = empty_output((N, CO, plan.OH, plan.OW), torch.bfloat16, qx.device, torch.channels_last)
    space = ReductionSpace(MOMENTS if mode == 0 else SUMS, plan.num_m, plan.num_n, CO, qx.device)
    if mode == 0:
        bnp_out = empty_output((BNP_ROWS, CO), torch.float32, qx.device)
        # max |z| bits per 16 channels (``empty_strided``: cheaper on the host than ``empty``)
        zmax = torch.empty_strided((z_slots(CO),), (1,), dtype=torch.int32, device=qx.device)
    else:
        bnp_out, zmax = bnp, space.sem
    dummy = space.out
    plan.launch(
        qx, qw, y, sx, sw, bias if bias is not None else dummy, dz if dz is not None else y, space.part, space.grp,
        space.out, space.sem, weight if weight is not None else dummy, beta if beta is not None else dummy,
        running_mean if running_mean is not None else dummy, running_var if running_var is not None else dummy,
        num_batches_tracked if num_batches_tracked is not None else space.sem, bnp_out, zmax, *plan.ints, float(eps),
        momentum_arg(momentum), float(plan.M), residual if residual is not None else y)
    if mode == 0:
        return y, space.out, bnp_out, zmax
    return y, space.out


def _tile(qx, qw, stride, padding, dilation):
    """The per-layer forward's tile (``gemm.tiles`` rules 1-3, 6), always one split: see the module docstring."""
    return conv_bn_launch(geometry(qx), geometry(qw), None, stride, padding, dilation, False, qx.device,
                          kernel_settings()).tile


def _triton_ok(qx, qw, *others) -> bool:
    taps = qw.shape[2] * qw.shape[3]
    return use_triton(qx, qw, *others) and qx.shape[1] * taps <= MAX_TERMS and qx.numel() < 2**31


@custom_op("ebkernels::conv2d_int8_bn_fwd", mutates_args=("running_mean", "running_var"))
def _fwd_op(qx: torch.Tensor, qw: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
            stride: list[int], padding: list[int], dilation: list[int], bits_a: int, bits_w: int,
            weight: Optional[torch.Tensor], beta: Optional[torch.Tensor], running_mean: torch.Tensor,
            running_var: torch.Tensor, num_batches_tracked: Optional[torch.Tensor],
            momentum: Optional[float], eps: float, batch_stats: bool, update: bool, act: str,
            residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # running_mean / running_var: ``absent`` when the BatchNorm keeps none (a mutable argument is never optional)
    running_mean, running_var = present(running_mean), present(running_var)
    if _triton_ok(qx, qw):  # (by position, in ``_launch``'s order: keywords cost ~1 µs a launch, issue 20 item 5)
        return _launch(0, qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, None, None, weight, beta,
                       running_mean, running_var, num_batches_tracked, momentum, eps, batch_stats, update, act,
                       residual)
    y, chan, bnp, zmax = conv2d_int8_bn_fwd_reference(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w,
                                                      weight, beta, running_mean, running_var, num_batches_tracked,
                                                      momentum, eps, batch_stats, update, act, residual)
    return y, chan, bnp, zmax.repeat(z_slots(qw.shape[0]))


def _fake_y(qx, qw, stride, padding, dilation):
    OH, OW = conv2d_output_size(qx.shape[2], qx.shape[3], qw.shape[2], qw.shape[3], stride, padding, dilation)
    return torch.empty((qx.shape[0], qw.shape[0], OH, OW), dtype=torch.bfloat16, device=qx.device,
                       memory_format=torch.channels_last)


@_fwd_op.register_fake
def _(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, weight, beta, running_mean, running_var,
      num_batches_tracked, momentum, eps, batch_stats, update, act, residual=None):
    CO = qw.shape[0]
    return (_fake_y(qx, qw, stride, padding, dilation), qx.new_empty((4, CO), dtype=torch.float32),
            qx.new_empty((BNP_ROWS, CO), dtype=torch.float32),
            qx.new_empty((z_slots(CO),), dtype=torch.int32))


@custom_op("ebkernels::conv2d_int8_bn_bwd_reduce", mutates_args=())
def _bwd_op(qx: torch.Tensor, qw: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
            stride: list[int], padding: list[int], dilation: list[int], bits_a: int, bits_w: int, dz: torch.Tensor,
            bnp: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_ok(qx, qw, dz):
        return _launch(1, qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, dz=dz, bnp=bnp, act=act)
    return conv2d_int8_bn_bwd_reduce_reference(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, dz,
                                               bnp, act)


@_bwd_op.register_fake
def _(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, dz, bnp, act):
    return _fake_y(qx, qw, stride, padding, dilation), qx.new_empty((2, qw.shape[0]), dtype=torch.float32)


def conv2d_int8_bn_fwd(qx, qw, sx, sw, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), bits_a=8, bits_w=8,
                       weight=None, beta=None, running_mean=None, running_var=None, num_batches_tracked=None,
                       momentum=0.1, eps=1e-5, batch_stats=True, update=False, act="relu", residual=None):
    """Conv of int8 codes ``qx`` (N, Cin_p, H, W; NHWC) with ``qw`` (Cout, Cin_p, KH, KW) and the BatchNorm
    statistics of its output: ``(y, chan, bnp, zmax_bits)`` with y bfloat16 (N, Cout, OH, OW) NHWC,
    ``chan`` [mean, biased var, max, min] of y, ``bnp`` [a, b, mean, rstd] of the BatchNorm (batch
    statistics when ``batch_stats``, else the running ones; ``weight``/``beta`` None: no affine), the
    float32 bits of max |z| (z = act(y*a + b), ``act`` one of ``bn_math.ACTIVATIONS``) as int32 [ceil(Cout / 16)], per
    16 channels the max of their column block (``_reduce.store_block_max``; max |z| is their max: ``bn_relu_quant``
    takes it); ``update``: running statistics moved. ``residual``: bfloat16, y's shape and NHWC layout, added to
    the conv before y's one rounding (a pre-activation block's last conv and the next block's BatchNorm statistics
    in one launch)."""
    act_code(act)
    if residual is not None:
        OH, OW = conv2d_output_size(qx.shape[2], qx.shape[3], qw.shape[2], qw.shape[3], stride, padding, dilation)
        want = (qx.shape[0], qw.shape[0], OH, OW)
        if (residual.dtype != torch.bfloat16 or tuple(residual.shape) != want
                or not residual.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"residual: a bfloat16 channels-last tensor of y's shape {want} is accepted; got "
                             f"{residual.dtype} {tuple(residual.shape)}")
    return _fwd_op(qx, qw, sx, sw, bias, list(stride), list(padding), list(dilation), int(bits_a), int(bits_w), weight,
                   beta, absent(qx) if running_mean is None else running_mean,
                   absent(qx, 1) if running_var is None else running_var, num_batches_tracked,
                   None if momentum is None else float(momentum), float(eps), bool(batch_stats), bool(update), act,
                   residual)


def conv2d_int8_bn_bwd_reduce(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, dz, bnp, act="relu"):
    """y recomputed (bit-identical to ``conv2d_int8_bn_fwd``'s) and the BatchNorm-backward sums
    [Σ g, Σ g·xhat] (2, Cout) of the gradient ``dz`` w.r.t. z: returns ``(y, sums)``."""
    act_code(act)
    return _bwd_op(qx, qw, sx, sw, bias, list(stride), list(padding), list(dilation), int(bits_a), int(bits_w), dz, bnp,
                   act)
