"""The interface every ticket criterion implements, and the pieces several of them share.

A criterion turns ``(model, data, ratios)`` into one *channel mask* per ratio plus a report: a bool
tensor over every ``nn.BatchNorm2d`` channel in ``model.modules()`` order (True = keep), the layout
of :func:`ebkernels.channel_mask` and of :func:`ebkernels.prune`. The trainer decides *when* to ask
(:attr:`TicketMethod.draws`) and *which weights* the ticket keeps (:attr:`TicketMethod.ticket_weights`);
the criterion only ranks channels.

Shared here:

- :class:`ScoringData`: what a criterion may read (training batches in a fixed order, no augmentation;
  the input shape; the device), the same on every rank so every rank computes the same mask;
- :func:`mask_from_scores`: the SPEC §3 rule (``keep = score > sort(score)[floor(total * p)]``) applied to
  any non-negative per-channel score, so every criterion prunes the same number of channels as EB at
  the same ratio; a layer the rule would empty keeps its best-scoring channel (listed in the report);
- :func:`bn_output_gates`: a per-channel gate multiplied onto every BN output, the place where pruning a
  channel acts in every family (a pruned BN channel leaves its consumer's input; pre-activation
  stream BNs gather it out), so gate gradients measure exactly what pruning removes.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from .._checks import check_ratio
from ..detector.early_bird_mask import ratio_keep
from ..pruning import bn_layers

__all__ = ["TicketMethod", "ScoringData", "mask_from_scores", "masks_at_ratios", "bn_output_gates", "layer_sizes", "check_ratios",
           "DRAWS", "TICKET_WEIGHTS"]

# When the trainer asks a criterion for its masks.
DRAWS = ("early", "trained", "init")  # at the detector's epoch / after all search epochs / before training
# Which weights the drawn ticket starts retraining from (with --retrain-init inherit).
TICKET_WEIGHTS = ("current", "initial")  # those of the scored network / the dense network's initial ones


@dataclasses.dataclass
class ScoringData:
    """The data a criterion may read.

    ``batches()`` yields the first ``num_batches`` training batches of a seeded permutation, without
    augmentation, whole (not split over ranks): every rank sees the same images, so every rank
    computes the same mask. ``input_shape`` is one sample's (C, H, W) (SynFlow's all-ones input).
    ``ds`` may be None for a data-free criterion.
    """

    ds: object
    batch_size: int
    num_batches: int
    seed: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    input_shape: tuple | None = None

    def __post_init__(self):
        if self.input_shape is None and self.ds is not None:
            self.input_shape = tuple(self.ds.input_shape)
        if self.input_shape is None:
            raise ValueError("ScoringData needs a dataset or an input_shape (C, H, W)")
        self.input_shape = tuple(int(v) for v in self.input_shape)
        if isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches < 1:
            raise ValueError(f"num_batches={self.num_batches!r} is not supported; accepted: a positive int")

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from .. import data as data_mod

        if self.ds is None:
            raise ValueError("this criterion reads training batches, but ScoringData has no dataset")
        it = data_mod.iterate_batches(self.ds, self.batch_size, train=True, epoch=0, seed=self.seed,
                                      augment=False, device=self.device)
        for i, batch in enumerate(it):
            if i == self.num_batches:
                return
            yield batch


class TicketMethod:
    """One ticket criterion. Subclasses set the class attributes and implement :meth:`masks`.

    - ``name``: the ``--method`` value; ``title``: how tables name it; ``paper``: its source;
    - ``draws``: ``"early"`` (the EB detector picks the epoch), ``"trained"`` (after the whole search
      schedule) or ``"init"`` (on the initial network, no dense training at all);
    - ``l1_on_gamma``: whether the dense training adds network slimming's L1 term on the BN scaling
      factors (only the γ-ranking criteria need it);
    - ``ticket_weights``: ``"current"`` (the ticket keeps the weights of the network that was scored)
      or ``"initial"`` (the kept weights are rewound to the dense network's initial values: LT).
    """

    name: str = ""
    title: str = ""
    paper: str = ""
    draws: str = "trained"
    l1_on_gamma: bool = False
    ticket_weights: str = "current"

    def masks(self, model: nn.Module, data: ScoringData, ratios) -> dict:
        """``{ratio: (bool mask over all BN channels, report dict)}`` for each ratio in ``ratios``.

        The report is JSON-able and always holds ``criterion`` (what ranks the channels),
        ``scoring_flops`` (multiply-adds spent to score, the unit of the trainer's FLOPs accounting; work
        shared by several ratios is counted in full for each, since each ratio's ticket needs all of it)
        and ``scoring_seconds``. ``model`` is not changed.
        """
        raise NotImplementedError

    def mask(self, model: nn.Module, data: ScoringData, ratio: float) -> tuple[torch.Tensor, dict]:
        """The mask and report for one ratio."""
        ratio = check_ratio(ratio)
        return self.masks(model, data, (ratio,))[ratio]

    def __repr__(self) -> str:
        return f"<ticket method {self.name}: {self.title}>"


def check_ratios(ratios) -> tuple[float, ...]:
    if isinstance(ratios, (int, float)):
        ratios = (ratios,)
    ratios = tuple(check_ratio(r) for r in ratios)
    if not ratios:
        raise ValueError("ratios is empty; accepted: one or more floats in (0, 1)")
    return ratios


def layer_sizes(model: nn.Module) -> list[tuple[str, int]]:
    """(name, channels) of every BatchNorm2d in module order: the mask's layout."""
    bns = bn_layers(model)
    if not bns:
        raise ValueError(f"the model ({type(model).__name__}) has no BatchNorm2d layers: a channel mask covers "
                         "BatchNorm2d channels (accepted: VGG, PreResNet, ResNet with BN)")
    return [(n, bn.num_features) for n, bn in bns]


def mask_from_scores(scores: torch.Tensor, sizes: list[tuple[str, int]], ratio: float) -> tuple[torch.Tensor, list]:
    """The SPEC §3 rule on per-channel ``scores`` (non-negative, module order): ``keep = score >
    sort(score)[floor(total * ratio)]``, the rule EB applies to |γ|, so every criterion prunes as many
    channels as EB does at the same ratio. A layer the rule would empty keeps its highest-scoring
    channel (the criterion's own choice, not |γ|'s); returns ``(mask, names of those layers)``.
    """
    ratio = check_ratio(ratio)
    scores = scores.detach().flatten().double().cpu()
    total = sum(n for _, n in sizes)
    if scores.numel() != total:
        raise ValueError(f"{scores.numel()} scores for {total} BatchNorm2d channels")
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("channel scores must be finite and non-negative")
    keep = ratio_keep(scores, ratio)
    rescued = []
    offset = 0
    for name, n in sizes:
        if not bool(keep[offset:offset + n].any()):
            keep[offset + int(torch.argmax(scores[offset:offset + n]))] = True
            rescued.append(name)
        offset += n
    return keep, rescued


def masks_at_ratios(scores: torch.Tensor, sizes: list[tuple[str, int]], ratios, report: dict) -> dict:
    """``{ratio: (mask, report)}`` for a criterion that scores every channel once: ``mask_from_scores`` at each
    ratio, its report ``report`` plus the layers rescued at that ratio (``rescued_by_score``)."""
    out = {}
    for r in ratios:
        mask, rescued = mask_from_scores(scores, sizes, r)
        out[r] = (mask, {**report, "rescued_by_score": rescued})
    return out


@contextlib.contextmanager
def bn_output_gates(model: nn.Module, values: torch.Tensor | None = None, dtype=None):
    """Multiply every BatchNorm2d's output channel c by a gate (a leaf tensor that requires grad).

    Yields the list of gates, one per BN in module order (all ones, or ``values``: a flat tensor over
    all channels, e.g. a 0/1 mask). ``d loss / d gate`` at gate 1 is the connection sensitivity of the
    whole channel, and a gate of 0 is the pruned channel. The gate sits *after* the BN on purpose: a
    conv filter followed by a training-mode BN is scale-invariant (BN divides the scale out), so
    ``sum(w * dL/dw)`` over the filter is ~0 for every channel and ranks nothing.
    """
    bns = [bn for _, bn in bn_layers(model)]
    ref = next(model.parameters())
    dtype = dtype or ref.dtype
    sizes = [bn.num_features for bn in bns]
    if values is None:
        flat = torch.ones(sum(sizes), dtype=dtype, device=ref.device)
    else:
        flat = values.detach().to(device=ref.device, dtype=dtype).flatten()
        if flat.numel() != sum(sizes):
            raise ValueError(f"{flat.numel()} gate values for {sum(sizes)} BatchNorm2d channels")
    gates = [g.clone().requires_grad_(True) for g in torch.split(flat, sizes)]

    def gate_hook(gate):
        def hook(module, inputs, output):
            return output * gate.view(1, -1, *([1] * (output.dim() - 2)))
        return hook

    handles = [bn.register_forward_hook(gate_hook(g)) for bn, g in zip(bns, gates)]
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()
