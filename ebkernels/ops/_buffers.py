"""Where every int8-kernel output, workspace and counter comes from (a leaf: imports nothing of ops).

- ``empty_output`` / ``empty_channel_major``: result and partial-sum buffers. Under
  ``config.override(poison_outputs=True)`` they start poisoned, so an element a kernel fails to write shows up in
  the tests;
- ``counter_pool``: integer counters and split-K workspaces that are zero at every launch because every
  kernel that uses them leaves them zero (no memset launches);
- ``split_workspace``: the int64 workspace of a split-K GEMM (``gemm.mainloop.split_fixup``);
- ``scratch``: a workspace one launch writes and reads back itself (an in-kernel reduction's partials);
- ``kept_workspaces``: a launch's set of ``scratch`` / ``counter_slice`` views, made once per shape.
"""
from __future__ import annotations

import torch

from ..config import kernel_settings

__all__ = ["empty_output", "empty_channel_major", "poison", "counter_pool", "counter_slice", "split_workspace",
           "scratch", "kept_workspaces"]

_CHANNELS_LAST, _empty_strided = torch.channels_last, torch.empty_strided
_STRIDES: dict = {}  # (shape, memory format) -> the strides of a dense tensor (``empty_output``)
_is_compiling = torch.compiler.is_compiling
_POOLS: dict = {}
_SLICES: dict = {}  # (pool key, start, stop) -> a view of the pool now under that key (``counter_slice``)
_SCRATCH: dict = {}  # (pool key, role) -> flat buffer (``scratch``)
_SCRATCH_VIEWS: dict = {}  # (pool key, role, shape) -> a view of that buffer
_KEPT: dict = {}  # (key, pool key) -> (generation, views) (``kept_workspaces``)
_GENERATION = [0]  # bumped when a counter pool or a scratch buffer is replaced: views made before are stale


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
    """Every output and partial-sum buffer of the int8 kernels (poisoned under ``poison_outputs``). Through
    ``empty_strided`` with the strides torch gives the format (contiguous or 4-D channels-last), kept per shape:
    ~0.5 µs less per output than ``torch.empty(memory_format=)`` on the host (issue 20 item 5); under a trace
    ``torch.empty`` as it is."""
    if _is_compiling():  # a trace: no host cache read or written (dynamo would track the dictionary)
        t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    else:
        strides = _STRIDES.get((shape, memory_format)) if type(shape) is tuple else None
        if strides is None:
            strides = _format_strides(shape, memory_format)
        t = _empty_strided(shape, strides, dtype=dtype, device=device)
    return poison(t) if kernel_settings().poison_outputs else t


def _format_strides(shape, memory_format) -> tuple:
    """The strides of a dense tensor of ``shape`` in ``memory_format`` (contiguous, or channels-last for 4-D), as
    torch lays them out; kept per shape (a tuple) for ``empty_output``."""
    if memory_format is _CHANNELS_LAST:
        _, C, H, W = shape
        strides = (H * W * C, 1, W * C, C)
    elif memory_format is torch.contiguous_format:
        strides, acc = [], 1
        for d in reversed(shape):
            strides.append(acc)
            acc *= max(d, 1)  # (torch's rule: a zero size does not zero the strides outside it)
        strides = tuple(reversed(strides))
    else:
        return torch.empty(shape, memory_format=memory_format, device="meta").stride()
    if type(shape) is tuple:
        if len(_STRIDES) >= 4096:
            _STRIDES.clear()
        _STRIDES[(shape, memory_format)] = strides
    return strides


def empty_channel_major(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``empty_output`` of logical ``shape`` (N, C, H, W) with channel-major memory [C, N, H, W] (the K-major operand
    of a weight-grad), in one allocation op (no permute of a [C, N, H, W] buffer)."""
    N, C, H, W = shape
    t = torch.empty_strided(shape, (H * W, N * H * W, W, 1), dtype=dtype, device=device)
    return poison(t) if kernel_settings().poison_outputs else t


_ON_CUDA: dict = {}  # torch.device -> whether it is a CUDA device (``device.type`` costs more than a lookup)


def _pool_key(device, dtype: torch.dtype):
    """(device, stream, dtype): a pool per stream (launches on one stream run one after the other)."""
    if type(device) is not torch.device:
        device = torch.device(device)
    cuda = _ON_CUDA.get(device)
    if cuda is None:
        cuda = _ON_CUDA[device] = device.type == "cuda"
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (device, _raw_stream(index), dtype)
    return (device, 0, dtype)


# the current CUDA stream's handle: the raw getter inductor's generated code calls (no ``torch.cuda.Stream`` object
# built per call, ~1 µs each and several per launch), else the public one
_raw_get = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _raw_stream(index: int) -> int:
    if _raw_get is not None:
        return _raw_get(index)
    return torch.cuda.current_stream(index).cuda_stream


def counter_pool(device, n: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``n`` counters (``dtype``: int32, or int64 for the split-K workspaces) that are zero, and that every
    kernel using them leaves zero again (the last program to count itself in resets what it used): one pool
    per device, stream and dtype, shared by every launch on that stream (launches on a stream run one after
    the other), so no launch needs a memset. Grows (a new zeroed tensor) when a launch needs more."""
    key = _pool_key(device, dtype)
    pool = _POOLS.get(key)
    if pool is None or pool.numel() < n:
        pool = torch.zeros(max(n, 1024, 2 * (pool.numel() if pool is not None else 0)), dtype=dtype,
                           device=device)
        _POOLS[key] = pool
        _SLICES.clear()  # views of the pool it replaces
        _GENERATION[0] += 1
    return pool


def counter_slice(device, start: int, stop: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``counter_pool(device, stop, dtype)[start:stop]``, the view kept for the next launch that asks for the
    same range (a slice costs ~1.5 µs on the host, several per launch: issue 20 item 5)."""
    key = _pool_key(device, dtype)
    pool = _POOLS.get(key)
    view = _SLICES.get((key, start, stop))
    if view is None or view._base is not pool:  # none yet, or a view of a pool since replaced
        pool = counter_pool(device, stop, dtype)
        if len(_SLICES) >= 4096:
            _SLICES.clear()
        view = _SLICES[(key, start, stop)] = pool[start:stop]
    return view


def split_workspace(programs: int, splits: int, BM: int, BN: int, device: torch.device) -> torch.Tensor:
    """The int64 workspace of ``split_fixup``, zero at launch and left zero by it (``counter_pool``): one
    BM×BN tile per program, then one semaphore per program (a one-element dummy for one split)."""
    n = 1 if splits <= 1 else programs * (BM * BN + 1)
    return counter_slice(device, 0, n, torch.int64)


def scratch(shape: tuple, dtype: torch.dtype, device, role: str) -> torch.Tensor:
    """A workspace of ``shape`` that one launch writes and then reads back itself, dead when the launch ends (an
    in-kernel reduction's tile and merge partials): one buffer per device, stream, dtype and ``role``, shared by
    every launch on that stream (they run one after the other), and the view of each shape kept, so a launch
    costs no allocation or view op for it (issue 20 item 5: every aten op costs host time). ``role`` keeps two
    workspaces of one launch in storages of their own (the cost model counts each storage's bytes). Under
    ``poison_outputs`` a fresh poisoned buffer instead, as ``empty_output``: a partial a kernel reads without
    having written it shows up in the tests rather than reading a former launch's value."""
    if kernel_settings().poison_outputs:
        return empty_output(shape, dtype, device)
    pool_key = (_pool_key(device, dtype), role)
    pool = _SCRATCH.get(pool_key)
    view = _SCRATCH_VIEWS.get((pool_key, shape))
    if view is None or view._base is not pool:  # none yet, or a view of a buffer since replaced
        n = 1
        for d in shape:
            n *= d
        if pool is None or pool.numel() < n:
            pool = torch.empty(max(n, 1024, 2 * (pool.numel() if pool is not None else 0)), dtype=dtype,
                               device=device)
            _SCRATCH[pool_key] = pool
            _GENERATION[0] += 1
        if len(_SCRATCH_VIEWS) >= 4096:
            _SCRATCH_VIEWS.clear()
        view = _SCRATCH_VIEWS[(pool_key, shape)] = pool[:n].view(shape)
    return view


def kept_workspaces(device, key, make) -> tuple:
    """``make()``: a tuple of ``scratch`` / ``counter_slice`` views one launch needs (e.g. a ``_reduce.ReductionSpace``
    of one size), kept per ``key`` and stream until a pool or scratch buffer is replaced, so a launch of a known
    shape costs one look-up instead of a look-up and a validity test per view (issue 20 item 5: ~2 µs a launch).
    Fresh under ``poison_outputs``, as ``scratch``."""
    if kernel_settings().poison_outputs:
        return make()
    full = (key, _pool_key(device, None))
    hit = _KEPT.get(full)
    if hit is not None and hit[0] == _GENERATION[0]:
        return hit[1]
    views = make()
    if len(_KEPT) >= 4096:
        _KEPT.clear()
    _KEPT[full] = (_GENERATION[0], views)
    return views
