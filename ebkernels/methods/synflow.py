"""SynFlow at channel level (Tanaka et al., NeurIPS 2020): data-free iterative synaptic-flow pruning
at initialisation — score, prune a little, score again, ..., then train the pruned network from its
initial weights.

The synaptic flow of a network is ``R = 1ᵀ f_|θ|(1)``: the sum of the outputs for an all-ones input
after every parameter and buffer is replaced by its absolute value (a positive, linearised network;
float64, BatchNorm in eval mode as in the reference code). A weight's score is ``θ · dR/dθ``; SynFlow
is data-free: no image is read. At channel level the score of a BN channel is ``g · dR/dg`` for a gate
g on the BN output (``base.bn_output_gates``), which equals the sum of the scores of the channel's
filter (and of the weights that read it): synaptic saliency is conserved at every neuron (Tanaka et
al., Theorem 1), and the total score of every weight layer equals R when there are no biases. The
tests check both.

Iteration (what avoids SynFlow's "layer collapse"): ``rounds`` rounds (100 by default); after round k
the kept fraction is ``(1 - p) ** (k / rounds)``, the exponential schedule of the paper. A pruned
channel's gate is 0, so it carries no flow in the later rounds. Intermediate rounds prune by count;
the last one applies the SPEC §3 rule (``mask_from_scores``), so the ticket has as many channels as
EB's at the same ratio.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from ..pruning import count_flops
from .base import ScoringData, TicketMethod, bn_output_gates, check_ratios, layer_sizes, mask_from_scores

__all__ = ["SynFlow", "linearised", "synaptic_flow", "synflow_mask"]

DEFAULT_ROUNDS = 100


@torch.no_grad()
def linearised(model: nn.Module) -> nn.Module:
    """A float64 eval-mode copy with every floating parameter and buffer replaced by its absolute value."""
    net = copy.deepcopy(model).double().eval()
    for t in net.state_dict().values():
        if t.is_floating_point():
            t.abs_()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def synaptic_flow(net: nn.Module, input_shape, keep: torch.Tensor | None = None, weight_scores: bool = False):
    """``(R, channel scores, weight scores)`` of a :func:`linearised` network.

    ``keep``: bool over all BN channels (False = gated off). Channel scores ``g · dR/dg`` in mask order
    (float64); weight scores (only with ``weight_scores=True``, else None): ``{parameter name: θ · dR/dθ}``.
    """
    device = next(net.parameters()).device
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
    values = None if keep is None else keep.to(torch.float64)
    params = dict(net.named_parameters()) if weight_scores else {}
    for p in params.values():
        p.requires_grad_(True)
    try:
        with bn_output_gates(net, values=values, dtype=torch.float64) as gates:
            flow = net(x).sum()
            grads = torch.autograd.grad(flow, gates + list(params.values()))
    finally:
        for p in params.values():
            p.requires_grad_(False)
    gate_grads, param_grads = grads[:len(gates)], grads[len(gates):]
    channel = torch.cat([g.detach() * d for g, d in zip(gates, gate_grads)]).cpu()
    weights = ({name: (p.detach() * d).cpu() for (name, p), d in zip(params.items(), param_grads)}
               if weight_scores else None)
    return float(flow.detach()), channel, weights


def synflow_mask(model: nn.Module, input_shape, ratio: float, rounds: int = DEFAULT_ROUNDS):
    """``(mask, rescued layers, R per round)`` of iterative SynFlow at ``ratio``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} is not supported; accepted: a positive int")
    net = linearised(model)
    sizes = layer_sizes(model)
    total = sum(n for _, n in sizes)
    keep = torch.ones(total, dtype=torch.bool)
    flows, rescued = [], []
    for k in range(1, rounds + 1):
        flow, scores, _ = synaptic_flow(net, input_shape, keep)
        flows.append(flow)
        if not math.isfinite(flow):
            raise ValueError(f"the synaptic flow overflowed float64 in round {k} ({flow}); the network is too deep "
                             f"for SynFlow's all-ones input without rescaling")
        scores = scores.abs()  # >= 0 already in a positive network; abs guards -0.0
        if k == rounds:  # the last round: the SPEC rule, as every criterion (gated-off channels score 0)
            keep, rescued = mask_from_scores(scores * keep, sizes, ratio)
        else:
            n_pruned = int(math.floor(total * (1 - (1 - ratio) ** (k / rounds))))
            rank_by = torch.where(keep, scores, torch.full_like(scores, -1.0))  # pruned ones stay pruned
            offset = 0
            for _, n in sizes:  # never gate off a layer's last channel: no flow would pass it again
                rank_by[offset + int(torch.argmax(rank_by[offset:offset + n]))] = math.inf
                offset += n
            keep[torch.argsort(rank_by, stable=True)[:n_pruned]] = False
    return keep, rescued, flows


class SynFlow(TicketMethod):
    name = "synflow"
    title = "SynFlow (channel gates, at init, data-free)"
    paper = "Tanaka et al., Pruning neural networks without any data by iteratively conserving synaptic flow, " \
            "NeurIPS 2020"
    draws = "init"
    l1_on_gamma = False
    ticket_weights = "current"

    def __init__(self, rounds: int = DEFAULT_ROUNDS):
        self.rounds = rounds

    def masks(self, model: nn.Module, data: ScoringData, ratios) -> dict:
        ratios = check_ratios(ratios)
        # one forward and one input-gradient backward of a single image per round
        flops = 2 * count_flops(model, data.input_shape) * self.rounds
        out = {}
        for r in ratios:
            t0 = time.perf_counter()
            mask, rescued, flows = synflow_mask(model, data.input_shape, r, self.rounds)
            out[r] = (mask, {"criterion": f"synaptic flow g*dR/dg of a gate on each BN output channel, {self.rounds} "
                                          f"rounds, exponential schedule (global ranking, no data)",
                             "rounds": self.rounds, "flow_first_round": flows[0], "flow_last_round": flows[-1],
                             "rescued_by_score": rescued, "scoring_flops": int(flops),
                             "scoring_seconds": time.perf_counter() - t0})
        return out
