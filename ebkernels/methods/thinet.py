"""ThiNet (Luo et al., ICCV 2017) — after full training, prune in every layer the channels whose
removal least changes the *next* layer's outputs, measured on sampled activations; retrain.

For a BN channel c read by the consumer layer L (``_graph.channel_links``), and a sampled output
entry y of L (an image, an output channel o, a position), y = sum over c of x̂_c (+ bias), where
x̂_c = sum over L's kernel window of W[o, c, ·] · (L's input, channel c): removing a set T of channels
changes y by exactly sum over T of x̂_c. ThiNet's greedy selection removes one channel at a time,
each time the one that keeps ``sum over samples of (sum over T of x̂_c)²`` smallest, until the layer's
share is removed. The removal order does not depend on the ratio, so one pass serves every ratio.

Sampling as in the paper: ``LOCATIONS_PER_IMAGE`` random (output channel, position) entries per image,
from the first ``data.num_batches`` training batches (no augmentation), the trained network in eval
mode. Like ThiNet, the ratio applies to every layer alike: floor(p · C) channels leave each layer
(ThiNet's per-layer compression rate, not a global ranking). A BN whose output has no single consumer
(a residual stream feeding an addition) cannot be scored this way and keeps all its channels; the
report lists it.

Deviations from the paper, for the same one-shot harness as every other criterion: all layers are
selected on the unpruned trained network at once (ThiNet prunes and fine-tunes layer by layer), and
the least-squares rescaling of the next layer's filters is not done (retraining follows instead).
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning import count_flops
from ._graph import channel_links
from .base import ScoringData, TicketMethod, check_ratios, layer_sizes

__all__ = ["ThiNet", "next_layer_contributions", "greedy_removal_order", "removal_error", "LOCATIONS_PER_IMAGE"]

LOCATIONS_PER_IMAGE = 10


def _conv_contributions(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, gen: torch.Generator):
    """``(x̂ [S, C], y [S])`` at ``LOCATIONS_PER_IMAGE`` random output entries per image; y excludes the bias."""
    if not (isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"):
        raise ValueError(f"ThiNet samples convolutions with numeric zero padding; got padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    n_img, _, out_h, out_w = out.shape
    s = n_img * LOCATIONS_PER_IMAGE
    n = torch.arange(n_img).repeat_interleave(LOCATIONS_PER_IMAGE)
    o = torch.randint(conv.out_channels, (s,), generator=gen)
    oh = torch.randint(out_h, (s,), generator=gen)
    ow = torch.randint(out_w, (s,), generator=gen)
    (ph, pw), (sh, sw), (dh, dw) = conv.padding, conv.stride, conv.dilation
    kh, kw = conv.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    ih = oh[:, None] * sh + torch.arange(kh)[None] * dh  # [S, KH]
    iw = ow[:, None] * sw + torch.arange(kw)[None] * dw  # [S, KW]
    dev = x.device
    patch = xp[n[:, None, None].to(dev), :, ih[:, :, None].to(dev), iw[:, None, :].to(dev)]  # [S, KH, KW, C]
    w = conv.weight.detach()[o.to(dev)]  # [S, C, KH, KW]
    contrib = torch.einsum("sijc,scij->sc", patch.double(), w.double())
    y = out[n.to(dev), o.to(dev), oh.to(dev), ow.to(dev)].double()
    if conv.bias is not None:
        y = y - conv.bias.detach()[o.to(dev)].double()
    return contrib.cpu(), y.cpu()


def _linear_contributions(linear: nn.Linear, x: torch.Tensor, out: torch.Tensor, gen: torch.Generator):
    n_img = x.shape[0]
    s = n_img * LOCATIONS_PER_IMAGE
    n = torch.arange(n_img).repeat_interleave(LOCATIONS_PER_IMAGE).to(x.device)
    o = torch.randint(linear.out_features, (s,), generator=gen).to(x.device)
    contrib = x[n].double() * linear.weight.detach()[o].double()
    y = out[n, o].double()
    if linear.bias is not None:
        y = y - linear.bias.detach()[o].double()
    return contrib.cpu(), y.cpu()


@torch.no_grad()
def next_layer_contributions(model: nn.Module, data: ScoringData) -> tuple[dict, dict, int]:
    """``({bn name: x̂ [S, C] float64}, {bn name: y [S]}, images read)`` for every BN with a single
    consumer; y is the consumer's output at the samples without its bias (= the row sums of x̂)."""
    net = copy.deepcopy(model).to(data.device).eval()
    links = {link.consumer_name: link for link in channel_links(net) if link.consumer is not None}
    modules = dict(net.named_modules())
    gen = torch.Generator().manual_seed(int(data.seed))
    parts: dict = {link.name: ([], []) for link in links.values()}

    def hook(bn_name):
        def record(module, inputs, output):
            fn = _conv_contributions if isinstance(module, nn.Conv2d) else _linear_contributions
            contrib, y = fn(module, inputs[0], output, gen)
            parts[bn_name][0].append(contrib)
            parts[bn_name][1].append(y)
        return record

    handles = [modules[name].register_forward_hook(hook(link.name)) for name, link in links.items()]
    images = 0
    try:
        for x, _ in data.batches():
            net(x)
            images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if images == 0:
        raise ValueError("ThiNet read no training batch (empty training set)")
    contribs = {name: torch.cat(c) for name, (c, _) in parts.items()}
    targets = {name: torch.cat(y) for name, (_, y) in parts.items()}
    return contribs, targets, images


def greedy_removal_order(contrib: torch.Tensor, n_remove: int) -> list[int]:
    """ThiNet's greedy selection: the first ``n_remove`` channels, in the order they are removed, each
    one minimising ``||sum over removed channels of x̂||²`` given those removed before it."""
    x = contrib.double()
    residual = torch.zeros(x.shape[0], dtype=torch.float64)
    sq_norms = (x * x).sum(0)
    alive = torch.ones(x.shape[1], dtype=torch.bool)
    order = []
    for _ in range(n_remove):
        # ||r + x_c||² - ||r||² for every candidate c, in one matrix-vector product
        cost = sq_norms + 2.0 * (x.T @ residual)
        cost[~alive] = math.inf
        c = int(torch.argmin(cost))
        order.append(c)
        alive[c] = False
        residual += x[:, c]
    return order


def removal_error(contrib: torch.Tensor, removed) -> float:
    """``sum over samples of (sum over removed channels of x̂)²``: the squared change of the next
    layer's sampled outputs when ``removed`` leave."""
    idx = torch.as_tensor(list(removed), dtype=torch.long)
    if idx.numel() == 0:
        return 0.0
    change = contrib.double()[:, idx].sum(1)
    return float(change @ change)


class ThiNet(TicketMethod):
    name = "thinet"
    title = "ThiNet (greedy next-layer reconstruction)"
    paper = "Luo et al., ThiNet: a filter level pruning method for deep neural network compression, ICCV 2017"
    draws = "trained"
    l1_on_gamma = False
    ticket_weights = "current"

    RANDOM_SUBSETS = 8  # random removals of the same size, the report's reference error

    def masks(self, model: nn.Module, data: ScoringData, ratios) -> dict:
        ratios = check_ratios(ratios)
        t0 = time.perf_counter()
        contribs, targets, images = next_layer_contributions(model, data)
        sizes = layer_sizes(model)
        windows = {link.name: math.prod(link.consumer.kernel_size) if isinstance(link.consumer, nn.Conv2d) else 1
                   for link in channel_links(model) if link.consumer is not None}
        most = max(ratios)
        orders, flops = {}, count_flops(model, data.input_shape) * images  # eval forward passes
        for (name, channels) in sizes:
            if name in contribs:
                x = contribs[name]
                n_remove = int(math.floor(most * channels))
                orders[name] = greedy_removal_order(x, n_remove)
                # the contributions (k² multiply-adds per sample and channel) and the greedy's x̂ᵀ r products
                window = x.shape[0] * channels * windows[name]
                flops += window + n_remove * x.shape[0] * channels
        seconds = time.perf_counter() - t0
        rng = torch.Generator().manual_seed(int(data.seed) + 1)
        out = {}
        for r in ratios:
            parts, layers = [], []
            for name, channels in sizes:
                keep = torch.ones(channels, dtype=torch.bool)
                if name not in orders:
                    layers.append({"name": name, "kept_whole": "no single consumer layer"})
                    parts.append(keep)
                    continue
                removed = orders[name][:int(math.floor(r * channels))]
                keep[removed] = False
                parts.append(keep)
                x, y = contribs[name], targets[name]
                scale = float(y @ y) or 1.0
                random_errors = [removal_error(x, torch.randperm(channels, generator=rng)[:len(removed)])
                                 for _ in range(self.RANDOM_SUBSETS)]
                layers.append({"name": name, "removed": len(removed),
                               "relative_error": removal_error(x, removed) / scale,
                               "random_relative_error": sum(random_errors) / len(random_errors) / scale})
            out[r] = (torch.cat(parts), {
                "criterion": f"greedy removal minimising the change of the next layer's outputs on "
                             f"{LOCATIONS_PER_IMAGE} sampled entries per image (floor(p * C) channels per layer)",
                "scoring_images": images, "layers": layers, "scoring_flops": int(flops),
                "scoring_seconds": seconds})
        return out
