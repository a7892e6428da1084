"""Pre-activation ResNet with bottleneck blocks (depth 9n+2), the network-slimming / EB layout.

Each block computes ``x + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(select(bn1(x))))))))))`` with a
1×1 projection on the shortcut where the width or stride changes. ``bn1`` reads the residual
stream, which pruning never narrows; ``select`` (a :class:`ChannelSelection`) gathers the kept
channels of ``bn1``'s output so ``conv1`` only sees those. The network ends in the same pattern:
``bn`` → ``select`` → ReLU → global average pool → ``fc``.

``cfg`` is the reference's flat list: per block [channels gathered by ``select``, ``conv1``
outputs, ``conv2`` outputs], then the channels gathered before ``fc``. With the depth and the
width multiplier (which sets the stream widths 16/32/64 × 4) it describes a pruned network fully.
"""
from __future__ import annotations


import torch
from torch import nn

from .vgg import _check_positive_int, _check_width, scale_channels, slimming_init

EXPANSION = 4
BASE_WIDTHS = (16, 32, 64)


class ChannelSelection(nn.Module):
    """Gathers a sorted subset of input channels (all of them when nothing was pruned).

    ``indices`` is an int64 buffer (not a parameter: it is structure, not something to train or to
    count as a weight), saved in the state_dict so a loaded ticket gathers the same channels.
    ``gathers_channels`` tells the fuser (``ebkernels.fusion.patterns``) that this module is
    ``x.index_select(1, indices)``: it fuses into the BatchNorm → ReLU → conv chain around it.
    """

    gathers_channels = True

    def __init__(self, num_channels: int, num_kept: int | None = None):
        super().__init__()
        self.num_channels = int(num_channels)
        num_kept = self.num_channels if num_kept is None else int(num_kept)
        if not 1 <= num_kept <= self.num_channels:
            raise ValueError(f"num_kept={num_kept} is out of range; accepted: 1..{self.num_channels}")
        self.register_buffer("indices", torch.arange(num_kept, dtype=torch.long))

    @property
    def num_kept(self) -> int:
        return int(self.indices.numel())

    def set_indices(self, indices: torch.Tensor) -> None:
        """Keep these channels (sorted, unique, within range)."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()
        if idx.numel() == 0:
            raise ValueError("a ChannelSelection must keep at least one channel")
        if idx.min() < 0 or idx.max() >= self.num_channels or not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(
                f"indices must be sorted, unique and within 0..{self.num_channels - 1}; got {idx.tolist()}")
        self.indices = idx.to(self.indices.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # indices are sorted and unique, so keeping as many channels as there are means keeping all
        if self.indices.numel() == x.shape[1]:
            return x
        return x.index_select(1, self.indices)

    def extra_repr(self) -> str:
        return f"{self.num_channels} -> {self.num_kept}"


class Bottleneck(nn.Module):
    """Pre-activation bottleneck: BN-select-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1."""

    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, cfg, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes, cfg[0])
        self.conv1 = nn.Conv2d(cfg[0], cfg[1], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg[1])
        self.conv2 = nn.Conv2d(cfg[1], cfg[2], kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cfg[2])
        self.conv3 = nn.Conv2d(cfg[2], planes * EXPANSION, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.select(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return out + residual


def preresnet_blocks_per_stage(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
        raise ValueError(f"depth={depth!r} is not supported for PreResNet; accepted: 9n+2 with n >= 1 "
                         "(11, 20, 29, ..., 101, 110, 164)")
    return (depth - 2) // 9


def preresnet_cfg(depth: int, width: float = 1.0) -> list:
    """The unpruned flat cfg (reference layout) of PreResNet-``depth`` at this width."""
    n = preresnet_blocks_per_stage(depth)
    width = _check_width(width)
    stem = scale_channels(16, width)
    cfg: list[int] = []
    inplanes = stem
    for base in BASE_WIDTHS:
        planes = scale_channels(base, width)
        for _ in range(n):
            cfg += [inplanes, planes, planes]
            inplanes = planes * EXPANSION
    cfg.append(inplanes)
    return cfg


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet for small images; PreResNet-101 has 11 blocks per stage."""

    def __init__(self, depth: int = 101, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, cfg=None):
        super().__init__()
        n = preresnet_blocks_per_stage(depth)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        width = _check_width(width)
        default = preresnet_cfg(depth, width)
        if cfg is None:
            cfg = default
        cfg = self._check_cfg(cfg, default)
        self.depth = depth
        stem = scale_channels(16, width)
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, padding=1, bias=False)
        inplanes = stem
        stages = []
        for s, base in enumerate(BASE_WIDTHS):
            planes = scale_channels(base, width)
            stride = 1 if s == 0 else 2
            blocks = []
            for b in range(n):
                block_cfg = cfg[3 * (s * n + b): 3 * (s * n + b) + 3]
                downsample = None
                if b == 0 and (stride != 1 or inplanes != planes * EXPANSION):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes * EXPANSION, kernel_size=1, stride=stride, bias=False))
                blocks.append(Bottleneck(inplanes, planes, block_cfg, stride if b == 0 else 1, downsample))
                inplanes = planes * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes, cfg[-1])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg[-1], num_classes)
        self.reset_parameters()

    @staticmethod
    def _check_cfg(cfg, default: list) -> list:
        if not isinstance(cfg, (list, tuple)):
            raise TypeError(f"cfg must be a flat list of channel counts, got {type(cfg).__name__}")
        cfg = list(cfg)
        if len(cfg) != len(default):
            raise ValueError(f"cfg has {len(cfg)} entries; this depth needs {len(default)} "
                             "(3 per block: gathered, conv1 out, conv2 out; then 1 before fc)")
        for i, (v, full) in enumerate(zip(cfg, default)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"cfg[{i}]={v!r} is not supported; accepted: a positive int")
            # gathered counts (every third entry, and the last) cannot exceed the stream width
            gathered = i % 3 == 0 or i == len(cfg) - 1
            if gathered and v > full:
                raise ValueError(f"cfg[{i}]={v} gathers more channels than the stream has ({full})")
        return cfg

    def blocks(self):
        for stage in (self.layer1, self.layer2, self.layer3):
            yield from stage

    @property
    def cfg(self) -> list:
        """The flat cfg read from the layers themselves (stays right after pruning)."""
        out: list[int] = []
        for block in self.blocks():
            out += [block.select.num_kept, int(block.conv1.out_channels), int(block.conv2.out_channels)]
        out.append(self.select.num_kept)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.select(self.bn(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def reset_parameters(self) -> None:
        """The reference initialisation: He-normal convs, gamma 0.5, default linear."""
        slimming_init(self, linear_std=None)
