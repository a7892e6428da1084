"""The end of every int8 GEMM program (the Linear, the convolution forward / input-grad, both weight-grads):
split-K fix-up, the shared epilogue, the weight-grad's fused G quantization. Its own module because it joins
``_igemm`` (index math, epilogue) and ``quantize`` (the G quantizer), which ``_igemm`` must not import."""
from __future__ import annotations

import triton
import triton.language as tl

from ._igemm import split_fixup, store_gemm_tile
from .quantize import gquant_epilogue

__all__ = ["finish_gemm_tile"]


@triton.jit
def finish_gemm_tile(acc, ws_ptr, out_ptr, row_offs, row_ok, col, col_offs, col_ok, sa_ptr, sb_ptr, bias_ptr, inv_ss,
                     gq_ptr, rng_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3, HAS_BIAS: tl.constexpr, RAW: tl.constexpr,
                     SPLIT_FIX: tl.constexpr, GQ: tl.constexpr, BITS_G: tl.constexpr, STOCH_G: tl.constexpr,
                     GBLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The end of a GEMM program on grid (tiles, splits) with its int32 tile ``acc``. ``SPLIT_FIX``
    (splits > 1): ``split_fixup`` adds it into the int64 workspace and only the tile's last split goes on,
    with the int64 sum over all splits (RAW results stay exact). Then the epilogue (``store_gemm_tile``)
    and, ``GQ`` > 0, the weight-grad's G quantization (``quantize.gquant_epilogue``: every tile finished
    by exactly one program, so it counts ``tiles`` of them; gq/rng/gn/g*/gs*: its scratch and the real
    gradient view)."""
    last = True
    if SPLIT_FIX:
        acc, last = split_fixup(acc, ws_ptr, tl.program_id(0), tl.num_programs(1), BM, BN)
    if last:
        y, y_mask = store_gemm_tile(acc, out_ptr, row_offs, row_ok, col, col_offs, col_ok, sa_ptr, sb_ptr, bias_ptr,
                                    inv_ss, HAS_BIAS, RAW)
        if GQ > 0:
            gquant_epilogue(y, y_mask, gq_ptr, rng_ptr, out_ptr, gn, g1, g2, g3, gs0, gs1, gs2, gs3,
                            tl.num_programs(0), tl.program_id(0) == 0, GQ, BITS_G, STOCH_G, GBLOCK)
