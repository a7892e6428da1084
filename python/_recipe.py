"""Shared pieces of the reproduction recipes in this folder (Fig. 1, Fig. 3, Table 2, low precision).

Each recipe runs ``ebkernels.train`` jobs in-process. Jobs live in hashed run directories under
``--runs`` (default ``runs/``), so a recipe that is interrupted resumes, a finished job is reused
(re-running a recipe only redraws its tables and plots), and a job two recipes share trains once.
Tables (Markdown and CSV) and PNG plots go to ``--results`` (default ``results/<recipe>``).

Scales (``--scale``):

- ``cpu``: Fashion-MNIST, a fixed 8,000-image training subset and 2,000 test images, VGG-11 at
  width 0.25, 24 search epochs (lr ÷10 at 12 and 18), 12 retraining epochs, batch 128 (the
  low-precision recipe searches on 3,000 images: int8 on CPU runs a float64 reference). Each recipe
  finishes in about 3-15 minutes on 2 otherwise idle CPU cores.
- ``gpu``: the paper's setting on Fashion-MNIST: VGG-16, the full 60k/10k set, 160 epochs (÷10 at
  80 and 120), 160 retraining epochs, batch 256.
- ``smoke``: a seconds-long slice (CI keeps the real-data path alive with it).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
try:
    import ebkernels  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from ebkernels import train  # noqa: E402
from ebkernels.train import Settings  # noqa: E402

SCALES = {
    "cpu": dict(model="vgg11", width=0.25, train_subset=8000, test_subset=2000, epochs=24, retrain_epochs=12,
                batch_size=128),
    "gpu": dict(model="vgg16", width=1.0, train_subset=None, test_subset=None, epochs=160, retrain_epochs=160,
                batch_size=256),
    "smoke": dict(model="vgg11", width=0.125, train_subset=256, test_subset=128, epochs=4, retrain_epochs=1,
                  batch_size=64),
}
RATIOS = (0.3, 0.5, 0.7)


def parser(description: str, name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu, gpu or smoke (see python/_recipe.py)")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default), cifar10, cifar100, digits")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the Debian fashion-mnist folder)")
    p.add_argument("--results", default=os.path.join("results", name), help="where tables and plots go")
    p.add_argument("--runs", default="runs", help="parent folder of the trainer's run directories")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=None, help="override the scale's search epochs")
    p.add_argument("--retrain-epochs", type=int, default=None, help="override the scale's retraining epochs")
    p.add_argument("--seed", type=int, default=0)
    return p


def base_settings(args, **overrides) -> Settings:
    scale = dict(SCALES[args.scale])
    if args.epochs is not None:
        scale["epochs"] = args.epochs
    if args.retrain_epochs is not None:
        scale["retrain_epochs"] = args.retrain_epochs
    kw = dict(dataset=args.dataset, data_dir=args.data_dir, out=args.runs, device=args.device, seed=args.seed,
              progress=sys.stderr.isatty(), ratios=RATIOS, precision="fp32", **scale)
    kw.update(overrides)
    return Settings(**kw)


def run_job(settings: Settings, label: str) -> tuple[dict, str]:
    """Run (resume, or reuse) one trainer job; returns (summary, run directory)."""
    t0 = time.perf_counter()
    print(f"\n### {label}", flush=True)
    summary = train.run(settings)
    run_dir = train.run_dir_for(train.resolve_settings(settings))
    print(f"### {label}: done in {time.perf_counter() - t0:.0f}s ({run_dir})", flush=True)
    return summary, run_dir


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def search_seconds(recs: list[dict], up_to_epoch: int) -> float:
    """Measured train+eval seconds of the search epochs 1..up_to_epoch."""
    return sum(r["time"] for r in recs if r["phase"] == "search" and r["epoch"] <= up_to_epoch)


def retrain_seconds(recs: list[dict], job: str) -> float:
    return sum(r["time"] for r in recs if r.get("job") == job)


def epoch_seconds(models: dict, settings: Settings, n_batches: int = 12, repeats: int = 3) -> dict:
    """Seconds per training epoch of each model, timed back to back on the same batches.

    Each model trains ``n_batches`` batches (forward, backward, SGD step; copies, so the models are not
    changed), the models take turns, ``repeats`` rounds, and the fastest round counts: a shared machine
    slows some rounds, never speeds one up. Scaled to the run's batches per epoch.
    """
    import copy

    import torch
    import torch.nn.functional as F

    from ebkernels import data

    r = train.resolve_settings(settings)
    ds = data.load_dataset(r.dataset, r.data_dir, r.download, r.train_subset, r.test_subset, seed=r.seed)
    batches = list(data.iterate_batches(ds, r.batch_size, train=True, epoch=0, seed=r.seed))[:n_batches]
    per_epoch = data.num_batches(ds, r.batch_size, True) / len(batches)
    best = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            m = copy.deepcopy(model).train()
            opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            x, y = batches[0]
            F.cross_entropy(m(x), y).backward()  # warm-up: allocations, first-call costs
            t0 = time.perf_counter()
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - t0) * per_epoch)
    return best


def dense_model(settings: Settings):
    """A freshly initialised dense network of these settings (for timing)."""
    import torch

    from ebkernels import build_model

    r = train.resolve_settings(settings)
    channels = 3 if r.dataset.startswith("cifar") else 1
    classes = 100 if r.dataset == "cifar100" else 10
    torch.manual_seed(r.seed)
    kw = {} if r.width == 1.0 else {"width": r.width}
    return build_model(r.model, num_classes=classes, in_channels=channels, **kw)


def ticket(summary: dict, tag: str) -> dict:
    for t in summary["tickets"]:
        if t["tag"] == tag:
            return t
    raise KeyError(f"no ticket {tag!r} in {summary['run_dir']}")


def write_table(results: str, stem: str, header: list[str], rows: list[list], note: str = "") -> str:
    """``<stem>.md`` and ``<stem>.csv``; returns the Markdown text."""
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, f"{stem}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)

    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
    with open(os.path.join(results, f"{stem}.md"), "w") as f:
        f.write(text)
    return text


def describe_setup(args, s: Settings) -> str:
    r = train.resolve_settings(s)
    subset = f"{r.train_subset or 'all'} train / {r.test_subset or 'all'} test images"
    return (f"{r.dataset} ({subset}), {r.model} width {r.width:g}, batch {r.batch_size}, lr {r.lr:g} "
            f"(÷10 at 50 % and 75 % of the epochs), {r.epochs} search epochs, {r.retrain_epochs} retraining "
            f"epochs, L1 {r.sparsity:g} on BN gammas, eps {r.eps:g}, FIFO {r.window}, seed {r.seed}, scale "
            f"'{args.scale}'")


def write_meta(results: str, info: dict) -> None:
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "meta.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot
