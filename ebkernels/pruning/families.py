"""The hand-written, exactly tested pruners of ebkernels' own families (SPEC §4).

- VGG (conv→BN→ReLU(→pool)→conv): a pruned channel leaves the conv's outputs, the BN, and the next
  conv's (or the classifier's) inputs.
- Pre-activation ResNet: the residual stream is never narrowed. BNs that read the stream stay
  whole; their mask becomes the ``ChannelSelection`` gather before the block's first conv (and
  before ``fc``). Inner BNs shrink with the conv that feeds them and the conv that reads them; a
  block's last conv keeps its output width.
- torchvision-style ResNet with BasicBlocks (ours, or torchvision's resnet18/34): only each block's
  inner width (``conv1``/``bn1`` outputs, ``conv2`` inputs). Mask entries of BNs on the stream cannot
  be applied; they are listed in ``report["unapplied"]`` and those channels are kept.

Layers are rebuilt with their own type (a ``QConv2d`` stays a ``QConv2d`` with its qconfig).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..models import PreResNet, VGG
from ..models.resnet import basic_blocks, is_basic_resnet
from .masks import ChannelPlan

__all__ = ["FAMILIES", "family_of", "prune_family"]

FAMILIES = ("vgg", "preresnet", "resnet")


def _construct_like(old: nn.Module, base: type, args: tuple, kwargs: dict) -> nn.Module:
    """A new layer of ``type(old)`` (e.g. QConv2d, with its qconfig); plain ``base`` if that fails."""
    cls = type(old)
    kw = dict(kwargs)
    if hasattr(old, "qconfig"):
        kw["qconfig"] = old.qconfig
    try:
        new = cls(*args, **kw)
    except TypeError as exc:
        warnings.warn(f"could not rebuild {cls.__name__} with its constructor ({exc}); "
                      f"the pruned layer is a plain {base.__name__}", stacklevel=4)
        new = base(*args, **kwargs)
    ref = old.weight
    new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    return new


def _copy_param(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    if dst is not None and src is not None:
        dst.copy_(src)


def _sliced_conv(old: nn.Conv2d, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None) -> nn.Conv2d:
    if old.groups != 1:
        raise ValueError(f"cannot prune a grouped convolution (groups={old.groups}); accepted: groups=1")
    w = old.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = _construct_like(old, nn.Conv2d, (w.shape[1], w.shape[0], old.kernel_size), dict(
        stride=old.stride, padding=old.padding, dilation=old.dilation, groups=1,
        bias=old.bias is not None, padding_mode=old.padding_mode))
    _copy_param(new.weight, w)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        b = old.bias.detach()
        _copy_param(new.bias, b if out_idx is None else b.index_select(0, out_idx.to(b.device)))
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _sliced_linear(old: nn.Linear, in_idx: torch.Tensor) -> nn.Linear:
    w = old.weight.detach().index_select(1, in_idx.to(old.weight.device))
    new = _construct_like(old, nn.Linear, (w.shape[1], w.shape[0]), dict(bias=old.bias is not None))
    _copy_param(new.weight, w)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        _copy_param(new.bias, old.bias.detach())
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _sliced_bn(old: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    kwargs = dict(eps=old.eps, momentum=old.momentum, affine=old.affine,
                  track_running_stats=old.track_running_stats)
    try:
        new = type(old)(idx.numel(), **kwargs)
    except TypeError:
        new = nn.BatchNorm2d(idx.numel(), **kwargs)
    ref = old.weight if old.weight is not None else old.running_mean
    new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(old, name)
            if src is not None:
                _copy_param(getattr(new, name), src.detach().index_select(0, idx.to(src.device)))
        for name in ("weight", "bias"):
            if getattr(old, name) is not None:
                getattr(new, name).requires_grad_(getattr(old, name).requires_grad)
    if old.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    return new


def _names(model: nn.Module) -> dict:
    return {m: n for n, m in model.named_modules()}


def _prune_vgg(model: VGG, plan: ChannelPlan) -> None:
    names = _names(model)
    layers = list(model.features)
    prev_idx = None  # kept input channels of the next conv (None: the image, all channels)
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        bn = layers[i + 1] if i + 1 < len(layers) else None
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"VGG feature {i} ({type(layer).__name__}) is not followed by a BatchNorm2d")
        idx = plan.keep(names[bn], "pruned")
        model.features[i] = _sliced_conv(layer, prev_idx, idx)
        model.features[i + 1] = _sliced_bn(bn, idx)
        prev_idx = idx
    model.classifier = _sliced_linear(model.classifier, prev_idx)


def _positions(selected: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Where each stream channel in ``idx`` sits among the currently ``selected`` ones."""
    return torch.searchsorted(selected.cpu(), idx)


def _prune_preresnet(model: PreResNet, plan: ChannelPlan) -> None:
    names = _names(model)
    for block in model.blocks():
        # bn1 reads the stream: it stays whole and the gather picks the kept channels for conv1
        old_sel = block.select.indices.detach().cpu()
        idx1 = plan.keep(names[block.bn1], "stream (gathered)", candidates=old_sel)
        idx2 = plan.keep(names[block.bn2], "pruned")
        idx3 = plan.keep(names[block.bn3], "pruned")
        block.select.set_indices(idx1)
        block.conv1 = _sliced_conv(block.conv1, _positions(old_sel, idx1), idx2)
        block.bn2 = _sliced_bn(block.bn2, idx2)
        block.conv2 = _sliced_conv(block.conv2, idx2, idx3)
        block.bn3 = _sliced_bn(block.bn3, idx3)
        block.conv3 = _sliced_conv(block.conv3, idx3, None)  # output width = stream width, kept
    old_sel = model.select.indices.detach().cpu()
    idx = plan.keep(names[model.bn], "stream (gathered)", candidates=old_sel)
    model.select.set_indices(idx)
    model.fc = _sliced_linear(model.fc, _positions(old_sel, idx))


def _prune_basic_resnet(model: nn.Module, plan: ChannelPlan) -> None:
    names = _names(model)
    inner = set()
    for block in basic_blocks(model):
        name = names[block.bn1]
        inner.add(name)
        idx = plan.keep(name, "pruned")
        block.conv1 = _sliced_conv(block.conv1, None, idx)
        block.bn1 = _sliced_bn(block.bn1, idx)
        block.conv2 = _sliced_conv(block.conv2, idx, None)
    for name in plan.order:
        if name not in inner:
            plan.whole(name)


def family_of(model: nn.Module) -> str | None:
    """``"vgg"``, ``"preresnet"`` or ``"resnet"`` (BasicBlock ResNets) for ebkernels' own families, else None."""
    if isinstance(model, VGG):
        return "vgg"
    if isinstance(model, PreResNet):
        return "preresnet"
    if is_basic_resnet(model):
        return "resnet"
    return None


def prune_family(model: nn.Module, plan: ChannelPlan, family: str) -> None:
    """Prune ``model`` (a copy: changed in place) by the family's rule, recording into ``plan``."""
    {"vgg": _prune_vgg, "preresnet": _prune_preresnet, "resnet": _prune_basic_resnet}[family](model, plan)
