"""Models of the early-bird experiments and a name registry.

``build_model(name, num_classes=10, in_channels=3, **kw)`` accepts:

- ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` (kw: ``width``, ``cfg``),
- ``preresnet<depth>`` with depth = 9n+2 (``preresnet20``, ``preresnet56``, ``preresnet101``, …;
  kw: ``width``, ``cfg``),
- ``resnet18`` (torchvision's structure; kw: ``cfg``, ``use_torchvision``),
- ``torchvision:<name>``: any torchvision classification model (``torchvision:resnet50``,
  ``torchvision:mobilenet_v2``, ...; kw: ``small_stem``, ``cfg``), see ``torchvision_models.py``.

Every model it returns carries ``ebk_arch`` (name and constructor arguments), so
:func:`architecture` can describe it — pruned or not — as JSON-able data that rebuilds it.
"""
from __future__ import annotations

import re

from torch import nn

from .preresnet import Bottleneck, ChannelSelection, PreResNet, preresnet_blocks_per_stage, preresnet_cfg
from .resnet import ResNet, is_basic_resnet, resnet18, resnet_cfg
from .torchvision_models import PREFIX as TORCHVISION_PREFIX
from .torchvision_models import build_torchvision, is_torchvision_name, layer_widths
from .vgg import VGG, VGG_CFGS, vgg_cfg

__all__ = [
    "build_model", "model_names", "architecture", "VGG", "PreResNet", "Bottleneck", "ChannelSelection",
    "ResNet", "resnet18", "vgg_cfg", "preresnet_cfg", "is_grouped_conv", "layer_widths", "TORCHVISION_PREFIX",
    "design_input_shape",
]

_PRERESNET = re.compile(r"preresnet(\d+)")


def model_names() -> list[str]:
    """Accepted names (preresnet accepts any depth 9n+2; common ones are listed)."""
    return ([f"vgg{d}" for d in sorted(VGG_CFGS)]
            + [f"preresnet{d}" for d in (11, 20, 29, 38, 47, 56, 101, 110, 164)] + ["resnet18"])


def _unknown(name) -> ValueError:
    return ValueError(f"unknown model name {name!r}; accepted: {', '.join(model_names())} "
                      "(preresnet<depth> takes any depth 9n+2), or torchvision:<name> for any torchvision "
                      "classification model (torchvision:resnet50, torchvision:mobilenet_v2, ...)")


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build a model by name; ``cfg=`` rebuilds a pruned architecture (see module docstring)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if is_torchvision_name(key):
        unknown = sorted(k for k in kw if k not in ("small_stem", "cfg"))
        if unknown:
            raise ValueError(f"{name!r} does not take {', '.join(unknown)}; accepted keyword arguments for "
                             f"torchvision models: small_stem, cfg")
        model = build_torchvision(key[len(TORCHVISION_PREFIX):], num_classes=num_classes, in_channels=in_channels,
                                  **kw)
    elif key.startswith("vgg") and key[3:].isdigit():
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


def is_grouped_conv(name: str, module: nn.Module) -> bool:
    """True for a Conv2d with ``groups > 1`` (depthwise included): a ``quantize_model`` skip predicate.

    The int8 kernels run grouped convolutions on a slow reference path; the trainer keeps them in float
    (``quantize_model(model, skip=is_grouped_conv)``) and says how many it kept.
    """
    return isinstance(module, nn.Conv2d) and module.groups > 1


def current_cfg(model: nn.Module):
    """The cfg of a VGG, PreResNet or BasicBlock ResNet, read from its layers; of a ``torchvision:``
    model, its :func:`layer_widths` record."""
    if is_torchvision_name(getattr(model, "ebk_arch", {}).get("name")):
        return layer_widths(model)
    if isinstance(model, (VGG, PreResNet)):
        return model.cfg
    if is_basic_resnet(model):
        return resnet_cfg(model)
    raise TypeError(f"no cfg for a {type(model).__name__}; accepted: VGG, PreResNet, BasicBlock ResNet, "
                    f"models built by build_model('torchvision:<name>')")


def design_input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) of the images a model from :func:`build_model` is built for; None for any other model.

    C is the ``in_channels`` it was built with; H×W is 32×32 for VGG and PreResNet (the paper's CIFAR
    networks) and for torchvision models built with ``small_stem=True``, 224×224 for resnet18 and
    torchvision models with their ImageNet stem. All of them end in a global average pool and run on
    other sizes as well: this is the size their FLOPs are quoted at when no other is given.
    """
    arch = getattr(model, "ebk_arch", None)
    if not isinstance(arch, dict) or not isinstance(arch.get("in_channels"), int):
        return None
    cifar = isinstance(model, (VGG, PreResNet)) or bool(arch.get("kwargs", {}).get("small_stem"))
    side = 32 if cifar else 224
    return (arch["in_channels"], side, side)


def architecture(model: nn.Module) -> dict:
    """JSON-able description (name, num_classes, in_channels, kwargs, cfg) that rebuilds ``model``."""
    arch = getattr(model, "ebk_arch", None)
    if not isinstance(arch, dict):
        raise ValueError(f"this {type(model).__name__} was not built by ebkernels.models.build_model, so "
                         "its architecture cannot be described; build it with build_model(name, ...)")
    return {**arch, "kwargs": dict(arch.get("kwargs", {})), "cfg": current_cfg(model)}
