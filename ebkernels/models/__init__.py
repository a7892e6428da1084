"""Models of the early-bird experiments and a name registry.

``build_model(name, num_classes=10, in_channels=3, **kw)`` accepts:

- ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` (kw: ``width``, ``cfg``),
- ``preresnet<depth>`` with depth = 9n+2 (``preresnet20``, ``preresnet56``, ``preresnet101``, …;
  kw: ``width``, ``cfg``),
- ``resnet18`` (torchvision's structure; kw: ``cfg``, ``use_torchvision``).

Every model it returns carries ``ebk_arch`` (name and constructor arguments), so
:func:`architecture` can describe it — pruned or not — as JSON-able data that rebuilds it.
"""
from __future__ import annotations

import re

from torch import nn

from .preresnet import Bottleneck, ChannelSelection, PreResNet, preresnet_blocks_per_stage, preresnet_cfg
from .resnet import ResNet, is_basic_resnet, resnet18, resnet_cfg
from .vgg import VGG, VGG_CFGS, vgg_cfg

__all__ = [
    "build_model", "model_names", "architecture", "VGG", "PreResNet", "Bottleneck", "ChannelSelection",
    "ResNet", "resnet18", "vgg_cfg", "preresnet_cfg",
]

_PRERESNET = re.compile(r"preresnet(\d+)")


def model_names() -> list[str]:
    """Accepted names (preresnet accepts any depth 9n+2; common ones are listed)."""
    return ([f"vgg{d}" for d in sorted(VGG_CFGS)]
            + [f"preresnet{d}" for d in (11, 20, 29, 38, 47, 56, 101, 110, 164)] + ["resnet18"])


def _unknown(name) -> ValueError:
    return ValueError(f"unknown model name {name!r}; accepted: {', '.join(model_names())} "
                      "(preresnet<depth> takes any depth 9n+2)")


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build a model by name; ``cfg=`` rebuilds a pruned architecture (see module docstring)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key.startswith("vgg") and key[3:].isdigit():
        depth = int(key[3:])
        if depth not in VGG_CFGS:
            raise _unknown(name)
        model = VGG(depth, num_classes=num_classes, in_channels=in_channels, **kw)
    elif _PRERESNET.fullmatch(key):
        depth = int(_PRERESNET.fullmatch(key).group(1))
        try:
            preresnet_blocks_per_stage(depth)
        except ValueError as exc:
            raise ValueError(f"unknown model name {name!r}: {exc}") from None
        model = PreResNet(depth, num_classes=num_classes, in_channels=in_channels, **kw)
    elif key == "resnet18":
        model = resnet18(num_classes=num_classes, in_channels=in_channels, **kw)
    else:
        raise _unknown(name)
    extra = {k: v for k, v in kw.items() if k not in ("cfg", "use_torchvision")}
    # plain data only: this is what a saved ticket stores to rebuild the model
    model.ebk_arch = {"name": key, "num_classes": num_classes, "in_channels": in_channels, "kwargs": extra}
    return model


def current_cfg(model: nn.Module) -> list:
    """The cfg of a VGG, PreResNet or BasicBlock ResNet, read from its layers."""
    if isinstance(model, (VGG, PreResNet)):
        return model.cfg
    if is_basic_resnet(model):
        return resnet_cfg(model)
    raise TypeError(f"no cfg for a {type(model).__name__}; accepted: VGG, PreResNet, BasicBlock ResNet")


def architecture(model: nn.Module) -> dict:
    """JSON-able description (name, num_classes, in_channels, kwargs, cfg) that rebuilds ``model``."""
    arch = getattr(model, "ebk_arch", None)
    if not isinstance(arch, dict):
        raise ValueError(f"this {type(model).__name__} was not built by ebkernels.models.build_model, so "
                         "its architecture cannot be described; build it with build_model(name, ...)")
    return {**arch, "kwargs": dict(arch.get("kwargs", {})), "cfg": current_cfg(model)}
