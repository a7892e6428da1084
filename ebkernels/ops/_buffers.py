"""Where every int8-kernel output, workspace and counter comes from (a leaf: imports nothing of ops).

- ``empty_output``: result and partial-sum buffers. Under ``config.override(poison_outputs=True)`` they
  start poisoned, so an element a kernel fails to write shows up in the tests;
- ``counter_pool``: integer counters and split-K workspaces that are zero at every launch because every
  kernel that uses them leaves them zero (no memset launches);
- ``split_workspace``: the int64 workspace of a split-K GEMM (``gemm.mainloop.split_fixup``).
"""
from __future__ import annotations

import torch

from ..config import kernel_settings

__all__ = ["empty_output", "poison", "counter_pool", "split_workspace", "absent", "present"]

_POOLS: dict = {}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with values no kernel writes by accident: NaN (floats), -128 (int8: never a code, never a
    window position), 0x7F7F7F7F (wider integers)."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    if t.dtype == torch.int8:
        return t.fill_(-128)
    return t.fill_(0x7F7F7F7F)


def empty_output(shape, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Every output and partial-sum buffer of the int8 kernels (poisoned under ``poison_outputs``)."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return poison(t) if kernel_settings().poison_outputs else t


def absent(like: torch.Tensor) -> torch.Tensor:
    """The stand-in for an absent tensor that a custom op mutates: a mutable argument is never Optional (an
    optional mutable argument breaks functionalization under ``torch.compile``), so "none" is an empty
    tensor, which the op's implementation reads back as None with ``present``."""
    return like.new_empty((0,))


def present(t: torch.Tensor):
    """``t``, or None for ``absent``'s stand-in."""
    return t if t.numel() else None


def counter_pool(device, n: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``n`` counters (``dtype``: int32, or int64 for the split-K workspaces) that are zero, and that every
    kernel using them leaves zero again (the last program to count itself in resets what it used): one pool
    per device, stream and dtype, shared by every launch on that stream (launches on a stream run one after
    the other), so no launch needs a memset. Grows (a new zeroed tensor) when a launch needs more."""
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream) if dtype == torch.int32 else (str(device), stream, dtype)
    pool = _POOLS.get(key)
    if pool is None or pool.numel() < n:
        pool = torch.zeros(max(n, 1024, 2 * (pool.numel() if pool is not None else 0)), dtype=dtype,
                           device=device)
        _POOLS[key] = pool
    return pool


def split_workspace(programs: int, splits: int, BM: int, BN: int, device: torch.device) -> torch.Tensor:
    """The int64 workspace of ``split_fixup``, zero at launch and left zero by it (``counter_pool``): one
    BM×BN tile per program, then one semaphore per program (a one-element dummy for one split)."""
    n = 1 if splits <= 1 else programs * (BM * BN + 1)
    return counter_pool(device, n, torch.int64)[:n]
