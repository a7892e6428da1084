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

Converting an op is a one-line change: ``@torch.library.custom_op(name, mutates_args=...)`` becomes
``@custom_op(name, mutates_args=...)``.
"""
from __future__ import annotations

import inspect

import torch
from torch._library.custom_ops import CustomOpDef

__all__ = ["custom_op", "DirectOp", "direct_path_allowed"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _plain(t) -> bool:
    if type(t) in _PLAIN:
        return not _is_wrapped(t)
    return False


def direct_path_allowed(args, kwargs) -> bool:
    """Whether a call with these arguments may skip the dispatcher (module docstring)."""
    if _is_compiling() or _dispatch_depth():
        return False
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, torch.Tensor):
            if not _plain(a) or (grad and a.requires_grad):
                return False
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            if not all(_plain(t) and not (grad and t.requires_grad) for t in a):
                return False
    return True


class DirectOp(CustomOpDef):
    """The op ``custom_op`` returns: a ``torch.library`` ``CustomOpDef`` (``register_fake``, ``opcheck``,
    ``torch.compile`` as before) whose call runs the implementation itself when the dispatcher is not needed."""

    def _direct(self, fn, mutates_args):
        params = list(inspect.signature(fn).parameters)
        names = () if mutates_args in ((), "unknown") else tuple(mutates_args)
        self._direct_fn = fn
        self._direct_mutated = tuple((params.index(n), n) for n in names)
        return self

    def __call__(self, *args, **kwargs):
        if not direct_path_allowed(args, kwargs):
            return super().__call__(*args, **kwargs)
        out = self._direct_fn(*args, **kwargs)
        for i, name in self._direct_mutated:
            t = args[i] if i < len(args) else kwargs.get(name)
            if t is not None:
                torch.autograd.graph.increment_version(t)
        return out


def custom_op(name: str, fn=None, /, *, mutates_args, **kwargs):
    """``torch.library.custom_op`` (same arguments), returning a ``DirectOp``."""
    def wrap(f):
        op = torch.library.custom_op(name, mutates_args=mutates_args, **kwargs)(f)
        op.__class__ = DirectOp
        return op._direct(f, mutates_args)
    return wrap(fn) if fn is not None else wrap
