"""The whole-model transform (SPEC §6): ``quantize_model`` swaps every eligible ``nn.Conv2d`` / ``nn.Linear``
of a model for ``QConv2d`` / ``QLinear`` (``modules``) and then lets ``fusion`` run the conv → BatchNorm →
activation chains of the model's traced graph as fused int8 blocks; ``dequantize_model`` undoes both.

Both *reuse the layer's Parameter objects* (no copy): an optimizer built before the swap keeps updating
the same tensors and its state (momentum buffers, keyed by Parameter) stays valid.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Callable, Iterable, Union

import torch.nn as nn

from .config import QConfig, as_qconfig
from .fusion import fuse as fuse_chains
from .fusion import unfuse
from .modules import QConv2d, QLinear

__all__ = ["quantize_model", "dequantize_model"]

SkipSpec = Union[None, str, Callable[[str, nn.Module], bool], Iterable[Union[str, Callable]]]

# --------------------------------------------------------------------------------------------------
# Exact types only: a subclass of nn.Conv2d/nn.Linear may override forward (or, like
# MultiheadAttention's out_proj, never have its forward called), so swapping it could change behaviour.
_FLOAT_TO_Q = {nn.Conv2d: QConv2d, nn.Linear: QLinear}
_Q_TYPES = (QConv2d, QLinear)


def _skip_matcher(skip: SkipSpec):
    """``skip`` as (name test, predicate test, the name patterns)."""
    if skip is None:
        items = []
    elif isinstance(skip, str) or callable(skip):
        items = [skip]
    else:
        try:
            items = list(skip)
        except TypeError:
            raise TypeError(f"skip must be a module name or glob pattern, a predicate (name, module) -> "
                            f"bool, or an iterable of those; got {type(skip).__name__}: {skip!r}") from None
    patterns, predicates = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif callable(item):
            predicates.append(item)
        else:
            raise TypeError(f"skip entry {item!r} ({type(item).__name__}) is not supported; accepted: a "
                            f"module name or glob pattern (str) or a predicate (name, module) -> bool")

    def name_matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def predicate_matches(name: str, module: nn.Module) -> bool:
        return any(bool(pred(name, module)) for pred in predicates)

    return name_matches, predicate_matches, patterns


def _swap(model: nn.Module, convert: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace modules top-down; ``convert(name, module)`` returns the replacement (``module`` itself
    to keep it and not look inside) or None to keep it and visit its children.

    A module reachable under several names (weight sharing) is converted once and the same new module
    is put at every place, so the sharing survives.
    """
    done: dict[int, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = convert(prefix, module)
        if new is None:
            new = module
            for child_name, child in list(module._modules.items()):
                if child is None:
                    continue
                qualified = f"{prefix}.{child_name}" if prefix else child_name
                replacement = visit(qualified, child)
                if replacement is not child:
                    module._modules[child_name] = replacement
        done[id(module)] = new
        return new

    return visit("", model)


def quantize_model(model: nn.Module, qconfig: QConfig | None = None, skip: SkipSpec = (),
                   inplace: bool = True, fuse: bool = True) -> nn.Module:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` for ``QConv2d`` / ``QLinear``.

    ``qconfig``: an ``ebkernels.QConfig`` for all swapped layers (default ``QConfig()``).
    ``skip``: layers to keep in float, given as qualified module names (as in ``named_modules()``),
    glob patterns (``"features.0"``, ``"classifier*"``, ``"*.downsample.*"``), a predicate
    ``(name, module) -> bool`` (called on eligible layers only), or an iterable mixing those. A name
    or pattern that matches a container skips everything inside it. ``first_and_last_layers(model)``
    names the first and last eligible layer (the usual ones to keep in float). A name pattern that
    matches no module gives a warning (likely a typo).
    ``inplace=True`` (default) swaps inside ``model`` and the new layers reuse the *same Parameter
    objects*, so an existing optimizer and its state keep working. ``inplace=False`` deep-copies the
    model first (new Parameters; the original is untouched).

    Eligible: modules whose type is exactly ``nn.Conv2d`` or ``nn.Linear`` (subclasses may override
    ``forward``, so they stay as they are); layers already quantized are left untouched, whatever
    their qconfig. Returns the model (the new layer itself if ``model`` is a bare eligible layer).

    ``fuse=True`` (default): the model is traced with ``torch.fx`` and every conv → BatchNorm → activation
    (→ max-pool), pre-activation BatchNorm → activation → conv and BatchNorm → activation chain of the graph
    then runs as a fused int8 block; chains hand each other int8 codes, and what runs between them (residual
    adds, concatenations, depthwise convs, the int8 layers outside chains) runs in bfloat16 with or without
    autocast (``ebkernels.fusion``; SPEC §9): same modules, Parameters, buffers, ``state_dict`` and type, far
    less saved memory. ``ebkernels.fusion.fused_chains(model)`` lists them (also logged at INFO level on the
    "ebkernels" logger, with a line for each module that keeps a chain from fusing, and why);
    ``fuse=False`` keeps every layer on its own.
    """
    qconfig = as_qconfig(qconfig)
    name_matches, predicate_matches, patterns = _skip_matcher(skip)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            warnings.warn(f"quantize_model: skip pattern {p!r} matches no module name of the model",
                          stacklevel=2)

    def convert(name: str, module: nn.Module):
        if name and name_matches(name):
            return module  # skipped with its whole subtree
        qcls = _FLOAT_TO_Q.get(type(module))
        if qcls is None:
            return None  # not a layer: look inside
        if predicate_matches(name, module):
            return module
        return qcls.from_float(module, qconfig)

    model = _swap(model, convert)
    if fuse:
        fuse_chains(model)
    return model


def dequantize_model(model: nn.Module, inplace: bool = True) -> nn.Module:
    """The inverse of ``quantize_model``: every ``QConv2d`` / ``QLinear`` becomes ``nn.Conv2d`` /
    ``nn.Linear`` with the same Parameter objects (``inplace=False`` deep-copies the model first)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    unfuse(model)
    return _swap(model, lambda name, m: m.to_float() if isinstance(m, _Q_TYPES) else None)
