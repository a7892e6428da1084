"""Shared pieces of the int8 GEMM and implicit-GEMM convolution kernels (SPEC §8).

One index decode and one set of tile helpers for every kernel in ``linear_int8`` and ``conv2d_int8``:

- ``decode_rows``: a flat row index over a (D0, D1, D2) grid, e.g. m -> (n, oh, ow) of an NHWC output;
- ``decode_tap`` / ``next_k_step``: the convolution's K position (kernel tap (kh, kw), first channel r0 of
  a BK chunk): decoded once per program, then advanced by scalar compares — no division in the K loop;
- ``tap_input_coord``: the input coordinate that output coordinate ``o`` reads through kernel tap ``t``,
  ``o*stride - pad + t*dil`` (forward and weight-grad);
- ``tap_output_coord``: the inverse, for the input-grad (a transposed convolution): the output coordinate
  that reads input coordinate ``i`` through tap ``t``, and whether it exists (``stride`` divides, in range);
- ``conv_implicit_gemm_tile``: the main loop of the convolution forward and input-grad (one body, the
  input-grad being the transposed convolution with the same weight codes);
- ``load_pixels_tile``: an int8 [pixels, channels] tile gathered from an NHWC tensor with padding masks —
  the im2col happens here, in registers, never in memory;
- ``store_gemm_tile``: the epilogue every kernel shares: raw int32 (exact partial sums, reduced later in
  int64) or the dequantized value ``acc * sa * sb / (S_a * S_b) + bias`` with scales read from device;
- ``int8_gemm_finalize_kernel``: sums int32 split partials exactly in int64, then the same epilogue;
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

import os

import torch
import triton
import triton.language as tl

from .._registry import aot_kernel

__all__ = ["MAX_TERMS", "GPU_TILES", "empty_output", "gemm_tiles", "alignment", "offsets_fit_int32",
           "int8_gemm_finalize", "assume_multiple", "to_bfloat16_rne", "cast_rne", "decode_rows", "decode_tap", "next_k_step", "tap_input_coord",
           "tap_output_coord", "grouped_tile_ids", "conv_implicit_gemm_tile", "load_pixels_tile",
           "store_gemm_tile", "int8_gemm_finalize_kernel"]

# 127² · n < 2^31 holds for n <= 133,144; chunks of 2^17 = 131,072 terms keep every int32 partial exact.
MAX_TERMS = 1 << 17


def empty_output(shape, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every output and partial-sum buffer of the int8 kernels comes from here (the tests replace it
    with a poisoned allocation, so an element a kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


# Tile configurations launched on a GPU; the ``@aot_kernel`` declarations compile exactly these.
# Chosen from the ptxas resource report (no GPU was available to time them): int8 MMA (mma.sync m16n8k32 on
# sm_80, wgmma m64n128k32 on sm_90), 0 spills, a 128x128 int32 accumulator over 8 warps (64 registers a
# thread), BK=64 (one 3x3 tap of a Cin=64 layer per K step), 4 stages (3 K tiles in flight).
# "unaligned": operands whose channel counts / leading dimensions are not multiples of 16 (ALIGN=1, e.g.
# a first layer with Cin=3) cannot use 16-byte vector loads: one address and predicate per byte, which
# spills at 128x128x64; 64x128x32 halves the per-thread load state and does not. Same warps/stages (the
# AOT registry holds one pair per kernel).
GPU_TILES = {
    "linear": {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    "conv": {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    "unaligned": {"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
}
# the interpreter's cost is per operation, not per element: few, mid-sized tiles
_INTERPRETER_TILES = {"BM": 64, "BN": 32, "BK": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


def gemm_tiles(device: torch.device, conv: bool = False, align: int = 16) -> dict:
    """Tile configuration: ``GPU_TILES`` on a GPU (``conv``: the convolution kernels; ``align`` 1, see
    ``alignment``: the unaligned fallback), few mid-sized tiles under the CPU interpreter."""
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return dict(GPU_TILES["unaligned" if align < 16 else "conv" if conv else "linear"])
    return dict(_INTERPRETER_TILES)


def alignment(values=(), tensors=()) -> int:
    """16 when every integer in ``values`` is a multiple of 16 and every tensor in ``tensors`` starts on a
    16-byte boundary, else 1: the ``ALIGN`` constexpr. With 16, the kernels tell the compiler so and it
    emits 16-byte vector loads/stores (and the ahead-of-time build sees what the JIT would infer)."""
    ok = all(int(v) % 16 == 0 for v in values) and all(t.data_ptr() % 16 == 0 for t in tensors)
    return 16 if ok else 1


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
def next_k_step(kh, kw, r0, KW, R, BK: tl.constexpr):
    """The convolution K step after (tap (kh, kw), channels [r0, r0+BK)): the next BK channels of the tap,
    else channel 0 of the next tap. A K tile never straddles two taps, so its decode stays scalar."""
    r0 += BK
    wrap = r0 >= R
    r0 = tl.where(wrap, 0, r0)
    kw = tl.where(wrap, kw + 1, kw)
    wrap = kw == KW
    return tl.where(wrap, kh + 1, kh), tl.where(wrap, 0, kw), r0


@triton.jit
def tap_input_coord(o, t, stride, pad, dil):
    """Input coordinate read by output coordinate ``o`` at kernel tap ``t`` (may fall in the padding)."""
    return o * stride - pad + t * dil


@triton.jit
def tap_output_coord(i, t, stride, pad, dil, O):
    """Output coordinate reading input coordinate ``i`` through tap ``t``, and whether it exists."""
    num = i + pad - t * dil
    nonneg = num >= 0
    o = tl.where(nonneg, num, 0) // stride  # clamp first: truncating division == floor division
    valid = nonneg & (o * stride == num) & (o < O)
    return o, valid


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
def conv_implicit_gemm_tile(src_ptr, w_ptr, n, p, q, row_ok, col, col_ok, t_start, t_end, KW, P, Q, R,
                            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, s_n, s_h, s_w, s_r,
                            sw_col, sw_h, sw_w, sw_r, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, TRANSPOSED: tl.constexpr, I64: tl.constexpr):
    """int32 [BM, BN] tile of an implicit-GEMM convolution over kernel taps ``[t_start, t_end)``.

    Rows are pixels (n, p, q) of the result, columns ``col`` its channels. Each tap (kh, kw) maps the
    row pixels to pixels (h, w) of ``src`` (NHWC-strided, spatial size P×Q, R channels), and the
    reduction runs over those R channels against ``w[col, kh, kw, r]`` (strides sw_*):
    - forward (``TRANSPOSED=False``): src = x, ``h = p*stride - pad + kh*dil``, R = Cin, col = Cout;
    - input-grad (``TRANSPOSED=True``): src = E, h is the output row that reads input row p through
      tap kh (only where ``stride`` divides), R = Cout, col = Cin — the transposed convolution.

    One flat K loop over (tap, BK-channel chunk), like Inductor's conv template: the software pipeline
    runs across taps (a nested tap/channel loop restarts it every tap, with 1-2 steps per tap at
    Cin = 64). Per row the loop carries only the image's base offset and the tap-0 coordinate (decoded
    once); (kh, kw, r0) are scalars advanced by ``next_k_step``. ``I64``: 64-bit pixel offsets (tensors
    past 2^31 elements); otherwise int32.
    """
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    rr = tl.arange(0, BK)
    if I64:
        pix_n = n.to(tl.int64) * s_n
    else:
        pix_n = n * s_n
    # tap-0 coordinate of every row, once: forward h = h0 + kh*dil; input-grad h = (h0 - kh*dil) / stride
    if TRANSPOSED:
        h0 = p + pad_h
        w0 = q + pad_w
    else:
        h0 = tap_input_coord(p, 0, stride_h, pad_h, dil_h)
        w0 = tap_input_coord(q, 0, stride_w, pad_w, dil_w)
    # the weight rows move by a scalar offset per K step: build their (int32: weights are small) offsets once
    w_rows = (col * sw_col)[:, None] + (rr * sw_r)[None, :]
    nrb = tl.cdiv(R, BK)
    kh, kw = decode_tap(t_start, KW)
    r0 = t_start * 0
    for _ in range(t_start * nrb, t_end * nrb):
        if TRANSPOSED:
            h, h_ok = tap_output_coord(h0, kh, stride_h, 0, dil_h, P)
            w, w_ok = tap_output_coord(w0, kw, stride_w, 0, dil_w, Q)
        else:
            h = tap_input_coord(h0, kh, 1, 0, dil_h)
            w = tap_input_coord(w0, kw, 1, 0, dil_w)
            h_ok = (h >= 0) & (h < P)
            w_ok = (w >= 0) & (w < Q)
        if I64:
            pix = pix_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
        else:
            pix = pix_n + h * s_h + w * s_w
        a = load_pixels_tile(src_ptr, pix, row_ok & h_ok & w_ok, r0 + rr, R, s_r)  # [BM, BK] im2col rows
        b = tl.load(w_ptr + (kh * sw_h + kw * sw_w + r0 * sw_r) + w_rows,
                    mask=col_ok[:, None] & (rr < R - r0)[None, :], other=0)  # [BN, BK] weight rows
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        kh, kw, r0 = next_k_step(kh, kw, r0, KW, R, BK)
    return acc


@triton.jit
def store_gemm_tile(acc, out_ptr, row_offs, row_ok, col, col_offs, col_ok, sa_ptr, sb_ptr, bias_ptr,
                    inv_ss, HAS_BIAS: tl.constexpr, RAW: tl.constexpr):
    """Epilogue. RAW: store the integer accumulator as is (exact partial sums). Otherwise
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


_FINALIZE_SIG = {"part_ptr": "*i32", "out_ptr": "*fp32", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                 "bias_ptr": "*fp32", "SPLIT": "i32", "s_split": "i64", "R": "i32", "CC": "i32", "R1": "i32",
                 "R2": "i32",
                 "rs0": "i64", "rs1": "i64", "rs2": "i64", "C1": "i32", "C2": "i32", "cs0": "i64",
                 "cs1": "i64", "cs2": "i64", "inv_ss": "fp32"}


@aot_kernel(signature=_FINALIZE_SIG,
            constexprs=[{"HAS_BIAS": b, "RAW": False, "BR": 64, "BC": 64} for b in (False, True)],
            num_warps=4, aligned=("part_ptr",))
@triton.jit
def int8_gemm_finalize_kernel(part_ptr, out_ptr, sa_ptr, sb_ptr, bias_ptr, SPLIT, s_split, R, CC, R1, R2, rs0, rs1,
                              rs2, C1, C2, cs0, cs1, cs2, inv_ss, HAS_BIAS: tl.constexpr,
                              RAW: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Sum the int32 partials ``part[SPLIT, R, CC]`` in int64 (exact at any reduction length), then the
    shared epilogue into ``out``: row r and column c decode over (R0, R1, R2) / (C0, C1, C2) grids with
    the given strides, so the result lands directly in NCHW, NHWC or OIHW order."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    r_ok = r < R
    c_ok = c < CC
    mask = r_ok[:, None] & c_ok[None, :]
    src = part_ptr + r.to(tl.int64)[:, None] * CC + c[None, :]
    total = tl.zeros((BR, BC), tl.int64)
    for _ in range(0, SPLIT):
        total += tl.load(src, mask=mask, other=0).to(tl.int64)
        src += s_split
    r0, r1, r2 = decode_rows(r, R1, R2)
    c0, c1, c2 = decode_rows(c, C1, C2)
    row_offs = r0.to(tl.int64) * rs0 + r1.to(tl.int64) * rs1 + r2.to(tl.int64) * rs2
    col_offs = c0.to(tl.int64) * cs0 + c1.to(tl.int64) * cs1 + c2.to(tl.int64) * cs2
    store_gemm_tile(total, out_ptr, row_offs, r_ok, c, col_offs, c_ok, sa_ptr, sb_ptr, bias_ptr, inv_ss,
                    HAS_BIAS, RAW)


def int8_gemm_finalize(part: torch.Tensor, out: torch.Tensor, sa, sb, bias, inv_ss: float,
                       rows: tuple, row_strides: tuple, cols: tuple, col_strides: tuple) -> None:
    """Launch the finalize kernel. ``rows``/``cols``: (D0, D1, D2) grids whose flat index is the partial
    buffer's row/column, ``*_strides`` the matching strides of ``out``. ``sa is None``: raw int64 sums."""
    split, R, CC = part.shape
    raw = sa is None
    dummy = part  # never dereferenced when RAW / no bias
    BR = BC = 64 if part.device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1" else 32
    grid = (triton.cdiv(R, BR), triton.cdiv(CC, BC))
    int8_gemm_finalize_kernel[grid](
        part, out, dummy if raw else sa, dummy if raw else sb, bias if bias is not None else dummy,
        split, R * CC, R, CC, rows[1], rows[2], *row_strides, cols[1], cols[2], *col_strides, float(inv_ss),
        HAS_BIAS=bias is not None, RAW=raw, BR=BR, BC=BC, num_warps=4)
