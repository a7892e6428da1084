"""The int8 GEMM programs' shared body (SPEC §8): main loops and the end of every tile.

One index decode and one set of tile helpers for every kernel in ``linear``, ``conv_fwd_dgrad``,
``conv_wgrad``, ``conv_wgrad_tma`` and the fused conv+BatchNorm kernel (``ops.fused.conv_bn``):

- ``phase_taps``: the taps of one phase of a strided input-grad (a transposed convolution split into
  stride_h·stride_w dense sub-problems: no per-tap divisibility test; ``tiles.dgrad_phase_taps`` on the
  host);
- ``conv_implicit_gemm_tile``: the main loop of the convolution forward and input-grad (one body: a set of
  taps j = (jh, jw) whose source pixel moves by (DH, DW) and whose weight tap by (step_h, step_w) per
  step of j), the K loop one tap at a time (BK channels per step) or flat over (tap, channel) (``FLAT``:
  K packed across taps for fewer channels than a K tile); ``conv_forward_tile``: its forward form, shared
  with the fused conv+BatchNorm kernel; ``k_steps``: its K-step count;
- ``load_pixels_tile``: an int8 [pixels, channels] tile gathered from an NHWC tensor with padding masks —
  the im2col happens here, in registers, never in memory;
- ``finish_gemm_tile``: the end of every GEMM program: ``split_fixup`` (split-K in one launch: each split
  adds its exact int32 tile, at most 2^17 terms, into an int64 workspace and the tile's last split goes
  on), ``store_gemm_tile`` (the raw integer sums, exact int64 results, or the dequantized value
  ``acc * sa * sb / (S_a * S_b) + bias`` with scales read from device), and the weight-grad's fused G
  quantization (``gquant``).

Index decode, casts and divisibility hints are the ``ops._tl`` leaves; the host side of a launch
(alignment, strides, workspaces) is ``ops._launch`` / ``ops._buffers``.

Register budget (why the kernels are written this way, see benchmarks/NOTES.md "Resource tuning"): the
K loop carries only per-row base offsets (one int32 per row) and scalars; the tile decode happens once
per program; the epilogue sees divisibility hints so its layout holds few rows per thread.
"""
from __future__ import annotations

from ..._triton import tl, triton
from .._tl import cast_rne, tap_input_coord
from .gquant import gquant_max, gquant_tile

__all__ = ["phase_taps", "grouped_tile_ids", "load_pixels_tile", "load_channel_major_tile", "k_steps",
           "conv_implicit_gemm_tile", "conv_forward_tile", "split_fixup", "gemm_tile_values", "store_gemm_tile",
           "finish_gemm_tile"]


@triton.jit
def phase_taps(ph, pad, dil, stride, K, step):
    """Taps of input phase ``ph`` (input coordinates ≡ ph mod stride) of a transposed convolution along
    one axis, ``step`` = stride / gcd(stride, dil): ``(k0, count, c0)``: taps k0, k0 + step, ... (count of
    them) are the only ones whose output coordinate ``(i + pad - k·dil) / stride`` is an integer for the
    inputs of the phase, and input ``ph + stride·a`` reads output ``a + c0 - j·(dil / gcd)`` through the
    j-th. Scalar arithmetic on non-negative operands (``tiles.dgrad_phase_taps`` is the host mirror, the
    plan printer counts the same taps)."""
    k0 = step  # none yet
    for k in range(0, step):
        hit = (k * dil + (stride - 1) * (ph + pad)) % stride == 0  # (k·dil - ph - pad) ≡ 0 (mod stride)
        k0 = tl.where(hit & (k0 == step), k, k0)
    ok = (k0 < step) & (k0 < K)
    k0 = tl.where(ok, k0, 0)
    count = tl.where(ok, (K - 1 - k0) // step + 1, 0)
    big = K * dil  # >= k0·dil: keeps the (exact) division's numerator non-negative
    c0 = (ph + pad - k0 * dil + stride * big) // stride - big
    return k0, count, c0


@triton.jit
def grouped_tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile col), GROUP_M row tiles at a time so operand tiles stay in L2."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def load_pixels_tile(ptr, pix_base, pix_ok, c, C, s_c):
    """int8 [pixels, channels] tile: ``pix_base`` (offsets of the pixels, int32 or int64) + ``c * s_c``;
    pixels outside the image (``pix_ok`` false) and channels ``>= C`` read as 0."""
    offs = pix_base[:, None] + (c * s_c)[None, :]
    mask = pix_ok[:, None] & (c < C)[None, :]
    return tl.load(ptr + offs, mask=mask, other=0)


@triton.jit
def load_channel_major_tile(ptr, c, c_ok, s_c, m, m_ok, I64: tl.constexpr):
    """int8 [channels, rows] tile of channel-major codes (row ``m`` of channel ``c`` at ``c * s_c + m``,
    the rows contiguous: a K-major MMA operand); masked entries read as 0. ``I64``: 64-bit offsets."""
    if I64:
        offs = (c.to(tl.int64) * s_c)[:, None] + m[None, :]
    else:
        offs = (c * s_c)[:, None] + m[None, :]
    return tl.load(ptr + offs, mask=c_ok[:, None] & m_ok[None, :], other=0)


@triton.jit
def k_steps(n_taps, R, BK: tl.constexpr, FLAT: tl.constexpr):
    """K steps of ``conv_implicit_gemm_tile`` over ``n_taps`` taps of R channels (``tiles.k_iters``)."""
    if FLAT:
        return tl.cdiv(n_taps * R, BK)
    return n_taps * tl.cdiv(R, BK)


@triton.jit
def conv_implicit_gemm_tile(src_ptr, w_ptr, pix_n, h0, w0, row_ok, col, col_ok, it0, it1, NTW, n_taps, kh0, kw0,
                            step_h, step_w, DH, DW, P, Q, R, s_h, s_w, s_r, sw_col, sw_h, sw_w, sw_r,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FLAT: tl.constexpr,
                            I64: tl.constexpr):
    """int32 [BM, BN] tile of an implicit-GEMM convolution over K steps ``[it0, it1)`` of this program's taps.

    Rows are pixels of the result (``pix_n``: each row's image offset in ``src``; ``row_ok``), columns
    ``col`` its channels. Tap j = (jh, jw) (``n_taps`` of them, jw < NTW) reads source pixel
    ``(h0 + jh·DH, w0 + jw·DW)`` (P×Q image, NHWC-strided, R channels; outside: 0) against weight tap
    ``(kh0 + jh·step_h, kw0 + jw·step_w)`` (``w[col, kh, kw, r]``, strides sw_*):
    - forward (``conv_forward_tile``): h0 = oh·stride - pad, DH = dil, every tap (kh0 = 0, step 1);
    - input-grad phase (a transposed convolution, ``phase_taps``): h0 = a + c0, DH = -dil/gcd, only the
      taps that hit the phase: no divisibility test, no wasted taps.

    K steps: ``FLAT=False``: step i = (tap i // ceil(R/BK), BK channels): a K tile never straddles taps,
    its decode is scalar (advanced by compares, no division in the loop), the pipeline runs across taps;
    ``FLAT=True``: flat K index k = i·BK + [0, BK) over (tap k // R, channel k % R), K packed across taps
    for fewer than 64 channels per tap (16-channel layers, the unpadded Cin = 3 first layer), which a
    one-tap K tile would mostly fill with zeros (one [BK] division per K step). ``I64``: 64-bit offsets."""
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    rr = tl.arange(0, BK)
    w_cols = col * sw_col
    if not FLAT:
        nrb = tl.cdiv(R, BK)
        j = it0 // nrb
        r0 = (it0 - j * nrb) * BK
        jh = j // NTW
        jw = j - jh * NTW
        w_rows = w_cols[:, None] + (rr * sw_r)[None, :]
        for _ in range(it0, it1):
            h = h0 + jh * DH
            w = w0 + jw * DW
            ok = row_ok & (h >= 0) & (h < P) & (w >= 0) & (w < Q)
            if I64:
                pix = pix_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
            else:
                pix = pix_n + h * s_h + w * s_w
            a = load_pixels_tile(src_ptr, pix, ok, r0 + rr, R, s_r)  # [BM, BK] im2col rows
            woff = (kh0 + jh * step_h) * sw_h + (kw0 + jw * step_w) * sw_w + r0 * sw_r
            b = tl.load(w_ptr + woff + w_rows, mask=col_ok[:, None] & (rr < R - r0)[None, :], other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            r0 += BK
            wrap = r0 >= R
            r0 = tl.where(wrap, 0, r0)
            jw = tl.where(wrap, jw + 1, jw)
            wrap = jw == NTW
            jh = tl.where(wrap, jh + 1, jh)
            jw = tl.where(wrap, 0, jw)
    else:
        KT = n_taps * R
        for it in range(it0, it1):
            k = it * BK + rr
            j = k // R
            c = k - j * R
            jh = j // NTW
            jw = j - jh * NTW
            k_ok = k < KT
            h = h0[:, None] + (jh * DH)[None, :]
            w = w0[:, None] + (jw * DW)[None, :]
            ok = row_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < P) & (w >= 0) & (w < Q)
            if I64:
                offs = pix_n[:, None] + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w + (c * s_r)[None, :]
            else:
                offs = pix_n[:, None] + h * s_h + w * s_w + (c * s_r)[None, :]
            a = tl.load(src_ptr + offs, mask=ok, other=0)  # [BM, BK]: taps × channels packed in K
            woff = (kh0 + jh * step_h) * sw_h + (kw0 + jw * step_w) * sw_w + c * sw_r
            b = tl.load(w_ptr + w_cols[:, None] + woff[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def conv_forward_tile(src_ptr, w_ptr, n, op, oq, row_ok, col, col_ok, it0, it1, KH, KW, P, Q, R, stride_h, stride_w,
                      pad_h, pad_w, dil_h, dil_w, s_n, s_h, s_w, s_r, sw_col, sw_h, sw_w, sw_r, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, FLAT: tl.constexpr, I64: tl.constexpr):
    """The forward convolution's tile (``conv_fwd_dgrad`` and the fused conv+BatchNorm kernel): output pixels
    (n, op, oq), every tap, source pixel ``(op·stride - pad + kh·dil, ...)``."""
    if I64:
        pix_n = n.to(tl.int64) * s_n
    else:
        pix_n = n * s_n
    h0 = tap_input_coord(op, 0, stride_h, pad_h, dil_h)
    w0 = tap_input_coord(oq, 0, stride_w, pad_w, dil_w)
    return conv_implicit_gemm_tile(src_ptr, w_ptr, pix_n, h0, w0, row_ok, col, col_ok, it0, it1, KW, KH * KW, 0, 0,
                                   1, 1, dil_h, dil_w, P, Q, R, s_h, s_w, s_r, sw_col, sw_h, sw_w, sw_r, BM, BN, BK,
                                   FLAT, I64)


@triton.jit
def split_fixup(acc, ws_ptr, tile, splits, BM: tl.constexpr, BN: tl.constexpr):
    """Split-K without int32 partials in memory or a finalize launch: add this split's exact int32 ``acc``
    (at most 2^17 terms) into the int64 workspace tile ``tile`` (``split_workspace``: zero at launch) with
    integer atomics — exact in any order, so the sum is deterministic — then count the split in on the
    tile's semaphore. Returns ``(total, last)``: ``last`` in the one program of the tile that arrived last
    (it alone goes on to the epilogue), ``total`` there the int64 sum over all splits (``acc`` elsewhere).

    Ordering, with ONE GPU-scope fence per program: the element adds are relaxed atomics (no fence each);
    a CTA barrier orders every thread's adds before the semaphore, and the semaphore add is the one
    acquire-release atomic (executed by one thread: its release is cumulative over what the CTA did before
    the barrier, its acquire orders what the CTA does after it). The last split then reads the workspace with
    L2 (``.cg``) loads, zeroes its tile and the semaphore (relaxed: the next launch on the stream sees them),
    so the workspace comes from ``counter_pool``, no memset."""
    offs = tile.to(tl.int64) * (BM * BN) + (tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :])
    tl.atomic_add(ws_ptr + offs, acc.to(tl.int64), sem="relaxed")
    tl.debug_barrier()  # every thread's adds are issued before the semaphore
    sem = ws_ptr + tl.num_programs(0).to(tl.int64) * (BM * BN) + tile
    done = tl.atomic_add(sem, 1, sem="acq_rel")
    last = done == splits - 1
    total = acc.to(tl.int64)
    if last:
        total = tl.load(ws_ptr + offs, cache_modifier=".cg")
        tl.store(ws_ptr + offs, tl.zeros([BM, BN], dtype=tl.int64))
        tl.atomic_xchg(sem, 0, sem="relaxed")
    return total, last


@triton.jit
def gemm_tile_values(acc, col, col_ok, sa_ptr, sb_ptr, bias_ptr, inv_ss, HAS_BIAS: tl.constexpr):
    """The dequantized fp32 tile ``acc * (sa * sb * inv_ss) + bias[col]`` (scales: 0-dim device tensors, so
    no host synchronisation is needed to get them)."""
    y = acc.to(tl.float32) * (tl.load(sa_ptr) * tl.load(sb_ptr) * inv_ss)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def store_gemm_tile(acc, out_ptr, row_offs, row_ok, col, col_offs, col_ok, sa_ptr, sb_ptr, bias_ptr,
                    inv_ss, res_ptr, HAS_BIAS: tl.constexpr, RAW: tl.constexpr, HAS_RES: tl.constexpr):
    """Epilogue. RAW: store the integer accumulator as is (the exact sums, int64 results). Otherwise
    ``gemm_tile_values`` (``HAS_RES``: plus the residual ``res_ptr``, laid out as the result, in fp32: one
    rounding for the conv and its residual add) stored in ``out_ptr``'s element type. Returns the fp32 tile
    and its mask (the weight-grad's fused G quantization reads them)."""
    offs = row_offs[:, None] + col_offs[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if RAW:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        y = acc.to(tl.float32)  # not the result: RAW callers ignore it
    else:
        y = gemm_tile_values(acc, col, col_ok, sa_ptr, sb_ptr, bias_ptr, inv_ss, HAS_BIAS)
        if HAS_RES:
            y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)
    return y, mask


@triton.jit
def finish_gemm_tile(acc, ws_ptr, out_ptr, row_offs, row_ok, col, col_offs, col_ok, sa_ptr, sb_ptr, bias_ptr, inv_ss,
                     gq_ptr, rng_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3, res_ptr, HAS_BIAS: tl.constexpr,
                     RAW: tl.constexpr, SPLIT_FIX: tl.constexpr, GQ: tl.constexpr, BITS_G: tl.constexpr,
                     STOCH_G: tl.constexpr, GBLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     HAS_RES: tl.constexpr):
    """The end of a GEMM program on grid (tiles, splits) with its int32 tile ``acc``. ``SPLIT_FIX``
    (splits > 1): ``split_fixup`` adds it into the int64 workspace and only the tile's last split goes on,
    with the int64 sum over all splits (RAW results stay exact). Then the epilogue (``store_gemm_tile``)
    and, ``GQ`` > 0, the weight-grad's G quantization (``gquant``): ``GQ=1`` folds the tile into max |G|
    (the launcher's codes pass follows), ``GQ=2`` (the launch's only tile, G dense row-major in ``out``)
    stores the values of G's codes instead of the tile. gq/rng: the scratch and random state; gn, g*, gs*
    (the real gradient view) and GBLOCK are kept for the launchers' argument lists and not read. ``HAS_RES``
    (the forward of a conv with its residual add fused, ``GQ=0``): ``res_ptr`` is added before the store."""
    last = True
    if SPLIT_FIX:
        acc, last = split_fixup(acc, ws_ptr, tl.program_id(0), tl.num_programs(1), BM, BN)
    if last:
        if GQ == 2:
            y = gemm_tile_values(acc, col, col_ok, sa_ptr, sb_ptr, bias_ptr, inv_ss, HAS_BIAS)
            offs = row_offs.to(tl.int64)[:, None] + col_offs.to(tl.int64)[None, :]
            gquant_tile(y, row_ok[:, None] & col_ok[None, :], offs, out_ptr, rng_ptr, BITS_G, STOCH_G)
        else:
            y, y_mask = store_gemm_tile(acc, out_ptr, row_offs, row_ok, col, col_offs, col_ok, sa_ptr, sb_ptr,
                                        bias_ptr, inv_ss, res_ptr, HAS_BIAS, RAW, HAS_RES)
            if GQ == 1:
                gquant_max(y, y_mask, gq_ptr, rng_ptr, tl.program_id(0) == 0, STOCH_G)
