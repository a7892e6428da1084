"""What a run tells its user: log lines, ``summary.json``, the printed summary and the plots.

``summary.json`` holds the epoch found per ratio, accuracies, params/FLOPs before and after, training
FLOPs, wall time per phase and GPU energy per phase (NVML, when available); its presence marks the run
finished. Plots: ``mask_distance_matrix.png`` (paper Fig. 3), ``mask_distance.png``, ``accuracy.png``.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from .rundir import ratio_key
from .settings import run_mode

__all__ = ["Log", "start_lines", "epoch_line", "ticket_line", "report_dict", "build_summary", "print_summary",
           "write_plots"]


class Log:
    """Rank 0's log: each line to the console (unless quiet) and appended to ``<run>/log.txt``."""

    def __init__(self, run_dir: str, stream=None, quiet: bool = False, is_main: bool = True):
        self.path = os.path.join(run_dir, "log.txt")
        self.stream = stream or sys.stdout
        self.quiet, self.is_main = quiet, is_main

    def __call__(self, msg: str) -> None:
        if not self.is_main:
            return
        if not self.quiet:
            try:
                from tqdm import tqdm

                tqdm.write(msg, file=self.stream)  # keeps a progress bar below the line intact
            except ImportError:
                print(msg, file=self.stream, flush=True)
            self.stream.flush()
        with contextlib.suppress(OSError):  # the log file is a convenience: never fail a run over it
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def start_lines(s, ds, run_dir: str) -> list[str]:
    """What a fresh run says first: where it writes, on what data, what it searches."""
    return [f"run directory: {run_dir}", f"data: {ds.describe()}",
            f"model: {s.model}{' (small-image stem)' if s.small_stem else ''} width {s.width:g}; search precision {s.precision}, ratios "
            f"{', '.join(map(ratio_key, s.ratios))}, eps {s.eps:g}, "
            f"{_method_words(s)}"]


def _method_words(s) -> str:
    """What the run does, in words, for its first lines."""
    return {"eb": "EB training",
            "ns": "baseline (train fully, prune, retrain)",
            "lt": "LT (train fully without L1, prune by filter l1 norm, rewind to the initial weights, retrain)",
            "thinet": "ThiNet (train fully without L1, prune by greedy next-layer reconstruction, retrain)",
            "snip": "SNIP (score the initial network on training batches, prune, train from the initial weights)",
            "synflow": f"SynFlow ({s.synflow_rounds} data-free rounds at initialisation, prune, train from the "
                       f"initial weights)"}[s.method]


def epoch_line(phase: str, epoch: int, total: int, lr: float, train: dict, test: dict, seconds: float,
               distances: dict | None = None, found: list = ()) -> str:
    """One epoch's log line; a search epoch adds each ratio's mask distance and the tickets found."""
    line = (f"[{phase}] epoch {epoch:3d}/{total}  lr {lr:.4g}  loss {train['train_loss']:.4f}  "
            f"train {train['train_acc']:5.1f}%  test {test['test_acc']:5.1f}%  ")
    if distances is not None:
        line += "  ".join(f"d(p={k}) {v:.3f}" if v is not None else f"d(p={k}) -" for k, v in distances.items())
        line += "  "
    line += f"{seconds:.1f}s  " + "  ".join(f"ticket p={key} found" for key in found)
    return line.rstrip()


def ticket_line(tag: str, epoch: int, by_detector: bool, report: dict, acc: float) -> str:
    requested = ""
    if "requested_params" in report:
        requested = (f" (the mask asked for {report['requested_params']} and {report['requested_flops']}; coupled "
                     f"channels: {report.get('coupled')})")
    return (f"  drew ticket {tag} at epoch {epoch}{' (detector)' if by_detector else ''}: params "
            f"{report.get('params_before')} -> {report.get('params_after')}, multiply-adds "
            f"{report.get('flops_before')} -> {report.get('flops_after')}{requested}, accuracy before retraining "
            f"{acc:.2f}%")


def report_dict(report) -> dict:
    """The pruning report as plain numbers (accepts a dict or an object with attributes)."""
    keys = ("params_before", "params_after", "flops_before", "flops_after")
    if isinstance(report, dict):
        d = {k: report[k] for k in keys if k in report}
        extra = {k: v for k, v in report.items() if k not in keys and isinstance(v, (int, float, str, list))}
    else:
        d = {k: getattr(report, k) for k in keys if hasattr(report, k)}
        extra = {}
    d = {k: int(v) for k, v in d.items()}
    requested = report.get("requested") if isinstance(report, dict) else None
    if isinstance(requested, dict):  # the graph pruner: what the mask asked for, next to what was achieved
        d.update(requested_params=int(requested["params"]), requested_flops=int(requested["flops"]))
    return {**extra, **d}


def build_summary(s, state: dict, run_dir: str, ds, dist) -> dict:
    search_records = [r for r in state["records"] if r["phase"] == "search"]
    n_train = len(ds.train_labels)
    dense_flops = state["dense"]["flops"]
    search_epochs = state.get("search_epochs", len(search_records))
    # training cost as in the paper's FLOPs accounting: forward + backward ~ 3x forward, per sample
    train_flops_per_epoch_dense = 3 * dense_flops * n_train
    results = {r["job"]: r for r in state["results"]}
    tickets = []
    for t in state["tickets"]:
        entry = dict(t)
        entry["path"] = os.path.relpath(t["path"], run_dir)
        for init in ("inherit", "reinit"):
            job = t["tag"] + ("" if init == "inherit" else "+reinit")
            if job in results:
                res = results[job]
                key = "retrain" if init == "inherit" else "retrain_reinit"
                entry[f"{key}_acc"] = res["final_acc"]
                entry[f"{key}_best_acc"] = res["best_acc"]
                entry[f"{key}_path"] = os.path.relpath(res["path"], run_dir)
        retrain_flops = 3 * t.get("flops_after", dense_flops) * n_train * s.retrain_epochs
        # the criterion's own work (SNIP's gradients, ThiNet's sampled activations, SynFlow's rounds)
        scoring_flops = int(t.get("criterion", {}).get("scoring_flops", 0))
        search_flops = train_flops_per_epoch_dense * t["epoch"]
        entry["train_flops"] = {"search": search_flops, "scoring": scoring_flops, "retrain": retrain_flops,
                                "total": search_flops + scoring_flops + retrain_flops}
        tickets.append(entry)
    last = search_records[-1] if search_records else {}
    wall = {k: round(v, 3) for k, v in state["wall"].items()}
    wall["total"] = round(sum(state["wall"].values()), 3)
    return {
        "finished": True,
        "run_dir": run_dir,
        "mode": run_mode(s),
        "method": s.method,
        "settings": s.hashed(),
        "data": ds.describe(),
        "device": str(dist.device) + (f" x{dist.world_size} processes" if dist.enabled else ""),
        "search": {"epochs_run": search_epochs, "precision": s.precision,
                   "found_epoch": {ratio_key(r): state["found"].get(ratio_key(r)) for r in s.ratios},
                   "final_test_acc": last.get("test_acc"),
                   "best_test_acc": max((r["test_acc"] for r in search_records), default=None),
                   "distances": {ratio_key(r): [rec["distances"].get(ratio_key(r)) for rec in search_records]
                                 for r in s.ratios}},
        "dense": {**state["dense"], "flops_note": "forward multiply-adds per sample (count_flops)"},
        "tickets": tickets,
        "train_flops_note": "3 x forward multiply-adds x training samples x epochs; search epochs are counted up to "
                            "each ticket's draw epoch (int8 operations in an int8 search); scoring: the multiply-adds "
                            "of the criterion's own network passes",
        "wall_time_s": wall,
        "energy_j": state["energy"] or None,
    }


def print_summary(summary: dict, out=sys.stdout, finished_before: bool = False) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    search = summary["search"]
    p("")
    mode = summary["mode"]
    method = summary.get("method", "ns" if mode == "baseline" else "eb")
    p(f"== early-bird {'' if mode == 'eb' else mode + ' '}summary: {summary['data']}")
    for key, ep in search["found_epoch"].items():
        if method in ("snip", "synflow"):
            txt = f"drawn at initialisation by {method} (no dense training)"
        elif method != "eb":
            # lt and thinet train without L1 on gamma: the detector's verdict there is only a record
            txt = (f"the |gamma| detector would have fired at epoch {ep}" if ep else
                   "the |gamma| detector did not fire") + \
                  f"; {mode} trained all {search['epochs_run']} epochs and drew it at the end"
        else:
            txt = (f"found by the detector at epoch {ep} (search stopped after epoch {search['epochs_run']} of "
                   f"at most {summary['settings']['epochs']})" if ep else
                   f"not found by the detector within {search['epochs_run']} epochs; drawn at the last epoch")
        p(f"ticket p={key}: {txt}")
    if search["final_test_acc"] is None:  # a ticket drawn at initialisation: no dense network trained
        p(f"dense network (not trained): {summary['dense']['params']:,} params, "
          f"{summary['dense']['flops'] / 1e6:.2f} M multiply-adds per image")
    else:
        p(f"dense network ({search['precision']} search): test accuracy {search['final_test_acc']:.2f}% after "
          f"epoch {search['epochs_run']}; {summary['dense']['params']:,} params, "
          f"{summary['dense']['flops'] / 1e6:.2f} M multiply-adds per image")
    for t in summary["tickets"]:
        pa, pb = t.get("params_after"), t.get("params_before")
        fa, fb = t.get("flops_after"), t.get("flops_before")
        line = f"ticket {t['tag']} (epoch {t['epoch']}): "
        if pa is not None and pb:
            line += f"params {pb:,} -> {pa:,} (-{100 * (1 - pa / pb):.1f}%), "
        if fa is not None and fb:
            line += f"multiply-adds {fb / 1e6:.2f}M -> {fa / 1e6:.2f}M (-{100 * (1 - fa / fb):.1f}%), "
        if t.get("requested_params") is not None and pb and fb:
            line += (f"the mask asked for -{100 * (1 - t['requested_params'] / pb):.1f}% params and "
                     f"-{100 * (1 - t['requested_flops'] / fb):.1f}% multiply-adds, ")
        line += f"accuracy {t['acc_before_retrain']:.2f}% as pruned (before retraining)"
        if "retrain_acc" in t:
            line += f", {t['retrain_acc']:.2f}% retrained"
        if "retrain_reinit_acc" in t:
            line += f", {t['retrain_reinit_acc']:.2f}% retrained from re-init"
        p(line)
    w = summary["wall_time_s"]
    p(f"wall time: search {w['search']:.1f}s, "
      + (f"scoring {w['score']:.1f}s, " if w.get("score") else "")
      + f"prune {w['prune']:.1f}s, retrain {w['retrain']:.1f}s, "
      f"eval {w['eval']:.1f}s (total {w['total']:.1f}s)"
      + (f"; GPU energy {summary['energy_j']}" if summary.get("energy_j") else ""))
    p(f"run directory: {summary['run_dir']}  (plots: mask_distance_matrix.png, mask_distance.png, accuracy.png)")


def write_plots(run_dir: str, state: dict, s, pairwise: dict) -> None:
    """The three PNGs; ``pairwise``: ratio key -> [T, T] mask distances (``EarlyBird.pairwise_distances``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [ratio_key(r) for r in s.ratios]
    # Fig. 3: 1 - normalised pairwise distance (warmer = closer), red lines at the ticket epoch
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.1), squeeze=False)
    for ax, key in zip(axes[0], keys):
        d = pairwise.get(key, np.zeros((0, 0)))
        if d.size:
            span = d.max() - d.min()
            img = 1 - (d - d.min()) / span if span > 0 else np.ones_like(d)
            n = len(d)
            im = ax.imshow(img, cmap="viridis", origin="upper", extent=(0.5, n + 0.5, n + 0.5, 0.5))
            fe = state["found"].get(key)
            if fe:
                ax.axvline(fe, color="red", lw=1.2)
                ax.axhline(fe, color="red", lw=1.2)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"p = {key}" + (f", ticket at epoch {state['found'][key]}" if state["found"].get(key) else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
    fig.suptitle("pairwise mask distance\n(1 - normalised: warmer = closer; red: ticket)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "mask_distance_matrix.png"), dpi=110)
    plt.close(fig)

    # distance to the previous epoch's mask
    recs = [r for r in state["records"] if r["phase"] == "search"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key in keys:
        xs = [r["epoch"] for r in recs if r["distances"].get(key) is not None]
        ys = [r["distances"][key] for r in recs if r["distances"].get(key) is not None]
        line, = ax.plot(xs, ys, marker=".", label=f"p = {key}")
        if state["found"].get(key):
            ax.axvline(state["found"][key], color=line.get_color(), ls=":", lw=1)
    ax.axhline(s.eps, color="red", ls="--", lw=1, label=f"eps = {s.eps:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mask distance to previous epoch")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("mask distance per epoch (dotted: ticket found)")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "mask_distance.png"), dpi=110)
    plt.close(fig)

    # accuracy curves: search, then each retraining job continuing from its draw epoch
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([r["epoch"] for r in recs], [r["test_acc"] for r in recs], color="black",
            label=f"search ({s.precision}) test")
    ax.plot([r["epoch"] for r in recs], [r["train_acc"] for r in recs], color="gray", ls="--", lw=1,
            label="search train")
    tickets = {t["tag"]: t for t in state["tickets"]}
    for res in state["results"]:
        curve = [r for r in state["records"] if r.get("job") == res["job"]]
        start = tickets[res["ticket"]]["epoch"]
        ax.plot([start + r["epoch"] for r in curve], [r["test_acc"] for r in curve], label=f"retrain {res['job']}")
    ax.set_xlabel("epoch (retraining continues from the draw epoch)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "accuracy.png"), dpi=110)
    plt.close(fig)
