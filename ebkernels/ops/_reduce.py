"""Per-channel reductions inside the kernels that produce the data: BatchNorm statistics in a conv
epilogue, BatchNorm-backward sums in the recompute epilogue, and the same over a plain tensor.

Every program reduces its own tile of rows to a *partial* per channel and stores it at its tile index;
no float atomics, so results do not depend on scheduling. The programs then count themselves in with an
integer atomic ("last program merges", as CUB's single-pass reductions do): the last tile of a group of
``GROUP`` tiles merges that group's partials in index order into a partial of the next level, and so on up
to one group, whose last arriver merges it into the final value. The tree keeps every merge short (a first
conv layer at batch 256 has 2,048 row tiles: three levels of at most 16 partials instead of one of 2,048; no
program streams more than 64 KiB) and the order fixed: the result is bit-identical run to run, in any
arrival order. Counters come from a per-device, per-stream
pool (``_buffers.counter_pool``) that is zero at every launch: the program that counts out last resets its
counter, so no launch needs a memset.

Two kinds of partial:

- ``MOMENTS``: count-weighted mean, M2 (sum of squared deviations from the tile mean), max and min of
  the values; merged with Chan et al.'s parallel formulas in float64 and stored as float32
  ``[mean, biased variance, max, min]``. Max/min propagate NaN.
- ``SUMS``: two plain sums (BatchNorm backward: Σg and Σg·x̂), summed in float64, stored as float32.

On the GPU the merging program reads the others' partials after an acquire-release atomic; the loads
use ``.cg`` (L2, not the incoherent L1).
"""
from __future__ import annotations

import functools

import torch

from .._triton import tl, triton
from ._buffers import counter_slice, empty_output, kept_workspaces, scratch

__all__ = ["GROUP", "TB", "merge_group", "MOMENTS", "SUMS", "tile_moments", "tile_sums", "store_partials", "finish_reduction",
           "publish_max", "Z_SLOT", "z_slots", "store_block_max", "max_of_blocks", "ReductionSpace", "moments_reference"]

GROUP = 16  # partials per merge, at every level
TB = 16  # partials per merge step (one step per merge)


def merge_group(columns: int) -> int:
    """The merge group of an element-wise kernel's reduction over ``columns`` channels per program: 16, or 8
    for 128 (a [16, 128] float64 merge block spills at 8 warps)."""
    return 8 if columns > 64 else GROUP
MOMENTS = 0
SUMS = 1
_PARTS = {MOMENTS: 4, SUMS: 2}


@triton.jit
def _nan_max(x, axis):
    """tl.max that returns NaN where a NaN was reduced (tl.max alone may drop it)."""
    m = tl.max(tl.where(x != x, -float("inf"), x), axis=axis)
    return tl.where(tl.sum((x != x).to(tl.int32), axis=axis) > 0, float("nan"), m)


@triton.jit
def _nan_min(x, axis):
    m = tl.min(tl.where(x != x, float("inf"), x), axis=axis)
    return tl.where(tl.sum((x != x).to(tl.int32), axis=axis) > 0, float("nan"), m)


@triton.jit
def tile_moments(v, row_ok, cnt):
    """Per column of the fp32 tile ``v`` [R, C] over its valid rows (``row_ok``, ``cnt`` of them, > 0):
    mean, M2 = Σ (v - mean)², max, min."""
    ok = row_ok[:, None]
    mean = tl.sum(tl.where(ok, v, 0.0), axis=0) / cnt
    d = tl.where(ok, v - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    mx = _nan_max(tl.where(ok, v, -float("inf")), 0)
    mn = _nan_min(tl.where(ok, v, float("inf")), 0)
    return mean, m2, mx, mn


@triton.jit
def tile_sums(a, b, row_ok):
    """Per column of the fp32 tiles ``a``, ``b`` [R, C]: the sums over the valid rows."""
    ok = row_ok[:, None]
    return tl.sum(tl.where(ok, a, 0.0), axis=0), tl.sum(tl.where(ok, b, 0.0), axis=0)


@triton.jit
def store_partials(part_ptr, t, T, C, col, col_ok, p0, p1, p2, p3, KIND: tl.constexpr):
    """Partial of row tile ``t`` (of ``T``) for channels ``col``: ``part[k, t, col]`` at
    ``k * T * C + t * C + col``."""
    s_part = T * C
    base = part_ptr + t.to(tl.int64) * C + col
    tl.store(base, p0, mask=col_ok)
    tl.store(base + s_part, p1, mask=col_ok)
    if KIND == 0:
        tl.store(base + 2 * s_part, p2, mask=col_ok)
        tl.store(base + 3 * s_part, p3, mask=col_ok)


@triton.jit
def _merge(src_ptr, s_src, lo, hi, span, M, col, col_ok, C, dst_ptr, s_dst, slot, KIND: tl.constexpr,
           TB: tl.constexpr, BC: tl.constexpr, FINAL: tl.constexpr):
    """Merge the partials ``[lo, hi)`` (at most TB) of ``src`` (item i at ``k * s_src + i * C + col``, covering
    rows ``[i*span, min((i+1)*span, M))``) in index order and store the result at ``slot`` of ``dst``
    (``k * s_dst + slot * C + col``): a partial of the same kind, or (``FINAL``) the float32 result
    (MOMENTS: mean, biased variance, max, min; SUMS: the two sums)."""
    # one block of at most TB partials (finish_reduction merges at most GROUP <= TB): every row loaded at once,
    # one L2 round trip; Chan's M2 = sum M2_i + sum n_i (mean_i - mean)^2 from the registers
    i = lo + tl.arange(0, TB)
    i_ok = i < hi
    offs = i.to(tl.int64)[:, None] * C + col[None, :]
    m = i_ok[:, None] & col_ok[None, :]
    a = tl.load(src_ptr + offs, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
    b = tl.load(src_ptr + s_src + offs, mask=m, other=0.0, cache_modifier=".cg").to(tl.float64)
    if KIND == 0:
        x = tl.load(src_ptr + 2 * s_src + offs, mask=m, other=-float("inf"), cache_modifier=".cg")
        mx = _nan_max(x, 0)
        x = tl.load(src_ptr + 3 * s_src + offs, mask=m, other=float("inf"), cache_modifier=".cg")
        mn = _nan_min(x, 0)
        cnt = tl.where(i_ok, tl.minimum(span, M - i * span), 0).to(tl.float64)
        n_all = (tl.minimum(hi * span, M) - lo * span).to(tl.float64)
        mean = tl.sum(cnt[:, None] * a, axis=0) / n_all
        d = a - mean[None, :]
        s1 = tl.sum(b + cnt[:, None] * d * d, axis=0)
        r0 = mean.to(tl.float32)
        if FINAL:
            r1 = (s1 / n_all).to(tl.float32)
        else:
            r1 = s1.to(tl.float32)
    else:
        r0 = tl.sum(a, axis=0).to(tl.float32)
        r1 = tl.sum(b, axis=0).to(tl.float32)
    dst = dst_ptr + slot.to(tl.int64) * C + col
    tl.store(dst, r0, mask=col_ok)
    tl.store(dst + s_dst, r1, mask=col_ok)
    if KIND == 0:
        tl.store(dst + 2 * s_dst, mx, mask=col_ok)
        tl.store(dst + 3 * s_dst, mn, mask=col_ok)


@triton.jit
def finish_reduction(part_ptr, grp_ptr, out_ptr, sem_ptr, t, T, pid_n, num_n, M, span, col, col_ok,
                     C, KIND: tl.constexpr, GROUP: tl.constexpr, TB: tl.constexpr, BC: tl.constexpr):
    """After tile ``t`` (of ``T``, each covering ``span`` of the ``M`` rows) stored its partial: count it
    in; the last tile of its group of ``GROUP`` merges the group into a partial of the next level, which
    counts itself in there the same way, up to the level with one group, whose last arriver merges it into
    ``out[k, col]`` (row pitch C) and returns True (in that one program per column block: it may go on to
    use the result, e.g. ``bn_finalize_channels``). No merge reads more than ``GROUP`` partials (issue 20:
    no program streams more than 64 KiB: 16 partials of 4 rows of 128 channels are 32 KiB), whatever T.
    Level ℓ's partials follow level ℓ-1's in ``grp`` (``ReductionSpace``), its semaphores ``sem[... + g *
    num_n + pid_n]`` level after level: zero at launch and zero again when the launch ends
    (``counter_pool``). One acquire-release count-in per level a program reaches (after a CTA barrier, so
    that its release covers every thread's stores)."""
    PARTS: tl.constexpr = 4 if KIND == 0 else 2
    tl.static_assert(GROUP <= TB)  # every merge is one block of partials (_merge)
    i = t
    n = T
    src = part_ptr
    s_src = T * C
    dst = grp_ptr
    sem = sem_ptr
    sp = span
    final = t < 0  # False, as a scalar tensor
    go = t >= 0
    while go:
        G = tl.cdiv(n, GROUP)
        g = i // GROUP
        in_group = tl.minimum(GROUP, n - g * GROUP)
        counter = sem + g * num_n + pid_n
        tl.debug_barrier()  # every thread's stores before the one thread's count-in (release: cumulative)
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        go = done == in_group - 1
        if go:
            tl.atomic_xchg(counter, 0, sem="relaxed")  # counted out: 0 for the next launch
            if G == 1:
                _merge(src, s_src, 0, n, sp, M, col, col_ok, C, out_ptr, C, g * 0, KIND, TB, BC, True)
                final = g >= 0
                go = g < 0
            else:
                _merge(src, s_src, g * GROUP, g * GROUP + in_group, sp, M, col, col_ok, C, dst, G * C, g, KIND,
                       TB, BC, False)
                src = dst
                s_src = G * C
                dst = dst + PARTS * G * C
                sem = sem + G * num_n
                i = g
                n = G
                sp = sp * GROUP
    return final


@triton.jit
def publish_max(bits, n_programs, sem_ptr, out_ptr):
    """Order-free max of per-program values (float32 bits of non-negative floats, NaN above all: an integer
    max propagates NaN) without a zeroed output and without a serial phase: every program folds its value
    into ``sem[1]`` with a relaxed integer ``atomic_max`` and counts itself in at ``sem[0]`` (two counters of
    ``_buffers.counter_pool``: zero at launch); the last of ``n_programs`` takes the max out (an atomic
    exchange that leaves ``sem[1]`` zero again), stores it at ``out_ptr`` and resets the counter: O(1) work,
    whoever arrives last. One GPU-scope fence per program: the counter's acquire-release (its release
    orders this program's max before the count, its acquire the last program's read after every count).
    Returns True in the last program."""
    tl.atomic_max(sem_ptr + 1, bits, sem="relaxed")
    done = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
    last = done == n_programs - 1
    if last:
        tl.store(out_ptr, tl.atomic_xchg(sem_ptr + 1, 0, sem="relaxed"))
        tl.atomic_xchg(sem_ptr, 0, sem="relaxed")
    return last


Z_SLOT = 16  # channels per entry of a published max |z| (every channel block is a multiple of 16 channels)


def z_slots(channels):
    """Entries of a max |z| published per channel block (``store_block_max``): one per 16 channels, whatever the
    launch's tile (a SymInt too: the fake implementations' output size)."""
    return (channels + Z_SLOT - 1) // Z_SLOT


@triton.jit
def store_block_max(bits, bits_ptr, pid_n, C, CB: tl.constexpr):
    """The merging program of channel block ``pid_n`` (``CB`` channels, a multiple of 16) stores its max |z| bits
    into the block's entries of ``bits_ptr`` (one per 16 channels): no count-in across blocks, so the producing
    launch (``conv2d_int8_bn_fwd``, ``bn_stats``) needs no second fence; the consumer takes the max."""
    slot = pid_n * (CB // 16) + tl.arange(0, CB // 16)
    tl.store(bits_ptr + slot, tl.full([CB // 16], 0, tl.int32) + bits, mask=slot < tl.cdiv(C, 16))


@triton.jit
def max_of_blocks(bits_ptr, n):
    """The max of ``n`` float32 bits (non-negative floats, NaN above all: an integer max) stored per channel block
    by ``store_block_max``; read by every program of the consumer at once, 128 per load (one load for every layer
    of up to 2,048 channels)."""
    r = tl.arange(0, 128)
    best = tl.max(tl.load(bits_ptr + r, mask=r < n, other=0), axis=0)
    for z0 in range(128, n, 128):
        best = tl.maximum(best, tl.max(tl.load(bits_ptr + z0 + r, mask=z0 + r < n, other=0), axis=0))
    return best


class ReductionSpace:
    """The buffers of one in-kernel reduction: tile partials, the partials of every merge level (``scratch``: only
    the launch reads them), the semaphores (from ``counter_pool``: zero, and left zero) and the float32 result
    ``out`` [4 or 2, C]."""

    def __init__(self, kind: int, tiles: int, col_blocks: int, C: int, device, group: int = GROUP):
        part, grp, sems, out = _space_sizes(kind, tiles, col_blocks, C, group)
        self.kind, self.tiles, self.C = kind, tiles, C
        # tile and merge partials: written and read back by the launch alone (``scratch``: no allocation per launch),
        # the three views kept per size (``kept_workspaces``)
        self.part, self.grp, self.sem = kept_workspaces(
            device, (kind, tiles, col_blocks, C, group),
            lambda: (scratch(part, torch.float32, device, "partials"), scratch(grp, torch.float32, device, "merges"),
                     counter_slice(device, 0, sems)))
        self.out = empty_output(out, dtype=torch.float32, device=device)

    @staticmethod
    def levels(tiles: int, group: int = GROUP) -> list:
        """Groups per level of the merge tree over ``tiles`` partials (the last level: one group)."""
        out, n = [], tiles
        while n > 0:
            n = -(-n // group)
            out.append(n)
            if n == 1:
                break
        return out


@functools.lru_cache(maxsize=1024)
def _space_sizes(kind: int, tiles: int, col_blocks: int, C: int, group: int) -> tuple:
    """``ReductionSpace``'s shapes (tile partials, merge partials, result) and semaphore count, once per size."""
    parts = _PARTS[kind]
    levels = ReductionSpace.levels(tiles, group)
    return (parts, tiles, C), (max(1, parts * sum(levels[:-1]) * C),), sum(levels) * col_blocks, (parts, C)


def moments_reference(v: torch.Tensor):
    """[mean, biased variance, max, min] (float32, from float64) per column of a 2-D tensor [rows, C]."""
    d = v.double()
    mean = d.mean(0)
    var = ((d - mean) ** 2).mean(0)
    return torch.stack([mean, var, d.amax(0), d.amin(0)]).float()
