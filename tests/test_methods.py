"""Each ticket criterion (ebkernels/methods/) does what its paper says, on small cases built to show it.

Random weights (and data seeds) from the test's seed (``helpers.fresh_seed``; EBKERNELS_TEST_SEED=random
draws fresh ones); the trainer-level behaviour (LT's rewinding to the initial weights, the CLI, resume) is
in test_methods_cli.py.
"""
import itertools
import math

import pytest
import torch
from torch import nn

from ebkernels import build_model, channel_mask
from ebkernels.data import load_dataset
from ebkernels.methods import METHOD_NAMES, ScoringData, get_method, mask_from_scores
from ebkernels.methods._graph import channel_links
from ebkernels.methods.base import layer_sizes
from ebkernels.methods.lt import filter_l1_scores
from ebkernels.methods.snip import snip_scores
from ebkernels.methods.synflow import linearised, synaptic_flow
from ebkernels.methods.thinet import greedy_removal_order, next_layer_contributions, removal_error
from ebkernels.pruning import bn_layers
from helpers import fresh_seed


def tiny_vgg(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vgg11", num_classes=10, in_channels=1, width=0.125)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None, False, 64, 64, seed=0)


def test_every_method_is_listed_and_an_unknown_one_names_the_accepted():
    assert METHOD_NAMES == ("eb", "ns", "lt", "snip", "synflow", "thinet")
    with pytest.raises(ValueError, match="accepted: eb, ns, lt, snip, synflow, thinet"):
        get_method("obd")


def test_mask_rule_prunes_as_many_channels_as_eb_and_rescues_an_emptied_layer():
    sizes = [("a", 4), ("b", 6)]
    scores = torch.cat([torch.full((4,), 1e-3), torch.rand(6) + 1.0])  # layer a would be emptied at p = 0.5
    mask, rescued = mask_from_scores(scores, sizes, 0.5)
    # keep = score > sorted[floor(10 * 0.5)]: the 4 best of layer b, plus layer a's best, rescued
    assert rescued == ["a"] and int(mask[:4].sum()) == 1 and int(mask[4:].sum()) == 4
    with pytest.raises(ValueError, match="non-negative"):
        mask_from_scores(-scores, sizes, 0.5)


def test_ns_and_eb_rank_by_gamma_exactly_as_channel_mask(digits):
    model = tiny_vgg(fresh_seed())
    for _, bn in bn_layers(model):
        bn.weight.data.uniform_(-1, 1)  # fresh |gamma| ranks
    data = ScoringData(digits, 32, 1)
    for name in ("eb", "ns"):
        masks = get_method(name).masks(model, data, (0.3, 0.7))
        for i, r in enumerate((0.3, 0.7)):
            assert torch.equal(masks[r][0], channel_mask(model, (0.3, 0.7))[i].cpu())


# ---------------------------------------------------------------------------------------------- SNIP
def test_snip_scores_a_dead_channel_zero_and_live_ones_above_zero(digits):
    """Lee et al.: the connection sensitivity of a connection that carries nothing is 0."""
    model = tiny_vgg(fresh_seed())
    (_, bn), conv = bn_layers(model)[1], channel_links(model)[1].producer
    dead = int(torch.randint(bn.num_features, ()))
    with torch.no_grad():  # a zero filter and a zero BN shift: the channel outputs 0 for every input
        conv.weight[dead] = 0
        bn.bias[dead] = 0
    scores, images = snip_scores(model, ScoringData(digits, 32, 2))
    offset = sum(n for _, n in layer_sizes(model)[:1])
    assert images == 64
    assert scores[offset + dead] == 0.0
    alive = torch.ones_like(scores, dtype=torch.bool)
    alive[offset + dead] = False
    assert bool((scores[alive] > 0).all()), scores
    # and the criterion removes it at the smallest ratio
    mask, report = get_method("snip").mask(model, ScoringData(digits, 32, 2), 0.05)
    assert not mask[offset + dead] and report["scoring_flops"] > 0


def test_snip_leaves_the_scored_network_untouched(digits):
    model = tiny_vgg(fresh_seed())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    get_method("snip").mask(model, ScoringData(digits, 32, 1), 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------- SynFlow
def _without_biases(model: nn.Module) -> nn.Module:
    """Zero every bias, BN shift and BN running mean: then the linearised network has no bias at all."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
    return model


def test_synflow_total_score_of_every_layer_is_the_flow_and_channel_scores_are_conserved():
    """Tanaka et al., Theorem 1 and its corollary: synaptic saliency is conserved at every neuron, so
    every layer's total score equals R = 1ᵀ f(1) (no biases); a channel's gate score is the sum of
    its filter's weight scores and of the scores of the weights that read it."""
    model = _without_biases(tiny_vgg(fresh_seed()))
    net = linearised(model)
    flow, channel, weights = synaptic_flow(net, (1, 16, 16), weight_scores=True)
    assert flow > 0
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for n in layers:
        assert float(weights[n + ".weight"].sum()) == pytest.approx(flow, rel=1e-9), n
    offset = 0
    for link in channel_links(net):
        own = channel[offset:offset + link.channels]
        filt = weights[link.producer_name + ".weight"].flatten(1).sum(1)
        reads = weights[link.consumer_name + ".weight"].transpose(0, 1).flatten(1).sum(1)
        assert torch.allclose(own, filt, rtol=1e-9) and torch.allclose(own, reads, rtol=1e-9), link.name
        offset += link.channels


def test_synflow_reads_no_data_and_prunes_by_rounds():
    model = tiny_vgg(fresh_seed())
    data = ScoringData(None, 32, 1, input_shape=(1, 16, 16))  # no dataset at all
    one = get_method("synflow", rounds=1).mask(model, data, 0.7)[0]
    many, report = get_method("synflow", rounds=8).mask(model, data, 0.7)
    total = sum(n for _, n in layer_sizes(model))
    assert report["rounds"] == 8 and report["flow_last_round"] < report["flow_first_round"]
    # both keep the SPEC rule's count (plus rescued layers); the iteration changes which channels
    assert abs(int(one.sum()) - int(many.sum())) <= len(layer_sizes(model))
    assert int(many.sum()) <= total - math.floor(total * 0.7) + len(layer_sizes(model))


# -------------------------------------------------------------------------------------------- ThiNet
def test_thinet_contributions_add_up_to_the_next_layers_sampled_outputs(digits):
    model = tiny_vgg(fresh_seed())
    contribs, targets, images = next_layer_contributions(model, ScoringData(digits, 32, 1, seed=fresh_seed()))
    assert images == 32 and contribs
    for name, x in contribs.items():  # y = sum over channels of x̂_c, exactly (float64)
        assert torch.allclose(x.sum(1), targets[name], rtol=1e-6, atol=1e-6), name


def test_thinet_greedy_removal_beats_random_and_is_exact_on_a_small_case():
    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64) * torch.rand(8, generator=gen, dtype=torch.float64)
    order = greedy_removal_order(x, 4)
    assert order[0] == int(torch.argmin((x * x).sum(0)))  # the first removal: the smallest contribution
    greedy = removal_error(x, order)
    errors = [removal_error(x, c) for c in itertools.combinations(range(8), 4)]
    assert greedy < sum(errors) / len(errors)  # better than a random choice on average
    assert greedy <= sorted(errors)[len(errors) // 10]  # and among the best tenth of all subsets


def test_thinet_masks_reconstruct_better_than_random_in_every_layer(digits):
    model = tiny_vgg(fresh_seed())
    mask, report = get_method("thinet").mask(model, ScoringData(digits, 32, 2, seed=fresh_seed()), 0.5)
    scored = [layer for layer in report["layers"] if "removed" in layer]
    assert scored and all(layer["relative_error"] < layer["random_relative_error"] for layer in scored), scored
    offset = 0
    for name, n in layer_sizes(model):  # floor(p * C) channels leave each scored layer
        layer = next(layer for layer in report["layers"] if layer["name"] == name)
        if "removed" in layer:
            assert int((~mask[offset:offset + n]).sum()) == math.floor(0.5 * n)
        offset += n


# ------------------------------------------------------------------------------------------------ LT
def test_lt_ranks_filters_by_l1_within_their_layer():
    model = tiny_vgg(fresh_seed())
    link = channel_links(model)[2]
    small = int(torch.randint(link.channels, ()))
    with torch.no_grad():
        link.producer.weight[small] *= 1e-3
    scores, sources = filter_l1_scores(model)
    offset = sum(layer.channels for layer in channel_links(model)[:2])
    layer = scores[offset:offset + link.channels]
    assert sources[2] == f"filter {link.producer_name}"
    assert int(torch.argmin(layer)) == small and float(layer.mean()) == pytest.approx(1.0)
    mask, _ = get_method("lt").mask(model, ScoringData(None, 32, 1, input_shape=(1, 16, 16)), 0.05)
    assert not mask[offset + small]
