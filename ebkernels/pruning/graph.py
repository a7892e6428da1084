"""Pruning any CNN through torch-pruning's dependency graph (models outside ebkernels' own families).

torch-pruning (MIT, pure Python, imported only here and only when needed) traces the model once and
groups the channels that must be removed together (``coupling.py`` explains the groups and the rule
that decides them). Only groups that contain a BatchNorm2d are pruned: the mask has no say over the
others (a classifier's hidden width, an SE block's squeeze width), which keep every channel.

What a coupled group may contain, so that removing a channel equals zeroing its BNs: Conv2d with
``groups=1`` or depthwise (``groups == in == out``), BatchNorm2d, Linear, concatenation,
split, flatten/view and the channel-wise operations in ``POINTWISE_OPS``. Anything else (LayerNorm,
GroupNorm, a grouped convolution, an op that mixes channels) is a ValueError naming the module.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .coupling import CoupledGroup, GroupCost, decide
from .masks import ChannelPlan

__all__ = ["import_torch_pruning", "prune_graph", "POINTWISE_OPS", "GRAPH_SUPPORTED"]

# autograd nodes (name without "Backward<n>") that act on each channel separately: removing a channel
# from their input removes it from their output and changes nothing else
POINTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Hardtanh", "Clamp", "Hardswish", "Hardsigmoid", "Silu",
    "Sigmoid", "Tanh", "Gelu", "LeakyRelu", "Elu", "MaxPool2DWithIndices", "MaxPool2D", "AvgPool2D",
    "AdaptiveAvgPool2D", "AdaptiveMaxPool2D", "Mean", "T", "Clone", "ToCopy",
})
GRAPH_SUPPORTED = ("Conv2d (groups=1 or depthwise), BatchNorm2d, Linear, concatenation, split, "
                   "flatten/view and channel-wise operations (activations, pooling, add, multiply)")


def import_torch_pruning(what: str):
    """The torch_pruning module, or an ImportError that says what needs it and how to get it."""
    try:
        import torch_pruning
    except ImportError:
        raise ImportError(f"pruning {what} needs torch-pruning (`pip install torch-pruning`, MIT, pure Python; "
                          "it is in requirements.txt). ebkernels' own families (VGG, PreResNet, BasicBlock "
                          "ResNets) are pruned without it.") from None
    return torch_pruning


@dataclasses.dataclass
class GraphOutcome:
    groups: list          # one JSON-able line per pruned group
    cost: GroupCost       # prices any choice of group widths
    requested: list       # per group: the width its BNs ask for on average
    achieved: list        # per group: the width it has now


def _op_name(module) -> str:
    raw = getattr(module, "_grad_fn", "Unknown")
    return re.sub(r"Backward\d*$", "", str(raw))


def _check_member(tp, dg, item, names: dict, root: str, sinks: set) -> bool:
    """Raise for a layer a group may not contain; True when the group reaches the model's output (an
    output node, or the output channels of a layer whose result nothing else reads)."""
    target = item.dep.target
    kind, module = target.type, target.module
    if id(module) in sinks and (isinstance(module, nn.BatchNorm2d) or dg.is_out_channel_pruning_fn(item.dep.handler)):
        return True
    where = f"in the channel group of {root!r}"
    if kind in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.DEPTHWISE_CONV):
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise ValueError(f"grouped convolution {names.get(module)!r} (groups={module.groups}, "
                             f"{module.in_channels}->{module.out_channels} channels) {where} cannot lose single "
                             f"channels; supported: {GRAPH_SUPPORTED}")
        return False
    if kind == tp.ops.OPTYPE.BN:
        if not isinstance(module, nn.BatchNorm2d):
            raise ValueError(f"{type(module).__name__} {names.get(module)!r} {where} is not supported "
                             f"(zeroing a BatchNorm2d channel does not zero its output); supported: {GRAPH_SUPPORTED}")
        return False
    if kind in (tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.RESHAPE):
        return False
    if kind == tp.ops.OPTYPE.OUTPUT:
        return True
    if kind == tp.ops.OPTYPE.ELEMENTWISE and _op_name(module) in POINTWISE_OPS:
        return False
    label = (f"{type(module).__name__} {names[module]!r}" if module in names
             else f"operation {_op_name(module)!r} ({kind.name.lower()})")
    raise ValueError(f"{label} {where} is not supported: removing a channel there is not the same as zeroing "
                     f"it; supported: {GRAPH_SUPPORTED}")


def _trace(tp, model: nn.Module, input_shape: tuple):
    param = next(model.parameters())
    example = torch.zeros(input_shape, device=param.device, dtype=param.dtype)
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as exc:
        raise ValueError(f"torch-pruning cannot trace {type(model).__name__} on an input of shape "
                         f"{tuple(input_shape)} ({type(exc).__name__}: {exc}); supported: CNNs whose channels "
                         f"flow through {GRAPH_SUPPORTED}") from exc


def _collect(tp, dg, names: dict, plan: ChannelPlan):
    """``[(CoupledGroup, cuts)]`` of the groups with a BN, plus the BNs whose group
    reaches the model's output (they stay whole). A cut is ``(dependency, module name, "in" | "out",
    dense indices, their root channels)`` for every Conv2d/Linear/BN dimension of the group."""
    groups, output_bns = [], set()
    sinks = {id(node.module) for node in dg.module2node.values() if not node.outputs}
    for g in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        items = list(g)
        bn_items = [it for it in items if isinstance(it.dep.target.module, nn.BatchNorm2d)]
        if not bn_items:
            continue
        root = names[items[0].dep.target.module]
        if any([_check_member(tp, dg, it, names, root, sinks) for it in items]):
            output_bns |= {names[it.dep.target.module] for it in bn_items}
            continue
        n = len(items[0].idxs)
        bn_channels, members, cuts = {}, {}, []
        for it in items:
            module = it.dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                continue
            name = names[module]
            # a BN or a depthwise conv has one width: its inputs and outputs are the same channels
            one_width = isinstance(module, nn.BatchNorm2d) or (isinstance(module, nn.Conv2d) and module.groups > 1)
            dim = "out" if one_width or dg.is_out_channel_pruning_fn(it.dep.handler) else "in"
            members[(name, dim)] = max(members.get((name, dim), 0), len(it.idxs))
            cuts.append((it.dep, name, dim, list(it.idxs), list(it.root_idxs)))
            if isinstance(module, nn.BatchNorm2d):
                channel_of = bn_channels.setdefault(name, [-1] * n)
                for idx, root_idx in zip(it.idxs, it.root_idxs):
                    channel_of[root_idx] = int(idx)
        group = CoupledGroup(root=root, channels=n, bn_channels=bn_channels,
                             members=[(k[0], k[1], v) for k, v in members.items()], index=len(groups))
        groups.append((group, cuts))
    return groups, output_bns


def _check_coverage(plan: ChannelPlan, groups, output_bns: set, traced: set) -> None:
    """Every BN the forward reaches must be fed by a conv/linear whose group covers all its channels."""
    covered = {n: torch.zeros(plan.bns[n].num_features, dtype=torch.bool) for n in plan.order}
    for group, _ in groups:
        for bn, channel_of in group.bn_channels.items():
            channel_of = torch.as_tensor(channel_of)
            covered[bn][channel_of[channel_of >= 0]] = True
    for name in plan.order:
        if name in output_bns or name not in traced:
            continue
        missing = (~covered[name]).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"BatchNorm2d {name!r} is not fed by a convolution or linear layer for channel(s) "
                             f"{missing[:8]}{'...' if len(missing) > 8 else ''} (e.g. it normalises the input "
                             f"image): its channels cannot be pruned; supported: BatchNorm2d layers that "
                             f"normalise the output of a Conv2d/Linear, directly or through {GRAPH_SUPPORTED}")


def _collect_removals(cuts, keep: torch.Tensor, removals: dict) -> None:
    """Add the dense-network indices a group drops to ``removals[(module, dim)] = (dependency, indices)``.

    Every module dimension is then cut once, by the indices of the dense network: no index shifts
    between groups (a DenseNet BN spans several), and no re-tracing per group (torch-pruning's own
    group-by-group pruning rebuilds all concatenation offsets each time: seconds on DenseNet-121).
    A BN's or depthwise conv's one width appears under both handlers; it is cut once.
    """
    for dep, name, dim, idxs, root_idxs in cuts:
        dropped = {int(i) for i, r in zip(idxs, root_idxs) if not bool(keep[r])}
        removals.setdefault((name, dim), (dep, set()))[1].update(dropped)


def prune_graph(model: nn.Module, plan: ChannelPlan, input_shape: tuple, rule: str) -> GraphOutcome:
    """Prune ``model`` (a float copy: changed in place) by the coupled-group ``rule``, recording into ``plan``."""
    tp = import_torch_pruning(f"a {type(model).__name__}")
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)  # the trace follows autograd
        dg = _trace(tp, model, input_shape)
    finally:
        for m, mode in modes.items():
            m.training = mode
    names = {m: n for n, m in model.named_modules()}
    groups, output_bns = _collect(tp, dg, names, plan)
    traced = {names[m] for m in dg.module2node if isinstance(m, nn.BatchNorm2d) and m in names}
    _check_coverage(plan, groups, output_bns, traced)
    cost = GroupCost(model, [g for g, _ in groups], input_shape)

    gammas = {n: bn.weight.detach().cpu().clone() for n, bn in plan.bns.items()}
    effective = {n: torch.ones(plan.bns[n].num_features, dtype=torch.bool) for n in plan.order}
    where = {}
    lines, requested, achieved, removals = [], [], [], {}
    for group, cuts in groups:
        keep, rescued = decide(group, plan.masks, gammas, rule)
        if rescued:
            plan.rescued.extend(sorted(group.bn_channels))
        keep_votes, seen = group.votes(plan.masks)
        for bn, channel_of in group.bn_channels.items():
            channel_of = torch.as_tensor(channel_of)
            hit = channel_of >= 0
            effective[bn][channel_of[hit]] = keep[hit]
            where.setdefault(bn, []).append(group)
        requested.append(group.requested_width(plan.masks))
        achieved.append(int(keep.sum()))
        lines.append({"index": group.index, "root": group.root, "channels": group.channels,
                      "bns": sorted(group.bn_channels), "requested": requested[-1], "kept": achieved[-1],
                      "rescued": rescued,
                      "kept_against_mask": int((keep * (seen - keep_votes)).sum()),
                      "pruned_against_mask": int((~keep * keep_votes).sum())})
        _collect_removals(cuts, keep, removals)
    with torch.no_grad():
        for dep, idxs in removals.values():
            if idxs:
                dep(sorted(idxs))
    for n, p in model.named_parameters():
        p.requires_grad_(grad_flags.get(n, True))

    for name in plan.order:
        if name in where:
            partners = set().union(*(g.bn_channels for g in where[name])) - {name}
            role = f"coupled with {len(partners)} other BN(s) ({rule})" if partners else "pruned"
            plan.decided(name, effective[name], role, groups=[g.index for g in where[name]])
        else:
            plan.whole(name, "feeds the model output (kept whole)" if name in output_bns
                       else "not reached by the forward (kept whole)")
        if plan.bns[name].num_features != plan.layers[name]["kept"]:  # torch-pruning did what we decided
            raise RuntimeError(f"internal error: BatchNorm2d {name!r} has {plan.bns[name].num_features} channels "
                               f"after pruning, the plan keeps {plan.layers[name]['kept']}")
    return GraphOutcome(groups=lines, cost=cost, requested=requested, achieved=achieved)
