"""Which implementation runs: the Triton kernels or the pure-PyTorch reference.

Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before
``ebkernels`` is imported (the interpreter executes the same kernels with numpy; that is how the
test suite checks them without a GPU). Everything else takes the reference path, which computes
the same numbers. ``force_backend("reference")`` pins the reference path (used as the oracle).
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is optional on machines that only ever run the reference path
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_forced: str | None = None


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should handle these tensors."""
    if _forced == "reference" or not HAS_TRITON:
        return False
    devs = {t.device.type for t in tensors}
    if devs == {"cuda"}:
        return True
    return INTERPRET and devs == {"cpu"}


@contextlib.contextmanager
def force_backend(name: str):
    """Context manager: ``"reference"`` runs the PyTorch path, ``"auto"`` picks as usual."""
    global _forced
    if name not in ("reference", "auto"):
        raise ValueError(f"backend must be 'reference' or 'auto', got {name!r}")
    old, _forced = _forced, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced = old
