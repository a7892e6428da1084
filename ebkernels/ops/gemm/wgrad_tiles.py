"""The weight-grad's plans (``tiles`` rules 5 and 8: the rule text is there, with the rest of the table): the
tile of a weight-grad from its channel counts (``wgrad_tile``), its reduction splits (``wgrad_splits``, also the
Linear's), the row geometry of the sm_90 TMA weight-grad (``TmaRows``, ``wgrad_tma_rows``, ``wgrad_tma_plan``) and
the plan of a launch (``conv_wgrad_plan``). Split out of ``tiles`` (which it reads; ``tiles`` does not read it) to
keep each file one sitting long.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...config import kernel_settings
from .._launch import MAX_TERMS, cached_plan, cdiv
from .tiles import WGRAD_BK, WGRAD_TILES, WGRAD_UNALIGNED_MAX, Plan, Tile, _find, on_gpu, pow2_at_least

__all__ = ["wgrad_tile", "TmaRows", "WGRAD_TMA_BOXES", "WGRAD_TMA_MIN_USEFUL", "wgrad_tma_rows", "wgrad_tma_plan",
           "wgrad_tma_wanted", "wgrad_col_tiles", "wgrad_splits", "conv_wgrad_plan"]


def wgrad_tile(CO: int, C: int, align: int = 16, taps: int = 1) -> Tile:
    """Rule 5; ``align`` 1 (operands not 16-byte aligned, e.g. N·OH·OW rows not a multiple of 16): BK = 32.
    Fewer than 16 input channels (the unpadded first layer): columns flat over the taps·C (tap, channel)
    pairs, BN the width that wastes fewest columns (27 of the 3×3×3 first layer: one 32-wide tile)."""
    BM = pow2_at_least(CO, 16, 128)
    if C < 16:
        cols = taps * C
        BN = min((16, 32, 64, 128), key=lambda b: (cdiv(cols, b) * b, -b))
        while BM * BN > WGRAD_UNALIGNED_MAX[True]:  # the per-column gather: larger flat tiles spill
            BM //= 2
        return _find(WGRAD_TILES, BM, BN, 32, True)
    BN = pow2_at_least(C, 16, 128)
    if align >= 16:
        return _find(WGRAD_TILES, BM, BN, WGRAD_BK, False)
    while BM * BN > WGRAD_UNALIGNED_MAX[False]:  # byte-wise loads: fewer rows per program
        BM //= 2
    return _find(WGRAD_TILES, BM, BN, 32, False)


@dataclasses.dataclass(frozen=True)
class TmaRows:
    """Row geometry of the TMA weight-grad (rule 8): the reduction rows as [N·OHs, OWs] (output rows padded
    to OHs, a multiple of BH, and columns to OWs, a multiple of BW), one K step a BH×BW box of them; the
    input codes as ``KW`` copies [N·Hp, OWs] (Hp = H + 2·pad_h), copy j shifted left by j·dil_w columns, so
    tap (kh, kw) is the box of copy kw at row offset kh·dil_h: every box start 16-byte aligned. ``CP`` /
    ``COP``: the copies' channel rows (Cin, Cout rounded up to the tile's BN / BM: no box spans two copies
    or runs past the tensor)."""

    BH: int
    BW: int
    OHs: int
    OWs: int
    Hp: int
    CP: int
    COP: int

    @property
    def rows(self) -> int:  # reduction rows per image, padding included
        return self.OHs * self.OWs


WGRAD_TMA_BOXES = ((1, 64), (2, 32), (4, 16))  # (BH, BW): BH·BW = 64 rows per K step
WGRAD_TMA_MIN_USEFUL = 0.6  # padded rows: at most 40% of the reduction (8×8 images: 50%, not taken)


def wgrad_tma_rows(N, H, W, OH, OW, KH, KW, stride, padding, C, CO, tile: Tile) -> Optional[TmaRows]:
    """Rule 8: the geometry of the TMA weight-grad, or None where it does not apply (stride 1, at least
    two taps, at least 16 input channels at an aligned 64-row tile, output rows at least 16 wide, and
    no more than 40% padding rows)."""
    if (tuple(stride) != (1, 1) or KH * KW < 2 or C < 16 or tile.flat or tile.BK != WGRAD_BK or OW < 16
            or N * H * W == 0):
        return None
    BH, BW = WGRAD_TMA_BOXES[0] if OW > 32 else WGRAD_TMA_BOXES[1] if OW > 16 else WGRAD_TMA_BOXES[2]
    g = TmaRows(BH, BW, cdiv(OH, BH) * BH, cdiv(OW, BW) * BW, H + 2 * padding[0],
                cdiv(C, tile.BN) * tile.BN, cdiv(CO, tile.BM) * tile.BM)
    if OH * OW < WGRAD_TMA_MIN_USEFUL * g.rows or N * g.Hp < BH:  # (no box taller than the input copies)
        return None
    return g


def wgrad_tma_plan(device, N, C, H, W, CO, OH, OW, KH, KW, stride, padding):
    """(tile, rows) of the TMA weight-grad for codes on ``device``, or None (rule 8 off there, or the shape
    does not fit it, or its copies would not index in int32). The tile is the aligned one: the kernel
    reads its own copies, whatever the alignment of the codes."""
    if not wgrad_tma_wanted(device):
        return None
    tile = wgrad_tile(CO, C, 16, KH * KW)
    rows = wgrad_tma_rows(N, H, W, OH, OW, KH, KW, stride, padding, C, CO, tile)
    if rows is None:
        return None
    if max(KW * rows.CP * N * rows.Hp * rows.OWs, rows.COP * N * rows.rows, N * C * H * W, N * CO * OH * OW) >= 2**31:
        return None
    return tile, rows


def wgrad_tma_wanted(device: Optional[torch.device]) -> bool:
    """Whether rule 8 is on for tensors on ``device``: ``KernelSettings.wgrad_tma``, or by default an sm_90
    GPU, where the int8 wgmma takes K-major shared-memory operands only and TMA fills them without a
    byte-wise transpose (sm_80's mma.sync takes them from registers; there the descriptors would lower to
    plain loads)."""
    forced = kernel_settings().wgrad_tma
    if forced is not None:
        return forced
    if kernel_settings().plan_sms:  # the planned card is an sm_90 one
        return True
    return on_gpu(device) and torch.cuda.get_device_capability(device)[0] == 9


def wgrad_col_tiles(tile: Tile, C: int, taps: int) -> int:
    """Column tiles of a weight-grad: over taps·C flat columns, or taps × ceil(C / BN)."""
    return cdiv(taps * C, tile.BN) if tile.flat else taps * cdiv(C, tile.BN)


def wgrad_splits(P: int, programs: int, sms: Optional[int], max_terms: int, BK: int = WGRAD_BK, min_iters: int = 8):
    """(splits, rows per split) of a reduction over P rows: each at most ``max_terms`` rows (int32-exact), a
    multiple of BK; with ``sms`` (a GPU), more while under two tiles per SM, each >= ``min_iters`` steps."""
    max_terms = max(BK, max_terms // BK * BK)
    splits = cdiv(P, max_terms)
    if sms:
        splits = max(splits, min(cdiv(2 * sms, max(programs, 1)), cdiv(P, min_iters * BK)))
    per = cdiv(cdiv(max(P, 1), splits), BK) * BK
    return cdiv(max(P, 1), per), per


@cached_plan
def conv_wgrad_plan(N, C, H, W, CO, OH, OW, KH, KW, *, sms, max_terms=MAX_TERMS, cin_real=None,
                    cout_real=None, stride=(1, 1), padding=(0, 0), tma=False) -> Plan:
    """Weight-grad ``dW[CO, KH·KW·C] = Eᵀ · X̃`` reducing over P = N·OH·OW rows (``sms`` None: no fill);
    ``tma``: rule 8 where the shape fits (an sm_90 GPU), the reduction then over its padded rows."""
    taps = KH * KW
    P = N * OH * OW
    tile = wgrad_tile(CO, C, 16 if C % 16 == 0 else 1, taps)
    rows = wgrad_tma_rows(N, H, W, OH, OW, KH, KW, stride, padding, C, CO, tile) if tma else None
    Pr = N * rows.rows if rows else P
    programs = cdiv(CO, tile.BM) * wgrad_col_tiles(tile, C, taps)
    splits, per = wgrad_splits(Pr, programs, sms, max_terms, tile.BK)
    issued = programs * cdiv(Pr, tile.BK) * tile.BM * tile.BN * tile.BK
    useful = P * (cout_real or CO) * (cin_real or C) * taps
    return Plan("wgrad", tile, programs, splits, per, issued, useful, {"P": Pr, "tma": rows})
