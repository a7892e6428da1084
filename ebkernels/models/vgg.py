"""CIFAR-style VGG with BatchNorm, the network-slimming / early-bird reference layout.

``features``: conv3x3(bias=False) → BatchNorm2d → ReLU stacks with 2×2 max-pools ("M" in the cfg);
then a global average pool and one ``Linear`` classifier, as in the EB reference code. Two
deliberate generalisations that leave 32×32 CIFAR results unchanged:

- pools use ``ceil_mode=True`` so small inputs (e.g. 8×8 greyscale digits) survive four pools
  (an even-sized map pools exactly as with floor mode);
- the final pool is adaptive (the reference's ``AvgPool2d(2)`` sees a 2×2 map at 32×32 — the same).

A pruned VGG is described completely by its ``cfg`` (channel counts and "M"), so
``VGG(depth, cfg=pruned.cfg)`` rebuilds its architecture.
"""
from __future__ import annotations

import math

import torch
from torch import nn

VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not supported; accepted: a positive int")
    return value


def _check_width(width) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < float(width) <= 16:
        raise ValueError(f"width={width!r} is not supported; accepted: a float multiplier with 0 < width <= 16")
    return float(width)


def scale_channels(channels: int, width: float) -> int:
    """Channel count times the width multiplier, never below 1."""
    return max(1, int(round(channels * width)))


def vgg_cfg(depth: int, width: float = 1.0) -> list:
    """The default cfg of VGG-``depth`` with every channel count scaled by ``width``."""
    if depth not in VGG_CFGS:
        raise ValueError(f"depth={depth!r} is not supported for VGG; accepted: {sorted(VGG_CFGS)}")
    width = _check_width(width)
    return [v if v == "M" else scale_channels(v, width) for v in VGG_CFGS[depth]]


def _check_cfg(depth: int, cfg) -> list:
    reference = VGG_CFGS[depth]
    if not isinstance(cfg, (list, tuple)):
        raise TypeError(f"cfg must be a list of channel counts and 'M', got {type(cfg).__name__}")
    cfg = list(cfg)
    shape = ["M" if v == "M" else "C" for v in cfg]
    if shape != ["M" if v == "M" else "C" for v in reference]:
        raise ValueError(
            f"cfg={cfg!r} does not match the VGG-{depth} layout (convs 'C' and pools 'M' in this order: "
            f"{''.join('M' if v == 'M' else 'C' for v in reference)})")
    for v in cfg:
        if v != "M" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"cfg entry {v!r} is not supported; accepted: a positive int or 'M'")
    return cfg


class VGG(nn.Module):
    """VGG-11/13/16/19 with BatchNorm for small images (CIFAR layout)."""

    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, cfg=None):
        super().__init__()
        if depth not in VGG_CFGS:
            raise ValueError(f"depth={depth!r} is not supported for VGG; accepted: {sorted(VGG_CFGS)}")
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        cfg = vgg_cfg(depth, width) if cfg is None else _check_cfg(depth, cfg)
        self.depth = depth
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=False),
                           nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.reset_parameters()

    @property
    def cfg(self) -> list:
        """Channel counts read from the layers themselves (stays right after pruning)."""
        out = []
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                out.append("M")
            elif isinstance(m, nn.Conv2d):
                out.append(int(m.out_channels))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def reset_parameters(self) -> None:
        """The reference initialisation (network slimming): He-normal convs, gamma 0.5, small linear."""
        slimming_init(self, linear_std=0.01)


def slimming_init(model: nn.Module, linear_std: float | None) -> None:
    """The network-slimming / EB reference initialisation: He-normal convs (fan-out), BN gamma 0.5
    (sparsity training starts from 0.5 in the reference) and beta 0; linear layers N(0, linear_std)
    with zero bias, or PyTorch's default when ``linear_std`` is None."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is None:
                m.reset_parameters()
            else:
                nn.init.normal_(m.weight, 0.0, linear_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
