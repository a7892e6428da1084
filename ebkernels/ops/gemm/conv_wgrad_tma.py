"""The TMA weight-grad of the int8 Conv2d (``conv``, rule 8 of ``tiles``): stride-1 convolutions
with two or more taps on sm_90, both MMA operands K-major in shared memory, filled by the Tensor Memory
Accelerator — no byte-wise shared-memory transpose of the input codes.

Why: sm_90's int8 ``wgmma`` reads both operands from shared memory K-major only. The weight-grad reduces
over the N·OH·OW rows, and NHWC input codes are row-major the other way, so the generic kernel
(``conv_wgrad``) transposes every X̃ tile into shared memory one byte per instruction (``python -m
ebkernels.aot`` counts those stores). Here one launch first writes channel-major copies of the codes
(``wgrad_tma_operands_kernel``):

- E as [Cout_p, N·OHs, OWs] (output rows padded to OHs, columns to OWs, zero there);
- the input codes as KW copies [KW·Cin_p, N·Hp, OWs], copy j = the zero-padded image shifted left by
  j·dil_w columns, so tap (kh, kw) reads copy kw at row offset kh·dil_h: every box starts 16-byte aligned
  (TMA's rule for the innermost coordinate, which the interpreter checks too).

Then a K step is one BH×BW box of output pixels (BH·BW = 64): ``E[co, n, oh0:oh0+BH, ow0:ow0+BW]``
against ``X_kw[ci, n, oh0+kh·dil_h : ..., ow0 : ow0+BW]``, each a 3-D TMA box reshaped to [channels, 64],
and ``tl.dot`` reduces them. Padded rows multiply zeros of E; rows past an image's end read the next
image's or TMA's zero fill, against E's zero padding rows. The splits, the int64 fix-up, the scales and
the fused G quantization are every GEMM's (``mainloop.finish_gemm_tile``). Exact against the
same float64 oracle (``conv2d_int8_wgrad_reference``); under ``TRITON_INTERPRET=1`` the descriptors
become masked loads, which ``tests/test_conv_wgrad_tma.py`` runs with ``config.override(wgrad_tma=True)``.

Cost, from the shapes (not measured: no GPU was lent): the copies write KW·|X| + |E| bytes once per
step and layer; the generic kernel instead spends BN·64 one-byte shared stores per K step and program.
"""
from __future__ import annotations

import torch

from ..._registry import aot_kernel
from ..._triton import TensorDescriptor, tl, triton
from .._buffers import empty_output
from .._launch import cdiv, alignment
from .._tl import assume_multiple, decode_tap
from . import tiles, wgrad_tiles
from .mainloop import finish_gemm_tile, grouped_tile_ids

__all__ = ["conv2d_int8_wgrad_tma_kernel", "wgrad_tma_operands_kernel", "wgrad_tma_operands",
           "wgrad_tma_operands_reference", "launch_wgrad_tma"]

_COPY_BLOCK_C, _COPY_BLOCK_R = 32, 128


@triton.jit
def _copy_channel_major(src_ptr, dst_ptr, c, r, C_SRC, C_DST, ROWS, OWS, HD, H, W, s_n, s_c, s_h, s_w, off_h,
                        off_w, s_dst):
    """dst[c, R, w] (R < ROWS over images of HD rows, w < OWS) = src[n, c, R % HD - off_h, w - off_w],
    zero outside the source image and for channels >= C_SRC."""
    R = r // OWS
    w = r - R * OWS
    n = R // HD
    h = R - n * HD - off_h
    iw = w - off_w
    ok_r = (r < ROWS * OWS) & (h >= 0) & (h < H) & (iw >= 0) & (iw < W)
    src = n * s_n + h * s_h + iw * s_w
    v = tl.load(src_ptr + src[None, :] + (c * s_c)[:, None], mask=(c < C_SRC)[:, None] & ok_r[None, :], other=0)
    tl.store(dst_ptr + (c * s_dst)[:, None] + r[None, :], v, mask=(c < C_DST)[:, None] & (r < ROWS * OWS)[None, :])


_OPERANDS_SIG = {"x_ptr": "*i8", "e_ptr": "*i8", "xd_ptr": "*i8", "ed_ptr": "*i8", "C": "i32", "CP": "i32",
                 "CO": "i32", "COP": "i32", "N": "i32", "H": "i32", "W": "i32", "OH": "i32", "OW": "i32",
                 "HP": "i32", "OHS": "i32", "OWS": "i32", "pad_h": "i32", "pad_w": "i32", "dil_w": "i32",
                 "sx_n": "i32", "sx_c": "i32", "sx_h": "i32", "sx_w": "i32", "se_n": "i32", "se_c": "i32",
                 "se_h": "i32", "se_w": "i32"}


@aot_kernel(signature=_OPERANDS_SIG,
            constexprs=[{"BLOCK_C": _COPY_BLOCK_C, "BLOCK_R": _COPY_BLOCK_R, "WITH_E": e} for e in (True, False)])
@triton.jit
def wgrad_tma_operands_kernel(x_ptr, e_ptr, xd_ptr, ed_ptr, C, CP, CO, COP, N, H, W, OH, OW, HP, OHS, OWS, pad_h,
                              pad_w, dil_w, sx_n, sx_c, sx_h, sx_w, se_n, se_c, se_h, se_w,
                              BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, WITH_E: tl.constexpr):
    """The operands of the TMA weight-grad in one launch (grid: row blocks, channel blocks, KW (+ 1)):
    axis 2 = j < KW: input copy j (``xd[j·CP + c, n·HP + h, w] = x[n, c, h - pad_h, w + j·dil_w - pad_w]``),
    axis 2 = KW (``WITH_E``): E (``ed[co, n·OHS + oh, ow] = e[n, co, oh, ow]``); zero wherever the source has
    nothing. Without ``WITH_E`` the E codes are already in that layout (the channel-major codes ``bn_relu_bwd``
    writes, when no row or channel needs padding): no copy of them."""
    j = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if j < tl.num_programs(2) - WITH_E:
        _copy_channel_major(x_ptr, xd_ptr + j * CP * (N * HP * OWS), c, r, C, CP, N * HP, OWS, HP, H, W, sx_n,
                            sx_c, sx_h, sx_w, pad_h, pad_w - j * dil_w, N * HP * OWS)
    elif tl.program_id(0) * BLOCK_R < N * OHS * OWS:
        _copy_channel_major(e_ptr, ed_ptr, c, r, CO, COP, N * OHS, OWS, OHS, OH, OW, se_n, se_c, se_h, se_w, 0, 0,
                            N * OHS * OWS)


_TMA_SIG = {"e_desc": "tensordesc<i8[{BM}, {BH}, {BW}]>", "x_desc": "tensordesc<i8[{BN}, {BH}, {BW}]>",
            "out_ptr": "*fp32", "se_ptr": "*fp32", "sx_ptr": "*fp32", "C": "i32", "CP": "i32", "CO": "i32",
            "KW": "i32", "taps": "i32", "HP": "i32", "OHS": "i32", "OWS": "i32", "q_total": "i32",
            "q_per_split": "i32", "dil_h": "i32", "so_o": "i32", "so_h": "i32", "so_w": "i32", "so_c": "i32",
            "ws_ptr": "*i64", "inv_ss": "fp32", "gq_ptr": "*i32", "rng_ptr": "*i64", "gn": "i64", "g1": "i64",
            "g2": "i64", "g3": "i64", "gs0": "i64", "gs1": "i64", "gs2": "i64", "gs3": "i64"}
_NO_GQ = {"GQ": 1, "BITS_G": 8, "STOCH_G": True, "GBLOCK": 1024, "RAW": False, "OUT_ALIGN": 16, "so_c": 1}


def _tma_aot():
    """Every aligned 64-row tile of the table with the (2, 32) box, one split or several, G quantized in the
    epilogue; the other two boxes at the 64×64 tile (the box changes the loads only), and there the raw
    int64 sums."""
    aligned = [t for t in tiles.WGRAD_TILES if t.BK == tiles.WGRAD_BK and not t.flat]
    out = []
    for t in aligned:
        for bh, bw in wgrad_tiles.WGRAD_TMA_BOXES:
            if (bh, bw) != (2, 32) and (t.BM, t.BN) != (64, 64):
                continue
            for fix in (False, True):
                out.append({**t.aot(), **_NO_GQ, "BH": bh, "BW": bw, "SPLIT_FIX": fix})
            if (t.BM, t.BN, bh) == (64, 64, 2):  # the raw int64 API (GQ=2 never: two or more taps, two tiles)
                out += [{**t.aot(), **_NO_GQ, "BH": bh, "BW": bw, "SPLIT_FIX": True, "GQ": 0, "RAW": True}]
    return out


@aot_kernel(signature=_TMA_SIG, constexprs=_tma_aot(), int8_mma=True, aligned=("out_ptr",), arches=(90,))
@triton.jit
def conv2d_int8_wgrad_tma_kernel(e_desc, x_desc, out_ptr, se_ptr, sx_ptr, C, CP, CO, KW, taps, HP, OHS, OWS,
                                 q_total, q_per_split, dil_h, so_o, so_h, so_w, so_c, ws_ptr, inv_ss, gq_ptr,
                                 rng_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3, RAW: tl.constexpr, BM: tl.constexpr,
                                 BN: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                                 GROUP_M: tl.constexpr, OUT_ALIGN: tl.constexpr, SPLIT_FIX: tl.constexpr,
                                 GQ: tl.constexpr, BITS_G: tl.constexpr, STOCH_G: tl.constexpr,
                                 GBLOCK: tl.constexpr):
    """``dW[co, kh, kw, ci]`` over this program's K steps ``[split · q_per_split, ...)`` of the q_total
    BH×BW boxes (``OHS/BH · OWS/BW`` per image); grid (Cout tiles × taps × Cin tiles, splits). ``CP``: the
    copies' channel count (a multiple of BN, so a box never spans two copies)."""
    tl.static_assert(BH * BW == BK)
    so_o = assume_multiple(so_o, OUT_ALIGN)
    so_h = assume_multiple(so_h, OUT_ALIGN)
    so_w = assume_multiple(so_w, OUT_ALIGN)
    num_c = tl.cdiv(C, BN)
    pid_co, pid_col = grouped_tile_ids(tl.program_id(0), tl.cdiv(CO, BM), taps * num_c, GROUP_M)
    t = pid_col // num_c
    ci0 = (pid_col - t * num_c) * BN
    kh, kw = decode_tap(t, KW)
    co0 = pid_co * BM
    nwb = OWS // BW
    per_image = (OHS // BH) * nwb
    q_start = tl.program_id(1) * q_per_split
    q_end = tl.minimum(q_start + q_per_split, q_total)
    x_row = kw * CP + ci0  # copy kw, channel block ci0
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for q in range(q_start, q_end):
        n = q // per_image
        rem = q - n * per_image
        ohb = rem // nwb
        oh0 = ohb * BH
        ow0 = (rem - ohb * nwb) * BW
        a = e_desc.load([co0, n * OHS + oh0, ow0]).reshape(BM, BK)  # [Cout, 64 rows], K-major
        b = x_desc.load([x_row, n * HP + oh0 + kh * dil_h, ow0]).reshape(BN, BK)  # [Cin, 64 rows], K-major
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    co = co0 + tl.arange(0, BM)
    ci = ci0 + tl.arange(0, BN)
    finish_gemm_tile(acc, ws_ptr, out_ptr, co * so_o, co < CO, ci, (kh * so_h + kw * so_w) + ci * so_c, ci < C,
                     se_ptr, sx_ptr, se_ptr, inv_ss, gq_ptr, rng_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3, out_ptr, False, RAW,
                     SPLIT_FIX, GQ, BITS_G, STOCH_G, GBLOCK, BM, BN, False)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
def e_is_tma_ready(qe, rows: wgrad_tiles.TmaRows) -> bool:
    """Whether the E codes already are the TMA operand [COp, N·OHs, OWs]: channel-major and contiguous (as
    ``bn_relu_bwd`` writes them), no padded channel, row or column, 16-byte aligned."""
    N, CO, OH, OW = qe.shape
    return ((CO, OH, OW) == (rows.COP, rows.OHs, rows.OWs) and qe.permute(1, 0, 2, 3).is_contiguous()
            and qe.data_ptr() % 16 == 0)


def wgrad_tma_operands(qe, qx, rows: wgrad_tiles.TmaRows, KW, padding, dilation):
    """(e operand [COp, N·OHs, OWs], x_copies [KW·Cp, N·Hp, OWs]) int8, in one launch; E is a view of ``qe``
    where that already is the operand (``e_is_tma_ready``), else a copy."""
    N, C, H, W = qx.shape
    _, CO, OH, OW = qe.shape
    cp, cop = rows.CP, rows.COP
    xd = empty_output((KW * cp, N * rows.Hp, rows.OWs), torch.int8, qx.device)
    ready = e_is_tma_ready(qe, rows)
    if ready:
        ed = qe.permute(1, 0, 2, 3).reshape(cop, N * rows.OHs, rows.OWs)
    else:
        ed = empty_output((cop, N * rows.OHs, rows.OWs), torch.int8, qx.device)
    x_rows = N * rows.Hp * rows.OWs
    e_rows = 0 if ready else N * rows.rows
    grid = (cdiv(max(x_rows, e_rows), _COPY_BLOCK_R), cdiv(max(cp, 0 if ready else cop), _COPY_BLOCK_C),
            KW + (not ready))
    wgrad_tma_operands_kernel[grid](qx, qe, xd, ed, C, cp, CO, cop, N, H, W, OH, OW, rows.Hp, rows.OHs, rows.OWs,
                                    padding[0], padding[1], dilation[1], *qx.stride(), *qe.stride(),
                                    BLOCK_C=_COPY_BLOCK_C, BLOCK_R=_COPY_BLOCK_R, WITH_E=not ready)
    return ed, xd


def wgrad_tma_operands_reference(qe, qx, rows: wgrad_tiles.TmaRows, KW, padding, dilation):
    """The copies of ``wgrad_tma_operands`` in PyTorch."""
    N, C, H, W = qx.shape
    _, CO, OH, OW = qe.shape
    cp, cop = rows.CP, rows.COP
    ed = torch.zeros((cop, N, rows.OHs, rows.OWs), dtype=torch.int8)
    ed[:CO, :, :OH, :OW] = qe.cpu().permute(1, 0, 2, 3)
    # the zero-padded image, wide enough for every shifted copy
    wide = rows.OWs + (KW - 1) * dilation[1] + W + 2 * padding[1]
    xp = torch.zeros((cp, N, rows.Hp, wide), dtype=torch.int8)
    xp[:C, :, padding[0]:padding[0] + H, padding[1]:padding[1] + W] = qx.cpu().permute(1, 0, 2, 3)
    xd = torch.cat([xp[..., j * dilation[1]:j * dilation[1] + rows.OWs] for j in range(KW)])
    return ed.reshape(cop, N * rows.OHs, rows.OWs), xd.reshape(KW * cp, N * rows.Hp, rows.OWs)


def launch_wgrad_tma(qe, qx, out, se, sx, inv_ss, rows: wgrad_tiles.TmaRows, tile: tiles.Tile, kernel_hw, padding,
                     dilation, n_tiles, splits, per, ws, g_args, g_mode, g_stoch, bits_g, raw):
    """The copies, then the TMA weight-grad on the grid (``n_tiles`` output tiles, the ones ``ws`` was sized
    for; ``splits`` splits of ``per`` rows, a multiple of 64)."""
    N, C = qx.shape[:2]
    CO = qe.shape[1]
    KH, KW = kernel_hw
    ed, xd = wgrad_tma_operands(qe, qx, rows, KW, padding, dilation)
    box = [rows.BH, rows.BW]
    e_desc = TensorDescriptor.from_tensor(ed, [tile.BM, *box])
    x_desc = TensorDescriptor.from_tensor(xd, [tile.BN, *box])
    so_o, so_c, so_h, so_w = out.stride()
    out_align = alignment((so_o, so_h, so_w), (out,))
    q_total = N * rows.rows // tile.BK
    conv2d_int8_wgrad_tma_kernel[(n_tiles, splits)](
        e_desc, x_desc, out, qe if raw else se, qe if raw else sx, C, rows.CP, CO, KW, KH * KW, rows.Hp,
        rows.OHs, rows.OWs, q_total, per // tile.BK, dilation[0], so_o, so_h, so_w, so_c, ws, inv_ss, *g_args,
        RAW=raw, BM=tile.BM, BN=tile.BN, BK=tile.BK, BH=rows.BH, BW=rows.BW, GROUP_M=tile.GROUP_M,
        OUT_ALIGN=out_align, SPLIT_FIX=splits > 1, GQ=g_mode, BITS_G=bits_g, STOCH_G=g_stoch, GBLOCK=1024,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
