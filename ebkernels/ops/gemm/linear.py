"""Int8 tensor-core Linear for WAGE-style training (SPEC §2): forward ``x Wᵀ``, input-grad ``E W`` and
weight-grad ``Eᵀ x``, all on one strided int8 GEMM kernel.

``linear_int8_gemm_kernel`` computes ``C[M, N] = A[M, K] · B[K, N]`` for int8 A and B of any strides
(so the three products are just different views of the same codes), accumulating int8×int8 in int32 on
tensor cores (``tl.dot`` -> ``mma.sync…s8`` / ``wgmma…s8``). The epilogue reads the two per-tensor scales
from device tensors, multiplies by ``sa·sb / (S_a·S_b)`` and adds the bias: no host synchronisation.

Reductions longer than ``MAX_TERMS = 2^17`` (127² · 2^17 < 2^31), or split to fill the GPU, run as
splits in one launch: each adds its exact int32 sums into an int64 workspace and the last split of each
output tile applies the epilogue and the weight-grad's fused G quantization (``mainloop.finish_gemm_tile``).
This matters for the weight-grad, whose reduction runs over all rows of the batch.

Public: ``qlinear(x, weight, bias=None, qconfig=None)``; lower level ``linear_int8_mm`` (a
``torch.library`` custom op, ``ebkernels::linear_int8_mm``) and its oracle ``linear_int8_mm_reference``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _rng
from ..._backend import use_triton
from ..._checks import check_same_device, check_tensor
from ..._registry import aot_kernel
from ..._triton import tl, triton
from ...config import QConfig, as_qconfig
from .._buffers import split_workspace
from .._launch import cdiv, MAX_TERMS, MIN_PROGRAMS, PROGRAM_BYTES, alignment
from .._tl import assume_multiple
from ..quantize import dequantize, quantize
from ..weight_step import batched_linear_codes, linear_codes_again
from . import tiles
from .gquant import gquant_finish, gquant_off, gquant_plan
from .host import (autocast_dtype, exact_int_sums, f32_chunks, f32_exact_terms, inv_code_scales, no_autocast,
                   quantize_weight_grad, quantize_weight_transposed, refuse_double_backward, result_and_scale,
                   split_reduction)
from .mainloop import finish_gemm_tile, grouped_tile_ids
from .._dispatch import custom_op

__all__ = ["qlinear", "linear_int8_mm", "linear_int8_mm_reference", "QLinearFunction"]


# Tile configurations of the int8 Linear GEMM launched on a GPU (the convolutions, the fused conv+BatchNorm
# included, take theirs from the per-shape table of ``tiles``); the Linear's ``@aot_kernel`` declarations compile
# exactly these.
# Chosen from the ptxas resource report (no GPU was available to time them): int8 MMA (mma.sync m16n8k32 on
# sm_80, wgmma m64n128k32 on sm_90), 0 spills, a 128x128 int32 accumulator over 8 warps (64 registers a
# thread), BK=64, 4 stages (3 K tiles in flight).
# "unaligned": operands whose leading dimensions are not multiples of 16 (ALIGN=1) cannot use 16-byte vector
# loads: one address and predicate per byte, which spills at 128x128x64; 64x128x32 halves the per-thread
# load state and does not. Same warps/stages (the Linear's AOT declaration holds one pair).
# "small": a GEMM whose operands total 256 KiB or more but whose big-tile grid (splits included) has fewer than
# MIN_PROGRAMS programs (a classifier head: 10 output features) takes 32x32x32 tiles and splits of one K step
# or more, so that no launch of that size runs on a handful of SMs (issue 20).
GPU_TILES = {
    "linear": {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    "unaligned": {"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    "small": {"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
}
# the interpreter's cost is per operation, not per element: few, mid-sized tiles
_INTERPRETER_TILES = {"BM": 64, "BN": 32, "BK": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


def gemm_tiles(device: torch.device, align: int = 16) -> dict:
    """Tile configuration of the Linear GEMM: ``GPU_TILES`` on a GPU (``align`` 1, see
    ``_launch.alignment``: the unaligned fallback), few mid-sized tiles under the CPU interpreter."""
    if tiles.on_gpu(device):
        return dict(GPU_TILES["unaligned" if align < 16 else "linear"])
    return dict(_INTERPRETER_TILES)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
_GEMM_SIG = {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": "*fp32", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
             "bias_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32",
             "s_am": "i32", "s_ak": "i32", "s_bk": "i32", "s_bn": "i32", "s_om": "i32", "s_on": "i32",
             "ws_ptr": "*i64", "inv_ss": "fp32", "gq_ptr": "*i32", "rng_ptr": "*i64", "gn": "i64", "g1": "i64",
             "g2": "i64", "g3": "i64", "gs0": "i64", "gs1": "i64", "gs2": "i64", "gs3": "i64"}
_GPU_TILES, _GPU_UNALIGNED = ({k: v for k, v in GPU_TILES[c].items() if k not in ("num_warps", "num_stages")}
                              for c in ("linear", "unaligned"))
_GPU_SMALL = dict(GPU_TILES["small"])
# AOT configurations as launched on a GPU (unit strides are specialised the way the JIT does it; ALIGN=16:
# extents and leading dimensions multiples of 16, what the JIT infers for such arguments), each with one
# split and with several (SPLIT_FIX: the last split of a tile finishes it): forward (x, Wᵀ: both
# K-contiguous) with fused scale + bias, input-grad (E, transposed copy of W: K-contiguous) the same
# kernel; the integer API's exact int64 sums (RAW) on the weight-grad's operands (Eᵀ, x: M/N-contiguous);
# both with the unaligned fallback tiles (ALIGN=1, e.g. 10 output features); QLinearFunction's weight-grad:
# scaled result with the G quantization fused in (small and large gradients; a classifier head's small
# one unaligned too).
_NO_GQ = {"GQ": 0, "BITS_G": 8, "STOCH_G": True, "GBLOCK": 1024}
_FWD, _WGRAD = {"s_ak": 1, "s_bk": 1, "s_on": 1}, {"s_am": 1, "s_bn": 1, "s_on": 1}
_GEMM_AOT = [
    {**cfg, "HAS_BIAS": not raw, "RAW": raw, "ALIGN": align, **_NO_GQ, **(_WGRAD if raw else _FWD), "SPLIT_FIX": fix}
    for cfg, align in ((_GPU_TILES, 16), (_GPU_UNALIGNED, 1)) for raw in (False, True) for fix in (False, True)]
_GEMM_AOT += [{**cfg, "HAS_BIAS": False, "RAW": False, "ALIGN": align, **_NO_GQ, "GQ": gq, **_WGRAD, "SPLIT_FIX": fix}
              for cfg, align, gq in ((_GPU_TILES, 16, 1), (_GPU_TILES, 16, 2), (_GPU_UNALIGNED, 1, 2))
              for fix in (False, True)]
# the small-grid tile (its own warps): forward / input-grad with bias, split or not; the weight-grad's G quantized
_GEMM_AOT += [{**_GPU_SMALL, "HAS_BIAS": True, "RAW": False, "ALIGN": 1, **_NO_GQ, **_FWD, "SPLIT_FIX": True},
              {**_GPU_SMALL, "HAS_BIAS": False, "RAW": False, "ALIGN": 1, **_NO_GQ, "GQ": 2, **_WGRAD, "SPLIT_FIX": True}]


@aot_kernel(signature=_GEMM_SIG, constexprs=_GEMM_AOT, num_warps=GPU_TILES["linear"]["num_warps"],
            num_stages=GPU_TILES["linear"]["num_stages"], int8_mma=True,
            aligned=("a_ptr", "b_ptr", "out_ptr"))
@triton.jit
def linear_int8_gemm_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, k_per_split,
                            s_am, s_ak, s_bk, s_bn, s_om, s_on, ws_ptr, inv_ss, gq_ptr, rng_ptr, gn, g1, g2,
                            g3, gs0, gs1, gs2, gs3, HAS_BIAS: tl.constexpr, RAW: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, ALIGN: tl.constexpr,
                            SPLIT_FIX: tl.constexpr, GQ: tl.constexpr, BITS_G: tl.constexpr, STOCH_G: tl.constexpr,
                            GBLOCK: tl.constexpr):
    """``out[m, n] = sum_k a[m, k] b[k, n]``, this program's part over the K range
    ``[split * k_per_split, (split+1) * k_per_split)``; grid (tiles, splits). ``SPLIT_FIX`` (splits > 1):
    the splits meet in the int64 workspace ``ws_ptr`` and the last one of the tile finishes it
    (``mainloop.finish_gemm_tile``). Offsets are int32 (the launcher routes operands past 2^31 elements to
    the reference path). ``ALIGN`` (16 or 1): the launcher guarantees M, N, K, ``k_per_split`` and every
    stride other than 1 are multiples of it. ``GQ`` (1, 2): the weight-grad's G quantization fused in
    (``quantize.gquant_epilogue``)."""
    M = assume_multiple(M, ALIGN)
    N = assume_multiple(N, ALIGN)
    K = assume_multiple(K, ALIGN)
    k_per_split = assume_multiple(k_per_split, ALIGN)
    s_om = assume_multiple(s_om, ALIGN)
    pid_m, pid_n = grouped_tile_ids(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    rk = k_start + tl.arange(0, BK)
    # pointers built once and advanced by BK along K (cheaper than re-deriving them every step)
    # rows/cols past the edge re-read valid ones (wrapped) instead of masking: their results are never
    # stored, and unmasked rows keep the loads simple
    a_rows = (rm % M) * s_am
    a_cols = rk * s_ak
    b_rows = rk * s_bk
    b_cols = (rn % N) * s_bn
    if ALIGN > 1:  # each is contiguous from a multiple of ALIGN (unit stride) or a multiple of ALIGN
        a_rows = tl.multiple_of(a_rows, ALIGN)
        a_cols = tl.multiple_of(a_cols, ALIGN)
        b_rows = tl.multiple_of(b_rows, ALIGN)
        b_cols = tl.multiple_of(b_cols, ALIGN)
    a_ptrs = a_ptr + (a_rows[:, None] + a_cols[None, :])
    b_ptrs = b_ptr + (b_rows[:, None] + b_cols[None, :])
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for _ in range(k_start, k_end, BK):
        k_ok = rk < k_end
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK * s_ak
        b_ptrs += BK * s_bk
        rk += BK
    finish_gemm_tile(acc, ws_ptr, out_ptr, rm * s_om, m_ok, rn, rn * s_on, n_ok, sa_ptr, sb_ptr, bias_ptr, inv_ss,
                     gq_ptr, rng_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3, out_ptr, HAS_BIAS, RAW, SPLIT_FIX, GQ, BITS_G,
                     STOCH_G, GBLOCK, BM, BN, False)


def _linear_int8_mm_triton(a, b, sa, sb, bias, bits_a, bits_b, out_dtype, max_terms, gq=None):
    """``gq``: None or (bits_g, rounding_g, scale mode of G): G-quantize the (scaled fp32) result in the
    kernel."""
    M, K = a.shape
    N = b.shape[1]
    raw = sa is None
    out, inv_ss = result_and_scale((M, N), sa, out_dtype, bits_a, bits_b, a.device)
    if out.numel() == 0:
        return out, False
    if K == 0:  # empty reduction: the sums are 0
        out.zero_()
        if bias is not None and not raw:
            out += bias.to(out_dtype)
        return out, False
    strides = [st for st in (*a.stride(), *b.stride()) if st != 1]
    cfg = gemm_tiles(a.device, align=alignment((M, N, K, *strides), (a, b)))
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    n_tiles = cdiv(M, BM) * cdiv(N, BN)
    splits, per = split_reduction(K, n_tiles, BK, a.device, max_terms)
    min_iters = 8
    moved = M * K + K * N + M * N * out.element_size() + (n_tiles * BM * BN * 8 if splits > 1 else 0)
    if tiles.on_gpu(a.device) and n_tiles * splits < MIN_PROGRAMS and moved >= 4 * PROGRAM_BYTES:
        cfg, min_iters = dict(GPU_TILES["small"]), 1  # a small grid over 256 KiB or more (see GPU_TILES)
        BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
        n_tiles = cdiv(M, BM) * cdiv(N, BN)
        splits, per = split_reduction(K, n_tiles, BK, a.device, max_terms, min_iters)
    # splits > 1: each adds its exact int32 tile into an int64 workspace, the last split of the tile
    # finishes it (epilogue, G quantization) in the same launch: no int32 partials, no finalize launch
    ws = split_workspace(n_tiles, splits, BM, BN, a.device)
    align = alignment((M, N, K, per, *strides, *(st for st in out.stride() if st != 1)), (a, b, out))
    fuse_g = gq is not None and not raw and out_dtype == torch.float32
    if fuse_g:
        g_args, g_mode, g_stoch = gquant_plan(out, *gq, out, n_tiles)
    else:
        g_args, g_mode, g_stoch = gquant_off(a)
    dummy = a  # never dereferenced: RAW / no bias
    linear_int8_gemm_kernel[(n_tiles, splits)](
        a, b, out, dummy if raw else sa, dummy if raw else sb, dummy if bias is None else bias, M, N, K, per,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), ws, inv_ss, *g_args,
        HAS_BIAS=not raw and bias is not None, RAW=raw, BM=BM, BN=BN, BK=BK, GROUP_M=cfg["GROUP_M"], ALIGN=align,
        SPLIT_FIX=splits > 1, GQ=g_mode, BITS_G=gq[0] if fuse_g else 8, STOCH_G=g_stoch, GBLOCK=1024,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if fuse_g:
        gquant_finish(out, g_args, g_mode, gq[0], g_stoch, gq[2])
    return out, fuse_g


def linear_int8_mm_reference(a, b, sa, sb, bias, bits_a: int, bits_b: int, out_dtype: torch.dtype,
                             fast: bool = False):
    """Oracle: the integer sums in float64 (exact: |sum| < 2^53), then the kernel's fp32 epilogue.
    ``fast`` (the CPU path): the same sums, in float32 chunks where that is exact (``exact_int_sums``)."""
    if fast:
        K = a.shape[1]
        per = f32_chunks(K, 1, f32_exact_terms(a, b))
        acc = exact_int_sums(K, per, lambda k0, k1: a[:, k0:k1].float() @ b[k0:k1].float(),
                             lambda: a.double() @ b.double())
    else:
        acc = a.double() @ b.double()
    if sa is None:
        return acc.to(torch.int64)
    scale = sa.float() * sb.float() * inv_code_scales(bits_a, bits_b)
    y = acc.float() * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@custom_op("ebkernels::linear_int8_mm", mutates_args=("rng",))
def _linear_int8_mm_op(a: torch.Tensor, b: torch.Tensor, sa: Optional[torch.Tensor],
                       sb: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits_a: int, bits_b: int,
                       out_dtype: torch.dtype, max_terms: int, bits_g: int, rounding_g: str, rng: torch.Tensor,
                       mode_g: str = "shift") -> torch.Tensor:
    # bits_g > 0: the result G-quantized (a weight-grad, scale mode ``mode_g``); rng: the device random state
    # it advances (always given: a mutable argument is never optional)
    with _rng.bound(rng):
        return _linear_impl(a, b, sa, sb, bias, bits_a, bits_b, out_dtype, max_terms, bits_g, rounding_g, mode_g)


def _linear_impl(a, b, sa, sb, bias, bits_a, bits_b, out_dtype, max_terms, bits_g, rounding_g, mode_g):
    gq = (bits_g, rounding_g, mode_g) if bits_g > 0 else None
    # the kernel's tile offsets are int32: operands past 2^31 elements take the reference path
    small = all((t.shape[0] - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) < 2**31 for t in (a, b))
    if use_triton(a, b) and small and a.shape[0] * b.shape[1] < 2**31:
        out, done = _linear_int8_mm_triton(a, b, sa, sb, bias, bits_a, bits_b, out_dtype, max_terms, gq)
    else:
        out, done = linear_int8_mm_reference(a, b, sa, sb, bias, bits_a, bits_b, out_dtype,
                                             fast=a.device.type == "cpu"), False  # GPU fp32 matmul may use TF32
    if gq is not None and not done:
        out = quantize_weight_grad(out, QConfig(bits_g=bits_g, rounding_g=rounding_g), mode_g)
    return out


@_linear_int8_mm_op.register_fake
def _(a, b, sa, sb, bias, bits_a, bits_b, out_dtype, max_terms, bits_g, rounding_g, rng, mode_g="shift"):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int64 if sa is None else out_dtype)


def linear_int8_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor | None = None,
                   sb: torch.Tensor | None = None, bias: torch.Tensor | None = None, bits_a: int = 8,
                   bits_b: int = 8, out_dtype: torch.dtype = torch.float32,
                   max_terms: int = MAX_TERMS) -> torch.Tensor:
    """``a[M, K] @ b[K, N]`` on int8 codes of any strides, on the int8 tensor cores.

    With scales ``sa``/``sb`` (0-dim float32 device tensors): ``acc * sa*sb / (2^(bits_a-1) 2^(bits_b-1))
    + bias`` in ``out_dtype``. With ``sa=None``: the exact integer sums as int64. ``max_terms`` (tests)
    caps the terms per int32 partial sum (default 2^17, the int32-safe chunk).
    """
    check_tensor("a", a, (torch.int8,))
    check_tensor("b", b, (torch.int8,))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"linear_int8_mm: a {tuple(a.shape)} and b {tuple(b.shape)} are not [M, K] and "
                         "[K, N] matrices")
    if (sa is None) != (sb is None):
        raise ValueError("linear_int8_mm: give both scales sa and sb, or neither (integer sums)")
    check_same_device(a=a, b=b, sa=sa, sb=sb, bias=bias)
    return _linear_int8_mm_op(a, b, sa, sb, bias, bits_a, bits_b, out_dtype, max_terms, 0, "nearest",
                              _rng.device_state(a.device))


# --------------------------------------------------------------------------------------------------
# Autograd function and public op
# --------------------------------------------------------------------------------------------------
class QLinearFunction(torch.autograd.Function):
    """WAGE-style Linear on 2-D input. Forward quantizes W and A and saves only their int8 codes and
    scales; backward quantizes E, runs input-grad and weight-grad on the int8 kernel, then G-quantizes
    the weight gradient. An operand whose bits is None stays float: every product involving it runs as
    a float32 torch matmul on the (dequantized) operands instead of the int8 kernel. ``out_dtype``: as
    ``QConv2dFunction``'s (autocast's under ``torch.autocast``; autocast off inside)."""

    @staticmethod
    def forward(ctx, x, weight, bias, qc: QConfig, out_dtype=None):
        with no_autocast(x):
            return QLinearFunction._forward(ctx, x, weight, bias, qc, out_dtype or x.dtype)

    @staticmethod
    def _forward(ctx, x, weight, bias, qc: QConfig, out_dtype):
        qx = sx = qw = qw_t = sw = None
        if qc.bits_a is not None:
            qx, sx = quantize(x, qc.bits_a, "nearest", qc.mode)
        again = None
        if qc.bits_w is not None:  # backward's input-grad reads the codes transposed: written in the same pass
            got = batched_linear_codes(weight, qc.bits_w, qc.mode) if qc.mode != "wage" or qc.alpha == 1.0 else None
            qw, qw_t, sw, again = got if got is not None else (*quantize_weight_transposed(weight, qc), None)
        if qx is not None and qw is not None:
            y = linear_int8_mm(qx, qw.t(), sx, sw, bias, qc.bits_a, qc.bits_w, out_dtype)
        else:
            xf = dequantize(qx, sx, qc.bits_a) if qx is not None else x.float()
            wf = dequantize(qw, sw, qc.bits_w) if qw is not None else weight.float()
            y = torch.nn.functional.linear(xf, wf, None if bias is None else bias.float()).to(out_dtype)
        ctx.qc = qc
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # int8 codes + scales instead of the float tensors (float only where that operand is unquantized)
        ctx.again = again  # a large weight's codes come back in backward (ops.weight_step): the weight is saved
        ctx.save_for_backward(qx if qx is not None else x, sx, qw_t if qw_t is not None else weight, sw)
        return y

    @staticmethod
    def backward(ctx, gy):
        refuse_double_backward()
        with no_autocast(gy):
            return QLinearFunction._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        qc = ctx.qc
        xa, sx, wa, sw = ctx.saved_tensors
        if ctx.again is not None:
            wa = linear_codes_again(ctx.again, wa, sw, qc.bits_w)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gx = gw = gb = None
        qe = se = None
        if qc.bits_e is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            qe, se = quantize(gy, qc.bits_e, qc.rounding_e, qc.mode_eg)

        def as_float(t, s, bits):
            return dequantize(t, s, bits) if s is not None else t.float()

        ef = None
        if ctx.needs_input_grad[0]:
            if qe is not None and sw is not None:  # dX = E W, W's codes saved K-major (in, out memory)
                gx = linear_int8_mm(qe, wa, se, sw, None, qc.bits_e, qc.bits_w, x_dtype)
            else:
                ef = as_float(qe, se, qc.bits_e) if qe is not None else gy.float()
                gx = (ef @ as_float(wa, sw, qc.bits_w)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            if qe is not None and sx is not None:  # dW = Eᵀ X, reduction over the rows; G quantization fused
                gw = _linear_int8_mm_op(qe.t(), xa, se, sx, None, qc.bits_e, qc.bits_a, torch.float32, MAX_TERMS,
                                        qc.bits_g or 0, qc.rounding_g, _rng.device_state(qe.device), qc.mode_eg)
            else:
                if ef is None:
                    ef = as_float(qe, se, qc.bits_e) if qe is not None else gy.float()
                gw = quantize_weight_grad(ef.t() @ as_float(xa, sx, qc.bits_a), qc)
            gw = gw.to(w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0, dtype=torch.float32).to(b_dtype)  # the float E, not its codes
        return gx, gw, gb, None, None


def qlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            qconfig: QConfig | None = None) -> torch.Tensor:
    """``y = x Wᵀ + b`` with W, A quantized to int8 codes (SPEC §2) and int8 tensor-core GEMMs for the
    forward, input-grad and weight-grad; E is quantized on the way into backward and the weight
    gradient is G-quantized (stochastic rounding). ``x``: (..., in_features); ``weight``:
    (out_features, in_features); ``qconfig`` defaults to ``QConfig()`` (8 bit everywhere). An operand
    with ``bits_* = None`` stays float and the products involving it run as float32 torch matmuls.
    CUDA tensors (or CPU under TRITON_INTERPRET=1) use the Triton kernels, other CPU tensors the
    PyTorch reference with the same numerics."""
    qc = as_qconfig(qconfig)
    check_tensor("x", x)
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must equal weight's in_features "
                         f"= {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    check_same_device(x=x, weight=weight, bias=bias)
    if x.numel() == 0 or weight.numel() == 0:
        # nothing to quantize: nn.Linear's own result for empty inputs / layers (zeros + bias, gradients)
        return torch.nn.functional.linear(x, weight, bias)
    lead = x.shape[:-1]
    ac = autocast_dtype(x)
    out_dtype = ac if ac is not None and x.dtype != torch.float64 else x.dtype
    if x.dim() == 2:  # no view of the result: an in-place op after it (nn.ReLU(inplace=True)) then costs no
        return QLinearFunction.apply(x, weight, bias, qc, out_dtype)  # copies in backward (autograd's CopySlices)
    y = QLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, qc, out_dtype)
    return y.reshape(*lead, weight.shape[0])
