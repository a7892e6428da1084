"""The command line: argparse -> Settings -> the job. ``ebkernels --help`` lists every flag.

:func:`run` is the same entry point for Python callers (the recipes in ``python/``).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import warnings

import torch

from .. import data as data_mod
from .dist import setup_dist
from .job import Job
from .rundir import run_dir_for
from .settings import Settings, TrainerError, resolve_settings

__all__ = ["build_parser", "settings_from_args", "run", "main"]


def _ratio_arg(text: str) -> list:
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number; accepted: floats in (0, 1), "
                                             f"comma-separated or repeated")
    return out


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: comma-separated epoch numbers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ebkernels",
        description="Early-bird ticket training: low-precision search -> detect -> prune -> retrain. "
                    "With no arguments: the whole job on scikit-learn's digits (well under a minute on an idle "
                    "2-core CPU).",
        epilog="examples:\n"
               "  ebkernels                                   # the demo: digits, int8 search, p = 0.5\n"
               "  ebkernels --dataset fashion-mnist --model vgg11 --width 0.25 --epochs 24 --ratio 0.3,0.5,0.7\n"
               "  ebkernels --dataset cifar10 --data-dir data/ --baseline   # progressive pruning baseline\n"
               "  ebkernels --method snip                     # a competitor: SNIP's ticket at initialisation\n"
               "  ebkernels --dataset cifar10 --model torchvision:resnet50 --small-stem   # any torchvision CNN\n"
               "  torchrun --nproc-per-node 8 -m ebkernels --dataset cifar10   # DDP; rank 0 writes\n"
               "The same command again resumes an interrupted run, or says that it is finished.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(data_mod.DATASETS)}")
    g.add_argument("--data-dir", default=None,
                   help="dataset folder (default: Debian's fashion-mnist folder when present, else "
                        "$EBKERNELS_DATA or ~/.cache/ebkernels/data)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download data")
    g.add_argument("--train-subset", type=int, default=None, help="use a fixed random subset of the training set")
    g.add_argument("--test-subset", type=int, default=None, help="use a fixed random subset of the test set")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no crop/flip augmentation")
    g = p.add_argument_group("model and search")
    g.add_argument("--model", default=None,
                   help="vgg11..vgg19, preresnet20..preresnet101, resnet18, or torchvision:<name> for any torchvision "
                        "classification model, e.g. torchvision:resnet50 (first conv and classifier adapted to the "
                        "dataset; needs torchvision, and torch-pruning to prune it) (default: vgg11 on digits, vgg16)")
    g.add_argument("--small-stem", action="store_true",
                   help="torchvision models: a 3x3 stride-1 first conv and no max-pool after it, for small images "
                        "(CIFAR, digits) instead of the ImageNet stem (7x7 / 2 + max-pool)")
    g.add_argument("--width", type=float, default=None, help="channel width multiplier (default 0.25 on digits, 1)")
    g.add_argument("--precision", default="int8",
                   help="search-phase arithmetic: int8 (QConv2d/QLinear, default), bf16 (autocast), fp32")
    g.add_argument("--int8-mode", default="shift",
                   help="int8 search: the per-tensor scale of W, A, E, G: shift (2^round(log2 max|x|), default), "
                        "absmax (max|x|*S/(S-1): nothing saturates) or wage (1 for W and A)")
    g.add_argument("--int8-rounding-e", default="stochastic",
                   help="int8 search: rounding of the errors E: stochastic (default, unbiased) or nearest")
    g.add_argument("--bn-recal-batches", type=int, default=8,
                   help="the search's reported dense accuracy uses BatchNorm statistics re-estimated on this many "
                        "training batches (a copy of the model: the search is unchanged); 0: the running "
                        "statistics (default 8)")
    g.add_argument("--no-int8-autocast", dest="int8_autocast", action="store_false",
                   help="int8 search: run its float parts (BatchNorm, activations, depthwise convs, the head) in "
                        "fp32 instead of bf16 autocast (the default; the fused chains hand bfloat16 on either way)")
    g.add_argument("--ratio", dest="ratios", type=_ratio_arg, action="append", default=None,
                   help="channel pruning ratio p in (0,1); repeat or comma-separate for several (default 0.5)")
    g.add_argument("--eps", type=float, default=0.1, help="detector threshold on the mask distance (default 0.1)")
    g.add_argument("--window", type=int, default=5, help="detector FIFO length (default 5)")
    g.add_argument("--detector-mode", default="consecutive",
                   help="stopping rule: consecutive (paper, default) or window (reference code)")
    g.add_argument("--sparsity", type=float, default=1e-4, help="L1 strength s on BN gammas (default 1e-4)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="(default 0.9)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(default 1e-4)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch (default 64 on digits, 256); a last batch of one sample is merged into "
                        "the batch before it (BatchNorm cannot train on one)")
    g.add_argument("--epochs", type=int, default=None,
                   help="search schedule length and maximum (default 40 on digits, 160); lr /10 at 50%% and 75%%")
    g.add_argument("--method", default=None,
                   help="ticket criterion (ebkernels/methods/): eb (default: |gamma| with L1, drawn when the detector "
                        "fires), ns (network slimming: train all --epochs with L1, prune by |gamma|), lt (train all "
                        "--epochs, prune by filter l1 / layer mean, rewind to the initial weights), snip (at init: "
                        "|dL/dgate| per channel from --score-batches batches), synflow (at init, no data: "
                        "--synflow-rounds of synaptic flow), thinet (train all --epochs, greedy next-layer "
                        "reconstruction per layer). lt, thinet, snip and synflow train without L1; snip and "
                        "synflow train only the pruned network (--retrain-epochs)")
    g.add_argument("--baseline", action="store_true",
                   help="progressive pruning baseline: train all --epochs, then prune and retrain (= --method ns)")
    g.add_argument("--score-batches", type=int, default=4,
                   help="training batches SNIP's gradients and ThiNet's sampled activations read (default 4)")
    g.add_argument("--synflow-rounds", type=int, default=100, help="SynFlow's pruning rounds (default 100)")
    g.add_argument("--search-to-end", action="store_true",
                   help="eb: the tickets are drawn when the detector fires, and the dense network trains on to "
                        "--epochs (its accuracy after the lr decay, for comparisons); the tickets are the same")
    g.add_argument("--draw-at", type=_int_list, default=(), help="also draw tickets at these epochs (e.g. 5,10,20)")
    g.add_argument("--coupled", default="majority",
                   help="channels a model can only prune together (a bottleneck ResNet's residual stream, DenseNet "
                        "concatenations, depthwise pairs): majority (default: kept when most of their BNs keep "
                        "them, ties by |gamma| up to the BNs' average request), any (kept when any BN keeps them), "
                        "all (kept only when every BN keeps them); torchvision models only")
    g = p.add_argument_group("retraining")
    g.add_argument("--retrain-epochs", type=int, default=None, help="default 20 on digits, 160")
    g.add_argument("--reinit", action="store_true", help="retrain from a random re-initialisation (EB Train re-init)")
    g.add_argument("--retrain-init", default=None, help="inherit (default), reinit, or both")
    g.add_argument("--retrain-precision", default="fp32", help="fp32 (default) or bf16 (autocast)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs", help="parent folder of the run directories (default runs/)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0, help="(default 0)")
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under torchrun: keep BatchNorm statistics per process")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="EXPERIMENTAL (not yet verified on a GPU): replay the search's training step (forward, "
                        "loss, backward) from a CUDA graph; needs a CUDA device and one process; a smaller last "
                        "batch runs eagerly")
    g.add_argument("--compile", action="store_true",
                   help="run the search's training forward and backward through torch.compile(fullgraph=True); "
                        "on CUDA with mode='reduce-overhead' (CUDA graphs: no eager host cost per launch); the "
                        "first steps compile (seconds to minutes)")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend under --compile: inductor (default) or aot_eager (one traced graph "
                        "each for forward and backward, run with the eager ops: compiles in seconds, no CUDA graphs)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    g.add_argument("--quiet", action="store_true",
                   help="print nothing but errors (warnings go to the run's log.txt); under torchrun, torchrun's own "
                        "OMP_NUM_THREADS notice comes before ebkernels starts: set OMP_NUM_THREADS to silence it")
    g.add_argument("--print-run-dir", action="store_true", help="print the run directory of these settings and exit")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    ratios = tuple(r for group in (args.ratios or [[0.5]]) for r in group)
    init = args.retrain_init or ("reinit" if args.reinit else "inherit")
    if args.reinit and args.retrain_init not in (None, "reinit"):
        raise TrainerError(f"--reinit contradicts --retrain-init {args.retrain_init}")
    return Settings(dataset=args.dataset, model=args.model, width=args.width, small_stem=args.small_stem,
                    coupled=args.coupled, data_dir=args.data_dir,
                    download=args.download, train_subset=args.train_subset, test_subset=args.test_subset,
                    augment=args.augment, precision=args.precision, int8_mode=args.int8_mode,
                    int8_rounding_e=args.int8_rounding_e, bn_recal_batches=args.bn_recal_batches,
                    int8_autocast=args.int8_autocast,
                    ratios=ratios, eps=args.eps,
                    window=args.window, detector_mode=args.detector_mode, sparsity=args.sparsity, lr=args.lr,
                    momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                    epochs=args.epochs, retrain_epochs=args.retrain_epochs, retrain_init=init,
                    retrain_precision=args.retrain_precision, baseline=args.baseline,
                    method=args.method or ("ns" if args.baseline else "eb"), score_batches=args.score_batches,
                    synflow_rounds=args.synflow_rounds,
                    draw_at=tuple(args.draw_at), search_to_end=args.search_to_end, sync_bn=args.sync_bn, seed=args.seed, out=args.out,
                    device=args.device, progress=args.progress, quiet=args.quiet,
                    cuda_graphs=args.cuda_graphs, compile=args.compile,
                    compile_backend=args.compile_backend)


def run(settings: Settings, log_stream=None) -> dict:
    """Run (or resume, or report) the job with these settings; returns the summary dict."""
    from .._backend import force_backend

    s = resolve_settings(settings)
    with warnings.catch_warnings():
        dist = setup_dist(s.device)
        job = Job(s, dist, log_stream)
        if s.quiet:  # --quiet prints nothing but errors: a warning goes to the run's log.txt only
            warnings.showwarning = functools.partial(_warning_to_log, job.log)
        job.prepare()
        # The Triton interpreter (TRITON_INTERPRET=1) is for checking kernels; training on CPU tensors
        # takes the PyTorch reference path, which computes the same numbers much faster.
        with force_backend("reference") if dist.device.type == "cpu" else contextlib.nullcontext():
            return job.run()


def _warning_to_log(log, message, category, filename, lineno, file=None, line=None) -> None:
    log(f"warning: {category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = settings_from_args(args)
        if args.print_run_dir:
            print(run_dir_for(resolve_settings(s)))
            return 0
        run(s)
    except TrainerError as e:
        print(f"ebkernels: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebkernels: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0
