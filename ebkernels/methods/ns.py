"""NS: network slimming (Liu et al., ICCV 2017) — train fully with L1 on the BN scaling factors,
prune the channels with the smallest |γ|, retrain. The trainer's ``--baseline`` (the paper's
"progressive pruning and training").

The mask is :func:`ebkernels.channel_mask` itself (SPEC §3: global ranking of |γ| over all BN layers,
``keep = |γ| > sort(|γ|)[floor(total * p)]``); a layer it empties is rescued by :func:`ebkernels.prune`
(its largest-|γ| channel, which is this criterion's own best).
"""
from __future__ import annotations

import time

from torch import nn

from ..detector import channel_mask
from .base import ScoringData, TicketMethod, check_ratios

__all__ = ["NetworkSlimming", "gamma_masks"]


def gamma_masks(model: nn.Module, ratios, criterion: str) -> dict:
    """``{ratio: (mask, report)}`` from |γ| (one fused detector launch for all ratios)."""
    ratios = check_ratios(ratios)
    t0 = time.perf_counter()
    masks = channel_mask(model, ratios).cpu()
    seconds = time.perf_counter() - t0
    # a sort of the |γ| vector: no network pass, no multiply-adds
    return {r: (masks[i], {"criterion": criterion, "scoring_flops": 0, "scoring_seconds": seconds})
            for i, r in enumerate(ratios)}


class NetworkSlimming(TicketMethod):
    name = "ns"
    title = "NS (network slimming)"
    paper = "Liu et al., Learning efficient convolutional networks through network slimming, ICCV 2017"
    draws = "trained"
    l1_on_gamma = True
    ticket_weights = "current"

    def masks(self, model: nn.Module, data: ScoringData, ratios) -> dict:
        return gamma_masks(model, ratios, "|gamma| of the fully trained network (global ranking)")
