"""The graph engine (torch-pruning) on small CNNs with every kind of channel coupling, in float64.

The model below has a post-activation residual stream written by two BNs, a depthwise pair, a DenseNet
style concatenation read by a pre-activation BN, and a flatten into the classifier: the pruned network
must compute what the masked network computes (tests/_masking.py) under every coupled-group rule.
"""
import sys
import warnings

import pytest
import torch
from torch import nn

import ebkernels
from ebkernels.pruning import bn_layers, count_flops, count_params, prune
from ebkernels.pruning.coupling import COUPLED_RULES

from _masking import assert_same_outputs, no_zero_width_layer, per_layer, random_mask, randomise_bns

pytestmark = [pytest.mark.torch_pruning, pytest.mark.usefixtures("one_torch_thread")]


class Coupled(nn.Module):
    def __init__(self, in_channels=3, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        # a residual stream written by two BNs (bottleneck ResNet style): coupled
        self.short = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.branch = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                    nn.Conv2d(6, 12, 1, bias=False), nn.BatchNorm2d(12))
        # expand -> depthwise -> project (MobileNet-V2 style): the depthwise conv ties two BNs
        self.expand = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                       nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12))
        # a concatenation read by a pre-activation BN (DenseNet style)
        self.grow = nn.Conv2d(12, 4, 3, padding=1, bias=True)
        self.norm = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 10, 1, bias=False)
        self.head_norm = nn.BatchNorm2d(10)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(10 * 4, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.short(x) + self.branch(x))
        x = x + self.project(self.depthwise(self.expand(x)))
        x = torch.cat([x, self.grow(x)], 1)
        x = torch.relu(self.head_norm(self.mix(torch.relu(self.norm(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def coupled_model(seed=0, trained_looking=False):
    torch.manual_seed(seed)
    model = Coupled().double().eval()
    randomise_bns(model, seed + 1, trained_looking)
    return model


def _x(seed=7):
    return torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore:the mask prunes every channel")  # small layers: a rescue is part of the test
@pytest.mark.parametrize("rule", COUPLED_RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_masks_prune_exactly_under_every_rule(rule, seed):
    model = coupled_model(seed)
    mask = random_mask(model, 0.5, seed + 10)
    pruned, report = prune(model, mask, coupled=rule, input_shape=(3, 8, 8))
    eff = report["effective_mask"]
    assert report["engine"] == "graph" and report["coupled"] == rule and report["verified"] < 1e-12
    assert_same_outputs(model, pruned, eff, _x())
    assert no_zero_width_layer(pruned)
    want, got = per_layer(model, mask), per_layer(model, eff)
    lines = {line["name"]: line for line in report["layers"]}
    for name, bn in bn_layers(pruned):  # the report says what was asked and what the network has
        assert lines[name]["requested"] == int(want[name].sum())
        assert lines[name]["kept"] == int(got[name].sum()) == bn.num_features
    # uncoupled conv -> BN chains implement the mask exactly under every rule
    for name in ("stem.1", "branch.1", "mix", "head_norm"):
        if name in lines:
            assert torch.equal(got[name], want[name]) or name in report["rescued"], name
    assert lines["head_norm"]["role"] == "pruned"
    assert lines["short.1"]["role"].startswith("coupled with")
    # the rule's promise on the coupled channels
    for name in want:
        if rule == "any":
            assert bool((got[name] >= want[name]).all()), name  # never prunes what the mask keeps
        if rule == "all" and not report["rescued"]:
            assert bool((got[name] <= want[name]).all()), name  # never keeps what the mask prunes
    for group in report["groups"]:
        if rule == "any":
            assert group["pruned_against_mask"] == 0
        if rule == "all" and not group["rescued"]:
            assert group["kept_against_mask"] == 0
    assert report["params_after"] == count_params(pruned) < report["params_before"]
    assert report["flops_after"] == count_flops(pruned, (3, 8, 8)) < report["flops_before"]


@pytest.mark.filterwarnings("ignore:the mask prunes every channel")
def test_the_rules_are_ordered_and_majority_follows_the_request():
    model = coupled_model(3, trained_looking=True)
    kept = {rule: prune(model, ratio=0.5, coupled=rule, input_shape=(3, 8, 8))[1] for rule in COUPLED_RULES}
    assert kept["all"]["channels_kept"] <= kept["majority"]["channels_kept"] <= kept["any"]["channels_kept"]
    assert kept["all"]["params_after"] <= kept["majority"]["params_after"] <= kept["any"]["params_after"]
    requested = kept["majority"]["channels_requested"]
    assert abs(kept["majority"]["channels_kept"] - requested) < abs(kept["any"]["channels_kept"] - requested)


def test_group_cost_at_the_achieved_widths_is_the_counted_cost():
    """The price of the request comes from the same model that prices the result exactly."""
    import copy

    from ebkernels.pruning.graph import prune_graph
    from ebkernels.pruning.masks import ChannelPlan, _split_mask

    model = coupled_model(4)
    masks = _split_mask(bn_layers(model), random_mask(model, 0.6, 5), None)
    pruned = copy.deepcopy(model)
    outcome = prune_graph(pruned, ChannelPlan(bn_layers(pruned), masks), (1, 3, 8, 8), "majority")
    assert outcome.cost.at([g["channels"] for g in outcome.groups]) == (count_params(model), count_flops(model, (3, 8, 8)))
    assert outcome.cost.at(outcome.achieved) == (count_params(pruned), count_flops(pruned, (3, 8, 8)))
    assert outcome.achieved != [g["channels"] for g in outcome.groups]


def test_a_group_the_mask_empties_keeps_its_best_channel():
    model = coupled_model(5)
    mask = random_mask(model, 0.3, 6)
    lines = per_layer(model, mask)
    for name in ("short.1", "branch.4", "project.1"):  # the BNs that write the residual stream
        lines[name][:] = False
    lines["norm"][:12] = False  # and those of its channels after the concatenation
    with pytest.warns(UserWarning, match="prunes every channel"):
        pruned, report = prune(model, mask, coupled="any", input_shape=(3, 8, 8))
    assert pruned.short[1].num_features == pruned.project[1].num_features == 1
    assert report["rescued"] and no_zero_width_layer(pruned)
    assert_same_outputs(model, pruned, report["effective_mask"], _x())


def test_a_quantized_model_is_pruned_as_plain_float_layers():
    torch.manual_seed(0)
    model = Coupled().eval()
    randomise_bns(model.double(), 1)
    model = model.float()
    with ebkernels.force_backend("reference"):
        ebkernels.quantize_model(model, skip=ebkernels.models.is_grouped_conv)
        pruned, report = prune(model, ratio=0.5, input_shape=(3, 8, 8))
    assert report["dequantized"] and report["verified"] < 1e-9
    assert not any(isinstance(m, (ebkernels.QConv2d, ebkernels.QLinear)) for m in pruned.modules())


# ---------------------------------------------------------------------------------------- bad input

class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _chain(*middle):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), *middle, nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double().eval()


@pytest.mark.parametrize("model,message", [
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                   nn.LazyLinear(2)), "BatchNorm2d '0' is not fed by a convolution"),
    (_chain(nn.GroupNorm(2, 8)), "GroupNorm '2' in the channel group of '0' is not supported"),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                   nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2)), "grouped convolution '3' \\(groups=2"),
    (_chain(_Wrap(lambda x: torch.roll(x, 1, dims=1))), "operation 'Roll' .* in the channel group of '0'"),
])
def test_unsupported_structures_are_named(model, message):
    model.double()(torch.zeros(1, 3, 8, 8, dtype=torch.float64))  # materialise lazy layers
    randomise_bns(model, 0)
    with pytest.raises(ValueError, match=message) as err:
        prune(model, ratio=0.5, input_shape=(3, 8, 8))
    assert "supported:" in str(err.value)


def test_a_zero_that_does_not_stay_zero_is_caught_by_the_final_check():
    model = _chain(nn.Sigmoid())  # sigmoid(0) = 0.5: a zeroed BN channel still feeds the next conv
    randomise_bns(model, 0)
    with pytest.raises(ValueError, match="does not compute what the dense network computes"):
        prune(model, ratio=0.5, input_shape=(3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = prune(model, ratio=0.5, input_shape=(3, 8, 8), verify=False)
    assert report["verified"] is None and count_params(pruned) < count_params(model)


def test_engine_and_rule_choices():
    vgg = ebkernels.build_model("vgg11", width=0.125)
    with pytest.raises(ValueError, match="coupled='most' is not supported; accepted: 'majority', 'any', 'all'"):
        prune(vgg, ratio=0.5, coupled="most")
    with pytest.raises(ValueError, match="engine='torch' is not supported"):
        prune(vgg, ratio=0.5, engine="torch")
    with pytest.raises(TypeError, match="does not understand its channel-gather buffer"):
        prune(ebkernels.build_model("preresnet20"), ratio=0.5, engine="graph")
    model = coupled_model(0)
    with pytest.raises(TypeError, match="engine='family' prunes VGG and PreResNet"):
        prune(model, ratio=0.5, engine="family")
    # an own family through the graph engine: the same function, by the same public call
    randomise_bns(vgg.double().eval(), 2)
    pruned, report = prune(vgg, random_mask(vgg, 0.5, 3), engine="graph", input_shape=(3, 32, 32))
    assert report["engine"] == "graph" and report["family"] is None
    assert_same_outputs(vgg, pruned, report["effective_mask"],
                        torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))


def test_without_torch_pruning_the_graph_engine_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning -> ImportError
    with pytest.raises(ImportError, match="needs torch-pruning .*pip install torch-pruning"):
        prune(coupled_model(0), ratio=0.5, input_shape=(3, 8, 8))
    vgg = ebkernels.build_model("vgg11", width=0.125)  # our own families do not need it
    randomise_bns(vgg.double(), 1)
    pruned, report = prune(vgg, ratio=0.5)
    assert report["engine"] == "family" and count_params(pruned) < count_params(vgg)
