"""The forward / input-grad kernel of the int8 Conv2d (``conv``; its own file for size, same op)
and its launchers: ``conv2d_int8_fwd_dgrad_kernel`` runs the forward ``Y[N·OH·OW, Cout] = X̃ · Wᵀ`` or,
with ``TRANSPOSED``, the input-grad ``dX[N·H·W, Cin] = Ẽ · W`` as stride_h·stride_w dense phases, on the
tile the per-shape table (``tiles``) chooses, split-K ending in ``mainloop.finish_gemm_tile``. The float64
oracles are ``conv2d_int8.conv2d_int8_fwd_reference`` / ``conv2d_int8_dgrad_reference``.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..._registry import aot_kernel
from ..._triton import tl, triton
from .._buffers import split_workspace
from ...config import kernel_settings
from .._launch import (BoundLaunch, alignment, cached_plan, cdiv, conv2d_output_size, geometry, memory_format,
                       offsets_fit_int32)
from .._tl import assume_conv_operands, assume_multiple, decode_rows
from . import tiles
from .host import result_and_scale
from .mainloop import (conv_forward_tile, conv_implicit_gemm_tile, finish_gemm_tile, grouped_tile_ids, k_steps,
                       phase_taps)

__all__ = ["conv2d_int8_fwd_dgrad_kernel"]

# Runtime arguments as the JIT types them for tensors below 2^31 elements (I64=False: int32 offsets).
_CONV_SIG = {"src_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*fp32", "ss_ptr": "*fp32", "sw_ptr": "*fp32",
             "bias_ptr": "*fp32", "P": "i32", "Q": "i32", "R": "i32", "OP": "i32", "OQ": "i32",
             "NCOL": "i32", "KH": "i32", "KW": "i32", "MQ": "i32", "HQ": "i32", "WQ": "i32", "per_split": "i32",
             "stride_h": "i32", "stride_w": "i32", "pad_h": "i32", "pad_w": "i32", "dil_h": "i32",
             "dil_w": "i32", "step_h": "i32", "step_w": "i32", "s_n": "i32", "s_h": "i32", "s_w": "i32",
             "s_r": "i32", "sw_col": "i32", "sw_h": "i32", "sw_w": "i32", "sw_r": "i32", "so_n": "i32",
             "so_h": "i32", "so_w": "i32", "so_c": "i32", "ws_ptr": "*i64", "res_ptr": "*fp32", "inv_ss": "fp32"}
# AOT configurations = GPU launches: every tile of the table (``tiles.IGEMM_TILES``), one split or split-K
# (SPLIT_FIX), as the forward of an NHWC layer (16-aligned channel counts, ALIGN=16, channels-last result, bias, unit stride/dilation as the
# JIT specialises arguments equal to 1) and as the phase-decomposed input-grad (runtime stride); the flat
# (K packed across taps) tiles also unaligned (ALIGN=1: the unpadded Cin = 3 first layer); a forward into an
# NCHW result (OUT_ALIGN=1) at the big tile; every forward tile also with its residual add fused (HAS_RES: the
# pre-activation ResNet's conv3 + shortcut).
_SPLITS = {64: (False, True), 128: (False, True), 256: (False,)}  # (the table runs 256-row tiles unsplit)
_CONV_UNIT = {"stride_h": 1, "stride_w": 1, "dil_h": 1, "dil_w": 1, "step_h": 1, "step_w": 1}


def _conv_aot(t, out_nchw=False, **kw):
    cfg = {**t.aot(), "s_r": 1, "sw_r": 1, "I64": False, "RAW": False, "FLAT": t.flat, "ALIGN": 16,
           "OUT_ALIGN": 16, "SPLIT_FIX": False, "HAS_RES": False, **kw}
    cfg.update({"so_w": 1} if out_nchw else {"so_c": 1})
    return cfg


_CONV_AOT = ([_conv_aot(t, **_CONV_UNIT, TRANSPOSED=False, HAS_BIAS=True, SPLIT_FIX=fix) for t in tiles.IGEMM_TILES
              for fix in _SPLITS[t.BM]]
             + [_conv_aot(t, TRANSPOSED=True, HAS_BIAS=False, SPLIT_FIX=fix) for t in tiles.IGEMM_TILES
                for fix in _SPLITS[t.BM]]
             + [_conv_aot(t, **_CONV_UNIT, TRANSPOSED=False, HAS_BIAS=True, ALIGN=1, OUT_ALIGN=1)
                for t in tiles.IGEMM_TILES if t.flat and t.BM * t.BN < 128 * 128]
             + [_conv_aot(next(t for t in tiles.IGEMM_TILES if t.name == "128x128x64/w8"), True, **_CONV_UNIT,
                          TRANSPOSED=False, HAS_BIAS=True, OUT_ALIGN=1)]
             + [_conv_aot(t, **_CONV_UNIT, TRANSPOSED=False, HAS_BIAS=True, SPLIT_FIX=fix, HAS_RES=True)
                for t in tiles.IGEMM_TILES for fix in _SPLITS[t.BM]])


@aot_kernel(signature=_CONV_SIG, constexprs=_CONV_AOT, int8_mma=True, aligned=("src_ptr", "w_ptr", "out_ptr"))
@triton.jit
def conv2d_int8_fwd_dgrad_kernel(src_ptr, w_ptr, out_ptr, ss_ptr, sw_ptr, bias_ptr, P, Q, R, OP, OQ, NCOL, KH, KW,
                                 MQ, HQ, WQ, per_split, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h,
                                 step_w, s_n, s_h, s_w, s_r, sw_col, sw_h, sw_w, sw_r, so_n, so_h, so_w, so_c,
                                 ws_ptr, res_ptr, inv_ss, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 RAW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                 GROUP_M: tl.constexpr, FLAT: tl.constexpr, ALIGN: tl.constexpr,
                                 OUT_ALIGN: tl.constexpr, I64: tl.constexpr, SPLIT_FIX: tl.constexpr,
                                 HAS_RES: tl.constexpr):
    """Forward (``TRANSPOSED=False``: src = x codes, P×Q = H×W, R = Cin; result Y, OP×OQ = OH×OW,
    NCOL = Cout; rows MQ = N·OH·OW over (N, HQ=OH, WQ=OW)) or input-grad by phases (``TRANSPOSED=True``:
    src = E codes, P×Q = OH×OW, R = Cout; result dX, OP×OQ = H×W, NCOL = Cin): grid axis 0 = stride_h·
    stride_w phases × row tiles of one phase (MQ = N·HQ·WQ, HQ = ceil(H / stride_h)) × column tiles; phase
    (ph, pw) computes the input pixels (ph + stride_h·a, pw + stride_w·b) from only the taps that reach them
    (``phase_taps``, ``step_*`` = stride / gcd(stride, dil)). Grid axis 1: K splits of ``per_split``
    steps (int32-exact chunks; ``SPLIT_FIX``: added into the int64 workspace ``ws_ptr``, the last split of
    the tile stores it). ``FLAT``: K packed across taps. ``ALIGN``/``OUT_ALIGN`` (16
    or 1): the launcher guarantees R and the strides of src and w / NCOL and the strides of the result are
    multiples of it (16-byte vectors); ``I64``: 64-bit offsets. ``HAS_RES`` (forward): ``res_ptr``, a tensor
    with the result's shape and strides, is added in fp32 before the one rounding to the result's dtype."""
    R, s_n, s_h, s_w, sw_col, sw_h, sw_w = assume_conv_operands(R, s_n, s_h, s_w, sw_col, sw_h, sw_w, ALIGN)
    NCOL = assume_multiple(NCOL, OUT_ALIGN)
    so_n = assume_multiple(so_n, OUT_ALIGN)
    so_h = assume_multiple(so_h, OUT_ALIGN)
    so_w = assume_multiple(so_w, OUT_ALIGN)
    num_m = tl.cdiv(MQ, BM)
    num_n = tl.cdiv(NCOL, BN)
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    if TRANSPOSED:
        phase = pid // (num_m * num_n)
        pid = pid - phase * (num_m * num_n)
    pid_m, pid_n = grouped_tile_ids(pid, num_m, num_n, GROUP_M)
    m = pid_m * BM + tl.arange(0, BM)
    col = pid_n * BN + tl.arange(0, BN)
    col_ok = col < NCOL
    n, a, b = decode_rows(m, HQ, WQ)  # once per program: the K loop carries per-row offsets only
    it0 = pid_s * per_split
    if TRANSPOSED:
        ph_h = phase // stride_w
        ph_w = phase - ph_h * stride_w
        kh0, cnt_h, c0_h = phase_taps(ph_h, pad_h, dil_h, stride_h, KH, step_h)
        kw0, cnt_w, c0_w = phase_taps(ph_w, pad_w, dil_w, stride_w, KW, step_w)
        op = ph_h + stride_h * a
        oq = ph_w + stride_w * b
        m_ok = (m < MQ) & (op < OP) & (oq < OQ)
        if I64:
            pix_n = n.to(tl.int64) * s_n
        else:
            pix_n = n * s_n
        it1 = tl.minimum(it0 + per_split, k_steps(cnt_h * cnt_w, R, BK, FLAT))
        # tap j of the phase reads output row a + c0 - j·dil/gcd (DH < 0: the transposed convolution)
        acc = conv_implicit_gemm_tile(src_ptr, w_ptr, pix_n, a + c0_h, b + c0_w, m_ok, col, col_ok, it0, it1,
                                      tl.maximum(cnt_w, 1), cnt_h * cnt_w, kh0, kw0, step_h, step_w,
                                      -(dil_h * step_h // stride_h), -(dil_w * step_w // stride_w), P, Q, R, s_h,
                                      s_w, s_r, sw_col, sw_h, sw_w, sw_r, BM, BN, BK, FLAT, I64)
    else:
        op = a
        oq = b
        m_ok = m < MQ
        it1 = tl.minimum(it0 + per_split, k_steps(KH * KW, R, BK, FLAT))
        acc = conv_forward_tile(src_ptr, w_ptr, n, op, oq, m_ok, col, col_ok, it0, it1, KH, KW, P, Q, R, stride_h,
                                stride_w, pad_h, pad_w, dil_h, dil_w, s_n, s_h, s_w, s_r, sw_col, sw_h, sw_w, sw_r,
                                BM, BN, BK, FLAT, I64)
    if I64:
        row_offs = n.to(tl.int64) * so_n + op.to(tl.int64) * so_h + oq.to(tl.int64) * so_w
        col_offs = col.to(tl.int64) * so_c
    else:
        row_offs = n * so_n + op * so_h + oq * so_w
        col_offs = col * so_c
    # the shared end of a GEMM program (splits meet in int64, the last one stores); no G quantization here
    finish_gemm_tile(acc, ws_ptr, out_ptr, row_offs, m_ok, col, col_offs, col_ok, ss_ptr, sw_ptr, bias_ptr, inv_ss,
                     ws_ptr, ws_ptr, 0, 0, 0, 0, 0, 0, 0, 0, res_ptr, HAS_BIAS, RAW, SPLIT_FIX, 0, 8, False, 1024, BM,
                     BN, HAS_RES)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvLikeLaunch:
    """What a forward / input-grad launch decides from its operands' geometry (``conv_like_launch``)."""

    plan: object  # tiles.Plan
    mhw: tuple  # MQ, HQ, WQ: rows of one phase and their grid
    steps: tuple
    src_strides: tuple  # s_n, s_h, s_w, s_r
    w_strides: tuple  # sw_col, sw_h, sw_w, sw_r (the kernel's names)
    out_strides: tuple  # so_n, so_h, so_w, so_c
    align: int
    out_align: int
    i64: bool


@cached_plan
def conv_like_launch(transposed, src_geom, w_geom, out_geom, res_aligned, P, Q, R, OP, OQ, NCOL, KH, KW, stride,
                     padding, dilation, max_terms, device, settings) -> ConvLikeLaunch:
    """The launch plan of ``_conv_like_launch`` for operands of geometry ``(shape, strides, 16-byte aligned)``
    (``res_aligned``: the residual's start, None without one), once per geometry (issue 20 item 5: host time);
    ``settings``: the ``KernelSettings`` in force (the SM count follows them)."""
    (N, _, _, _), (s_n, s_r, s_h, s_w), src16 = src_geom
    _, w_strides, w16 = w_geom
    sw_col, sw_r = (w_strides[1], w_strides[0]) if transposed else (w_strides[0], w_strides[1])
    _, (so_n, so_c, so_h, so_w), out16 = out_geom
    M = N * OP * OQ
    sms = tiles.device_sms(device)
    if transposed:
        plan = tiles.conv_dgrad_plan(N, R, P, Q, NCOL, OP, OQ, KH, KW, stride, padding, dilation, sms=sms,
                                      max_terms=max_terms)
        mhw = (plan.mode["Mq"], cdiv(OP, stride[0]), cdiv(OQ, stride[1]))
    else:
        plan = tiles.conv_fwd_plan(N, R, P, Q, NCOL, KH, KW, stride, padding, dilation, sms=sms, max_terms=max_terms)
        mhw = (M, OP, OQ)
    steps = tuple(s // math.gcd(s, d) for s, d in zip(stride, dilation))  # taps of one phase: k0, k0 + step, ...
    align = alignment((R, s_n, s_h, s_w, sw_col, w_strides[2], w_strides[3])) if src16 and w16 else 1
    out_align = alignment((NCOL, so_n, so_h, so_w)) if out16 and res_aligned is not False else 1
    i64 = not offsets_fit_int32(src_geom[:2], out_geom[:2])
    return ConvLikeLaunch(plan, mhw, steps, (s_n, s_h, s_w, s_r), (sw_col, w_strides[2], w_strides[3], sw_r),
                          (so_n, so_h, so_w, so_c), align, out_align, i64)


def _conv_like_launch(transposed, src, wq, ss, sw, bias, out, P, Q, R, OP, OQ, NCOL, KH, KW, stride, padding,
                      dilation, inv_ss, max_terms, residual=None):
    """Shared launch of the forward / input-grad kernels: result pixels (N, OP, OQ) × NCOL channels,
    reduction over KH·KW taps × R channels (``wq``: the weight codes, (Cout, Cin) strides in forward, their
    (Cin, Cout)-ordered copy's in the input-grad); the tile from the table (``tiles``), the same plan
    ``python -m ebkernels.aot --plan`` prints; split over K steps when longer than ``max_terms``."""
    raw = ss is None
    launch, bound, ints = conv_like_call(transposed, geometry(src), geometry(wq), geometry(out),
                                         None if residual is None else residual.data_ptr() % 16 == 0, P, Q, R, OP, OQ,
                                         NCOL, KH, KW, tuple(stride), tuple(padding), tuple(dilation), max_terms,
                                         src.device, kernel_settings(), raw, not raw and bias is not None)
    plan = launch.plan
    # splits > 1: exact int32 tiles added into an int64 workspace, the last split of a tile stores it
    ws = split_workspace(plan.programs, plan.splits, plan.tile.BM, plan.tile.BN, src.device)
    dummy = src
    bound(src, wq, out, dummy if raw else ss, dummy if raw else sw, bias if (not raw and bias is not None) else dummy,
          *ints, ws, residual if residual is not None else out, inv_ss)
    return out


@cached_plan
def conv_like_call(transposed, src_geom, w_geom, out_geom, res_aligned, P, Q, R, OP, OQ, NCOL, KH, KW, stride,
                   padding, dilation, max_terms, device, settings, raw: bool, has_bias: bool) -> tuple:
    """(``conv_like_launch``'s plan, the kernel bound with its grid and constexprs, its integer arguments) for
    one call's flags (``raw``: exact integer sums, ``has_bias``): per call only tensors and the scale go."""
    launch = conv_like_launch(transposed, src_geom, w_geom, out_geom, res_aligned, P, Q, R, OP, OQ, NCOL, KH, KW,
                              stride, padding, dilation, max_terms, device, settings)
    plan = launch.plan
    tile, splits = plan.tile, plan.splits
    bound = BoundLaunch(conv2d_int8_fwd_dgrad_kernel, (plan.programs, splits), TRANSPOSED=transposed,
                        HAS_BIAS=has_bias, RAW=raw, BM=tile.BM, BN=tile.BN, BK=tile.BK, GROUP_M=tile.GROUP_M,
                        FLAT=tile.flat, ALIGN=launch.align, OUT_ALIGN=launch.out_align, I64=launch.i64,
                        SPLIT_FIX=splits > 1, HAS_RES=res_aligned is not None, num_warps=tile.num_warps,
                        num_stages=tile.num_stages)
    ints = (P, Q, R, OP, OQ, NCOL, KH, KW, *launch.mhw, plan.per_split, stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1], *launch.steps, *launch.src_strides, *launch.w_strides, *launch.out_strides)
    return launch, bound, ints


def check_residual(residual, qx, qw, sx, stride, padding, dilation) -> None:
    """A forward's residual (or None) needs scaled results and the result's shape."""
    if residual is None:
        return
    OH, OW = conv2d_output_size(qx.shape[2], qx.shape[3], qw.shape[2], qw.shape[3], stride, padding, dilation)
    shape = (qx.shape[0], qw.shape[0], OH, OW)
    if sx is None or tuple(residual.shape) != shape:
        raise ValueError(f"conv2d_int8_fwd: a residual needs scaled results (sx, sw) and the result's shape {shape}, "
                         f"got {tuple(residual.shape)}")


def _fwd_triton(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, out_dtype, channels_last,
                max_terms, residual=None):
    """The forward launch; ``residual`` (scaled results only, the result's shape) is added in the epilogue when
    it has the result's strides, else after it."""
    N, C, H, W = qx.shape
    CO, _, KH, KW = qw.shape
    OH, OW = conv2d_output_size(H, W, KH, KW, stride, padding, dilation)
    out, inv_ss = result_and_scale((N, CO, OH, OW), sx, out_dtype, bits_a, bits_w, qx.device,
                                   memory_format(channels_last))
    if out.numel() == 0:
        return out if residual is None else out.copy_(residual)
    if residual is not None and residual.stride() != out.stride():  # another layout: the add after the conv
        y = _fwd_triton(qx, qw, sx, sw, bias, stride, padding, dilation, bits_a, bits_w, torch.float32, channels_last,
                        max_terms)
        return out.copy_(y.add_(residual))  # still one rounding
    if qw.stride(1) != 1 and C > 1:  # the reduction runs over Cin: keep it contiguous (K-major operand)
        qw = qw.contiguous(memory_format=torch.channels_last)
    return _conv_like_launch(False, qx, qw, sx, sw, bias, out, H, W, C, OH, OW, CO, KH, KW,
                             stride, padding, dilation, inv_ss, max_terms, residual)


def _cout_major(qw) -> bool:
    """Whether weight codes (Cout, Cin, KH, KW) lie in memory as a dense [KH, KW, Cin, Cout] array."""
    CO, C, KH, KW = qw.shape
    want = (1, CO, KW * C * CO, C * CO)
    got = qw.stride()
    for d, a, b in zip((CO, C, KH, KW), got, want):
        if d > 1 and a != b:
            return False
    return True


def _dgrad_triton(qe, qw, se, sw, input_hw, stride, padding, dilation, bits_e, bits_w, out_dtype,
                  channels_last, max_terms):
    N, CO, OH, OW = qe.shape
    _, C, KH, KW = qw.shape
    H, W = input_hw
    out, inv_ss = result_and_scale((N, C, H, W), se, out_dtype, bits_e, bits_w, qe.device,
                                   memory_format(channels_last))
    if out.numel() == 0:
        return out
    # the reduction runs over Cout: a copy of the (small) weight codes with Cout contiguous keeps the
    # tensor-core operand K-major; none (and no view op) where they already are so (the weight batch's input-grad
    # layout: memory [KH, KW, Cin, Cout])
    qw_t = qw if _cout_major(qw) else qw.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    return _conv_like_launch(True, qe, qw_t, se, sw, None, out, OH, OW, CO, H, W, C, KH,
                             KW, stride, padding, dilation, inv_ss, max_terms)
