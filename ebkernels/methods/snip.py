"""SNIP at channel level (Lee et al., ICLR 2019): single-shot pruning at initialisation by connection
sensitivity — score the initial network on a few training batches, prune, train the pruned network
from its initial weights.

SNIP's sensitivity of a connection is ``|dL/dc|`` for a multiplicative gate ``c = 1`` on it
(= ``|w * dL/dw|``). A channel's gate multiplies the BN output (``base.bn_output_gates``), so the score
of channel k is ``|sum over batches of dL/dg_k|``: how much the loss moves when the whole channel is
scaled — exactly the part of the network pruning removes. (Gating the conv filter instead would score
nothing: a training-mode BN divides the filter's scale out, so ``sum(w * dL/dw)`` over a filter ~ 0.)
The gradients of all scoring batches are summed before the absolute value, as one larger SNIP batch.
Global ranking, unnormalised, as in SNIP (which normalises by the total only, a constant). A channel
whose output is identically zero (a dead filter) scores exactly 0.

The network is scored in training mode (batch statistics; running statistics of a fresh network say
nothing) on a copy, so the initial weights and buffers the ticket keeps are untouched.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning import count_flops
from .base import ScoringData, TicketMethod, bn_output_gates, check_ratios, layer_sizes, masks_at_ratios

__all__ = ["Snip", "snip_scores"]


def snip_scores(model: nn.Module, data: ScoringData) -> tuple[torch.Tensor, int]:
    """``(|sum dL/dgate| per BN channel in mask order, images read)`` on a training-mode copy of ``model``."""
    net = copy.deepcopy(model).to(data.device).train()
    for p in net.parameters():
        p.requires_grad_(False)  # only the gates' gradients are needed: no weight gradients computed
    total, images = None, 0
    with bn_output_gates(net, dtype=torch.float32) as gates:
        for x, y in data.batches():
            loss = F.cross_entropy(net(x).float(), y)
            grads = torch.autograd.grad(loss, gates)
            flat = torch.cat(grads).detach().double()
            total = flat if total is None else total + flat
            images += len(y)
    if total is None:
        raise ValueError("SNIP read no training batch (empty training set)")
    return total.abs().cpu(), images


class Snip(TicketMethod):
    name = "snip"
    title = "SNIP (channel gates, at init)"
    paper = "Lee et al., SNIP: single-shot network pruning based on connection sensitivity, ICLR 2019"
    draws = "init"
    l1_on_gamma = False
    ticket_weights = "current"

    def masks(self, model: nn.Module, data: ScoringData, ratios) -> dict:
        ratios = check_ratios(ratios)
        t0 = time.perf_counter()
        scores, images = snip_scores(model, data)
        seconds = time.perf_counter() - t0
        # one forward and one input-gradient backward (about the forward's cost) per image
        flops = 2 * count_flops(model, data.input_shape) * images
        return masks_at_ratios(scores, layer_sizes(model), ratios, {
            "criterion": "|dL/dg| of a gate on each BN output channel at initialisation (global ranking)",
            "scoring_images": images, "scoring_flops": int(flops), "scoring_seconds": seconds})
