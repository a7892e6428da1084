"""The weight batch of one training step (``weight_batch``'s launches, used by the fused blocks): every fused
conv's weight codes from one pair of launches when the model's forward starts (``prepare_weight_batch``; the
fusion runner makes it the active batch for the forward), looked up by each block (``batched_weight_codes``),
and, for the large weights whose codes no block keeps, derived again in one launch for all of them when the
first block's backward asks (``BackwardCodes``: one launch per step instead of one per layer).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from .weight_batch import KEEP_CODES_NUMEL, WeightItem, recode_many, weight_codes_many
from .weight_codes import weight_codes

__all__ = ["WeightBatch", "BackwardCodes", "prepare_weight_batch", "active_weight_batch", "push_weight_batch",
           "pop_weight_batch", "batched_weight_codes", "batched_backward_codes", "linear_item", "batched_linear_codes",
           "linear_codes_again", "StepZeros", "reserve_zero_grad", "zero_grad_of"]


class BackwardCodes:
    """The codes of a forward's large weights (more than ``KEEP_CODES_NUMEL`` elements: not kept) derived again
    in backward, all in one launch when the first block asks (``codes``), from the forward's scales: one
    launch per step instead of one per layer. A weight changed since the forward (``_version``) gets None (its
    block re-derives its own codes)."""

    def __init__(self, items: list, scales: torch.Tensor):
        self.items, self.scales = items, scales
        self.versions = [it.weight._version for it in items]
        self.views = None

    def codes(self, index: int):
        if self.items[index].weight._version != self.versions[index]:
            return None
        if self.views is None:
            with torch.no_grad():  # (backward runs without grad mode: this keeps it so under create_graph too)
                self.views = recode_many(self.items, self.scales)
        return self.views[index]


class StepZeros:
    """Zero gradients of one step (a conv bias before a train-mode BatchNorm has exactly no effect on the loss): each
    layer reserves its slice in forward (``reserve``), backward's first ``take`` allocates one zero buffer for all
    of them, instead of a zeros kernel per layer. A new buffer every step: an in-place change of one gradient (a
    clipping) touches no other, and none of a later step's."""

    def __init__(self):
        self.sizes: dict = {}
        self.buffers: dict = {}
        self.taken: set = set()

    def reserve(self, t: torch.Tensor) -> tuple:
        key = (t.dtype, t.device)
        offset = self.sizes.get(key, 0)
        self.sizes[key] = offset + t.numel()
        return self, key, offset, tuple(t.shape)

    def take(self, key, offset: int, shape: tuple) -> torch.Tensor:
        """The slice, once (a second backward through the same graph gets a new zero tensor: the first one may
        have been changed in place since, as the parameter's ``.grad``)."""
        if (key, offset) in self.taken:
            return torch.zeros(shape, dtype=key[0], device=key[1])
        self.taken.add((key, offset))
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.zeros(self.sizes[key], dtype=key[0], device=key[1])
        return buf[offset:offset + math.prod(shape)].view(shape)


def reserve_zero_grad(t: torch.Tensor) -> Optional[tuple]:
    """A ticket for a zero gradient like ``t`` from the active batch's ``StepZeros`` (None: no batch active)."""
    batch = _ACTIVE[-1] if _ACTIVE else None
    return batch.zeros.reserve(t) if batch is not None else None


def zero_grad_of(ticket: Optional[tuple], t: torch.Tensor) -> torch.Tensor:
    """The zero gradient of a ``reserve_zero_grad`` ticket (a slice of the step's buffer), or ``zeros_like(t)``."""
    if ticket is None:
        return torch.zeros_like(t)
    zeros, *where = ticket
    return zeros.take(*where)


class WeightBatch:
    """The codes of a set of weights, valid while each weight is unchanged (same storage, ``_version``), and the
    step's ``StepZeros``."""

    def __init__(self, items, codes, backward=None):
        self.zeros = StepZeros()
        self.entries = {}
        again = {}  # one BackwardCodes per group of large weights
        for it, c, b in zip(items, codes, backward or [None] * len(items)):
            if b is not None:
                group, scales, j = b
                b = (again.setdefault(id(scales), BackwardCodes(group, scales)), j)
            w = it.weight
            self.entries[(w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device)] = (
                w._version, it.bits, it.mode, it.ci_pad, it.co_pad, c, b)

    def _entry(self, item: WeightItem):
        w = item.weight
        e = self.entries.get((w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device))
        if e is None or e[:5] != (w._version, item.bits, item.mode, item.ci_pad, item.co_pad):
            return None
        return e

    def get(self, item: WeightItem):
        e = self._entry(item)
        return None if e is None else e[5]

    def backward(self, item: WeightItem):
        """(``BackwardCodes``, index) of a large weight of the batch, or None."""
        e = self._entry(item)
        return None if e is None else e[6]


_ACTIVE: list = []


def prepare_weight_batch(items: list) -> WeightBatch:
    """Quantize every item now (``weight_codes_many``) and return the batch."""
    items = [it for it in items if it.weight.dim() == 4]
    backward: list = []
    return WeightBatch(items, weight_codes_many(items, backward) if items else [], backward)


def push_weight_batch(batch: Optional[WeightBatch]) -> None:
    """Make ``batch`` the one ``batched_weight_codes`` reads (None: none) until ``pop_weight_batch``."""
    _ACTIVE.append(batch)


def pop_weight_batch() -> None:
    if _ACTIVE:
        _ACTIVE.pop()


@contextlib.contextmanager
def active_weight_batch(batch: Optional[WeightBatch]):
    """``batched_weight_codes`` finds the batch's codes inside the block (nested blocks: the innermost)."""
    push_weight_batch(batch)
    try:
        yield batch
    finally:
        pop_weight_batch()


def batched_weight_codes(item: WeightItem):
    """The active batch's ``(fwd, dgrad, scale)`` of this weight, or None (none active, weight not in it or
    changed since, other bits / padding)."""
    batch = _ACTIVE[-1] if _ACTIVE else None
    return batch.get(item) if batch is not None else None


def batched_backward_codes(item: WeightItem):
    """The active batch's ``(BackwardCodes, index)`` of this (large) weight, or None."""
    batch = _ACTIVE[-1] if _ACTIVE else None
    return batch.backward(item) if batch is not None else None


# ----- a Linear's weight in the batch: a 1×1 conv weight, whose two layouts are (out, in) and (in, out) -----
def linear_item(weight: torch.Tensor, bits: int, mode: str) -> WeightItem:
    """A ``QLinear``'s (out, in) weight as the batch holds it (no channel padding): the forward's codes (out, in)
    and the input-grad's K-major (in, out) order, both from the batch's launches."""
    return WeightItem(weight[:, :, None, None], bits, mode, 0, 0)


def batched_linear_codes(weight: torch.Tensor, bits: int, mode: str):
    """``(qw, qw_t, scale, again)`` of a Linear weight from the active batch, or None: ``qw_t`` (an (out, in) view
    of (in, out) memory) for a weight backward keeps, else None and ``again`` (``BackwardCodes``, index): a large
    weight's codes are derived again in backward with the other large weights'."""
    item = linear_item(weight, bits, mode)
    codes = batched_weight_codes(item)
    if codes is None:
        return None
    fwd, dgrad, scale = codes
    again = batched_backward_codes(item) if weight.numel() > KEEP_CODES_NUMEL else None
    return fwd[:, :, 0, 0], None if again is not None else dgrad[:, :, 0, 0], scale, again


def linear_codes_again(again, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Backward: the input-grad layout of a large Linear weight's codes (``batched_linear_codes``' ``again``), or,
    for a weight changed since the forward, derived from it with the forward's scale."""
    codes = again[0].codes(again[1])
    if codes is None:
        codes = weight_codes(weight[:, :, None, None], scale, bits, 0)
    return codes[1][:, :, 0, 0]
