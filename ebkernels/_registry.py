"""One declaration per Triton kernel, read by ``python -m ebkernels.aot``.

A kernel registers itself where it is defined::

    @aot_kernel(signature={"x_ptr": "*fp32", "n": "i32"}, constexprs={"BLOCK": 1024})
    @triton.jit
    def my_kernel(x_ptr, n, BLOCK: tl.constexpr): ...

``signature`` gives the Triton type of every runtime argument (``*i8``, ``*fp32``, ``i32``,
``i64``, ``fp32``...). ``constexprs`` fixes the compile-time arguments for the ahead-of-time build;
pass a list of dicts to build several configurations; a configuration's ``num_warps`` /
``num_stages`` keys override the kernel's (per-tile warps of the tile table); its ``maxnreg`` (the
register cap per thread, ``.maxnreg``) goes to the compiler as the launcher passes it. ``int8_mma=True``
marks a GEMM kernel whose PTX must contain int8 tensor-core instructions. ``aligned`` names pointer
arguments the launcher keeps 16-byte aligned (the JIT specialises on this too, so the AOT build sees the same code).
``fp_fusion=False``: the launcher passes ``enable_fp_fusion=False`` (no ``a*b+c`` -> fma contraction: the
kernel rounds like its PyTorch reference and the interpreter), and so does the AOT build. A signature
entry may name constexprs of the configuration (a TMA descriptor's block: ``tensordesc<i8[{BM}, {BK}]>``);
``arches``: build only for these compute capabilities (a TMA kernel: 90).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["AOTKernel", "aot_kernel", "registered_kernels"]


@dataclasses.dataclass(frozen=True)
class AOTKernel:
    name: str
    fn: Any  # triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    signature: dict[str, str]
    constexprs: tuple[dict[str, Any], ...]
    num_warps: int
    num_stages: int
    int8_mma: bool
    aligned: tuple[str, ...]
    fp_fusion: bool = True
    arches: tuple[int, ...] | None = None  # the architectures it is built for (None: every one asked)

    def signature_for(self, cfg: dict) -> dict[str, str]:
        """The signature of one configuration: an entry may name constexprs (``tensordesc<i8[{BM}, {BK}]>``)."""
        return {a: t.format(**cfg) if "{" in t else t for a, t in self.signature.items()}

    def attrs(self) -> dict:
        """Argument attributes in the form ``triton.compiler.ASTSource`` expects."""
        names = list(self.fn.arg_names)
        return {(names.index(a),): [["tt.divisibility", 16]] for a in self.aligned}


_REGISTRY: dict[str, AOTKernel] = {}
COMPILE_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # configuration keys that are not kernel arguments


def aot_kernel(
    *,
    signature: dict[str, str],
    constexprs: dict[str, Any] | list[dict[str, Any]] | None = None,
    name: str | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    int8_mma: bool = False,
    aligned: tuple[str, ...] = (),
    fp_fusion: bool = True,
    arches: tuple[int, ...] | None = None,
) -> Callable:
    def register(fn):
        kname = name or getattr(fn, "__name__", None) or fn.fn.__name__
        arg_names = list(fn.arg_names)
        cfgs = constexprs if isinstance(constexprs, list) else [constexprs or {}]
        for cfg in cfgs:
            missing = [a for a in arg_names if a not in signature and a not in cfg]
            extra = [a for a in cfg if a not in arg_names and a not in COMPILE_OPTIONS]
            if extra:
                raise TypeError(f"aot_kernel({kname}): constexprs {extra} are not arguments of the kernel")
            if missing:
                raise TypeError(f"aot_kernel({kname}): no type or constexpr value for {missing}")
        for a in aligned:
            if a not in signature or not signature[a].startswith("*"):
                raise TypeError(f"aot_kernel({kname}): aligned argument {a!r} is not a pointer")
        if kname in _REGISTRY:
            raise ValueError(f"aot_kernel: kernel name {kname!r} registered twice")
        _REGISTRY[kname] = AOTKernel(kname, fn, dict(signature), tuple(cfgs), num_warps, num_stages,
                                     int8_mma, tuple(aligned), fp_fusion, arches)
        return fn

    return register


KERNEL_PACKAGES = ("ebkernels.ops", "ebkernels.detector")  # where every @aot_kernel lives


def registered_kernels() -> list[AOTKernel]:
    """All kernels of the package (importing every module of ``KERNEL_PACKAGES``, subpackages included,
    registers them)."""
    import importlib
    import pkgutil

    for name in KERNEL_PACKAGES:
        pkg = importlib.import_module(name)
        for mod in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}."):
            importlib.import_module(mod.name)
    return list(_REGISTRY.values())
