"""Record what one training step launches, without running a Triton kernel, and the host time it took.

Two hooks, one ordered event list:

- ``InterpretedFunction.run`` (what ``kernel[grid](...)`` calls under ``TRITON_INTERPRET=1``) is replaced by a
  recorder that keeps the kernel's name (the function ``__name__``: stable when files move), the grid,
  every tensor argument (shape, dtype, strides, storage, byte footprint; a TMA ``TensorDescriptor`` by its
  base tensor and block), the scalars and the keyword arguments (constexprs, warps, stages), and returns
  without executing. Patched there rather than at ``GridExecutor`` so that the interpreter's own per-launch
  set-up is not timed as host work: on a GPU that time is Triton's ``JITFunction.run`` instead, which the
  pricing adds as a stated constant (``cards.Rules.triton_launch_us``).
- a ``TorchDispatchMode`` records every aten op at its real shapes (inputs, outputs, the convolution
  geometry), inside the ebkernels custom ops too: a custom op is re-dispatched to its CPU implementation
  with the mode still on, so its buffer zeroing and copies are seen, and every launch knows the custom op
  it came from.

Host time (``Event.host_us``): the wall time between the end of the previous event and the start of this
one, i.e. the Python wrappers, planning, custom-op dispatch, autograd and module code, with the recorder's
own bookkeeping and the CPU compute of aten ops (which a GPU does not do on the host) taken out, minus the
cost of entering the dispatch mode for that op, plus the calibrated cost of dispatching a trivial aten op
on this CPU (``calibrate``). The mode's cost depends on the op (on this CPU ~3.6 µs for ``add``, ~4.7 for a
view, ~8.7 for ``empty`` with its keyword arguments: Python objects for every argument), so it is measured per
op overload the first time the recorder sees it (``op_trampoline``: the op run again, with and without a bare
mode; ops that change state, draw random numbers or compute for long keep the ``add`` figure). It is measured
on the machine that runs the trace, launches stubbed, as CPU time of the Python thread (``time.thread_time``):
engineers share the CPUs here, and time the thread spends descheduled is not host work of the step.

The recorder keeps the storage of every tensor an aten op returns until the step ends (the storage, not the
tensor: autograd steals a gradient only while nothing else holds the tensor). The int8 steps run on real CPU
tensors (the bf16 / fp32 steps on fake ones), and the CPU allocator returns a large buffer to the system when
its last reference goes (``munmap``: tens of µs for an activation at batch 256, in whatever Python frame drops it): host
time that grows with the batch and that a GPU step, whose caching allocator frees a block in O(1), does not
have. A small tensor's free stays counted, in the calibrated aten floor (its trivial op frees its result).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorArg", "Launch", "AtenOp", "Recorder", "calibrate"]


@dataclasses.dataclass
class TensorArg:
    """A tensor as a kernel or op sees it."""

    name: str
    shape: tuple
    stride: tuple
    dtype: str
    itemsize: int
    storage: int  # identity of the storage (its data pointer; 0 for fake tensors: then the Python id)
    offset: int  # bytes from the storage start
    block: Optional[tuple] = None  # a TMA descriptor's box

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def extent(self) -> int:
        """Bytes from the first to one past the last element the view can touch."""
        if self.numel == 0:
            return 0
        return (sum((d - 1) * abs(s) for d, s in zip(self.shape, self.stride)) + 1) * self.itemsize


def tensor_arg(name: str, t: torch.Tensor, block=None) -> TensorArg:
    st = t.untyped_storage()
    ptr = 0 if isinstance(t, FakeTensor) or t.device.type == "meta" else st.data_ptr()
    if ptr == 0:  # fake / meta tensors have no storage address: the storage object's identity
        ptr = id(st)
    return TensorArg(name, tuple(t.shape), tuple(t.stride()), str(t.dtype).replace("torch.", ""), t.element_size(),
                     ptr, t.storage_offset() * t.element_size(), block)


@dataclasses.dataclass
class Event:
    host_us: float  # measured host work before this event (see the module docstring)
    op: str  # the ebkernels custom op it ran in, or "" (autograd / module code)


@dataclasses.dataclass
class Launch(Event):
    kernel: str
    grid: tuple
    tensors: dict
    scalars: dict
    constexprs: dict
    nargs: int

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def t(self, name: str) -> Optional[TensorArg]:
        return self.tensors.get(name)

    def get(self, name: str, default=None):
        if name in self.constexprs:
            return self.constexprs[name]
        return self.scalars.get(name, default)


@dataclasses.dataclass
class AtenOp(Event):
    name: str  # e.g. "aten.convolution.default"
    inputs: list
    outputs: list
    params: dict  # what pricing needs besides shapes (convolution geometry, output mask)


def _grid3(grid, named: dict) -> tuple:
    if callable(grid):
        grid = grid(named)
    grid = tuple(int(g) for g in grid)
    return (grid + (1, 1, 1))[:3]


class Recorder(TorchDispatchMode):
    """Records launches and aten ops (see the module docstring). Use as a context manager around one step;
    ``events`` then holds them in order and ``host_tail_us`` the host time after the last one."""

    def __init__(self, tramp_s: float = 0.0, aten_floor_s: float = 0.0):
        super().__init__()
        self.events: list = []
        self.stack: list[str] = []
        self.tramp_s, self.aten_floor_s = tramp_s, aten_floor_s
        self._last_end = 0.0
        self._pending = 0.0  # excluded seconds since the last event (bookkeeping of custom-op handlers)
        self.host_tail_us = 0.0
        self._patched = None
        self._depth = 0  # the mode is re-entered inside custom ops: patch and time at the outermost level only
        self._kept: list = []  # the storages of aten ops' results, freed after the step (module docstring)
        self.opt_start = -1  # the index of the optimizer step's first event, where the step marks it

    # ---- timing -----------------------------------------------------------------------------------------
    def _gap_us(self, t_in: float, tramp: float) -> float:
        gap = (t_in - self._last_end) - self._pending - tramp
        self._pending = 0.0
        return max(0.0, gap) * 1e6

    # ---- Triton launches --------------------------------------------------------------------------------
    def _record_launch(self, fn, args, grid, kwargs):
        t_in = time.thread_time()
        host = self._gap_us(t_in, 0.0)
        from ebkernels._triton import launch_arguments, launch_constexprs

        names = list(fn.arg_names)
        named = {k: v for k, v in launch_arguments(fn, args, kwargs).items() if k in names}
        compile_time = launch_constexprs(fn, args, kwargs)  # constexprs may come by position (``BoundLaunch``)
        tensors, scalars = {}, {}
        for k, v in named.items():
            if isinstance(v, torch.Tensor):
                tensors[k] = tensor_arg(k, v)
            elif hasattr(v, "base") and hasattr(v, "block_shape"):  # TMA TensorDescriptor
                tensors[k] = tensor_arg(k, v.base, tuple(v.block_shape))
            elif isinstance(v, (int, float, bool)) and k not in compile_time and k not in kwargs:
                scalars[k] = v
        consts = {k: v for k, v in compile_time.items() if isinstance(v, (int, float, bool, str)) or v is None}
        self.events.append(Launch(host, self.stack[-1] if self.stack else "", fn.__name__, _grid3(grid, named),
                                  tensors, scalars, consts, len(names)))
        self._last_end = time.thread_time()

    def __enter__(self):
        self._depth += 1
        if self._depth > 1:
            return super().__enter__()
        import triton.runtime.interpreter as ti

        rec = self
        orig = ti.InterpretedFunction.run

        def run(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return None
            rec._record_launch(fn_self, args, grid, kwargs)
            return None  # recorded, not executed

        ti.InterpretedFunction.run = run
        self._patched = (ti.InterpretedFunction, orig)
        self._direct = _patch_direct_path(self)
        self._last_end = time.thread_time()
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth > 0:
            return super().__exit__(*exc)
        self.host_tail_us = max(0.0, time.thread_time() - self._last_end - self._pending) * 1e6
        self._kept.clear()
        cls, orig = self._patched
        cls.run = orig
        self._direct()
        return super().__exit__(*exc)

    # ---- aten ops and custom ops ------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t_in = time.thread_time()
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "prim":  # metadata queries of fake tensors (prim.device): no dispatch on a GPU, not timed
            out = func(*args, **kwargs)
            self._pending += time.thread_time() - t_in + self.tramp_s
            return out
        if ns != "aten":  # an ebkernels custom op: its implementation, with the mode still on
            self._pending += self.tramp_s
            self.stack.append(f"{ns}::{func._opname}")
            try:
                with self:  # (entering and leaving the mode again is the recorder's cost: excluded)
                    self._pending += time.thread_time() - t_in
                    try:
                        return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
                    finally:
                        t_out = time.thread_time()
            finally:
                self.stack.pop()
                self._pending += time.thread_time() - t_out
        tramp = op_trampoline(func, args, kwargs, self.tramp_s)  # (measured once per op, before the gap ends)
        host = self._gap_us(t_in, tramp) + self.aten_floor_s * 1e6
        out = func(*args, **kwargs)
        self.events.append(_aten_event(func, args, kwargs, out, host, self.stack[-1] if self.stack else ""))
        self._kept.extend(t.untyped_storage() for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor))
        self._last_end = time.thread_time()
        return out


def _patch_direct_path(rec: Recorder):
    """Let ``ops._dispatch``'s eager direct path run under the recorder, as it does on a GPU in eager mode
    (no dispatch mode there): the recorder alone on the mode stack does not count as a mode, and a direct
    call still names the custom op its launches and aten ops came from. Without this the recorder's own
    mode would send every custom op through the dispatcher (~50-150 µs a call on this CPU), a cost the eager
    step on a GPU does not pay. Returns the undo."""
    try:
        from ebkernels.ops import _dispatch
    except ImportError:  # pragma: no cover - ebkernels always importable here
        return lambda: None
    depth, call = _dispatch._dispatch_depth, _dispatch.DirectOp.__call__
    stack = torch._C._len_torch_dispatch_stack

    def recorder_depth():
        return stack() - 1 if rec._depth == 1 else stack()

    def direct_call(op, *args, **kwargs):
        t = time.thread_time()
        direct = _dispatch.direct_path_allowed(args, kwargs)  # the recorder's question: not timed as host work
        rec._pending += time.thread_time() - t
        if not direct:
            return call(op, *args, **kwargs)
        rec.stack.append(f"{op._namespace}::{op._name}")
        try:
            return call(op, *args, **kwargs)
        finally:
            rec.stack.pop()

    _dispatch._dispatch_depth = recorder_depth
    _dispatch.DirectOp.__call__ = direct_call

    def undo():
        _dispatch._dispatch_depth = depth
        _dispatch.DirectOp.__call__ = call
    return undo


class _Bare(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_OP_TRAMP: dict = {}  # op overload -> seconds its dispatch through a bare mode adds (``op_trampoline``)
_NOT_REPEATED = ("rand", "normal", "bernoulli", "dropout", "multinomial", "uniform", "exponential", "poisson",
                 "random", "seed")


def _plain_and_moded(call, reps: int, rounds: int) -> tuple[float, float]:
    """(seconds per ``call`` without, with a bare dispatch mode): ``reps`` calls each way, alternately, ``rounds``
    times, the best of each (a shared CPU's noise only adds)."""
    plain = moded = float("inf")
    for _ in range(rounds):
        for mode in (None, _Bare()):
            t0 = time.thread_time()
            with mode if mode is not None else contextlib.nullcontext():
                for _ in range(reps):
                    call()
            took = (time.thread_time() - t0) / reps
            if mode is None:
                plain = min(plain, took)
            else:
                moded = min(moded, took)
    return plain, moded


def op_trampoline(func, args, kwargs, default: float, reps: int = 100, rounds: int = 7) -> float:
    """Seconds a dispatch mode adds to one call of ``func`` (an aten op overload) on this CPU: measured once per
    overload with these arguments, the op run ``reps`` times without and with a bare mode, alternately, ``rounds``
    times (the best of each: a shared CPU's noise only adds); an op that mutates, draws random numbers or runs
    longer than 200 µs is not repeated and takes ``default``."""
    hit = _OP_TRAMP.get(func)
    if hit is not None:
        return hit
    value = default
    if not func._schema.is_mutable and not any(w in func._opname for w in _NOT_REPEATED):
        t = time.thread_time()
        func(*args, **kwargs)
        if time.thread_time() - t < 200e-6:
            plain, moded = _plain_and_moded(lambda: func(*args, **kwargs), reps, rounds)
            value = max(0.0, moded - plain)
    _OP_TRAMP[func] = value
    return value


_WRITE_ONLY = {"copy_", "zero_", "fill_", "normal_", "uniform_", "random_", "bernoulli_", "set_", "resize_",
               "index_put_"}


def _aten_event(func, args, kwargs, out, host: float, op: str) -> AtenOp:
    schema = func._schema
    name = func._opname
    inputs, outputs, written = [], [], set()
    for i, a in enumerate(schema.arguments):
        v = args[i] if i < len(args) else kwargs.get(a.name)
        is_write = a.alias_info is not None and a.alias_info.is_write
        leaves = [x for x in tree_flatten(v)[0] if isinstance(x, torch.Tensor)]
        for x in leaves:
            if is_write:
                written.add(id(x))
                outputs.append(tensor_arg(a.name, x))
            if not (is_write and name in _WRITE_ONLY):
                inputs.append(tensor_arg(a.name, x))
    for x in tree_flatten(out)[0]:
        if isinstance(x, torch.Tensor) and id(x) not in written:
            outputs.append(tensor_arg("out", x))
    params: dict[str, Any] = {}
    if name in ("convolution", "convolution_backward"):
        names = [a.name for a in schema.arguments]
        for key in ("stride", "padding", "dilation", "transposed", "groups", "output_mask"):
            if key in names:
                i = names.index(key)
                params[key] = args[i] if i < len(args) else kwargs.get(key)
    return AtenOp(host, op, f"{func.namespace}.{name}.{func._overloadname}", inputs, outputs, params)


def calibrate(reps: int = 2000) -> tuple[float, float]:
    """(seconds to enter a TorchDispatchMode handler and leave it, seconds to dispatch a trivial aten op) on
    this CPU: what ``Recorder`` subtracts from and adds to each aten op's host time."""
    a, b = torch.zeros(1), torch.zeros(1)
    op = torch.ops.aten.add.Tensor
    plain, moded = _plain_and_moded(lambda: op(a, b), reps, 3)
    return max(0.0, moded - plain), plain
