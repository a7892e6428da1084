"""``triton`` and ``triton.language``, or a stand-in where triton is not installed (a leaf).

Every kernel module imports triton from here. Without triton (e.g. macOS, Windows, or a CPU-only
install that skipped it) ``import ebkernels`` still works and every op runs its pure-PyTorch reference
path (the same numbers, slower): the stand-in's ``@triton.jit`` keeps the function's name and
docstring, and launching it raises an error that says why. One log line says so at import.
"""
from __future__ import annotations

import logging

__all__ = ["HAS_TRITON", "triton", "tl", "philox", "uint_to_uniform_float", "TensorDescriptor", "constexpr_names",
           "launch_arguments", "launch_constexprs"]

try:
    import triton
    import triton.language as tl
    from triton.language.random import philox, uint_to_uniform_float
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TRITON = True
except ImportError as _missing:  # pragma: no cover - the no-triton test runs this in a subprocess
    import inspect
    import types

    HAS_TRITON = False
    _WHY = f"triton is not installed ({_missing}); ebkernels runs its PyTorch reference path"

    class _NoKernel:
        """A ``@triton.jit`` function without triton: named, documented, not launchable."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__, self.__doc__, self.__module__ = fn.__name__, fn.__doc__, fn.__module__
            self.arg_names = list(inspect.signature(fn).parameters)  # as a JITFunction has them

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.__name__}: cannot launch a Triton kernel: {_WHY}")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__}: cannot run a Triton device function: {_WHY}")

    def _jit(fn=None, **_options):
        return _NoKernel(fn) if fn is not None else _NoKernel

    def _cdiv(a: int, b: int) -> int:
        return -(-a // b)

    def _next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    triton = types.SimpleNamespace(jit=_jit, cdiv=_cdiv, next_power_of_2=_next_power_of_2)
    tl = types.SimpleNamespace(constexpr=object)
    philox = uint_to_uniform_float = TensorDescriptor = None
    logging.getLogger("ebkernels").warning(_WHY)


_CONSTEXPRS: dict = {}  # kernel -> the names of its constexpr parameters (``constexpr_names``)


def constexpr_names(kernel) -> frozenset:
    """The names of ``kernel``'s ``tl.constexpr`` parameters (a ``@triton.jit`` function, interpreted or not),
    read from its signature: a launcher may pass them by position (``ops._launch.BoundLaunch``), so what
    inspects a launch (the cost model's recorder, the tests' launch spy) asks this which values were
    compile-time ones."""
    names = _CONSTEXPRS.get(kernel)
    if names is None:
        import inspect

        fn = getattr(kernel, "fn", kernel)
        names = frozenset(n for n, p in inspect.signature(fn).parameters.items()
                          if p.annotation is tl.constexpr or "constexpr" in str(p.annotation))
        _CONSTEXPRS[kernel] = names
    return names


def launch_arguments(kernel, args, kwargs) -> dict:
    """Every argument of one ``kernel.run(*args, **kwargs)`` call by parameter name, compile options
    (``num_warps``, ...) included: positional ones named in signature order."""
    named = dict(zip(kernel.arg_names, args))
    named.update(kwargs)
    return named


def launch_constexprs(kernel, args, kwargs) -> dict:
    """The compile-time arguments of one ``kernel.run(*args, **kwargs)`` call by name: its constexprs, by keyword or
    by position, and the compile options (``num_warps``, ...)."""
    compile_time, params = constexpr_names(kernel), kernel.arg_names
    return {k: v for k, v in launch_arguments(kernel, args, kwargs).items() if k in compile_time or k not in params}
