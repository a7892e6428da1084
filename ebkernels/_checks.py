"""Argument checks shared by the public functions: one message style everywhere."""
from __future__ import annotations

import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; accepted: {accepted}")


def check_bits(name: str, bits, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        extra = " or None (leave in float)" if allow_none else ""
        raise ValueError(f"{name}={bits!r} is not supported; accepted: an int from 2 to 8{extra}")


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {', '.join(map(repr, choices))}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors must be on one device; got {listing}")


def check_ratio(ratio) -> float:
    """A pruning ratio p with 0 < p < 1: a TypeError for what is no number (a string, a tensor), a
    ValueError for a number out of range (bools count as numbers there, as in Python)."""
    if not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio={ratio!r} is a {type(ratio).__name__}; accepted: a float with 0 < ratio < 1 "
                        f"(a Python or NumPy number{', e.g. float(ratio)' if isinstance(ratio, str) else ''})")
    if isinstance(ratio, bool) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio={ratio!r} is out of range; accepted: a float with 0 < ratio < 1")
    return float(ratio)
