"""What the int8 layers compute and how the kernels run: ``QConfig`` (SPEC §2: bit widths, scale mode,
rounding; one per layer) and ``KernelSettings`` (process-wide choices that change how a result is
computed, never the result: which backend, keep or recompute y in a fused block, the TMA weight-grad,
poisoned kernel buffers for the tests).

``KernelSettings`` has one override point, the context manager ``override``::

    with ebkernels.config.override(backend="reference", y_policy="keep"):
        ...

Code reads the settings in force with ``kernel_settings()``; nothing else changes them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

from ._checks import check_bits, check_choice

MODES = ("shift", "wage", "absmax")
ROUNDINGS = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True)
class QConfig:
    """Bit widths, scale mode and rounding of the four quantized operands (SPEC §2).

    ``bits_w``/``bits_a``/``bits_e``/``bits_g`` (2..8, or None to keep that operand in float):
    weights, activations (the layer input), errors (gradient w.r.t. the layer output) and the
    weight gradient. ``mode`` (the per-tensor scale, ``ops._scale``): "shift" (default) scales all four
    by ``Shift(max|x|) = 2**round(log2 max|x|)``; "wage" uses the fixed scale 1 for W and A (times
    ``alpha`` for W), as in WAGE, and Shift for E and G; "absmax" scales all four by
    ``max|x|·S/(S-1)`` (max|x| maps to code S-1: nothing saturates). ``mode_eg`` is the mode E and G use.

    ``rounding_e`` is "stochastic" by default: rounding E to nearest with one scale per tensor zeroes most
    small error entries, and behind a training-mode BatchNorm the per-channel sums of the quantized E
    (exactly zero in float) then keep a bias that shifts the channel means (measured, issue 22: the BN
    running statistics lag and the dense accuracy with them); stochastic rounding is unbiased.
    "nearest" stays available. G is rounded stochastically too (``rounding_g``).
    """

    bits_w: int | None = 8
    bits_a: int | None = 8
    bits_g: int | None = 8
    bits_e: int | None = 8
    mode: str = "shift"
    rounding_e: str = "stochastic"
    rounding_g: str = "stochastic"
    alpha: float = 1.0

    def __post_init__(self):
        for name in ("bits_w", "bits_a", "bits_g", "bits_e"):
            check_bits(name, getattr(self, name), allow_none=True)
        check_choice("mode", self.mode, MODES)
        check_choice("rounding_e", self.rounding_e, ROUNDINGS)
        check_choice("rounding_g", self.rounding_g, ROUNDINGS)
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} is not supported; accepted: a positive float")

    @property
    def mode_eg(self) -> str:
        """The scale mode of E and G: "absmax" in mode absmax, else "shift" (WAGE's fixed 1 is for W and A)."""
        return "absmax" if self.mode == "absmax" else "shift"


def as_qconfig(qconfig) -> QConfig:
    """``qconfig`` checked: a ``QConfig``, or the defaults for None."""
    if qconfig is None:
        return QConfig()
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"qconfig must be an ebkernels.QConfig or None (defaults), got "
                        f"{type(qconfig).__name__}: {qconfig!r}")
    return qconfig


BACKENDS = ("auto", "reference")
Y_POLICIES = ("auto", "keep", "recompute")


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """How the kernels run (never what they compute).

    ``backend``: "auto" (the Triton kernels on CUDA tensors, and on CPU tensors under
    ``TRITON_INTERPRET=1``; the PyTorch reference elsewhere) or "reference" (always the PyTorch path: the
    oracle). ``y_policy``: a fused block's conv output y in backward: "recompute" it in the GEMM that forms
    the BatchNorm-backward sums, "keep" it (bfloat16), or "auto" (keep where the layer is compute-bound,
    ``ops.fused.block.keeps_y``). ``wgrad_tma``: the TMA weight-grad of ``gemm.tiles`` rule 8: None = on
    sm_90 only, True = wherever the rule's shape conditions hold (the interpreter included), False = never.
    ``poison_outputs``: every kernel output and workspace from ``ops._buffers.empty_output`` starts
    poisoned (NaN / -128 / 0x7F7F7F7F), so an element a kernel fails to write shows up (tests).
    ``plan_sms``: plan every launch as an sm_90 GPU with this many SMs runs it, whatever executes it
    (``ops.gemm.tiles``; the cost model prices the GPU's launches from an interpreter run); None = off.
    Default: the environment variable ``EBKERNELS_PLAN_SMS`` (unset or 0: None).
    """

    backend: str = "auto"
    y_policy: str = "auto"
    wgrad_tma: Optional[bool] = None
    poison_outputs: bool = False
    plan_sms: Optional[int] = dataclasses.field(default_factory=lambda: _env_plan_sms())

    def __post_init__(self):
        check_choice("backend", self.backend, BACKENDS)
        check_choice("y_policy", self.y_policy, Y_POLICIES)
        check_choice("wgrad_tma", self.wgrad_tma, (None, True, False))
        check_choice("poison_outputs", self.poison_outputs, (True, False))
        if self.plan_sms is not None and (isinstance(self.plan_sms, bool) or not isinstance(self.plan_sms, int)
                                          or self.plan_sms < 1):
            raise ValueError(f"plan_sms={self.plan_sms!r} is not supported; accepted: None or an int >= 1")


def _env_plan_sms() -> Optional[int]:
    raw = os.environ.get("EBKERNELS_PLAN_SMS", "").strip()
    if raw in ("", "0"):
        return None
    if not raw.isdigit():
        raise ValueError(f"EBKERNELS_PLAN_SMS={raw!r} is not supported; accepted: an int >= 1 (the GPU's SMs), or 0")
    return int(raw)


_settings = KernelSettings()


def kernel_settings() -> KernelSettings:
    """The ``KernelSettings`` in force."""
    return _settings


@contextlib.contextmanager
def override(**changes):
    """Context manager: the settings in force with ``changes`` (fields of ``KernelSettings``) for the
    duration of the block, restored afterwards (exceptions included)."""
    global _settings
    old = _settings
    fields = {f.name for f in dataclasses.fields(KernelSettings)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise TypeError(f"override: unknown setting(s) {unknown}; accepted: {sorted(fields)}")
    _settings = dataclasses.replace(old, **changes)
    try:
        yield _settings
    finally:
        _settings = old
