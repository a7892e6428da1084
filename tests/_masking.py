"""Shared helpers of the pruning tests: BN values that look trained, masks, and the masked network.

The masked network is the oracle of every pruning test: the dense model (float64, eval mode) with gamma
and beta set to 0 on every BN channel a mask drops. That channel's BN output is then 0, so a correct
pruner's smaller network computes exactly the same outputs.
"""
import copy

import torch

from ebkernels.pruning import bn_layers


def n_channels(model):
    return sum(bn.num_features for _, bn in bn_layers(model))


def random_mask(model, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_channels(model), generator=g) >= p


def randomise_bns(model, seed, trained_looking=False):
    """Non-trivial BN affine parameters and running statistics (in place, float64 models).

    trained_looking: |gamma| as after network-slimming training (an L1 pull towards 0): about half the
    channels of a layer near zero, the rest large, with a scale that differs from layer to layer, so a
    global ranking prunes some layers much more than others.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            n = bn.num_features
            if trained_looking:
                scale = 0.3 + 1.2 * torch.rand(1, generator=g, dtype=torch.float64)
                alive = torch.rand(n, generator=g) < 0.5
                size = torch.where(alive, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.02, dtype=torch.float64))
                sign = torch.where(torch.rand(n, generator=g) < 0.8, 1.0, -1.0).double()
                gamma = scale * size * sign * torch.randn(n, generator=g, dtype=torch.float64).abs()
            else:
                gamma = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
            bn.weight.copy_(gamma)
            bn.bias.copy_((torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.4)
            bn.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.2)
            bn.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)


def masked_network(model, mask):
    """Copy of ``model`` with gamma = beta = 0 on the BN channels where the flat ``mask`` is False."""
    masked = copy.deepcopy(model)
    offset = 0
    with torch.no_grad():
        for _, bn in bn_layers(masked):
            keep = mask[offset: offset + bn.num_features]
            offset += bn.num_features
            bn.weight[~keep] = 0
            bn.bias[~keep] = 0
    assert offset == mask.numel()
    return masked


def per_layer(model, mask):
    """{BN name: its slice of the flat mask}."""
    out, offset = {}, 0
    for name, bn in bn_layers(model):
        out[name] = mask[offset: offset + bn.num_features]
        offset += bn.num_features
    return out


def assert_same_outputs(model, pruned, mask, x):
    """pruned(x) == masked(x) in float64, and the comparison is not vacuous."""
    with torch.no_grad():
        want, got, dense = masked_network(model, mask)(x), pruned(x), model(x)
    assert want.abs().max() > 1e-3  # not a degenerate all-zero comparison
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(dense, want, atol=1e-6)  # the mask changed the function: the check can fail


def no_zero_width_layer(model):
    for name, m in model.named_modules():
        widths = [getattr(m, a) for a in ("in_channels", "out_channels", "num_features", "in_features",
                                          "out_features") if hasattr(m, a)]
        assert all(w >= 1 for w in widths), (name, widths)
    return True
