"""Quantization settings of the WAGE-style 8-bit training (SPEC §2)."""
from __future__ import annotations

import dataclasses

from ._checks import check_bits, check_choice

MODES = ("shift", "wage")
ROUNDINGS = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True)
class QConfig:
    """Bit widths and rounding of the four quantized operands.

    ``bits_w``/``bits_a``/``bits_e``/``bits_g`` (2..8, or None to keep that operand in float):
    weights, activations (the layer input), errors (gradient w.r.t. the layer output) and the
    weight gradient. ``mode="shift"`` scales W and A per tensor by ``Shift(max|x|)``;
    ``mode="wage"`` uses the fixed scale 1 for W and A (times ``alpha`` for W), as in WAGE.
    E and G always use ``Shift(max|x|)``. ``rounding_e`` is "nearest" (default) or "stochastic";
    G is always rounded stochastically (``rounding_g``).
    """

    bits_w: int | None = 8
    bits_a: int | None = 8
    bits_g: int | None = 8
    bits_e: int | None = 8
    mode: str = "shift"
    rounding_e: str = "nearest"
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
