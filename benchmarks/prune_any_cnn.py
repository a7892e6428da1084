"""What a global |gamma| mask asks of torchvision CNNs, and what physical pruning achieves (CPU, exact counts).

For each model: small-image stem, 3x32x32 input, 10 classes; BN gammas set as after a network-slimming
search (per layer a random scale, about half the channels near zero), the SPEC §3 mask at ratio p, then
``ebkernels.prune`` under each coupled-group rule. Printed per model and rule: the parameter and
multiply-add reductions the mask requested (every coupled group at the width its BNs ask for on
average) against those achieved, and the float64 check of the pruned network.

    python benchmarks/prune_any_cnn.py [--ratio 0.5] [--models resnet50,mobilenet_v2,vgg16_bn,densenet121]
"""
import argparse
import time
import warnings

import torch

import ebkernels
from ebkernels._cli import comma_list
from ebkernels.pruning import bn_layers


def slimmed_gammas(model, seed: int) -> None:
    """Gammas that look trained with L1: per layer a scale in [0.3, 1.5], half the channels at 2 % of it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            n = bn.num_features
            scale = 0.3 + 1.2 * torch.rand(1, generator=g)
            alive = torch.rand(n, generator=g) < 0.5
            bn.weight.copy_(scale * torch.where(alive, 1.0, 0.02) * torch.randn(n, generator=g).abs())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--models", type=comma_list(), default=["resnet50", "mobilenet_v2", "vgg16_bn", "densenet121"],
                    help="comma-separated torchvision model names")
    ap.add_argument("--rules", type=comma_list(accepted=("majority", "any", "all")), default=["majority", "any", "all"],
                    help="comma-separated coupling rules")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"ratio p = {args.ratio}, input 3x32x32, small-image stem, seed {args.seed} (CPU, exact counts)")
    print(f"{'model':<14}{'rule':<10}{'params req':>11}{'achieved':>10}{'MACs req':>10}{'achieved':>10}"
          f"{'channels kept/asked':>21}{'float64 diff':>14}{'s':>6}")
    for name in args.models:
        model = ebkernels.build_model(f"torchvision:{name}", num_classes=10, in_channels=3, small_stem=True)
        slimmed_gammas(model, args.seed)
        mask = ebkernels.channel_mask(model, args.ratio)
        for rule in args.rules:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rescued layers are listed in the report
                _, rep = ebkernels.prune(model, mask, input_shape=(3, 32, 32), coupled=rule)
            req = rep["requested"] or {"params_reduction": rep["params_reduction"],
                                       "flops_reduction": rep["flops_reduction"]}
            print(f"{name:<14}{rule:<10}{req['params_reduction']:>11.1%}{rep['params_reduction']:>10.1%}"
                  f"{req['flops_reduction']:>10.1%}{rep['flops_reduction']:>10.1%}"
                  f"{rep['channels_kept']:>11}/{rep['channels_requested']:<9}{rep['verified']:>14.1e}"
                  f"{time.perf_counter() - t0:>6.1f}")


if __name__ == "__main__":
    main()
