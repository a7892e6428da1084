"""``custom_op``: ``torch.library.custom_op`` with a direct path in eager mode (a leaf: imports nothing of ops).

Every launch of the package is a ``torch.library`` custom op, so that ``torch.compile`` traces through the
int8 layers (fake tensors, functionalization, inductor). In eager mode the op's dispatch costs more than the
launcher it wraps (issue 20 item 5: ~50 µs per call against ~1 µs for an aten op), so the callable that
``custom_op`` returns calls the Python implementation directly when nothing needs the dispatcher:

- not inside ``torch.compile`` / ``torch.export`` tracing (``torch.compiler.is_compiling()``);
- no ``TorchDispatchMode`` active (fake tensor mode, ``opcheck``'s checks, functionalization, proxy modes);
- every tensor argument a plain ``torch.Tensor`` or ``nn.Parameter`` (no FakeTensor, no subclass, no functorch
  wrapper), and none that needs autograd to record the op (the ops have no autograd formula of their own: the
  autograd functions of ``ops`` call them under no-grad).

Otherwise the registered op runs. The direct path does what the op's eager dispatch does to its mutated
arguments: their version counters go up (``torch.autograd.graph.increment_version``), so autograd still sees an
in-place change of a saved tensor. The registered op stays reachable (``torch.ops.ebkernels.<name>``)
and takes ``register_fake`` / ``register_autograd`` / ``opcheck`` as before (``DirectOp`` is a ``CustomOpDef``).

Inside an int8 autograd function's forward or backward (``direct_scope``) the question is asked once, of the
function's own tensors, instead of per op: the ops it calls take tensors it received or made itself, so their
answer is the same (its layers' BatchNorm buffers are not asked about: a tensor subclass there alone, with plain
parameters and inputs, reaches a launcher, which fails on it loudly rather than computing something else).

``absent`` / ``present``: "no tensor" for a mutable argument (which may not be Optional), a kept zero-size
stand-in where the direct path runs.

Converting an op is a one-line change: ``@torch.library.custom_op(name, mutates_args=...)`` becomes
``@custom_op(name, mutates_args=...)``.
"""
from __future__ import annotations

import inspect
import threading

import torch
from torch._library.custom_ops import CustomOpDef

__all__ = ["custom_op", "DirectOp", "direct_path_allowed", "direct_scope", "absent", "present"]

_TENSOR, _PARAM = torch.Tensor, torch.nn.Parameter
_SCALAR = frozenset((int, float, bool, str, type(None)))  # argument types the check skips without a look
_is_compiling = torch.compiler.is_compiling
_increment_version = torch._C._increment_version
_dispatch_depth = torch._C._len_torch_dispatch_stack
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_grad_enabled = torch.is_grad_enabled
# no functorch transform active: no tensor is a live functorch wrapper (one call, not one per tensor)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _tensors_ok(values, grad: bool, wrapped: bool = True) -> bool:
    """Plain tensors only, none autograd would record (``grad``: grad mode on) and, where a functorch transform is
    active (``wrapped``), none of its wrappers; without either the loop is type tests alone (an autograd function's
    forward and backward, where every launcher runs)."""
    for a in values:
        tp = type(a)
        if tp in _SCALAR:
            continue
        if tp is _TENSOR or tp is _PARAM:
            if (wrapped and _is_wrapped(a)) or (grad and a.requires_grad):
                return False
        elif tp is list or tp is tuple:
            if a and isinstance(a[0], _TENSOR) and not _tensors_ok(a, grad, wrapped):
                return False
        elif isinstance(a, _TENSOR):  # a subclass (FakeTensor, a wrapper subclass): the dispatcher's business
            return False
    return True


def direct_path_allowed(args, kwargs) -> bool:
    """Whether a call with these arguments may skip the dispatcher (module docstring). Checked per call, so
    kept to type tests: ~1-2 µs for a 20-argument op (issue 20 item 5)."""
    if _is_compiling() or _dispatch_depth():
        return False
    grad, wrapped = _grad_enabled(), _transforms_active()
    if not _tensors_ok(args, grad, wrapped):
        return False
    return not kwargs or _tensors_ok(kwargs.values(), grad, wrapped)


class _Local(threading.local):
    trusted = False  # inside a direct_scope whose tensors may skip the dispatcher (per thread; a plain attribute)


_LOCAL = _Local()


class direct_scope:
    """Context manager around an int8 autograd function's forward or backward: when ``values`` (its tensor
    arguments; other objects are skipped) may skip the dispatcher (``direct_path_allowed``), every op called
    inside takes the direct path without asking again (issue 20 item 5: the check costs ~2-4 µs a call, and a
    fused block makes 3-7 calls). Per thread (the autograd engine runs a CUDA backward on a thread of its own);
    a nested scope (a block's forward recomputed inside another's backward by a reentrant checkpoint) asks about
    its own tensors, and the outer answer comes back when it ends."""

    __slots__ = ("_values", "_prev")

    def __init__(self, *values):
        self._values = values

    def __enter__(self):
        if _is_compiling():  # a trace asks per op (and sees no thread-local state)
            return self
        self._prev = _LOCAL.trusted
        _LOCAL.trusted = direct_path_allowed(self._values, None)
        return self

    def __exit__(self, *exc):
        if not _is_compiling():
            _LOCAL.trusted = self._prev
        return False


_ABSENT: dict = {}  # (device, slot) -> the zero-size stand-in ``absent`` hands out in eager mode


def absent(like: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """The stand-in for an absent tensor that a custom op mutates: a mutable argument is never Optional (an
    optional mutable argument breaks functionalization under ``torch.compile``), so "none" is an empty
    tensor, which the op's implementation reads back as None with ``present``. In eager mode one kept
    zero-size tensor per device and ``slot`` (no allocation op per call: issue 20 item 5; nothing is ever
    written into zero elements): an op with two absent arguments passes slots 0 and 1, so they never alias.
    A fresh one where the dispatcher sees the call (a trace, a dispatch mode, a tensor subclass)."""
    if type(like) is torch.Tensor and (_LOCAL.trusted or (not _is_compiling() and not _dispatch_depth())):
        key = (like.device, slot)
        t = _ABSENT.get(key)
        if t is None:
            t = _ABSENT[key] = like.new_empty((0,))
        return t
    return like.new_empty((0,))


def present(t: torch.Tensor):
    """``t``, or None for ``absent``'s stand-in."""
    return t if t.numel() else None


class DirectOp(CustomOpDef):
    """The op ``custom_op`` returns: a ``torch.library`` ``CustomOpDef`` (``register_fake``, ``opcheck``,
    ``torch.compile`` as before) whose call runs the implementation itself when the dispatcher is not needed."""

    def _direct(self, fn, mutates_args, direct=None):
        params = list(inspect.signature(fn).parameters)
        names = () if mutates_args in ((), "unknown") else tuple(mutates_args)
        self._direct_fn = direct if direct is not None else fn
        self._direct_mutated = tuple((params.index(n), n) for n in names)
        # a call passing every mutated argument by position (the package's own calls): their indices alone
        self._mutated_by_position = 1 + max((i for i, _ in self._direct_mutated), default=-1)
        self._mutated_at = tuple(i for i, _ in self._direct_mutated)
        return self

    def __call__(self, *args, **kwargs):
        if not (_LOCAL.trusted or direct_path_allowed(args, kwargs)):
            return super().__call__(*args, **kwargs)
        out = self._direct_fn(*args, **kwargs)
        if self._mutated_at:
            if len(args) >= self._mutated_by_position:
                mutated = [t for t in map(args.__getitem__, self._mutated_at) if t is not None]
            else:
                n = len(args)
                mutated = [t for t in (args[i] if i < n else kwargs.get(name) for i, name in self._direct_mutated)
                           if t is not None]
            if mutated:
                _increment_version(mutated)  # (``torch.autograd.graph.increment_version``'s one call, for all)
        return out


def custom_op(name: str, fn=None, /, *, mutates_args, direct=None, **kwargs):
    """``torch.library.custom_op`` (same arguments), returning a ``DirectOp``. ``direct``: what the direct path
    calls instead of the implementation (same arguments and effects; it may leave out what only the registered op
    needs, e.g. the empty tensors an op returns to keep a fixed number of results)."""
    def wrap(f):
        op = torch.library.custom_op(name, mutates_args=mutates_args, **kwargs)(f)
        op.__class__ = DirectOp
        return op._direct(f, mutates_args, direct)
    return wrap(fn) if fn is not None else wrap
