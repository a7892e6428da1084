"""Physical channel pruning of a drawn ticket, its cost, re-initialisation, and ticket files (SPEC §4).

``prune(model, mask)`` returns a smaller copy whose layers hold copied slices of the original
weights. The mask covers every ``nn.BatchNorm2d`` in ``model.modules()`` order (True = keep), the
order of ``ebkernels.channel_mask``; or it is a dict ``{bn_module_name: bool tensor}``.

- ``families.py``: ebkernels' own families (VGG, pre-activation ResNet, BasicBlock ResNet), pruned
  by hand-written, exactly tested rules.
- ``costs.py``: parameters and multiply-adds; ``masks.py``: the mask layout and per-BN bookkeeping;
  ``tickets.py``: ``reinit``, ``save_ticket``, ``load_ticket``.

No layer is left with zero channels: a layer whose mask keeps nothing keeps its largest-|gamma|
channel, with a warning, and is listed in ``report["rescued"]``.

``report["effective_mask"]`` is the mask the pruned network implements: zeroing gamma and beta of
every BN channel where it is False gives a network that computes the same outputs in eval mode.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .._checks import check_ratio
from ..models import current_cfg
from .costs import _input_shape, _unwrap, count_flops, count_params
from .families import family_of, prune_family
from .masks import ChannelPlan, _split_mask, bn_layers
from .tickets import load_ticket, reinit, save_ticket

__all__ = ["prune", "count_params", "count_flops", "reinit", "save_ticket", "load_ticket", "bn_layers"]


def prune(model: nn.Module, mask=None, *, ratio=None, input_shape=None) -> tuple[nn.Module, dict]:
    """Physically prune a copy of ``model``; returns ``(pruned_model, report)`` (module docstring).

    mask: bool tensor over all BatchNorm2d channels in module order (True = keep), or
    ``{bn_module_name: bool tensor}`` (layers not named keep everything). With ``mask=None`` the
    mask is computed from the BN gammas at ``ratio`` (SPEC §3 rule); with both, ``ratio`` only labels
    the report. input_shape: (C, H, W) for the FLOP count, default (first conv's channels, 32, 32).

    report: ``family``, ``ratio``, ``params_before/after``, ``flops_before/after`` (multiply-adds per
    sample), their ``*_reduction`` (fraction removed), ``input_shape``, ``channels_total``,
    ``channels_kept``, ``layers`` (per BN: channels, requested, kept, role), ``rescued`` (layers the
    mask would have emptied), ``unapplied`` (stream BNs whose mask entries could not be applied),
    ``cfg`` (of the pruned model) and ``effective_mask`` (bool tensor, see module docstring). All
    but the last are JSON-able.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if ratio is not None:
        ratio = check_ratio(ratio)
    model = _unwrap(model)
    bns = bn_layers(model)
    if not bns:
        raise ValueError(f"model ({type(model).__name__}) has no BatchNorm2d layers; channel pruning "
                         "reads importance from BN gammas (accepted: VGG, PreResNet, ResNet with BN)")
    for name, bn in bns:
        if bn.weight is None:
            raise ValueError(f"BatchNorm2d {name!r} has affine=False: no gamma to rank or rescue channels by")
    family = family_of(model)
    if family is None:
        raise TypeError(f"prune supports VGG and PreResNet from ebkernels.models and BasicBlock ResNets "
                        f"(torchvision resnet18/34 structure); got {type(model).__name__}")
    shape = _input_shape(model, input_shape)
    masks = _split_mask(bns, mask, ratio)

    pruned = copy.deepcopy(model)
    for p in pruned.parameters():
        p.grad = None
    plan = ChannelPlan(bn_layers(pruned), masks)
    with torch.no_grad():
        prune_family(pruned, plan, family)

    if plan.rescued:
        warnings.warn(f"the mask prunes every channel of {len(plan.rescued)} layer(s): "
                      f"{', '.join(plan.rescued)}; each keeps its largest-|gamma| channel so no layer is "
                      "empty (listed in report['rescued'])", stacklevel=2)
    params_before, params_after = count_params(model), count_params(pruned)
    flops_before, flops_after = count_flops(model, shape), count_flops(pruned, shape)
    effective = torch.cat([plan.effective[n] for n in plan.order])
    report: dict[str, Any] = {
        "family": family,
        "ratio": ratio,
        "params_before": params_before, "params_after": params_after,
        "params_reduction": 1.0 - params_after / params_before,
        "flops_before": flops_before, "flops_after": flops_after,
        "flops_reduction": 1.0 - flops_after / flops_before if flops_before else 0.0,
        "input_shape": list(shape[1:]),
        "channels_total": int(effective.numel()),
        "channels_kept": int(effective.sum()),
        "layers": [plan.layers[n] for n in plan.order],
        "rescued": plan.rescued,
        "unapplied": plan.unapplied,
        "cfg": current_cfg(pruned),
        "effective_mask": effective,
    }
    return pruned, report
