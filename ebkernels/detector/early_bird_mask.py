"""The fused early-bird mask update (SPEC §3): |gamma| -> threshold per ratio -> packed channel masks ->
XOR + popcount against the on-device mask history -> normalised Hamming distances.

One call handles every requested ratio at once. Inputs and outputs (all on one device):

- ``gammas``: float32, 1-D, length ``total`` (the BN scaling factors, concatenated in module order).
- ``ks``: int32 ``[R]``, ``ks[r] = floor(total * ratio_r)``: the index into ``sort(|gamma|)`` that gives
  the threshold of ratio r.
- ``ring``: int32 ``[R, H, W]``, ``W = ceil(total / 32)``: the last H packed masks of each ratio (a ring
  buffer). The call writes the new masks into slot ``slot`` (mutated in place).
- returns ``packed`` int32 ``[R, W]`` (the new masks, also the entry for the full history),
  ``dist`` float64 ``[R, H]`` (``popcount(new XOR ring[r, h]) / total``; 0 for ``h == slot``) and
  ``thr`` float32 ``[R]`` (the thresholds).

Mask rule, exactly the reference code's: ``thr = sort(|gamma|)[floor(total * p)]``, ``keep = |gamma| > thr``.
Channel i lives in word ``i // 32``, bit ``i % 32`` (least significant first); padding bits are 0.
|gamma| is taken in float32 (half/bfloat16 widen exactly). NaN sorts last (as ``torch.sort``) and a NaN
channel is never kept (``NaN > thr`` is false).

Three implementations, one contract: the sort-based PyTorch reference (the oracle), the Triton kernel
below (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) and the native C++/CUDA ops of ``csrc/``.

The Triton kernel is ONE launch with ONE program (grid ``(1,)``). Threshold selection is a radix select
on the float bits of |gamma| (for non-negative floats the bit patterns order like the values, NaN
above inf): four passes over 8-bit digits, each a histogram of the digits of the elements that still
match the selected prefix; the first pass is shared by all ratios. Then one sweep per ratio packs the
mask and XORs it with the H history words of the same position. Why a single program: the threshold
of a ratio depends on a global histogram, so several programs would need either a grid-wide barrier
(not expressible safely in Triton, and a deadlock under the sequential interpreter) or one launch per
radix pass. BN channel sets are small (VGG16: 4,224; PreResNet-101: 7,408), where one program should
be fastest; for millions of channels the single program streams the vector ``1 + 4R`` times (8 MB per
sweep at 2M channels: an estimated ~1 ms on one SM for three ratios, not yet measured on a GPU), still
nothing next to an epoch. Correctness at every size is tested (2·10⁶ channels included).
"""
from __future__ import annotations

import math

import torch

from .._backend import INTERPRET, use_triton
from .._registry import aot_kernel
from .._triton import tl, triton
from ..config import kernel_settings
from ..ops._dispatch import custom_op

__all__ = ["early_bird_update", "early_bird_update_reference", "early_bird_update_triton",
           "thresholds_reference", "pack_masks", "unpack_masks", "popcount_words", "ratio_ks", "ratio_keep",
           "n_words", "BACKENDS"]

BACKENDS = ("auto", "triton", "native", "reference")
_MAX_TOTAL = 2**31 - 1  # int32 indexing in every implementation


def n_words(total: int) -> int:
    """Packed int32 words per mask of ``total`` channels."""
    return (total + 31) // 32


def ratio_ks(total: int, ratios) -> list[int]:
    """``floor(total * p)`` per ratio: the sorted position of each threshold (float64, as the reference
    code's ``int(total * percent)``)."""
    return [int(math.floor(total * float(p))) for p in ratios]


def ratio_keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The mask rule on the host, for flat non-negative ``scores`` (|gamma|, or another criterion's):
    ``scores > sort(scores)[floor(total * ratio)]`` (strict), what the kernel computes on |gamma|."""
    return scores > torch.sort(scores).values[ratio_ks(scores.numel(), [ratio])[0]]


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, sort-based)
# --------------------------------------------------------------------------------------------------
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount_words(words: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Number of set bits of int32 ``words`` summed along ``dim`` (int64), through a byte table."""
    if words.dtype != torch.int32:
        raise TypeError(f"popcount_words: words must be int32, got {words.dtype}")
    words = words.contiguous()
    as_bytes = words.view(torch.uint8).reshape(*words.shape[:-1], words.shape[-1] * 4) \
        if words.dim() else words.reshape(1).view(torch.uint8)
    lut = _POPCOUNT8.to(words.device)
    counts = lut[as_bytes.long()]
    if dim in (-1, words.dim() - 1):
        return counts.sum(-1)
    return counts.reshape(*words.shape, 4).sum(-1).sum(dim)


def pack_masks(keep: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., total]`` -> int32 ``[..., ceil(total/32)]``; channel i at word i//32, bit i%32."""
    total = keep.shape[-1]
    W = n_words(total)
    bits = torch.zeros(*keep.shape[:-1], W * 32, dtype=torch.int64, device=keep.device)
    bits[..., :total] = keep.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=keep.device).bitwise_left_shift(
        torch.arange(32, device=keep.device))
    words = (bits.reshape(*keep.shape[:-1], W, 32) * weights).sum(-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed 32-bit
    return words.to(torch.int32)


def unpack_masks(words: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: int32 ``[..., W]`` -> bool ``[..., total]``."""
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_masks: words must be int32 packed masks, got {words.dtype}")
    if words.shape[-1] != n_words(total):
        raise ValueError(f"unpack_masks: {words.shape[-1]} words cannot hold total={total} channels; "
                         f"expected {n_words(total)} words")
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift; & 1 keeps one bit
    return bits.reshape(*words.shape[:-1], -1)[..., :total].bool()


def thresholds_reference(gammas: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``sort(|gamma|)[k]`` per k (float32)."""
    sorted_abs = torch.sort(gammas.float().abs()).values
    return sorted_abs[ks.long()]


def early_bird_update_reference(gammas: torch.Tensor, ks: torch.Tensor, ring: torch.Tensor, slot: int):
    """Sort-based reference of the fused update (same contract as the kernel; mutates ``ring``)."""
    total = gammas.numel()
    absg = gammas.float().abs()
    thr = thresholds_reference(gammas, ks)
    keep = absg.unsqueeze(0) > thr.unsqueeze(1)  # [R, total]
    packed = pack_masks(keep)
    counts = popcount_words(torch.bitwise_xor(ring, packed.unsqueeze(1)))  # [R, H]
    counts[:, slot] = 0
    dist = counts.double() / total
    ring[:, slot] = packed
    return packed, dist, thr


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _popcount32(x):
    """Set bits of each uint32 (SWAR; no libdevice call, so it also runs under the interpreter)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return (x & 0x3F).to(tl.int32)


@triton.jit
def _abs_bits(g_ptr, offs, total):
    """Float bits of |gamma| as int32 keys (order like the values; 0 for out-of-range lanes)."""
    x = tl.load(g_ptr + offs, mask=offs < total, other=0.0)
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def _select_bin(hist, k):
    """Radix step: the bin holding the k-th smallest (0-based) element and k's rank inside it."""
    bins = tl.arange(0, 256)
    cum = tl.cumsum(hist, 0)
    d = tl.sum((cum <= k).to(tl.int32), axis=0)  # cum is non-decreasing: first bin with cum > k
    below = tl.sum(tl.where(bins < d, hist, 0), axis=0)
    return d, k - below


@triton.jit
def _digit_histogram(g_ptr, total, prefix, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of the 8-bit digit at SHIFT over the keys whose higher bits equal ``prefix``."""
    PMASK: tl.constexpr = -(1 << (SHIFT + 8))  # int32 with every bit above the digit set
    lanes = tl.arange(0, BLOCK)
    hist = tl.zeros([256], dtype=tl.int32)
    for start in range(0, total, BLOCK):
        offs = start + lanes
        key = _abs_bits(g_ptr, offs, total)
        sel = (offs < total) & ((key & PMASK) == prefix)
        hist += tl.histogram((key >> SHIFT) & 255, 256, mask=sel)
    return hist


@aot_kernel(signature={"g_ptr": "*fp32", "ks_ptr": "*i32", "thr_ptr": "*fp32", "ring_ptr": "*i32",
                       "out_ptr": "*i32", "dist_ptr": "*fp64", "total": "i32", "n_words": "i32",
                       "n_ratios": "i32", "hist_len": "i32", "slot": "i32"},
            constexprs=[{"BLOCK": 4096, "WBLOCK": 128, "HB": 2}, {"BLOCK": 4096, "WBLOCK": 128, "HB": 8}],
            num_warps=8, num_stages=1)
@triton.jit
def early_bird_mask_kernel(g_ptr, ks_ptr, thr_ptr, ring_ptr, out_ptr, dist_ptr, total, n_words, n_ratios,
                           hist_len, slot, BLOCK: tl.constexpr, WBLOCK: tl.constexpr, HB: tl.constexpr):
    """Whole update in one program: radix select per ratio, pack, XOR + popcount vs the ring, distances."""
    lanes = tl.arange(0, BLOCK)

    # pass 0 (bits 24..30, the sign bit of |gamma| is 0) has no prefix yet: one histogram for all ratios
    hist0 = tl.zeros([256], dtype=tl.int32)
    for start in range(0, total, BLOCK):
        offs = start + lanes
        key = _abs_bits(g_ptr, offs, total)
        hist0 += tl.histogram(key >> 24, 256, mask=offs < total)

    hrow = tl.arange(0, HB)
    hvalid = (hrow < hist_len) & (hrow != slot)  # the slot being replaced is not compared
    wl = tl.arange(0, WBLOCK)
    bitpos = tl.arange(0, 32)
    for r in range(0, n_ratios):
        k = tl.load(ks_ptr + r)
        d, k = _select_bin(hist0, k)
        prefix = d << 24
        for p in tl.static_range(1, 4):
            hist = _digit_histogram(g_ptr, total, prefix, 24 - 8 * p, BLOCK)
            d, k = _select_bin(hist, k)
            prefix = prefix | (d << (24 - 8 * p))
        thr = prefix.to(tl.float32, bitcast=True)
        tl.store(thr_ptr + r, thr)

        # pack 32 channels per word; XOR + popcount against every history slot of the same words
        ring_r = ring_ptr + (hist_len * n_words).to(tl.int64) * r  # int64: R*H*W may pass 2**31
        counts = tl.zeros([HB], dtype=tl.int32)
        for wstart in range(0, n_words, WBLOCK):
            words_idx = wstart + wl
            wvalid = words_idx < n_words
            offs = words_idx[:, None] * 32 + bitpos[None, :]  # [WBLOCK, 32]
            x = tl.load(g_ptr + offs, mask=offs < total, other=0.0)
            keep = (tl.abs(x) > thr) & (offs < total)
            # distinct bits: the sum is the OR (bit 31 wraps to the sign bit, as intended)
            word = tl.sum(keep.to(tl.int32) << bitpos[None, :], axis=1)
            old = tl.load(ring_r + hrow[:, None] * n_words + words_idx[None, :],
                          mask=hvalid[:, None] & wvalid[None, :], other=0)
            diff = (old ^ word[None, :]).to(tl.uint32, bitcast=True)
            counts += tl.sum(tl.where(hvalid[:, None] & wvalid[None, :], _popcount32(diff), 0), axis=1)
            tl.store(out_ptr + n_words.to(tl.int64) * r + words_idx, word, mask=wvalid)
            tl.store(ring_r + slot * n_words + words_idx, word, mask=wvalid)
        dist = counts.to(tl.float64) / total.to(tl.float64)  # fp64 '/' is div.rn.f64: equals Python's count/total
        tl.store(dist_ptr + r * hist_len + hrow, tl.where(hvalid, dist, 0.0), mask=hrow < hist_len)


def _block_sizes(total: int) -> tuple[int, int]:
    """(BLOCK, WBLOCK): GPU tiles sized for one SM (the AOT configurations). The interpreter runs numpy
    per op and pays per Python-level iteration, so it gets blocks as large as the data (capped)."""
    if INTERPRET:
        block = min(1 << 18, triton.next_power_of_2(total))
        return block, max(1, block // 32)
    return 4096, 128


def early_bird_update_triton(gammas: torch.Tensor, ks: torch.Tensor, ring: torch.Tensor, slot: int):
    """Triton path of :func:`early_bird_update` (one launch, one program)."""
    total = gammas.numel()
    R, H, W = ring.shape
    packed = torch.empty((R, W), dtype=torch.int32, device=gammas.device)
    dist = torch.empty((R, H), dtype=torch.float64, device=gammas.device)
    thr = torch.empty((R,), dtype=torch.float32, device=gammas.device)
    BLOCK, WBLOCK = _block_sizes(total)
    HB = max(2, triton.next_power_of_2(H))
    early_bird_mask_kernel[(1,)](gammas, ks, thr, ring, packed, dist, total, W, R, H, slot,
                                 BLOCK=BLOCK, WBLOCK=WBLOCK, HB=HB, num_warps=8, num_stages=1)
    return packed, dist, thr


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def _native_update(gammas, ks, ring, slot):
    from .. import _native

    return _native.early_bird_update(gammas, ks, ring, slot)


def _pick_backend(gammas: torch.Tensor, backend: str) -> str:
    if backend != "auto":
        return backend
    if use_triton(gammas):
        return "triton"
    if kernel_settings().backend == "reference":  # force_backend("reference") pins the oracle, not the C++ op
        return "reference"
    from .. import _native

    if _native.available(gammas.device):
        return "native"
    if gammas.device.type == "cpu":
        _native.warn_missing_once()
    return "reference"


@custom_op("ebkernels::early_bird_update", mutates_args=("ring",))
def _early_bird_update_op(gammas: torch.Tensor, ks: torch.Tensor, ring: torch.Tensor, slot: int,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = _pick_backend(gammas, backend)
    if chosen == "triton":
        return early_bird_update_triton(gammas, ks, ring, slot)
    if chosen == "native":
        return _native_update(gammas, ks, ring, slot)
    return early_bird_update_reference(gammas, ks, ring, slot)


@_early_bird_update_op.register_fake
def _(gammas, ks, ring, slot, backend):
    R, H, W = ring.shape
    return (ring.new_empty((R, W)), gammas.new_empty((R, H), dtype=torch.float64),
            gammas.new_empty((R,), dtype=torch.float32))


def early_bird_update(gammas: torch.Tensor, ks: torch.Tensor, ring: torch.Tensor, slot: int,
                      backend: str = "auto"):
    """Fused mask update (module docstring): returns ``(packed [R, W] int32, dist [R, H] float64,
    thr [R] float32)`` and writes the new masks into ``ring[:, slot]``. No host synchronisation.

    ``backend``: "auto" (Triton on CUDA and under the interpreter, else the native C++ op when built,
    else the reference; ``force_backend("reference")`` pins the reference), or one of "triton",
    "native", "reference" explicitly. ``ks`` values must lie in ``[0, total)`` (:func:`ratio_ks` gives
    them); they are not read back here, which would synchronise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; accepted: {', '.join(map(repr, BACKENDS))}")
    if not isinstance(gammas, torch.Tensor) or gammas.dtype != torch.float32 or gammas.dim() != 1:
        what = f"{gammas.dtype} {tuple(gammas.shape)}" if isinstance(gammas, torch.Tensor) else type(gammas).__name__
        raise TypeError(f"gammas must be a 1-D float32 tensor, got {what}")
    total = gammas.numel()
    if not 1 <= total <= _MAX_TOTAL:
        raise ValueError(f"gammas has {total} channels; accepted: 1 to {_MAX_TOTAL}")
    if not isinstance(ring, torch.Tensor) or ring.dtype != torch.int32 or ring.dim() != 3 \
            or ring.shape[2] != n_words(total) or ring.shape[1] < 1:
        got = f"{ring.dtype} {tuple(ring.shape)}" if isinstance(ring, torch.Tensor) else type(ring).__name__
        raise ValueError(f"ring must be an int32 tensor [R, H>=1, {n_words(total)}] for total={total}; got {got}")
    R, H, _ = ring.shape
    if not isinstance(ks, torch.Tensor) or ks.dtype != torch.int32 or tuple(ks.shape) != (R,):
        got = f"{ks.dtype} {tuple(ks.shape)}" if isinstance(ks, torch.Tensor) else type(ks).__name__
        raise ValueError(f"ks must be an int32 tensor of shape ({R},) (one index per ratio); got {got}")
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < H:
        raise ValueError(f"slot={slot!r} is out of range; accepted: an int in [0, {H})")
    if len({gammas.device, ks.device, ring.device}) != 1:
        raise ValueError(f"gammas ({gammas.device}), ks ({ks.device}) and ring ({ring.device}) must share a device")
    if not (gammas.is_contiguous() and ring.is_contiguous() and ks.is_contiguous()):
        raise ValueError("gammas, ks and ring must be contiguous")
    return _early_bird_update_op(gammas, ks, ring, slot, backend)
