"""``prune``: picks the engine (our families' hand-written pruner, or torch-pruning's graph for any CNN),
prunes a copy, reports the cost, and checks the result exactly (see the package docstring)."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .._checks import check_ratio
from ..models import current_cfg
from .costs import _input_shape, _unwrap, count_flops, count_params
from .coupling import check_rule
from .equivalence import check_equivalent
from .families import family_of, prune_family
from .masks import ChannelPlan, _split_mask, bn_layers

__all__ = ["prune", "ENGINES"]

ENGINES = ("auto", "family", "graph")


def _engine_for(model: nn.Module, engine: str) -> tuple[str, str | None]:
    """(engine, family): ``auto`` takes the hand-written pruner for ebkernels' families, torch-pruning else."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not supported; accepted: {', '.join(map(repr, ENGINES))}")
    family = family_of(model)
    if engine == "family" and family is None:
        raise TypeError(f"engine='family' prunes VGG and PreResNet from ebkernels.models and BasicBlock ResNets "
                        f"(torchvision resnet18/34 structure); got {type(model).__name__}: use engine='auto' or "
                        f"'graph' (torch-pruning) for other CNNs")
    if engine == "graph" and family == "preresnet":
        raise TypeError("engine='graph' cannot prune ebkernels' PreResNet: torch-pruning does not understand its "
                        "channel-gather buffer (ChannelSelection); use engine='auto' (its hand-written pruner)")
    if engine == "auto":
        engine = "family" if family is not None else "graph"
    return engine, (family if engine == "family" else None)


def _float_copy(model: nn.Module) -> tuple[nn.Module, bool]:
    """A copy for the graph engine: plain float layers (torch-pruning rebuilds nn.Conv2d/nn.Linear only)."""
    from ..convert import dequantize_model
    from ..modules import QConv2d, QLinear

    pruned = copy.deepcopy(model)
    quantized = any(isinstance(m, (QConv2d, QLinear)) for m in pruned.modules())
    return (dequantize_model(pruned) if quantized else pruned), quantized


def _fraction_removed(before: int, after: int) -> float:
    return 1.0 - after / before if before else 0.0


def prune(model: nn.Module, mask=None, *, ratio=None, input_shape=None, engine: str = "auto",
          coupled: str = "majority", verify: bool = True) -> tuple[nn.Module, dict]:
    """Physically prune a copy of ``model``; returns ``(pruned_model, report)`` (module docstring).

    mask: bool tensor over all BatchNorm2d channels in module order (True = keep), or
    ``{bn_module_name: bool tensor}`` (layers not named keep everything). With ``mask=None`` the
    mask is computed from the BN gammas at ``ratio`` (SPEC §3 rule); with both, ``ratio`` only labels
    the report. input_shape: (C, H, W) for the FLOP count, the exactness check and the graph engine's
    trace; default: the size a model from ``build_model`` is built for
    (``ebkernels.models.design_input_shape``); any other model needs it (a ValueError says so).
    engine: ``"auto"`` (default: ``"family"`` for ebkernels' own families, ``"graph"`` for any other
    CNN), ``"family"`` or ``"graph"``. coupled: the rule for
    channels the graph engine must remove together, ``"majority"`` (default), ``"any"`` or ``"all"``
    (``ebkernels.pruning.coupling``). verify: check the result against the masked network in float64
    (``ebkernels.pruning.equivalence``) and raise a ValueError if it differs.

    report: ``engine``, ``family`` (None for the graph engine), ``coupled`` (graph engine), ``ratio``,
    ``params_before/after``, ``flops_before/after`` (multiply-adds per sample), their ``*_reduction``
    (fraction removed), ``requested`` (graph engine: ``params``/``flops`` and their reductions if every
    coupled group kept the channels its BNs ask for on average; exact for uncoupled layers),
    ``input_shape``, ``channels_total``, ``channels_requested``, ``channels_kept``, ``layers`` (per BN:
    channels, requested, kept, role, groups), ``groups`` (graph engine: per coupled group its root,
    BNs, requested and kept width, channels kept or pruned against the mask), ``rescued`` (BNs the mask
    would have emptied), ``unapplied`` (BNs whose mask entries could not be applied),
    ``dequantized`` (the graph engine returns plain float layers), ``verified`` (relative output
    difference, or None), ``cfg`` (of the pruned model; None when it was not built by
    ``ebkernels.build_model``) and ``effective_mask`` (bool tensor). All but the last are JSON-able.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if ratio is not None:
        ratio = check_ratio(ratio)
    check_rule(coupled)
    model = _unwrap(model)
    bns = bn_layers(model)
    if not bns:
        raise ValueError(f"model ({type(model).__name__}) has no BatchNorm2d layers; channel pruning reads "
                         "importance from BN gammas (accepted: CNNs with BatchNorm2d after their convolutions)")
    for name, bn in bns:
        if bn.weight is None:
            raise ValueError(f"BatchNorm2d {name!r} has affine=False: no gamma to rank or rescue channels by")
    engine, family = _engine_for(model, engine)
    shape = _input_shape(model, input_shape)
    masks = _split_mask(bns, mask, ratio)

    quantized = False
    if engine == "family":
        pruned = copy.deepcopy(model)
    else:
        pruned, quantized = _float_copy(model)
    for p in pruned.parameters():
        p.grad = None
    plan = ChannelPlan(bn_layers(pruned), masks)
    outcome = None
    if engine == "family":
        with torch.no_grad():
            prune_family(pruned, plan, family)
    else:
        from .graph import prune_graph

        outcome = prune_graph(pruned, plan, shape, coupled)

    if plan.rescued:
        shown = ", ".join(plan.rescued[:8]) + (f" and {len(plan.rescued) - 8} more" if len(plan.rescued) > 8 else "")
        warnings.warn(f"the mask prunes every channel of {len(plan.rescued)} layer(s): {shown}; each (each coupled "
                      "group) keeps its largest-|gamma| channel so no layer is empty (listed in report['rescued'])",
                      stacklevel=2)
    verified = check_equivalent(model, pruned, plan.effective, shape) if verify else None
    params_before, params_after = count_params(model), count_params(pruned)
    flops_before, flops_after = count_flops(model, shape), count_flops(pruned, shape)
    effective = torch.cat([plan.effective[n] for n in plan.order])
    requested = None
    if outcome is not None:
        params_req, flops_req = outcome.cost.at(outcome.requested)
        requested = {"params": params_req, "flops": flops_req,
                     "params_reduction": _fraction_removed(params_before, params_req),
                     "flops_reduction": _fraction_removed(flops_before, flops_req)}
    try:
        cfg = current_cfg(pruned)
    except (TypeError, ValueError):  # a model from outside build_model has no cfg to rebuild it by
        cfg = None
    report: dict[str, Any] = {
        "engine": engine,
        "family": family,
        "coupled": coupled if engine == "graph" else None,
        "ratio": ratio,
        "params_before": params_before, "params_after": params_after,
        "params_reduction": _fraction_removed(params_before, params_after),
        "flops_before": flops_before, "flops_after": flops_after,
        "flops_reduction": _fraction_removed(flops_before, flops_after),
        "requested": requested,
        "input_shape": list(shape[1:]),
        "channels_total": int(effective.numel()),
        "channels_requested": int(sum(int(m.sum()) for m in masks)),
        "channels_kept": int(effective.sum()),
        "layers": [plan.layers[n] for n in plan.order],
        "groups": outcome.groups if outcome is not None else [],
        "rescued": plan.rescued,
        "unapplied": plan.unapplied,
        "dequantized": quantized,
        "verified": verified,
        "cfg": cfg,
        "effective_mask": effective,
    }
    return pruned, report
