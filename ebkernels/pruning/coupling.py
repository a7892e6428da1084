"""Coupled channel groups: the rule that decides them, and what the mask's request would have cost.

In an arbitrary CNN some channels cannot be removed from one layer alone: the residual stream of a
bottleneck ResNet is written by the last BN of every block of a stage and by the downsample BN; a
DenseNet channel, once concatenated, is read by the first BN of every later layer of its block; a
depthwise convolution ties the BN before it to the BN after it. torch-pruning finds these groups; the
early-bird mask, drawn from one global |gamma| ranking over all BNs (SPEC §3), has one vote per coupled
BN channel, and they may disagree. The rule turns the votes of a group channel into one decision:

- ``majority`` (default): keep the channel when more than half of its coupled BN channels keep it,
  prune it when fewer than half do. Tied channels (one BN of two says keep: MobileNet's depthwise
  pairs, two of a ResNet-50 stage's four stream BNs) are kept in the order of their mean |gamma|
  over the coupled BNs, until the group has the width its BNs ask for on average. So a group keeps
  about as many channels as its BNs ask for, and which ones follows the votes, then the ranking.
- ``any``: keep it when any coupled BN keeps it (every BN has a veto against pruning: never prunes a
  channel the mask keeps, keeps far more than asked on long residual streams).
- ``all``: keep it only when every coupled BN keeps it (prunes every channel any BN drops).

A group with one BN (the conv→BN chains) implements the mask exactly under every rule. A group that
would keep no channel keeps the one with the largest mean |gamma| over its BNs (never a zero-width
layer). :class:`GroupCost` prices a choice of group widths, which is how the report gives the
parameters and multiply-adds the mask asked for next to those achieved.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

__all__ = ["COUPLED_RULES", "CoupledGroup", "check_rule", "decide", "GroupCost"]

COUPLED_RULES = ("majority", "any", "all")


def check_rule(rule) -> str:
    if rule not in COUPLED_RULES:
        raise ValueError(f"coupled={rule!r} is not supported; accepted: {', '.join(map(repr, COUPLED_RULES))}")
    return rule


@dataclasses.dataclass
class CoupledGroup:
    """Channels that torch-pruning removes together, described by module names (plain data).

    ``bn_channels[bn]`` lists, for each root channel, the channel of BN ``bn`` it is (or -1 where the
    BN does not see that root channel). ``members`` are ``(module name, "in" | "out", entries)``:
    ``entries`` of that dimension belong to this group (a multiple of ``channels``, e.g. 49 per channel
    for the classifier after a 7×7 flatten).
    """

    root: str
    channels: int
    bn_channels: dict
    members: list
    index: int = 0

    def votes(self, masks: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep votes, BN channels) per root channel."""
        keep = torch.zeros(self.channels, dtype=torch.long)
        seen = torch.zeros(self.channels, dtype=torch.long)
        for bn, channel_of in self.bn_channels.items():
            channel_of = torch.as_tensor(channel_of)
            where = channel_of >= 0
            keep[where] += masks[bn][channel_of[where]].long()
            seen[where] += 1
        return keep, seen

    def requested_width(self, masks: dict) -> int:
        """How many channels the group's BNs ask to keep, on average over the BNs (at least 1)."""
        keeps = []
        for bn, channel_of in self.bn_channels.items():
            channel_of = torch.as_tensor(channel_of)
            keeps.append(int(masks[bn][channel_of[channel_of >= 0]].sum()))
        return max(1, round(sum(keeps) / len(keeps))) if keeps else self.channels


def _mean_abs_gamma(group: CoupledGroup, gammas: dict) -> torch.Tensor:
    total = torch.zeros(group.channels, dtype=torch.float64)
    seen = torch.zeros(group.channels, dtype=torch.float64)
    for bn, channel_of in group.bn_channels.items():
        channel_of = torch.as_tensor(channel_of)
        where = channel_of >= 0
        total[where] += gammas[bn][channel_of[where]].double().abs()
        seen[where] += 1
    return total / seen.clamp(min=1)


def decide(group: CoupledGroup, masks: dict, gammas: dict, rule: str) -> tuple[torch.Tensor, bool]:
    """(keep flag per root channel, whether the no-empty-layer rescue was needed)."""
    keep_votes, seen = group.votes(masks)
    if rule == "majority":
        keep = 2 * keep_votes > seen
        tied = ((2 * keep_votes == seen) & (seen > 0)).nonzero().flatten()
        room = group.requested_width(masks) - int(keep.sum())
        if room > 0 and tied.numel():
            order = torch.argsort(_mean_abs_gamma(group, gammas)[tied], descending=True, stable=True)
            keep[tied[order[:room]]] = True
    elif rule == "any":
        keep = keep_votes > 0
    else:
        keep = keep_votes == seen
    keep |= seen == 0  # a root channel no BN sees has no vote against it
    if bool(keep.any()):
        return keep, False
    keep[int(torch.argmax(_mean_abs_gamma(group, gammas)))] = True
    return keep, True


def _is_depthwise(m: nn.Conv2d) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


class GroupCost:
    """Parameters and multiply-adds of the model when each coupled group keeps a given number of channels.

    Built once on the dense model: one no-grad pass records the output positions of every Conv2d and
    Linear (as :func:`ebkernels.count_flops` counts them); parameters outside Conv2d/Linear/BatchNorm2d
    are counted as they are. ``at(widths)`` is exact for any group widths: at the achieved widths it
    equals ``count_params`` / ``count_flops`` of the pruned network (tested).
    """

    def __init__(self, model: nn.Module, groups: list, input_shape: tuple):
        self.groups = groups
        modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
        counted = {id(p) for m in modules.values() for p in m.parameters(recurse=False)}
        self.other_params = sum(p.numel() for p in model.parameters() if id(p) not in counted)
        positions = _output_positions(model, modules, input_shape)
        # the dense shapes, read now: pruning changes these modules in place afterwards
        self.layers = {}
        for name, m in modules.items():
            if isinstance(m, nn.BatchNorm2d):
                self.layers[name] = ("bn", m.num_features, m.num_features, 1, 0, m.weight is not None, 0)
            elif isinstance(m, nn.Conv2d):
                kind = "depthwise" if _is_depthwise(m) else "conv"
                self.layers[name] = (kind, m.in_channels, m.out_channels, m.groups, math.prod(m.kernel_size),
                                     m.bias is not None, positions[name])
            else:
                self.layers[name] = ("linear", m.in_features, m.out_features, 1, 1, m.bias is not None,
                                     positions[name])

    def at(self, widths: list) -> tuple[int, int]:
        removed: dict[tuple[str, str], int] = {}
        for group, width in zip(self.groups, widths):
            drop = group.channels - int(width)
            for name, dim, entries in group.members:
                removed[(name, dim)] = removed.get((name, dim), 0) + drop * entries // group.channels
        params, flops = self.other_params, 0
        for name, (kind, full_in, full_out, groups, kernel, bias, positions) in self.layers.items():
            out = full_out - removed.get((name, "out"), 0)
            if kind == "bn":
                params += 2 * out if bias else 0  # bias here: affine
                continue
            cin = full_in - removed.get((name, "in"), 0)
            if kind == "depthwise":  # one width: in = out = groups
                per_output = kernel
            elif kind == "conv":
                per_output = cin // groups * kernel
            else:
                per_output = cin
            params += out * per_output + (out if bias else 0)
            flops += positions * out * per_output
        return params, flops


def _output_positions(model: nn.Module, layers: dict, input_shape: tuple) -> dict:
    """Output positions per sample (H*W of a conv, leading dims of a linear) of every Conv2d/Linear."""
    positions: dict[str, int] = {}
    handles = []
    for name, m in layers.items():
        if isinstance(m, nn.BatchNorm2d):
            continue
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features

        def hook(_m, _inputs, output, name=name, width=width):
            positions[name] = positions.get(name, 0) + output.numel() // (input_shape[0] * width)
        handles.append(m.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    for name, m in layers.items():  # a layer the forward never reaches costs nothing (count_flops agrees)
        if not isinstance(m, nn.BatchNorm2d):
            positions.setdefault(name, 0)
    return positions
