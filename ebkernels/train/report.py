"""What a run tells its user: log lines, ``summary.json``, the printed summary and the plots.

``summary.json`` holds the epoch found per ratio, accuracies, params/FLOPs before and after, training
FLOPs, wall time per phase and GPU energy per phase (NVML, when available); its presence marks the run
finished. Plots: ``mask_distance_matrix.png`` (paper Fig. 3), ``mask_distance.png``, ``accuracy.png``
(``plots.py``).
"""
from __future__ import annotations

import contextlib
import os
import sys

from .plots import write_plots
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
    if "test_acc_running" in test:  # the search: BN statistics re-estimated, and the running ones
        line += f"(running BN {test['test_acc_running']:5.1f}%)  "
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
                   **({"int8": {"mode": s.int8_mode, "rounding_e": s.int8_rounding_e}} if s.precision == "int8"
                      else {}),
                   "found_epoch": {ratio_key(r): state["found"].get(ratio_key(r)) for r in s.ratios},
                   # the dense accuracy with BN statistics re-estimated on bn_recal_batches training batches
                   # (when "bn_statistics" says so), and with the running statistics beside it
                   "final_test_acc": last.get("test_acc"),
                   "final_test_acc_running": last.get("test_acc_running", last.get("test_acc")),
                   "bn_statistics": (f"re-estimated on {s.bn_recal_batches} training batches"
                                     if "test_acc_running" in last else "running"),
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
            went_on = summary["settings"].get("search_to_end")
            txt = (f"found by the detector at epoch {ep} (search {'went on to' if went_on else 'stopped after'} "
                   f"epoch {search['epochs_run']} of at most {summary['settings']['epochs']})" if ep else
                   f"not found by the detector within {search['epochs_run']} epochs; drawn at the last epoch")
        p(f"ticket p={key}: {txt}")
    if search["final_test_acc"] is None:  # a ticket drawn at initialisation: no dense network trained
        p(f"dense network (not trained): {summary['dense']['params']:,} params, "
          f"{summary['dense']['flops'] / 1e6:.2f} M multiply-adds per image")
    else:
        bn = search.get("bn_statistics", "running")
        words = "" if bn == "running" else (f" (BN statistics {bn}; with the running ones "
                                            f"{search['final_test_acc_running']:.2f}%)")
        p(f"dense network ({search['precision']} search): test accuracy {search['final_test_acc']:.2f}%{words} "
          f"after epoch {search['epochs_run']}; {summary['dense']['params']:,} params, "
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
