"""Shared pieces of the int8 GEMM and implicit-GEMM convolution kernels (SPEC §8).

One index decode and one set of tile helpers for every kernel in ``linear_int8`` and ``conv2d_int8``:

- ``decode_rows``: a flat row index over a (D0, D1, D2) grid, e.g. m -> (n, oh, ow) of an NHWC output;
- ``decode_tap``: a kernel tap index -> (kh, kw) (the weight-grad's one tap per program);
- ``tap_input_coord``: the input coordinate that output coordinate ``o`` reads through kernel tap ``t``,
  ``o*stride - pad + t*dil`` (forward and weight-grad);
- ``phase_taps``: the taps of one phase of a strided input-grad (a transposed convolution split into
  stride_h·stride_w dense sub-problems: no per-tap divisibility test; ``_tiles.dgrad_phase_taps`` on the
  host);
- ``conv_implicit_gemm_tile``: the main loop of the convolution forward and input-grad (one body: a set of
  taps j = (jh, jw) whose source pixel moves by (DH, DW) and whose weight tap by (step_h, step_w) per
  step of j), the K loop one tap at a time (BK channels per step) or flat over (tap, channel) (``FLAT``:
  K packed across taps for fewer channels than a K tile); ``conv_forward_tile``: its forward form, shared
  with the fused conv+BatchNorm kernel; ``k_steps``: its K-step count;
- ``load_pixels_tile``: an int8 [pixels, channels] tile gathered from an NHWC tensor with padding masks —
  the im2col happens here, in registers, never in memory;
- ``store_gemm_tile``: the epilogue every kernel shares: the raw integer sums (exact, int64 results) or the
  dequantized value ``acc * sa * sb / (S_a * S_b) + bias`` with scales read from device;
- ``split_fixup`` / ``split_workspace``: split-K in one launch: each split adds its exact int32 tile (at
  most 2^17 terms) into an int64 workspace and the tile's last split applies the epilogue (the end of
  every GEMM program, with the weight-grad's fused G quantization: ``_gemm_end.finish_gemm_tile``);
- ``assume_multiple`` / ``alignment``: the launcher checks which extents and strides are multiples of 16
  and tells the kernel (constexpr ``ALIGN``), so loads and stores are 16-byte vectors in the
  ahead-of-time build too (the JIT would infer it from the arguments; ``python -m ebkernels.aot`` cannot);
- ``offsets_fit_int32``: whether a tensor's element offsets fit int32 (constexpr ``I64`` otherwise), so
  per-row offsets stay 32-bit in the common case.

Register budget (why the kernels are written this way, see benchmarks/NOTES.md "Resource tuning"): the
K loop carries only per-row base offsets (one int32 per row) and scalars; the tile decode happens once
per program; the epilogue sees divisibility hints so its layout holds few rows per thread.

Integer division here only ever sees non-negative operands (negative coordinates are clamped before
dividing), so C-style truncation on the GPU and in the interpreter agree with floor division.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tiles

__all__ = ["MAX_TERMS", "GPU_TILES", "empty_output", "gemm_tiles", "alignment", "nchw_strides", "offsets_fit_int32",
           "assume_multiple", "assume_conv_operands", "to_bfloat16_rne", "cast_rne", "decode_rows", "decode_tap", "tap_input_coord",
           "phase_taps", "split_fixup", "split_workspace", "grouped_tile_ids", "k_steps", "conv_implicit_gemm_tile", "conv_forward_tile", "load_pixels_tile",
           "store_gemm_tile"]

# 127² · n < 2^31 holds for n <= 133,144; chunks of 2^17 = 131,072 terms keep every int32 partial exact.
MAX_TERMS = 1 << 17


def empty_output(shape, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every output and partial-sum buffer of the int8 kernels comes from here (the tests replace it
    with a poisoned allocation, so an element a kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


# Tile configurations of the int8 Linear GEMM launched on a GPU (the convolutions, the fused conv+BatchNorm
# included, take theirs from the per-shape table of ``_tiles``); the ``@aot_kernel`` declarations compile
# exactly these.
# Chosen from the ptxas resource report (no GPU was available to time them): int8 MMA (mma.sync m16n8k32 on
# sm_80, wgmma m64n128k32 on sm_90), 0 spills, a 128x128 int32 accumulator over 8 warps (64 registers a
# thread), BK=64, 4 stages (3 K tiles in flight).
# "unaligned": operands whose leading dimensions are not multiples of 16 (ALIGN=1) cannot use 16-byte vector
# loads: one address and predicate per byte, which spills at 128x128x64; 64x128x32 halves the per-thread
# load state and does not. Same warps/stages (the Linear's AOT declaration holds one pair).
GPU_TILES = {
    "linear": {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    "unaligned": {"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
}
# the interpreter's cost is per operation, not per element: few, mid-sized tiles
_INTERPRETER_TILES = {"BM": 64, "BN": 32, "BK": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


def gemm_tiles(device: torch.device, align: int = 16) -> dict:
    """Tile configuration of the Linear GEMM: ``GPU_TILES`` on a GPU (``align`` 1, see ``alignment``: the
    unaligned fallback), few mid-sized tiles under the CPU interpreter."""
    if _tiles.on_gpu(device):  # (a real GPU, or the one EBKERNELS_PLAN_SMS plans for)
        return dict(GPU_TILES["unaligned" if align < 16 else "linear"])
    return dict(_INTERPRETER_TILES)


def alignment(values=(), tensors=()) -> int:
    """16 when every integer in ``values`` is a multiple of 16 and every tensor in ``tensors`` starts on a
    16-byte boundary, else 1: the ``ALIGN`` constexpr. With 16, the kernels tell the compiler so and it
    emits 16-byte vector loads/stores (and the ahead-of-time build sees what the JIT would infer)."""
    ok = all(int(v) % 16 == 0 for v in values) and all(t.data_ptr() % 16 == 0 for t in tensors)
    return 16 if ok else 1


def nchw_strides(t: torch.Tensor):
    """(s_n, s_h, s_w, s_c) of a logical NCHW tensor (any memory format)."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def offsets_fit_int32(*tensors) -> bool:
    """Whether every element offset of every tensor fits int32 (then the kernels keep 32-bit offsets)."""
    return all(sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride()) if d > 0) < 2**31 for t in tensors)


@triton.jit
def assume_multiple(x, A: tl.constexpr):
    """``x``, which the launcher guarantees to be a multiple of ``A``, written as ``x // A * A`` (the same
    value) so the compiler knows its divisibility even for a kernel argument. ``A = 1``: unchanged."""
    if A > 1:
        x = x // A * A
    return x


@triton.jit
def assume_conv_operands(R, s_n, s_h, s_w, sw_col, sw_h, sw_w, ALIGN: tl.constexpr):
    """``assume_multiple`` on what every implicit-GEMM convolution launcher aligns: the source's channels
    per tap R, its pixel strides, the weight's column and tap strides."""
    return (assume_multiple(R, ALIGN), assume_multiple(s_n, ALIGN), assume_multiple(s_h, ALIGN),
            assume_multiple(s_w, ALIGN), assume_multiple(sw_col, ALIGN), assume_multiple(sw_h, ALIGN),
            assume_multiple(sw_w, ALIGN))


@triton.jit
def to_bfloat16_rne(x):
    """float32 -> bfloat16, round to nearest even (as ``torch.Tensor.to``; NaN -> the canonical quiet NaN).
    Spelled out in integer arithmetic: the interpreter's own cast truncates, a GPU's rounds; this gives
    the same bits on both."""
    bits = x.to(tl.uint32, bitcast=True)
    hi = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    hi = tl.where(x != x, 0x7FC0, hi).to(tl.uint16)
    return hi.to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """float32 ``x`` in ``dtype``, bfloat16 rounded to nearest even on every backend (``to_bfloat16_rne``)."""
    if dtype == tl.bfloat16:
        return to_bfloat16_rne(x)
    return x.to(dtype)


@triton.jit
def decode_rows(r, D1, D2):
    """Flat index ``r`` over a (D0, D1, D2) grid, last fastest -> (i0, i1, i2)."""
    i2 = r % D2
    t = r // D2
    return t // D1, t % D1, i2


@triton.jit
def decode_tap(t, KW):
    """Kernel tap index ``t`` (row-major over KH×KW) -> (kh, kw)."""
    kh = t // KW
    return kh, t - kh * KW


@triton.jit
def tap_input_coord(o, t, stride, pad, dil):
    """Input coordinate read by output coordinate ``o`` at kernel tap ``t`` (may fall in the padding)."""
    return o * stride - pad + t * dil


@triton.jit
def phase_taps(ph, pad, dil, stride, K, step):
    """Taps of input phase ``ph`` (input coordinates ≡ ph mod stride) of a transposed convolution along
    one axis, ``step`` = stride / gcd(stride, dil): ``(k0, count, c0)``: taps k0, k0 + step, ... (count of
    them) are the only ones whose output coordinate ``(i + pad - k·dil) / stride`` is an integer for the
    inputs of the phase, and input ``ph + stride·a`` reads output ``a + c0 - j·(dil / gcd)`` through the
    j-th. Scalar arithmetic on non-negative operands (``_tiles.dgrad_phase_taps`` is the host mirror, the
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
    """K steps of ``conv_implicit_gemm_tile`` over ``n_taps`` taps of R channels (``_tiles.k_iters``)."""
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
    """The forward convolution's tile (``conv2d_int8`` and the fused conv+BatchNorm kernel): output pixels
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
    Ordering: each add is a release, the semaphore an acq_rel atomic, and the last split reads the
    workspace with L1-bypassing loads after it. Every other split has added and counted in by then, so the
    last one leaves its tile and semaphore zero again: the workspace comes from ``counter_pool``, no memset."""
    offs = tile.to(tl.int64) * (BM * BN) + (tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :])
    tl.atomic_add(ws_ptr + offs, acc.to(tl.int64), sem="release")
    tl.debug_barrier()  # every thread's adds are issued before the semaphore
    sem = ws_ptr + tl.num_programs(0).to(tl.int64) * (BM * BN) + tile
    done = tl.atomic_add(sem, 1)
    last = done == splits - 1
    total = acc.to(tl.int64)
    if last:
        total = tl.load(ws_ptr + offs, cache_modifier=".cg")
        tl.store(ws_ptr + offs, tl.zeros([BM, BN], dtype=tl.int64))
        tl.atomic_xchg(sem, 0)
    return total, last


def split_workspace(programs: int, splits: int, BM: int, BN: int, device: torch.device) -> torch.Tensor:
    """The int64 workspace of ``split_fixup``, zero at launch and left zero by it (``counter_pool``): one
    BM×BN tile per program, then one semaphore per program (a one-element dummy for one split)."""
    from ._channel_stats import counter_pool

    n = 1 if splits <= 1 else programs * (BM * BN + 1)
    return counter_pool(device, n, torch.int64)[:n]


@triton.jit
def store_gemm_tile(acc, out_ptr, row_offs, row_ok, col, col_offs, col_ok, sa_ptr, sb_ptr, bias_ptr,
                    inv_ss, HAS_BIAS: tl.constexpr, RAW: tl.constexpr):
    """Epilogue. RAW: store the integer accumulator as is (the exact sums, int64 results). Otherwise
    ``acc * (sa * sb * inv_ss) + bias[col]`` in fp32, stored in ``out_ptr``'s element type; the
    scales are 0-dim device tensors, so no host synchronisation is needed to get them. Returns the fp32
    tile and its mask (the weight-grad's fused G quantization reads them)."""
    offs = row_offs[:, None] + col_offs[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if RAW:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        y = acc.to(tl.float32)  # not the result: RAW callers ignore it
    else:
        scale = tl.load(sa_ptr) * tl.load(sb_ptr) * inv_ss
        y = acc.to(tl.float32) * scale
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, cast_rne(y, out_ptr.dtype.element_ty), mask=mask)
    return y, mask
