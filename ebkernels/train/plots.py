"""The run's three plots, drawn for a reader who sees nothing else.

- ``mask_distance_matrix.png`` (paper Fig. 3): the normalised Hamming distance between the masks of
  every pair of search epochs, on a scale from 0 (same mask) to the largest distance seen, labelled;
- ``mask_distance.png``: each epoch's distance to the previous epoch's mask, and the threshold eps;
- ``accuracy.png``: test accuracy of the search (BatchNorm statistics re-estimated on a few training batches,
  the legend says so, with the running statistics' accuracy as a thin line), then of each ticket: as pruned
  (a marker at the epoch it was drawn) and along its retraining, counted on from that epoch.

In all three the epoch axis has whole-number ticks and each ticket's epoch is marked with how it was
taken: by the detector, at the last epoch because the detector did not fire, or at the end of
training (criteria that train fully). Short runs stay readable: every curve has point markers, so a
one-epoch retraining is a visible point and not an invisible line of length zero.

The ``*_figure`` functions return matplotlib ``Figure`` objects (no pyplot state), which the tests
inspect; :func:`write_plots` saves them.
"""
from __future__ import annotations

import os

import numpy as np

from .rundir import ratio_key

__all__ = ["write_plots", "ticket_marks", "distance_matrix_figure", "distance_figure", "accuracy_figure"]

TICKET_COLOR = "red"


def ticket_marks(state: dict, s) -> dict:
    """Ratio key -> ``(epoch, words)`` of the ticket drawn for that ratio (not the extra ``--draw-at``
    ones); none for tickets drawn at initialisation (epoch 0: no search to mark)."""
    marks = {}
    for t in state["tickets"]:
        key = ratio_key(t["ratio"])
        if t["tag"] != key or not t["epoch"]:
            continue
        if t.get("by_detector"):
            how = "detector"
        elif s.method == "eb":
            how = "last epoch: the detector did not fire"
        else:
            how = "end of training"
        marks[key] = (int(t["epoch"]), f"ticket at epoch {t['epoch']} ({how})")
    return marks


def _whole_epochs(ax, which: str = "x") -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in ((ax.xaxis,) if which == "x" else (ax.xaxis, ax.yaxis)):
        axis.set_major_locator(MaxNLocator(integer=True))


def distance_matrix_figure(state: dict, s, pairwise: dict):
    """Fig. 3: pairwise mask distances, darker = more channels differ; red lines at the ticket."""
    from matplotlib.figure import Figure

    keys = [ratio_key(r) for r in s.ratios]
    marks = ticket_marks(state, s)
    fig = Figure(figsize=(4.4 * len(keys), 4.3))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        d = np.asarray(pairwise.get(key, np.zeros((0, 0))), dtype=float)
        title = f"p = {key}"
        if d.size:
            n = len(d)
            top = float(d.max()) if d.max() > 0 else 1.0
            im = ax.imshow(d, cmap="viridis_r", vmin=0.0, vmax=top, origin="upper",
                           extent=(0.5, n + 0.5, n + 0.5, 0.5), interpolation="nearest")
            bar = fig.colorbar(im, ax=ax, fraction=0.046)
            bar.set_label("mask distance (fraction of channels that differ)", fontsize=8)
            if key in marks:
                epoch, words = marks[key]
                ax.axvline(epoch, color=TICKET_COLOR, lw=1.2)
                ax.axhline(epoch, color=TICKET_COLOR, lw=1.2)
                title += f"\n{words}"
        else:
            ax.text(0.5, 0.5, "no search epochs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        _whole_epochs(ax, "xy")
    fig.suptitle("pairwise mask distance between search epochs\n(0 = the same mask; red: the ticket's epoch)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def distance_figure(state: dict, s):
    """Each epoch's mask distance to the previous epoch's, eps, and the ticket epochs."""
    from matplotlib.figure import Figure

    keys = [ratio_key(r) for r in s.ratios]
    marks = ticket_marks(state, s)
    recs = [r for r in state["records"] if r["phase"] == "search"]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for key in keys:
        xs = [r["epoch"] for r in recs if r["distances"].get(key) is not None]
        ys = [r["distances"][key] for r in recs if r["distances"].get(key) is not None]
        line, = ax.plot(xs, ys, marker="o", ms=4, label=f"p = {key}")
        if key in marks:
            epoch, words = marks[key]
            ax.axvline(epoch, color=line.get_color(), ls=":", lw=1.5, label=f"p = {key}: {words}")
    ax.axhline(s.eps, color=TICKET_COLOR, ls="--", lw=1, label=f"eps = {s.eps:g} (detector threshold)")
    if recs:
        ax.set_xlim(0.5, recs[-1]["epoch"] + 0.5)
    if len(recs) < 2:
        ax.text(0.5, 0.5, "one search epoch: no previous mask to compare with", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("search epoch")
    ax.set_ylabel("mask distance to the previous epoch's mask")
    ax.set_ylim(bottom=0)
    _whole_epochs(ax)
    ax.legend(fontsize=7)
    ax.set_title("mask distance per epoch (dotted: the ticket's epoch)", fontsize=10)
    fig.tight_layout()
    return fig


def accuracy_figure(state: dict, s):
    """Search accuracy, each ticket as pruned, and each retraining continued from its ticket's epoch."""
    from matplotlib.figure import Figure

    recs = [r for r in state["records"] if r["phase"] == "search"]
    fig = Figure(figsize=(6.8, 4.3))
    ax = fig.subplots()
    if recs:
        xs = [r["epoch"] for r in recs]
        recal = all("test_acc_running" in r for r in recs)
        ax.plot(xs, [r["test_acc"] for r in recs], color="black", marker="o", ms=3,
                label=f"search ({s.precision}): test" + (f", BN statistics re-estimated ({s.bn_recal_batches} "
                                                         f"training batches)" if recal else ", running BN statistics"))
        if recal:
            ax.plot(xs, [r["test_acc_running"] for r in recs], color="black", lw=0.8, ls=":", marker=".", ms=2,
                    label="search: test, running BN statistics")
        ax.plot(xs, [r["train_acc"] for r in recs], color="gray", ls="--", lw=1, marker="o", ms=2,
                label="search: train")
    colors = {}
    for i, t in enumerate(state["tickets"]):
        color = colors[t["tag"]] = f"C{i % 10}"
        ax.plot([t["epoch"]], [t["acc_before_retrain"]], ls="none", marker="X", ms=9, color=color, zorder=5,
                markeredgecolor="black", markeredgewidth=0.5,
                label=f"ticket {t['tag']} as pruned (epoch {t['epoch']}, before retraining)")
    tickets = {t["tag"]: t for t in state["tickets"]}
    for res in state["results"]:
        ticket = tickets[res["ticket"]]
        curve = [r for r in state["records"] if r.get("job") == res["job"]]
        xs = [ticket["epoch"] + r["epoch"] for r in curve]
        ys = [r["test_acc"] for r in curve]
        if res.get("init", "inherit") == "inherit":  # it starts from the network as pruned
            xs, ys = [ticket["epoch"]] + xs, [ticket["acc_before_retrain"]] + ys
        ax.plot(xs, ys, marker="o", ms=4, color=colors.get(res["ticket"]),
                ls="-" if res.get("init", "inherit") == "inherit" else "-.", label=f"retrain {res['job']}: test")
    ax.set_xlabel("epoch (retraining counted on from its ticket's epoch)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 101)
    _whole_epochs(ax)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("test accuracy: search, tickets as pruned, retraining", fontsize=10)
    fig.tight_layout()
    return fig


def write_plots(run_dir: str, state: dict, s, pairwise: dict) -> None:
    """The three PNGs; ``pairwise``: ratio key -> [T, T] mask distances (``EarlyBird.pairwise_distances``)."""
    for name, fig in (("mask_distance_matrix.png", distance_matrix_figure(state, s, pairwise)),
                      ("mask_distance.png", distance_figure(state, s)),
                      ("accuracy.png", accuracy_figure(state, s))):
        fig.savefig(os.path.join(run_dir, name), dpi=110)
