"""Which implementation runs: the Triton kernels or the pure-PyTorch reference.

Triton kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before
``ebkernels`` is imported (the interpreter executes the same kernels with numpy; that is how the
test suite checks them without a GPU). Everything else takes the reference path, which computes
the same numbers, and so does everything where triton is not installed (``_triton``).
``force_backend("reference")`` (``config.override(backend="reference")``) pins the reference path,
the oracle.
"""
from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON
from .config import kernel_settings, override

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should handle these tensors."""
    if not tensors or not HAS_TRITON or kernel_settings().backend == "reference":
        return False
    # every tensor on CUDA, or (interpreter) every one on the CPU; ``is_cuda`` / ``is_cpu`` in a plain loop rather
    # than a set of ``device.type`` strings or ``all()`` over a generator: this runs several times per launch
    # (issue 20 item 5, host time)
    for t in tensors:
        if not t.is_cuda:
            break
    else:
        return True
    if not INTERPRET:
        return False
    for t in tensors:
        if not t.is_cpu:
            return False
    return True


def force_backend(name: str):
    """Context manager: ``"reference"`` runs the PyTorch path, ``"auto"`` picks as usual (the
    ``backend`` field of ``config.override``)."""
    if name not in ("reference", "auto"):
        raise ValueError(f"backend must be 'reference' or 'auto', got {name!r}")
    return override(backend=name)
