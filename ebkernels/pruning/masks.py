"""The channel mask a pruner applies: one flag per BatchNorm2d channel, in module order (SPEC §3)."""
from __future__ import annotations


import numpy as np
import torch
from torch import nn

from ..detector.early_bird_mask import ratio_keep
from .costs import _unwrap

__all__ = ["bn_layers"]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every BatchNorm2d in ``model.modules()`` order: the mask's layout."""
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, nn.BatchNorm2d)]


def _ratio_mask(bns, ratio: float) -> list[torch.Tensor]:
    """SPEC §3: thr = sort(|gamma|)[floor(total * p)], keep |gamma| > thr (strict)."""
    gammas = [bn.weight.detach().abs().flatten().cpu() for _, bn in bns]
    return list(torch.split(ratio_keep(torch.cat(gammas), ratio), [g.numel() for g in gammas]))


def _as_bool_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor (or a dict of them), got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"{name} has dtype {str(value.dtype).replace('torch.', '')}; accepted: bool "
                        "(True = keep the channel; convert 0/1 values with `mask.bool()`)")
    return value.detach().cpu()


def _split_mask(bns, mask, ratio) -> list[torch.Tensor]:
    sizes = [bn.num_features for _, bn in bns]
    total = sum(sizes)
    if mask is None:
        if ratio is None:
            raise ValueError("prune needs a mask or a ratio; got mask=None and ratio=None")
        return _ratio_mask(bns, ratio)
    if isinstance(mask, dict):
        names = {n: i for i, (n, _) in enumerate(bns)}
        unknown = [k for k in mask if k not in names]
        if unknown:
            raise ValueError(f"mask has keys {unknown} that are not BatchNorm2d layers of the model; "
                             f"accepted: {list(names)}")
        out = [torch.ones(s, dtype=torch.bool) for s in sizes]
        for key, value in mask.items():
            t = _as_bool_tensor(f"mask[{key!r}]", value).flatten()
            if t.numel() != sizes[names[key]]:
                raise ValueError(f"mask[{key!r}] has {t.numel()} entries; that layer has {sizes[names[key]]} channels")
            out[names[key]] = t
        return out
    flat = _as_bool_tensor("mask", mask)
    if flat.dim() != 1:
        raise ValueError(f"mask must be 1-D (one flag per BN channel), got shape {tuple(flat.shape)}")
    if flat.numel() != total:
        raise ValueError(f"mask has {flat.numel()} entries; the model has {total} BatchNorm2d channels "
                         f"in {len(bns)} layers (accepted: a bool tensor of length {total})")
    return list(torch.split(flat, sizes))



class ChannelPlan:
    """Per-BN bookkeeping shared by both pruners: which channels stay, and the report's line per layer.

    ``effective[name]`` is the mask the pruned network implements; ``layers[name]`` says how many
    channels the mask asked to keep (``requested``) and how many the pruned network keeps (``kept``).
    """

    def __init__(self, bns, masks):
        self.bns = dict(bns)
        self.order = [n for n, _ in bns]
        self.masks = dict(zip(self.order, masks))
        self.sizes = {n: int(bn.num_features) for n, bn in bns}  # before pruning changes any layer
        self.effective = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bns}
        self.layers: dict[str, dict] = {}
        self.rescued: list[str] = []
        self.unapplied: list[str] = []

    def _line(self, name: str, kept: int, role: str, **extra) -> None:
        self.layers[name] = {"name": name, "channels": self.sizes[name],
                             "requested": int(self.masks[name].sum()), "kept": int(kept), "role": role, **extra}

    def keep(self, name: str, role: str, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted indices of kept channels of BN ``name``; ``candidates``: those still available."""
        bn = self.bns[name]
        want = self.masks[name].clone()
        if candidates is not None:
            allowed = torch.zeros_like(want)
            allowed[candidates] = True
            want &= allowed
        else:
            allowed = torch.ones_like(want)
        if not bool(want.any()):
            gamma = bn.weight.detach().abs().cpu().clone()
            gamma[~allowed] = -1.0
            want[int(torch.argmax(gamma))] = True
            self.rescued.append(name)
        self.effective[name] = want
        idx = torch.nonzero(want).flatten()
        self._line(name, idx.numel(), role)
        return idx

    def whole(self, name: str, role: str = "stream (kept whole)") -> None:
        """A BN whose channels this pruner cannot narrow: all of them stay."""
        if not bool(self.masks[name].all()):
            self.unapplied.append(name)
        self._line(name, self.sizes[name], role)

    def decided(self, name: str, keep: torch.Tensor, role: str, **extra) -> None:
        """A BN whose kept channels were decided elsewhere (a coupled group of the graph pruner)."""
        self.effective[name] = keep.clone()
        self._line(name, int(keep.sum()), role, **extra)
