"""LT: the lottery ticket, one-shot, at channel level (Frankle & Carbin, ICLR 2019; channel ranking
by filter ℓ1 norm as in Li et al., ICLR 2017) — train fully, prune the channels whose filters have the
smallest magnitude, rewind the kept weights to their initial values, retrain.

Channel score: the ℓ1 norm of the channel's filter — the output slice of the conv that produces the
BN channel. Where no conv is the channel's own producer (a pre-activation BN reading the residual
stream, a stem conv that also feeds a shortcut) the score is the ℓ1 norm of the weights pruning it
removes instead: the consumer's input slice.

Layer normalisation: raw filter norms are not comparable across layers (a filter has Cin·k² weights,
and He initialisation scales them by 1/sqrt(k²·Cout)), so a global ranking of raw norms empties
whole layers. Each score is divided by the mean score of its layer: the global ranking then compares
how much smaller than its layer's typical filter a filter is, and the network keeps the same share of
channels where the filters are uniform.

The rewinding is the trainer's part (``ticket_weights = "initial"``): it prunes the dense network's
*initial* weights with this mask, so the ticket retrains from exactly the values training started from.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ._graph import channel_links
from .base import ScoringData, TicketMethod, check_ratios, layer_sizes, masks_at_ratios

__all__ = ["LotteryTicket", "filter_l1_scores"]


@torch.no_grad()
def filter_l1_scores(model: nn.Module) -> tuple[torch.Tensor, list[str]]:
    """Per-channel layer-normalised ℓ1 scores in mask order, and for each BN layer what was measured
    (``"filter <conv>"`` or ``"input slice of <layer>"``)."""
    scores, sources = [], []
    for link in channel_links(model):
        if link.producer is not None:
            w = link.producer.weight.detach()
            l1 = w.abs().flatten(1).sum(1)
            sources.append(f"filter {link.producer_name}")
        elif link.consumer is not None:
            w = link.consumer.weight.detach()
            l1 = w.abs().transpose(0, 1).flatten(1).sum(1)
            sources.append(f"input slice of {link.consumer_name}")
        else:
            raise ValueError(f"BatchNorm2d {link.name!r} has neither its own producing conv nor a single consuming "
                             f"layer: LT has no weights to rank its channels by")
        l1 = l1.double().cpu()
        mean = l1.mean()
        scores.append(l1 / mean if mean > 0 else l1)
    return torch.cat(scores), sources


class LotteryTicket(TicketMethod):
    name = "lt"
    title = "LT (one-shot, channel ℓ1, rewound)"
    paper = "Frankle & Carbin, The lottery ticket hypothesis, ICLR 2019 (channel ranking: Li et al., ICLR 2017)"
    draws = "trained"
    l1_on_gamma = False
    ticket_weights = "initial"

    def masks(self, model: nn.Module, data: ScoringData, ratios) -> dict:
        ratios = check_ratios(ratios)
        t0 = time.perf_counter()
        scores, sources = filter_l1_scores(model)
        return masks_at_ratios(scores, layer_sizes(model), ratios, {
            "criterion": "filter l1 norm / mean of its layer (global ranking), weights rewound to their initial values",
            "scored": sources, "scoring_flops": 0,  # weight norms: no network pass
            "scoring_seconds": time.perf_counter() - t0})
