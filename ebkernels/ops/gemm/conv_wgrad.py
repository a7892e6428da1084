"""The weight-grad kernel of the int8 Conv2d (``conv``; its own file for size, same op):
``dW[Cout, (kh, kw, ci)] = Eᵀ · X̃`` reducing over the N·OH·OW rows, no materialised im2col.

The tile comes from the per-shape table (``wgrad_tiles.wgrad_tile``: narrow Cout/Cin tiles; columns flat over
(tap, channel) below 16 input channels), the reduction is split into chunks of at most 2^17 rows whose
exact int32 sums are added into an int64 workspace, and the last split of each output tile applies the
scales and the fused G quantization (``mainloop.finish_gemm_tile``): one launch,
exact at any batch size. The float64 oracle is ``conv2d_int8.conv2d_int8_wgrad_reference``.
"""
from __future__ import annotations

import dataclasses

import torch

from ..._registry import aot_kernel
from ..._triton import tl, triton
from .._buffers import split_workspace
from ...config import kernel_settings
from .._launch import BoundLaunch, alignment, cached_plan, cdiv, geometry, leading, offsets_fit_int32
from .._tl import assume_multiple, decode_rows, decode_tap, tap_input_coord
from . import tiles, wgrad_tiles
from .conv_wgrad_tma import launch_wgrad_tma
from .gquant import gquant_finish, gquant_off, gquant_plan
from .host import result_and_scale
from .mainloop import finish_gemm_tile, grouped_tile_ids, load_channel_major_tile, load_pixels_tile

__all__ = ["conv2d_int8_wgrad_kernel"]

_WGRAD_SIG = {"e_ptr": "*i8", "x_ptr": "*i8", "out_ptr": "*fp32", "se_ptr": "*fp32", "sx_ptr": "*fp32",
              "H": "i32", "W": "i32", "C": "i32", "OH": "i32", "OW": "i32", "CO": "i32", "KW": "i32",
              "M": "i32", "taps": "i32", "m_per_split": "i32", "stride_h": "i32", "stride_w": "i32",
              "pad_h": "i32", "pad_w": "i32", "dil_h": "i32", "dil_w": "i32", "se_n": "i32", "se_h": "i32",
              "se_w": "i32", "se_c": "i32", "sx_n": "i32", "sx_h": "i32", "sx_w": "i32", "sx_c": "i32",
              "so_o": "i32", "so_h": "i32", "so_w": "i32", "so_c": "i32", "ws_ptr": "*i64", "inv_ss": "fp32",
              "gq_ptr": "*i32", "rng_ptr": "*i64", "gn": "i64", "g1": "i64", "g2": "i64", "g3": "i64", "gs0": "i64",
              "gs1": "i64", "gs2": "i64", "gs3": "i64"}
# QConv2dFunction's launch: E codes channel-major (``E_CM``: [Cout, N·OH·OW], the reduction dimension
# contiguous, se_w = 1); the variants below
_NO_GQ = {"GQ": 0, "BITS_G": 8, "STOCH_G": True, "GBLOCK": 1024}
_WG_UNIT = {"stride_h": 1, "stride_w": 1, "dil_h": 1, "dil_w": 1}


def _wgrad_aot(t, **kw):
    return {**t.aot(), **_WG_UNIT, **_NO_GQ, "sx_c": 1, "so_c": 1, "ALIGN": 16, "OUT_ALIGN": 16, "I64": False,
            "E_CM": True, "X_CM": False, "FLAT_N": t.flat, "se_w": 1, **kw}


# every tile of the table (``tiles.WGRAD_TILES``) as QConv2dFunction launches it: channel-major E codes,
# scaled result with G quantized in the epilogue, one split or several (SPLIT_FIX: the last split of a
# tile finishes it); the BK = 32 tiles unaligned (ALIGN=1: E rows N·OH·OW or Cin not multiples of 16);
# at the big tile the other variants: NHWC E, channel-major X (1×1), the one-tile G quantization in registers
# (GQ=2: a 1×1 layer's or the flat first layer's gradient in one tile, split or not), exact int64 sums (RAW,
# the integer API)
_BIG = [t for t in tiles.WGRAD_TILES if t.BK == tiles.WGRAD_BK][-1]
_FLAT = [t for t in tiles.WGRAD_TILES if t.flat and (t.BM, t.BN) == (64, 32)][0]
_WGRAD_AOT = ([_wgrad_aot(t, GQ=1, RAW=False, SPLIT_FIX=fix, **({} if t.BK == tiles.WGRAD_BK else
                                                                {"ALIGN": 1, "OUT_ALIGN": 1}))
               for t in tiles.WGRAD_TILES for fix in (False, True)]
              + [{**_wgrad_aot(_BIG, RAW=True, E_CM=False, se_c=1, SPLIT_FIX=True), "se_w": None},
                 {**_wgrad_aot(_BIG, RAW=False, X_CM=True, sx_w=1, SPLIT_FIX=True), "sx_c": None},
                 _wgrad_aot(_BIG, GQ=2, RAW=False, SPLIT_FIX=False),
                 {**_wgrad_aot(_BIG, GQ=2, RAW=False, X_CM=True, sx_w=1, SPLIT_FIX=True), "sx_c": None},
                 _wgrad_aot(_FLAT, GQ=2, RAW=False, SPLIT_FIX=True, ALIGN=1, OUT_ALIGN=1),
                 _wgrad_aot(_BIG, RAW=True, SPLIT_FIX=True)])
_WGRAD_AOT = [{k: v for k, v in c.items() if v is not None} for c in _WGRAD_AOT]


@aot_kernel(signature=_WGRAD_SIG, constexprs=_WGRAD_AOT, int8_mma=True, aligned=("e_ptr", "x_ptr", "out_ptr"))
@triton.jit
def conv2d_int8_wgrad_kernel(e_ptr, x_ptr, out_ptr, se_ptr, sx_ptr, H, W, C, OH, OW, CO, KW, M, taps,
                             m_per_split, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, se_n, se_h, se_w,
                             se_c, sx_n, sx_h, sx_w, sx_c, so_o, so_h, so_w, so_c, ws_ptr, inv_ss, gq_ptr,
                             rng_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3,
                             RAW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             GROUP_M: tl.constexpr, ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr,
                             I64: tl.constexpr, E_CM: tl.constexpr, X_CM: tl.constexpr, FLAT_N: tl.constexpr,
                             SPLIT_FIX: tl.constexpr, GQ: tl.constexpr,
                             BITS_G: tl.constexpr, STOCH_G: tl.constexpr, GBLOCK: tl.constexpr):
    """Weight-grad ``dW[co, kh, kw, ci] = sum_m E[m, co] · X[n, ih, iw, ci]`` over this program's chunk
    of the N·OH·OW rows (at most 2^17: its int32 sum is exact). Grid (Cout tiles × taps × Cin tiles,
    chunks): each program holds one tap, so its input pixels are one shifted, masked row set.
    ``ALIGN``/``OUT_ALIGN``/``I64`` as in ``conv2d_int8_fwd_dgrad_kernel``. ``E_CM``: the E codes are
    channel-major, ``E[co, m]`` at ``co * se_c + m`` (the launcher checks se_n = OH·OW, se_h = OW,
    se_w = 1): the E tile is loaded as [Cout, rows] with the reduction contiguous, a K-major int8 MMA
    operand (16-byte cp.async rows, no shared-memory transpose); otherwise E is NHWC, [rows, Cout].
    ``X_CM`` (with ``E_CM``, only for a 1×1 kernel, stride 1, no padding: X̃ = X, input pixel = row m): the
    input codes are channel-major too, ``X[ci, m]`` at ``ci * sx_c + m``: both operands K-major, a plain
    GEMM ``E[Cout, M] · X[Cin, M]ᵀ``. ``FLAT_N`` (fewer than 16 input channels): the columns run flat over
    (tap, channel), each with its own input-pixel shift (a [rows, columns] gather), so the first layer's
    3×3×3 columns fill one 32-wide tile instead of nine 16-wide ones. ``SPLIT_FIX`` (several chunks): they meet
    in the int64 workspace ``ws_ptr``, the last one of the tile finishes it. ``GQ`` (1, 2; scaled result): G
    quantization fused in (``mainloop.finish_gemm_tile``, ``gquant``)."""
    C = assume_multiple(C, ALIGN)
    M = assume_multiple(M, ALIGN if E_CM else 1)
    m_per_split = assume_multiple(m_per_split, ALIGN if E_CM else 1)
    se_c = assume_multiple(se_c, ALIGN if E_CM else 1)
    sx_c = assume_multiple(sx_c, ALIGN if X_CM else 1)
    CO = assume_multiple(CO, ALIGN)
    se_n = assume_multiple(se_n, ALIGN)
    se_h = assume_multiple(se_h, ALIGN)
    se_w = assume_multiple(se_w, ALIGN)
    sx_n = assume_multiple(sx_n, ALIGN)
    sx_h = assume_multiple(sx_h, ALIGN)
    sx_w = assume_multiple(sx_w, ALIGN)
    so_o = assume_multiple(so_o, OUT_ALIGN)
    so_h = assume_multiple(so_h, OUT_ALIGN)
    so_w = assume_multiple(so_w, OUT_ALIGN)
    if FLAT_N:  # columns flat over (tap, channel): few input channels, taps packed into one column tile
        num_c = tl.cdiv(taps * C, BN)
        pid_co, pid_col = grouped_tile_ids(tl.program_id(0), tl.cdiv(CO, BM), num_c, GROUP_M)
        col = pid_col * BN + tl.arange(0, BN)
        ci_ok = col < taps * C
        t = col // C
        ci = col - t * C
    else:  # one tap per program, BN of its input channels
        num_c = tl.cdiv(C, BN)
        pid_co, pid_col = grouped_tile_ids(tl.program_id(0), tl.cdiv(CO, BM), taps * num_c, GROUP_M)
        t = pid_col // num_c
        ci = (pid_col - t * num_c) * BN + tl.arange(0, BN)
        ci_ok = ci < C
        col = ci
    kh, kw = decode_tap(t, KW)  # scalars, or one per column (FLAT_N)
    pid_s = tl.program_id(1)
    co = pid_co * BM + tl.arange(0, BM)
    co_ok = co < CO
    m_start = pid_s * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for m0 in range(m_start, m_end, BK):
        m = m0 + tl.arange(0, BK)
        m_ok = m < m_end
        n, oh, ow = decode_rows(m, OH, OW)
        if I64:
            e_pix = n.to(tl.int64) * se_n + oh.to(tl.int64) * se_h + ow.to(tl.int64) * se_w
        else:
            e_pix = n * se_n + oh * se_h + ow * se_w
        if E_CM:
            a = load_channel_major_tile(e_ptr, co, co_ok, se_c, m, m_ok, I64)  # [BM Cout, BK rows]
        else:
            a = load_pixels_tile(e_ptr, e_pix, m_ok, co, CO, se_c)  # [BK rows, BM Cout]
        if FLAT_N:  # [BK rows, BN (tap, channel)]: each column its own input pixel shift
            ih = tap_input_coord(oh[:, None], kh[None, :], stride_h, pad_h, dil_h)
            iw = tap_input_coord(ow[:, None], kw[None, :], stride_w, pad_w, dil_w)
            x_ok = (m_ok[:, None] & ci_ok[None, :]) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            if I64:
                x_offs = (n.to(tl.int64) * sx_n)[:, None] + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
            else:
                x_offs = (n * sx_n)[:, None] + ih * sx_h + iw * sx_w
            b = tl.load(x_ptr + x_offs + (ci * sx_c)[None, :], mask=x_ok, other=0)
        elif X_CM:
            b = load_channel_major_tile(x_ptr, ci, ci_ok, sx_c, m, m_ok, I64)  # [BN Cin, BK rows]
        else:
            ih = tap_input_coord(oh, kh, stride_h, pad_h, dil_h)
            iw = tap_input_coord(ow, kw, stride_w, pad_w, dil_w)
            x_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            if I64:
                x_pix = n.to(tl.int64) * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
            else:
                x_pix = n * sx_n + ih * sx_h + iw * sx_w
            b = load_pixels_tile(x_ptr, x_pix, x_ok, ci, C, sx_c)  # [BK rows, BN Cin]
        if X_CM:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        else:
            if E_CM:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:  # the reduction is E's outer dimension: Triton transposes this operand in shared memory
                acc = tl.dot(tl.trans(a), b, acc, out_dtype=tl.int32)
    col_offs = (kh * so_h + kw * so_w) + ci * so_c
    finish_gemm_tile(acc, ws_ptr, out_ptr, co * so_o, co_ok, col, col_offs, ci_ok, se_ptr, sx_ptr, se_ptr, inv_ss,
                     gq_ptr, rng_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3, out_ptr, False, RAW, SPLIT_FIX, GQ, BITS_G,
                     STOCH_G, GBLOCK, BM, BN, False)


@dataclasses.dataclass(frozen=True, eq=False)
class WgradLaunch:
    """What a weight-grad launch decides from its operands' geometry (``wgrad_launch``): the operand forms
    (channel-major E / X), the strides the kernel reads, the tile, the TMA rows (rule 8) or None, the
    output tiles and the K splits. Compared and hashed by identity (one per geometry, cached): a key of
    ``_wgrad_call`` at the cost of a pointer."""

    e_cm: bool
    x_cm: bool
    strides: tuple  # se_n, se_h, se_w, se_c, sx_n, sx_h, sx_w, sx_c
    align: int
    tile: tiles.Tile
    flat_n: bool
    rows: object  # wgrad_tiles.TmaRows or None
    n_tiles: int
    splits: int
    per: int
    i64: bool


@cached_plan
def wgrad_launch(e_geom, x_geom, kernel_hw, stride, padding, max_terms, device, settings) -> WgradLaunch:
    """The launch plan of ``_wgrad_triton`` for E and X of geometry ``(shape, strides, 16-byte aligned)``, once
    per geometry (issue 20 item 5: the host work of a launch); ``settings``: the ``KernelSettings`` in force
    (the SM count and rule 8 follow them)."""
    (N, CO, OH, OW), (se_n, se_c, se_h, se_w), e16 = e_geom
    (_, C, H, W), (sx_n, sx_c, sx_h, sx_w), x16 = x_geom
    KH, KW = kernel_hw
    M = N * OH * OW
    ptrs_ok = e16 and x16
    # channel-major E ([Cout, N·OH·OW] with the rows contiguous, see QConv2dFunction): the K-major operand
    e_cm = (se_w == 1 or OW == 1) and (se_h == OW or OH == 1) and (se_n == OH * OW or N == 1) and CO > 1
    # channel-major input codes, 1×1 kernel, stride 1, no padding: X̃ = X, pixel m; both operands K-major
    x_cm = (e_cm and KH == KW == 1 and list(stride) == [1, 1] and list(padding) == [0, 0] and C > 1
            and (sx_w == 1 or W == 1) and (sx_h == W or H == 1) and (sx_n == H * W or N == 1))
    if x_cm:
        se_n, se_h, se_w = OH * OW, OW, 1
        sx_n, sx_h, sx_w = H * W, W, 1
        align = alignment((C, CO, M, se_c, sx_c)) if ptrs_ok else 1  # CO too: the kernel assumes it a multiple
    elif e_cm:
        se_n, se_h, se_w = OH * OW, OW, 1
        align = alignment((C, CO, M, se_c, sx_n, sx_h, sx_w)) if ptrs_ok else 1
    else:
        align = alignment((C, CO, se_n, se_h, se_w, sx_n, sx_h, sx_w)) if ptrs_ok else 1
    taps = KH * KW
    tile = wgrad_tiles.wgrad_tile(CO, C, align, taps)  # the table (rule 5), as ``--plan`` prints it
    flat_n = tile.flat and not x_cm
    if tile.flat and x_cm:  # 1×1 channel-major: one tap, the plain columns (same count)
        tile = dataclasses.replace(tile, flat=False)
    # rule 8 (sm_90): both operands K-major through TMA, over the padded rows of their copies
    tma = None if x_cm else wgrad_tiles.wgrad_tma_plan(device, N, C, H, W, CO, OH, OW, KH, KW, stride, padding)
    rows = None
    if tma is not None:
        tile, rows = tma
    n_tiles = cdiv(CO, tile.BM) * wgrad_tiles.wgrad_col_tiles(tile, C, taps)
    splits, per = wgrad_tiles.wgrad_splits(N * rows.rows if rows else M, n_tiles,
                                           tiles.device_sms(device) if tiles.on_gpu(device) else None, max_terms,
                                           tile.BK)
    i64 = not offsets_fit_int32(e_geom[:2], x_geom[:2])
    return WgradLaunch(e_cm, x_cm, (se_n, se_h, se_w, se_c, sx_n, sx_h, sx_w, sx_c), align, tile, flat_n, rows,
                       n_tiles, splits, per, i64)


@cached_plan
def _wgrad_call(plan: WgradLaunch, x_shape, e_shape, kernel_hw, stride, padding, dilation, out_strides, out_align: int,
                raw: bool, g_mode: int, bits_g: int, g_stoch: bool) -> tuple:
    """(the kernel bound with its grid and constexprs, its integer arguments before the workspace) of a plan's
    launch for one call's geometry and flags: per call only tensors, scales and G's arguments go."""
    (N, C, H, W), (_, CO, OH, OW) = x_shape, e_shape
    KH, KW = kernel_hw
    tile = plan.tile
    so_o, so_c, so_h, so_w = out_strides
    bound = BoundLaunch(conv2d_int8_wgrad_kernel, (plan.n_tiles, plan.splits), RAW=raw, BM=tile.BM, BN=tile.BN,
                        BK=tile.BK, GROUP_M=tile.GROUP_M, ALIGN=plan.align, OUT_ALIGN=out_align, I64=plan.i64,
                        E_CM=plan.e_cm, X_CM=plan.x_cm, FLAT_N=plan.flat_n, SPLIT_FIX=plan.splits > 1, GQ=g_mode,
                        BITS_G=bits_g, STOCH_G=g_stoch, GBLOCK=1024, num_warps=tile.num_warps,
                        num_stages=tile.num_stages)
    ints = (H, W, C, OH, OW, CO, KW, N * OH * OW, KH * KW, plan.per, stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1], *plan.strides, so_o, so_h, so_w, so_c)
    return bound, ints


def _wgrad_triton(qe, qx, se, sx, kernel_hw, stride, padding, dilation, bits_e, bits_a, out_dtype,
                  max_terms, gq=None, fmt=torch.contiguous_format):
    """``gq``: None, or (bits_g, rounding_g, cout, cin, scale mode of G): G-quantize the real [:cout, :cin] part in the
    kernel (``gquant``); ``fmt``: the result's memory format; returns (out, quantized?)."""
    N, C, H, W = qx.shape
    _, CO, OH, OW = qe.shape
    KH, KW = kernel_hw
    raw = se is None
    out, inv_ss = result_and_scale((CO, C, KH, KW), se, out_dtype, bits_e, bits_a, qx.device, fmt)
    if out.numel() == 0:
        return out, False
    M = N * OH * OW
    if M == 0:
        return out.zero_(), False
    kernel_hw, stride, padding = tuple(kernel_hw), tuple(stride), tuple(padding)  # (plan keys as they are)
    plan = wgrad_launch(geometry(qe), geometry(qx), kernel_hw, stride, padding, max_terms, qx.device,
                        kernel_settings())
    tile, rows, n_tiles, splits, per = plan.tile, plan.rows, plan.n_tiles, plan.splits, plan.per
    # splits > 1: each adds its exact int32 tile into an int64 workspace, the last split of the tile
    # finishes it (scales, G quantization) in the same launch: no int32 partials, no finalize launch
    ws = split_workspace(n_tiles, splits, tile.BM, tile.BN, qx.device)
    fuse_g = gq is not None and not raw and out_dtype == torch.float32
    if fuse_g:
        bits_g, rounding_g, cout, cin, scale_g = gq
        real = leading(out, cout, cin)
        g_args, g_mode, g_stoch = gquant_plan(real, bits_g, rounding_g, scale_g, out, n_tiles)
    else:
        (g_args, g_mode, g_stoch), bits_g = gquant_off(qe), 8
    if rows is not None:
        launch_wgrad_tma(qe, qx, out, se, sx, inv_ss, rows, tile, kernel_hw, padding, dilation, n_tiles, splits, per,
                         ws, g_args, g_mode, g_stoch, bits_g, raw)
    else:
        so = out.stride()
        out_align = alignment((so[0], so[2], so[3]), (out,))
        bound, ints = _wgrad_call(plan, qx.shape, qe.shape, kernel_hw, stride, padding, tuple(dilation), so, out_align,
                                  raw, g_mode, bits_g, g_stoch)
        bound(qe, qx, out, qe if raw else se, qe if raw else sx, *ints, ws, inv_ss, *g_args)
    if fuse_g:
        gquant_finish(real, g_args, g_mode, bits_g, g_stoch, scale_g)
    return out, fuse_g
