"""EB: early-bird tickets (You et al., ICLR 2020) — network slimming's |γ| ranking, drawn as soon as
the masks stop changing.

The criterion is NS's (:mod:`.ns`); what differs is *when* it is applied: the trainer runs the
detector (SPEC §3, ``ebkernels.EarlyBird``) after every search epoch and draws each ratio's ticket at
the epoch its mask distances settle, stopping the search once every ratio has one.
"""
from __future__ import annotations

from torch import nn

from .base import ScoringData, TicketMethod
from .ns import gamma_masks

__all__ = ["EarlyBirdTicket"]


class EarlyBirdTicket(TicketMethod):
    name = "eb"
    title = "EB Train"
    paper = "You et al., Drawing early-bird tickets: towards more efficient training of deep networks, ICLR 2020"
    draws = "early"
    l1_on_gamma = True
    ticket_weights = "current"

    def masks(self, model: nn.Module, data: ScoringData, ratios) -> dict:
        return gamma_masks(model, ratios, "|gamma| at the draw epoch, the detector's unless drawn otherwise (global ranking)")
