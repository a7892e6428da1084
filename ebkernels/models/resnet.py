"""ResNet-18 with torchvision's structure and module names.

``torchvision.models.resnet18`` is used when torchvision imports cleanly; otherwise a local
definition with the same modules, names, initialisation and forward, so state_dicts are
interchangeable. Pruning narrows only the inner width of each BasicBlock (``conv1``/``bn1``
outputs, ``conv2`` inputs); ``cfg`` lists those 8 inner widths.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .vgg import _check_positive_int

RESNET18_STAGES = ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))  # planes, blocks, stride


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (expansion 1) with the same attribute names."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet for BasicBlocks (stem 7×7/2 + max-pool, four stages, avgpool, fc)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(RESNET18_STAGES, start=1):
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes))
            layers = [BasicBlock(inplanes, planes, stride, downsample)]
            layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_resnet(model: nn.Module) -> None:
    """torchvision's ResNet initialisation (Kaiming fan-out convs, BN 1/0, default linear)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


def basic_blocks(model: nn.Module) -> list:
    """The BasicBlocks of a torchvision-style ResNet in forward order (layer1..layer4)."""
    out = []
    for i in range(1, 5):
        out += list(getattr(model, f"layer{i}"))
    return out


def is_basic_resnet(model: nn.Module) -> bool:
    """True for torchvision-style ResNets built from BasicBlocks (any class with that structure)."""
    if not all(isinstance(getattr(model, n, None), nn.Module) for n in
               ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")):
        return False
    blocks = basic_blocks(model)
    return bool(blocks) and all(
        isinstance(getattr(b, "conv1", None), nn.Conv2d) and isinstance(getattr(b, "bn1", None), nn.BatchNorm2d)
        and isinstance(getattr(b, "conv2", None), nn.Conv2d) and isinstance(getattr(b, "bn2", None), nn.BatchNorm2d)
        and not hasattr(b, "conv3") for b in blocks)


def resnet_cfg(model: nn.Module) -> list:
    """Inner widths (``conv1`` outputs) of every BasicBlock."""
    return [int(b.conv1.out_channels) for b in basic_blocks(model)]


def _torchvision_resnet18(num_classes: int):
    from .torchvision_models import import_torchvision

    try:
        tv_models = import_torchvision()
    except ImportError:  # absent, or a build that does not match this torch (fails at import)
        return None
    try:
        return tv_models.resnet18(weights=None, num_classes=num_classes)
    except Exception as exc:  # pragma: no cover - depends on the installed torchvision
        warnings.warn(f"torchvision.models.resnet18 failed ({exc}); using the local ResNet-18", stacklevel=3)
        return None


def resnet18(num_classes: int = 10, in_channels: int = 3, cfg=None, use_torchvision: bool | None = None) -> nn.Module:
    """ResNet-18 (torchvision's when importable, else the local twin); ``cfg``: 8 inner widths."""
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    model = None
    if use_torchvision is not False:
        model = _torchvision_resnet18(num_classes)
        if model is None and use_torchvision:
            raise RuntimeError("use_torchvision=True but torchvision.models.resnet18 is not importable")
    if model is None:
        model = ResNet(num_classes=num_classes, in_channels=in_channels)
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if cfg is not None:
        _apply_resnet_cfg(model, cfg)
    return model


def _apply_resnet_cfg(model: nn.Module, cfg) -> None:
    blocks = basic_blocks(model)
    if not isinstance(cfg, (list, tuple)):
        raise TypeError(f"cfg must be a list of {len(blocks)} inner widths, got {type(cfg).__name__}")
    if len(cfg) != len(blocks):
        raise ValueError(f"cfg has {len(cfg)} entries; ResNet-18 needs {len(blocks)} (one inner width per block)")
    for i, (block, width) in enumerate(zip(blocks, cfg)):
        full = block.conv1.out_channels
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= full:
            raise ValueError(f"cfg[{i}]={width!r} is not supported; accepted: an int in 1..{full}")
        if width == full:
            continue
        block.conv1 = _conv3x3(block.conv1.in_channels, width, block.conv1.stride[0])
        block.bn1 = nn.BatchNorm2d(width)
        block.conv2 = _conv3x3(width, block.conv2.out_channels)
        for conv in (block.conv1, block.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
