"""The check every pruning ends with: the pruned network computes what the masked network computes.

The masked network is the dense one with gamma and beta of every BN channel the effective mask drops
set to 0, in eval mode: that channel's BN output is 0, so removing it changes nothing downstream. Both
run in float64 as plain float layers (int8 layers would pick other scales) on one seeded random input.
A difference means the model has an operation between coupled layers that does not map a zeroed
channel to zero (or a pruner bug): ``prune`` raises instead of returning a silently different network.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["masked_network", "max_difference", "check_equivalent", "TOLERANCE"]

TOLERANCE = 1e-7  # relative to the largest output; float64 reorderings are ~1e-13, real mismatches ~1


def _float64_eval(model: nn.Module) -> nn.Module:
    from ..convert import dequantize_model

    out = dequantize_model(copy.deepcopy(model))
    return out.to(torch.float64).eval()


def masked_network(model: nn.Module, effective: dict) -> nn.Module:
    """A float64 eval copy of ``model`` with gamma = beta = 0 where ``effective[bn_name]`` is False."""
    masked = _float64_eval(model)
    with torch.no_grad():
        for name, bn in masked.named_modules():
            if isinstance(bn, nn.BatchNorm2d) and name in effective:
                drop = ~effective[name].to(bn.weight.device)
                bn.weight[drop] = 0
                bn.bias[drop] = 0
    return masked


def max_difference(model: nn.Module, pruned: nn.Module, effective: dict, input_shape: tuple,
                   samples: int = 2) -> tuple[float, float]:
    """(largest |masked - pruned| output difference, largest |masked| output) on a seeded random input."""
    masked, small = masked_network(model, effective), _float64_eval(pruned)
    device = next(masked.parameters()).device
    x = torch.randn((samples, *input_shape[1:]), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(device)
    with torch.no_grad():
        want, got = masked(x), small(x)
    if want.shape != got.shape:
        return float("inf"), float(want.abs().max())
    return float((want - got).abs().max()), float(want.abs().max())


def check_equivalent(model: nn.Module, pruned: nn.Module, effective: dict, input_shape: tuple) -> float:
    """The largest output difference, relative; a ValueError when it is above :data:`TOLERANCE`."""
    diff, scale = max_difference(model, pruned, effective, input_shape)
    relative = diff / max(scale, 1e-30)
    if not relative <= TOLERANCE:
        raise ValueError(f"the pruned {type(model).__name__} does not compute what the dense network computes with "
                         f"the pruned channels zeroed (largest output difference {diff:.3g}, relative "
                         f"{relative:.3g}): an operation between coupled layers does not map a zeroed channel to "
                         f"zero; prune(..., verify=False) returns the network anyway")
    return relative
