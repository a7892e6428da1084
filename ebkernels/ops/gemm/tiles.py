"""Per-shape tile configurations of the int8 convolution kernels: the table, its heuristic, the plan of a launch.

No GPU was available to autotune, so the table is a documented rule computed from the shapes alone; every
tile it can choose is declared to the AOT registry (``declared_tiles``, read by the ``@aot_kernel``
lists of ``conv_fwd_dgrad``, ``conv_wgrad`` and ``fused.conv_bn``) and builds for sm_80 and sm_90 (``python -m ebkernels.aot``).
The fused conv + BatchNorm forward (``fused.conv_bn``, and its backward recompute of y) runs the forward's
rule 1-3/6 tile (``conv_fwd_plan``) with no split: its epilogue needs each output's whole sum.
``python -m ebkernels.aot --plan vgg16,preresnet101 --batch 256`` prints what the table chooses for every
layer, the grid against the GPU's SMs, and the *useful-MMA fraction* of each GEMM:

    useful multiply-adds / multiply-adds issued by the MMA tiles

where *useful* counts the products of the layer's real channels (N·OH·OW·Cout·Cin·KH·KW for each of the
three GEMMs of a convolution; taps that read the zero padding of the image count as useful, as in any
implicit GEMM) and *issued* counts every program's K steps times BM·BN·BK, masked lanes included:
ragged tile edges, channel padding, K tiles wider than a tap's channels, taps a strided input-grad
skips by masks. ``--tiles legacy`` prints the same for the one tile every GEMM ran before this table
(128×128×64; input-grad over every tap with a per-tap divisibility test; Cin < 16 zero-padded to 16).

The rule (one function per GEMM kind below; the launchers call the same functions, so the printed plan is
what runs):

1. **Narrow N tiles for small channel counts.** BN = the power of two >= the result's channel count,
   clipped to [16, 128] (16: the narrowest operand of Triton's int8 ``tl.dot``).
2. **K packed across taps** when a tap has fewer than 64 channels (R: Cin in forward, Cout in
   input-grad) or R is not a multiple of 64: the K loop runs flat over (tap, channel) in steps of 32
   (``FLAT``), so a 16-channel 3×3 layer issues 5 K steps of 32 (144 of 160 lanes useful) instead of 9 of
   64 (144 of 576), and the Cin = 3 first layer, whose codes are no longer padded to 16 channels, one step
   (27 of 32) instead of 9 of 64 (27 of 576). R a multiple of 64: one tap per K step of 64 (scalar decode).
3. **M tiles by grid fill**: BM = 256 where a tap holds a multiple of 64 channels, BN = 64 and 256-row tiles
   still fill 3/4 of the SMs (less L2 traffic per multiply-add: the cost model prices these implicit GEMMs
   L2-bound at 128 rows, e.g. VGG16's and PreResNet's 64-channel layers at batch 256), unsplit (a split one
   runs 128 rows: its split-K build with the residual spills; 256×128 spills 136-2380 B in every build, AOT,
   so it is not in the table); else BM = 128 unless that fills fewer than 3/4 of the SMs, then 64; if still
   short and BN = 128, BN = 64 (the 512-channel 2×2 layers: 32 programs at 128×128, 128 at 64×64 on 132 SMs;
   the 4×4 ones keep 128 of 128×128).
4. **Input-grad by phase decomposition**: a stride (sh, sw) input-grad is sh·sw dense sub-problems, one
   per input phase (ih % sh, iw % sw), each reading only the taps that hit it (``dgrad_phase_taps``), in
   one launch: no per-tap divisibility test, no wasted taps, any stride / padding / dilation.
5. **Weight-grad**: rows are output channels (BM = power of two >= Cout in [16, 128]), columns the input
   channels of one tap (BN likewise from Cin) or, for fewer than 16 (unpadded) input channels, flat over
   (tap, channel) (the first layer's 27 columns in one 32-wide tile, not 9 taps × 16). The reduction over
   N·OH·OW runs in steps of 64 rows, split (``wgrad_tiles.wgrad_splits``, also the Linear's rule) into
   int32-exact chunks of at most 2^17 terms and, on a GPU, into more splits while the output tiles are fewer
   than two per SM; the splits meet in an int64 workspace and the last one finishes the tile (as in rule 7).
6. Warps: 8 when the accumulator tile has >= 128·64 elements (weight-grad: or 128 columns), else 4; 4
   pipeline stages. Unaligned operands (channel counts / rows not multiples of 16: byte-wise loads):
   weight-grad BK = 32 and at most 64×128 (flat columns: 2048 accumulators), forward BM = 64 at 128
   columns (the larger tiles spill there).
7. **Split-K** of a forward / input-grad where one output's reduction exceeds 2^17 terms (SPEC §2:
   int32-exact chunks; none in VGG16 or PreResNet-101), and where the grid fills less than half the SMs
   (up to one CTA per SM, at least 4 K steps per split; none of the two networks at batch 256, several at
   batch 64). Each split adds its exact int32 tile into an int64 workspace and the last split of the tile
   does the epilogue (``mainloop.split_fixup``): one launch, exact in any order. Not done: stream-K.
8. **TMA weight-grad on sm_90** (``wgrad_tiles.wgrad_tma_rows``, ``conv_wgrad_tma``): stride 1, two or more taps, at
   least 16 input channels, output rows at least 16 wide and at most 40% padding rows: both operands go
   K-major into shared memory by TMA from channel-major copies (E in boxes of BH×BW output pixels: 1×64
   for rows wider than 32, 2×32 up to 32, 4×16 up to 16; the input codes as KW column-shifted copies),
   so int8 wgmma needs no byte-wise transpose of X̃; the tile is rule 5's aligned one, the reduction its
   padded rows (N·OHs·OWs). Off elsewhere (``config.KernelSettings.wgrad_tma``: None = sm_90 only).

Under ``TRITON_INTERPRET=1`` the same table runs with ``INTERPRETER_SMS`` SMs (small, so that the exact
tests' small shapes make it choose every tile: ``tests/test_tiles.py`` asks it).
``KernelSettings.plan_sms = N`` (default: the environment variable ``EBKERNELS_PLAN_SMS``, read at import;
the cost model ``benchmarks/cost_model.py`` sets it, tests use ``config.override(plan_sms=132)``): plan every
launch as the priced GPU runs it, whatever executes it: an sm_90 card (H100 / H200) with N SMs (132 for
both), so that a launch recorded under the interpreter is the GPU's launch: the GPU tile table with N SMs
for the grid fill and the split rules, rule 8's TMA weight-grad, the Linear's GPU tiles (``on_gpu`` and
``device_sms`` say so; ``linear.gemm_tiles`` asks ``on_gpu``). None or 0: off. Plans: one per shape (``cached_plan``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

from ...config import kernel_settings
from .._launch import MAX_TERMS, cached_plan, cdiv, conv_out

__all__ = ["Tile", "Plan", "MAX_TERMS", "SMS_H100", "INTERPRETER_SMS", "device_sms", "on_gpu", "IGEMM_TILES",
           "WGRAD_TILES", "WGRAD_BK", "declared_tiles", "conv_fwd_plan", "conv_dgrad_plan", "igemm_tile",
           "dgrad_phase_taps", "pow2_at_least", "k_iters"]

SMS_H100 = 132  # H100 / H200 SXM
INTERPRETER_SMS = 4  # what the table assumes under the interpreter (tests: small shapes, every choice)
GRID_FILL = 0.75  # rule 3: a grid of at least this share of the SMs keeps the larger tile
WGRAD_BK = 64


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile configuration: block sizes, the K layout (``flat``: K packed across taps), warps, stages."""

    BM: int
    BN: int
    BK: int
    flat: bool = False
    num_warps: int = 4
    num_stages: int = 4
    GROUP_M: int = 8

    name = property(lambda self: f"{self.BM}x{self.BN}x{self.BK}{'f' if self.flat else ''}/w{self.num_warps}")

    def aot(self) -> dict:
        """Constexprs plus warps/stages, the form an ``@aot_kernel`` configuration takes."""
        return {"BM": self.BM, "BN": self.BN, "BK": self.BK, "GROUP_M": self.GROUP_M,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


def _tile(BM, BN, BK, flat=False, wide_warps=False) -> Tile:
    return Tile(BM, BN, BK, flat, 8 if BM * BN >= 128 * 64 or (wide_warps and BN == 128) else 4, 4)


# implicit-GEMM forward / input-grad: BM x BN x {64 one tap per step, 32 flat over (tap, channel)}
IGEMM_TILES = (tuple(_tile(BM, BN, BK, flat) for BM in (64, 128) for BN in (16, 32, 64, 128)
                     for BK, flat in ((64, False), (32, True)))
               + (_tile(256, 64, 64),))  # rule 3's 256-row tile: 64 channels per tap, one tap per K step
# weight-grad: output channels x input channels of one tap, 64 rows of the reduction per step (32 when the
# operands are not 16-byte aligned: byte-wise loads of 64-row tiles spill); 8 warps for 128 columns too
# (32x128 at 4 warps spills on sm_90)
# flat: columns over (tap, channel) for fewer than 16 input channels (unaligned: BK = 32)
# (flat: at most 2048 accumulators, the [rows, columns] gather of larger tiles spills; unaligned: at most
# 64×128, 128×128 spills on sm_90)
WGRAD_UNALIGNED_MAX = {False: 8192, True: 2048}
WGRAD_TILES = tuple(_tile(BM, BN, BK, flat, wide_warps=True) for BK, flat in ((WGRAD_BK, False), (32, False), (32, True))
                    for BM in (16, 32, 64, 128) for BN in (16, 32, 64, 128)
                    if BK == WGRAD_BK or BM * BN <= WGRAD_UNALIGNED_MAX[flat])


def declared_tiles(kind: str) -> tuple:
    """Every tile the table can choose for a kernel kind ("igemm", "wgrad")."""
    return {"igemm": IGEMM_TILES, "wgrad": WGRAD_TILES}[kind]


def on_gpu(device: Optional[torch.device]) -> bool:
    """Whether launches plan for a GPU: a real one, or the card ``KernelSettings.plan_sms`` names."""
    if kernel_settings().plan_sms:
        return True
    return device is not None and device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def device_sms(device: Optional[torch.device]) -> int:
    """SMs the table fills: ``KernelSettings.plan_sms`` when set, the GPU's own count, ``INTERPRETER_SMS``
    under the interpreter."""
    plan = kernel_settings().plan_sms
    if plan:
        return plan
    if on_gpu(device):
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def pow2_at_least(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, int(x) - 1).bit_length()))


def _find(tiles, BM, BN, BK, flat) -> Tile:
    for t in tiles:
        if (t.BM, t.BN, t.BK, t.flat) == (BM, BN, BK, flat):
            return t
    raise KeyError((BM, BN, BK, flat))


@dataclasses.dataclass
class Plan:
    """What one launch does: the tile, the grid (``programs`` output tiles × ``splits``), the useful and
    issued multiply-adds, and the kernel's mode (``phases``...)."""

    kind: str
    tile: Tile
    programs: int  # output tiles (grid axis 0)
    splits: int  # reduction splits (grid axis 1)
    per_split: int  # K steps (weight-grad: rows) per split
    issued: int
    useful: int
    mode: dict = dataclasses.field(default_factory=dict)

    @property
    def ctas(self) -> int:
        return self.programs * self.splits

    @property
    def fraction(self) -> float:
        return self.useful / self.issued if self.issued else 1.0


# --------------------------------------------------------------------------------------------------
# implicit GEMM: forward and input-grad
# --------------------------------------------------------------------------------------------------
def dgrad_phase_taps(K: int, stride: int, pad: int, dil: int):
    """Per input phase ph (0 <= ph < stride: the input coordinates i ≡ ph mod stride) of a transposed
    convolution along one axis: ``(k0, count, c0)``: the taps that hit it are k0, k0 + step, ... (``count``
    of them, step = stride / gcd(stride, dil)), input i = ph + stride·a reads output coordinate
    ``a + c0 - j·(dil / gcd)`` through tap j. Mirrors the kernel's ``phase_taps``."""
    step = stride // math.gcd(stride, dil)
    out = []
    for ph in range(stride):
        k0 = next((k for k in range(step) if (k * dil - ph - pad) % stride == 0), None)
        if k0 is None or k0 >= K:
            out.append((0, 0, 0))
            continue
        out.append((k0, (K - 1 - k0) // step + 1, (ph + pad - k0 * dil) // stride))
    return out


def igemm_tile(row_tiles, NCOL: int, R: int, sms: int) -> Tile:
    """Rules 1-3 for an implicit GEMM with ``row_tiles(BM)`` row tiles (all phases), NCOL result channels,
    R channels per tap. R not a multiple of 16 (byte-wise loads: the unpadded first layer) and 128 columns:
    BM = 64 (128×128 spills there on sm_90)."""
    BN = pow2_at_least(NCOL, 16, 128)
    flat = R % 64 != 0
    BK = 32 if flat else 64
    BM = 128
    if not flat and BN == 64 and row_tiles(256) * cdiv(NCOL, BN) >= GRID_FILL * sms:
        BM = 256
    elif row_tiles(128) * cdiv(NCOL, BN) < GRID_FILL * sms or (R % 16 and BN == 128):
        BM = 64
    if row_tiles(BM) * cdiv(NCOL, BN) < GRID_FILL * sms and BN == 128:
        BN = 64
    return _find(IGEMM_TILES, BM, BN, BK, flat)


def k_iters(tile: Tile, n_taps: int, R: int) -> int:
    """K steps over ``n_taps`` taps of R channels: flat ceil(taps·R / BK), else taps·ceil(R / BK)."""
    if tile.flat:
        return cdiv(n_taps * R, tile.BK)
    return n_taps * cdiv(R, tile.BK)


MIN_SPLIT_ITERS = 4  # a split of a forward / input-grad reduction keeps at least this many K steps


def k_split(iters: int, tile: Tile, R: int, max_terms: int, programs: int = 0, sms: int = 0):
    """(splits, K steps per split) so that no split sums more than ``max_terms`` products per output
    (SPEC §2; a K step holds at most min(BK, R) of them, flat ones BK; at least one step per split), and
    split-K (rule 7) while the grid of ``programs`` output tiles fills less than half of ``sms`` SMs: up
    to ``sms`` CTAs, each split keeping ``MIN_SPLIT_ITERS`` K steps."""
    terms = tile.BK if tile.flat else min(tile.BK, R)
    per = max(1, max_terms // max(terms, 1))
    splits = cdiv(max(iters, 1), per)
    if programs and 2 * programs < sms and iters >= 2 * MIN_SPLIT_ITERS:
        splits = max(splits, min(cdiv(sms, programs), iters // MIN_SPLIT_ITERS))
    per = cdiv(max(iters, 1), splits)
    return cdiv(max(iters, 1), per), per


def _split_256(tile: Tile, splits: int) -> bool:
    """Rule 3: a 256-row tile runs unsplit (a reduction longer than ``max_terms`` takes 128 rows instead)."""
    return tile.BM == 256 and splits > 1


@cached_plan
def conv_fwd_plan(N, C, H, W, CO, KH, KW, stride, padding, dilation, *, sms, max_terms=MAX_TERMS,
                  cin_real=None, cout_real=None) -> Plan:
    """Forward ``Y[N·OH·OW, CO] = X̃ · Wᵀ``, R = C channels per tap as stored (``cin_real``/``cout_real``:
    the layer's own channel counts when the codes are padded)."""
    OH, OW = conv_out(H, KH, stride[0], padding[0], dilation[0]), conv_out(W, KW, stride[1], padding[1], dilation[1])
    M = N * OH * OW
    tile = igemm_tile(lambda bm: cdiv(M, bm), CO, C, sms)
    while True:
        programs = cdiv(M, tile.BM) * cdiv(CO, tile.BN)
        iters = k_iters(tile, KH * KW, C)
        splits, per = k_split(iters, tile, C, max_terms, programs, sms)
        if not _split_256(tile, splits):
            break
        tile = _find(IGEMM_TILES, 128, tile.BN, tile.BK, tile.flat)
    issued = programs * iters * tile.BM * tile.BN * tile.BK
    useful = M * (cout_real or CO) * (cin_real or C) * KH * KW
    return Plan("fwd", tile, programs, splits, per, issued, useful, {"M": M})


@cached_plan
def conv_dgrad_plan(N, CO, OH, OW, C, H, W, KH, KW, stride, padding, dilation, *, sms, max_terms=MAX_TERMS,
                    cin_real=None, cout_real=None) -> Plan:
    """Input-grad ``dX[N·H·W, C]`` from E (N, CO, OH, OW), R = CO channels per tap, by phases: the grid is
    phases × (row tiles of one phase, N·ceil(H/sh)·ceil(W/sw) rows) × column tiles."""
    ph_h = dgrad_phase_taps(KH, stride[0], padding[0], dilation[0])
    ph_w = dgrad_phase_taps(KW, stride[1], padding[1], dilation[1])
    phases = stride[0] * stride[1]
    Mq = N * cdiv(H, stride[0]) * cdiv(W, stride[1])
    tile = igemm_tile(lambda bm: phases * cdiv(Mq, bm), C, CO, sms)
    while True:
        per_phase = cdiv(Mq, tile.BM) * cdiv(C, tile.BN)
        iters = [k_iters(tile, a[1] * b[1], CO) for a in ph_h for b in ph_w]
        splits, per = k_split(max(iters), tile, CO, max_terms, phases * per_phase, sms)
        if not _split_256(tile, splits):
            break
        tile = _find(IGEMM_TILES, 128, tile.BN, tile.BK, tile.flat)
    issued = per_phase * sum(iters) * tile.BM * tile.BN * tile.BK
    useful = N * OH * OW * (cout_real or CO) * (cin_real or C) * KH * KW
    return Plan("dgrad", tile, phases * per_phase, splits, per, issued, useful, {"phases": phases, "Mq": Mq,
                                                                                 "per_phase": per_phase})
