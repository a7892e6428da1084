"""The weight batch of one training step (``weight_batch``'s launches, used by the fused blocks): every fused
conv's weight codes from one pair of launches when the model's forward starts (``prepare_weight_batch``; the
fusion runner makes it the active batch for the forward), looked up by each block (``batched_weight_codes``),
and, for the large weights whose codes no block keeps, derived again in one launch for all of them when the
first block's backward asks (``BackwardCodes``: one launch per step instead of one per layer).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .weight_batch import WeightItem, recode_many, weight_codes_many

__all__ = ["WeightBatch", "BackwardCodes", "prepare_weight_batch", "active_weight_batch", "push_weight_batch",
           "pop_weight_batch", "batched_weight_codes", "batched_backward_codes"]


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
            self.views = recode_many([it._replace(weight=it.weight.detach()) for it in self.items], self.scales)
        return self.views[index]


class WeightBatch:
    """The codes of a set of weights, valid while each weight is unchanged (same storage, ``_version``)."""

    def __init__(self, items, codes, backward=None):
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
