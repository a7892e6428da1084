"""The PyTorch reference of ``quantize`` (SPEC §2): the codes and scale the kernels must match bit for bit, the
stochastic noise drawn with the kernels' Philox numbers (``_rng``)."""
from __future__ import annotations

import math

import torch

from .. import _rng
from ._scale import scale_reference

__all__ = ["quantize_reference"]


def _codes_reference(v: torch.Tensor, bits: int, noise: torch.Tensor | None) -> torch.Tensor:
    """Codes from ``v = x / s`` (float32)."""
    S = float(2 ** (bits - 1))
    y = (v * S).clamp(-(S - 1), S - 1)
    y = torch.floor(y + noise) if noise is not None else torch.round(y)
    return torch.nan_to_num(y, nan=0.0).to(torch.int8)


def _noise_reference(shape, device, seed, ticket=None) -> torch.Tensor:
    """U[0, 1) per element, Philox on the element's row-major index (as the kernels draw it): ``seed``
    an int (ticket 0), or None: the device random state, which gives a ticket (``ebkernels._rng``), unless
    one was taken already (``ticket``)."""
    if seed is None:
        seed = _rng.device_state(device)[0]
        ticket = _rng.take_ticket_reference(device) if ticket is None else ticket
    else:
        ticket = 0
    n = math.prod(shape)
    return _rng.philox_uniform_reference(seed, ticket, torch.arange(n, device=device)).view(shape)


def quantize_reference(x: torch.Tensor, bits: int = 8, stochastic: bool = False, mode: str = "shift",
                       seed: int | None = 0, ticket=None):
    """PyTorch reference: ``(codes int8 like x, scale 0-dim float32)``; ``mode``: the scale rule
    (``_scale``). Stochastic noise: see ``_noise_reference`` (the same numbers as the kernels draw)."""
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())
    s = scale_reference(amax, mode, bits)
    noise = _noise_reference(tuple(xf.shape), x.device, seed, ticket) if stochastic else None
    codes = _codes_reference(xf / s, bits, noise)
    return codes, s
