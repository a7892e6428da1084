"""The optional native extension ``ebkernels._C`` (csrc/: C++ CPU op, CUDA op where built with CUDA).

Importing ``ebkernels._C`` registers ``torch.ops.ebkernels_native.early_bird_update``. When the
extension is missing (no compiler at install time, ``EBKERNELS_NO_NATIVE=1``, or built against another
torch), the package keeps working on its Triton and PyTorch paths; :func:`warn_missing_once` says why,
once, the first time the native path would have been chosen.
"""
from __future__ import annotations

import os
import warnings

import torch

__all__ = ["available", "early_bird_update", "missing_reason", "warn_missing_once"]

_OP = "ebkernels_native::early_bird_update"
_reason: str | None = None
_warned = False

if os.environ.get("EBKERNELS_NO_NATIVE", "0") == "1":
    _reason = "disabled by EBKERNELS_NO_NATIVE=1"
else:
    try:
        from . import _C  # noqa: F401  (the import registers the ops with the dispatcher)
    except ImportError as e:
        _reason = (f"ebkernels._C could not be imported ({e}); build it with "
                   "`pip install --no-build-isolation -e .` (needs a C++ compiler and ninja)")


def missing_reason() -> str | None:
    """Why the native ops are unavailable, or None when they are loaded."""
    return _reason


def available(device: torch.device | str | None = None) -> bool:
    """True when the native op is loaded (and has a kernel for ``device``'s type, if given)."""
    if _reason is not None:
        return False
    if device is None:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)


def warn_missing_once() -> None:
    """One warning per process explaining why the native CPU op is not used."""
    global _warned
    if _reason is not None and not _warned:
        _warned = True
        warnings.warn(f"ebkernels: native ops unavailable, using the PyTorch reference on CPU: {_reason}",
                      RuntimeWarning, stacklevel=3)


def early_bird_update(gammas: torch.Tensor, ks: torch.Tensor, ring: torch.Tensor, slot: int):
    """The native fused mask update (same contract as ``ebkernels.detector.early_bird_mask``)."""
    if not available(gammas.device):
        raise RuntimeError(f"native early_bird_update unavailable for {gammas.device}: "
                           f"{_reason or 'no kernel for this device type in the built extension'}")
    return torch.ops.ebkernels_native.early_bird_update(gammas, ks, ring, slot)
