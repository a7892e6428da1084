"""Run a launch's programs in another order under the Triton interpreter (issue 20: arrival order).

A GPU runs a grid's programs in any order and overlaps them; the interpreter runs them one at a time in a
fixed nested loop (x, then y, then z). Every kernel whose result depends on who arrives last (split-K
fix-ups, last-arriver merges, semaphores, published maxima, the fused G quantization) must give the same
bits in any order: ``grid_order("reversed")`` / ``grid_order("shuffled", seed)`` make the interpreter run
every launch inside the ``with`` block in that order (all three grid axes permuted together, not axis by
axis), ``ORDERS`` / ``run_in_orders`` run a callable in the forward, reversed and two shuffled orders and
return the results. The interpreter still runs one program at a time: this tests what the order of
arrival decides, not what concurrent programs would race on (the AOT report counts the fences that order
those).

It wraps ``triton.runtime.interpreter.GridExecutor.__call__`` of triton 3.6 (the loop is the only change;
argument copies, language patching and the copy back are the interpreter's own methods).
"""
from __future__ import annotations

import contextlib
import inspect
import random
from typing import NamedTuple

import triton
import triton.runtime.interpreter as ti

__all__ = ["grid_order", "ORDERS", "run_in_orders", "Run"]

ORDERS = ("forward", "reversed", ("shuffled", 1), ("shuffled", 2))

_state = {"order": "forward", "seed": 0, "runs": []}


class Run(NamedTuple):
    """One launch run inside ``grid_order``: the kernel's name and its programs' (x, y, z) in the order run."""

    kernel: str
    order: list


def _order(grid) -> list:
    idx = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
    mode = _state["order"]
    if mode == "reversed":
        idx.reverse()
    elif mode == "shuffled":
        first = list(idx)
        random.Random(_state["seed"] * 1_000_003 + len(_state["runs"])).shuffle(idx)
        if idx == first and len(idx) > 1:  # a small grid may shuffle into itself: never the forward order
            idx = idx[1:] + idx[:1]
    return idx


def _call(self, *args_dev, **kwargs):
    """``GridExecutor.__call__`` of triton 3.6, the programs run in ``_order(grid)``."""
    argspec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    patch_scope = ti._patch_lang(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        args = {name: arg if name in self.constexprs else ti._implicit_cvt(arg) for name, arg in args.items()}
        grid = self.grid(args) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        ti.interpreter_builder.set_grid_dim(*grid)
        order = _order(grid)
        _state["runs"].append(Run(self.fn.__name__, order))
        try:
            for x, y, z in order:
                ti.interpreter_builder.set_grid_idx(x, y, z)
                self.fn(**args)
        except Exception as e:
            if triton.knobs.compilation.front_end_debugging:
                raise
            raise ti.InterpreterError(repr(e)) from e
    finally:
        patch_scope.restore()
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


@contextlib.contextmanager
def grid_order(order="reversed", seed: int = 0):
    """Inside the block every interpreted launch runs its programs in ``order``: "forward" (the
    interpreter's own), "reversed", "shuffled" (seeded by ``seed`` and the launch's position in the block),
    or a tuple ``("shuffled", seed)``. Yields the list of ``Run`` s (filled as launches run)."""
    if isinstance(order, tuple):
        order, seed = order
    if order not in ("forward", "reversed", "shuffled"):
        raise ValueError(f"order {order!r}; accepted: forward, reversed, shuffled")
    saved, old = dict(_state), ti.GridExecutor.__call__  # (another wrapper of __call__ is not called inside)
    _state.update(order=order, seed=seed, runs=[])
    ti.GridExecutor.__call__ = _call
    try:
        yield _state["runs"]
    finally:
        ti.GridExecutor.__call__ = old
        _state.clear()
        _state.update(saved)


def run_in_orders(fn, orders=ORDERS, launches: list | None = None) -> list:
    """``[fn()]`` once per order (each inside ``grid_order``): the caller compares the results bit for bit.
    ``fn`` must build fresh outputs on each call (the kernels' own outputs: allocate inside ``fn``).
    ``launches``: a list that gets the ``Run`` s of each order (a list per order)."""
    out = []
    for order in orders:
        with grid_order(order) as runs:
            out.append(fn())
        assert runs, f"no launch ran in order {order}"
        if order != "forward":
            assert any(r.order != sorted(r.order) for r in runs if len(r.order) > 1), \
                f"order {order}: no launch was reordered"
        if launches is not None:
            launches.append(list(runs))
    return out
