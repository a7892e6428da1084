"""``ops._dispatch``'s host shortcuts (issue 20 item 5): ``direct_scope`` (one dispatcher check for the ops an int8
autograd function calls, not one per op) and ``absent`` (the zero-size stand-in of a missing mutable argument, kept
per device and slot in eager mode). The direct path itself and its checks: ``test_compile.py``."""
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ebkernels
from ebkernels import _rng
from ebkernels.ops import _dispatch
from ebkernels.ops._dispatch import absent, direct_scope, present
from ebkernels.ops.quantize import _quantize_op
from helpers import fresh_seed, gen


class _Sub(torch.Tensor):
    pass


class _Bare(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _counting(monkeypatch) -> list:
    """Every ``direct_path_allowed`` call from here on, with its answer."""
    seen, real = [], _dispatch.direct_path_allowed

    def counted(args, kwargs):
        seen.append(real(args, kwargs))
        return seen[-1]

    monkeypatch.setattr(_dispatch, "direct_path_allowed", counted)
    return seen


def _quantize(x, st):
    return _quantize_op(x, 8, True, "shift", -1, False, 0, False, st, absent(x))


def test_direct_scope_asks_once_for_its_tensors_and_restores(monkeypatch):
    s = fresh_seed()
    x = torch.randn((2, 3, 4, 5), generator=gen(s))
    st = _rng.device_state("cpu")
    seen = _counting(monkeypatch)
    ebkernels.manual_seed(s % 1000)
    outside = _quantize(x, st)
    assert seen == [True]  # an op outside a scope asks itself
    seen.clear()
    ebkernels.manual_seed(s % 1000)
    with torch.no_grad(), direct_scope(x, None, "spec", (x,)):
        inside = _quantize(x, st)
        assert seen == [True]  # the scope's one question; its op asked nothing
        with direct_scope(x.as_subclass(_Sub)):  # nested: asks about its own tensors (no), so its op asks itself
            _quantize(x, st)
        assert seen == [True, False, True] and _dispatch._LOCAL.trusted  # the outer answer back
        _quantize(x, st)
    assert seen == [True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))  # the same direct path, the same bits
    seen.clear()
    try:
        with torch.no_grad(), direct_scope(x):
            raise KeyError("inside")
    except KeyError:
        pass
    _quantize(x, st)
    assert seen == [True, True] and not getattr(_dispatch._LOCAL, "trusted", False)  # restored after an error


def test_a_scope_with_a_subclass_or_under_a_mode_trusts_nothing(monkeypatch):
    x = torch.randn((2, 3, 4, 5), generator=gen(fresh_seed()))
    st = _rng.device_state("cpu")
    seen = _counting(monkeypatch)
    with torch.no_grad(), direct_scope(x, x.as_subclass(_Sub)):
        _quantize(x, st)
    assert seen == [False, True]  # the scope said no: its op asked for itself
    seen.clear()
    with torch.no_grad(), _Bare(), direct_scope(x):
        _quantize(x, st)
    assert seen == [False, False]  # under a dispatch mode the registered op runs


def test_direct_scope_is_per_thread():
    x = torch.randn((3,), generator=gen(fresh_seed()))
    other = []
    with torch.no_grad(), direct_scope(x):
        assert _dispatch._LOCAL.trusted
        t = threading.Thread(target=lambda: other.append(getattr(_dispatch._LOCAL, "trusted", False)))
        t.start()
        t.join()
    assert other == [False]


def test_absent_keeps_one_stand_in_per_device_and_slot():
    x = torch.randn((2, 3), generator=gen(fresh_seed()))
    a0, a1 = absent(x), absent(x, 1)
    assert a0.numel() == a1.numel() == 0 and present(a0) is None and present(x) is x
    assert absent(x) is a0 and absent(x.double(), 1) is a1 and a0 is not a1  # two of one op never alias
    # where the dispatcher sees the call (a subclass, a dispatch mode): a fresh one each time
    sub = x.as_subclass(_Sub)
    assert absent(sub) is not absent(sub)
    with _Bare():
        assert absent(x) is not absent(x) and absent(x) is not a0


@_dispatch.custom_op("ebkernels_test::add_into_two", mutates_args=("a", "b"))
def _add_into_two(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    a.add_(x, alpha=scale)
    b.sub_(x, alpha=scale)


def test_direct_path_bumps_mutated_versions_by_position_and_by_keyword():
    """The direct path bumps the version of every mutated argument as the registered op does, whether the call
    passes them by position (the package's calls: an index look-up) or by keyword."""
    x = torch.randn(5, generator=gen(fresh_seed()))
    a, b = torch.zeros(5), torch.zeros(5)
    for call in (lambda: _add_into_two(x, a, b), lambda: _add_into_two(x, a, b=b, scale=2.0),
                 lambda: _add_into_two(x, b=b, a=a)):
        va, vb = a._version, b._version
        with direct_scope(x, a, b):
            call()
        assert a._version > va and b._version > vb
    assert torch.equal(a, 4 * x) and torch.equal(b, -4 * x)
