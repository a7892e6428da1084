"""Low-precision search: does an int8 (WAGE-style, QConv2d/QLinear) search train like an fp32 one, and draw
the same early-bird tickets? Rows fp32, bf16, int8 (the default QConfig: Shift scales, E rounded
stochastically), int8 with E rounded to nearest, int8 with absmax scales; several seeds.

Every row is the same EB job (12 search epochs at ``--scale cpu``, lr ÷10 at 6 and 9; L1 on BN gammas, detector eps 0.1, FIFO 5, tickets retrained in fp32 with
inherited weights, p = 0.3 / 0.5 / 0.7) with ``--search-to-end``: the tickets are drawn when the detector
fires and the dense network trains on through the lr decay, so one job gives both the tickets and the
dense accuracy after the decay. The dense accuracy is reported with BatchNorm statistics re-estimated on
8 training batches (the trainer's default) and with the running statistics (issue 22: at lr 0.1 the
running means lag the weights, most in an int8 search with nearest-rounded E).

Tables: dense test accuracy after the decay and at the last lr-0.1 epoch (mean ± sd over seeds), train
loss; per ratio, the epoch each ticket was drawn, its mask distance to the fp32 ticket of the same seed
(next to fp32's own seed-to-seed distance and bf16's), and its retrain accuracy. On CPU the int8 layers run
the PyTorch reference of the kernels (exact, several times slower than fp32), so the CPU scale searches on
a 3,000-image subset; its wall times say nothing about GPU speed.

    python python/low_precision.py --scale cpu                       # 15 jobs; see docs/reproduction.md
    python python/low_precision.py --scale cpu --rows int8 --seeds 2  # a part (e.g. in a second process)

Writes ``results/low_precision/low_precision.{md,png}`` and one CSV per table.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

import _recipe as R
from ebkernels import load_ticket, mask_distance

ROWS = {"fp32": dict(precision="fp32"), "bf16": dict(precision="bf16"), "int8": dict(precision="int8"),
        "int8-nearest-e": dict(precision="int8", int8_rounding_e="nearest"),
        "int8-absmax": dict(precision="int8", int8_mode="absmax")}
WORDS = {"fp32": "fp32", "bf16": "bf16 (autocast)", "int8": "int8 (default: Shift scales, stochastic E)",
         "int8-nearest-e": "int8, E rounded to nearest", "int8-absmax": "int8, absmax scales"}


def _ms(xs, digits=2):
    """'mean ± sd' (sd over seeds; just the value for one seed)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.fmean(xs)
    return f"{m:.{digits}f}" if len(xs) < 2 else f"{m:.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _job(args, row, seed):
    subset = {"train_subset": 3000} if args.scale == "cpu" else {}  # int8 on CPU: the reference path
    s = R.base_settings(args, seed=seed, search_to_end=True, **subset, **ROWS[row])
    summary, run_dir = R.run_job(s, f"{row} search, seed {seed}")
    if "final_test_acc_running" not in summary["search"]:
        raise SystemExit(f"{run_dir} was finished by an older trainer (no re-estimated BN accuracy); move it away")
    recs = [r for r in R.records(run_dir) if r["phase"] == "search"]
    masks = {}
    for p in R.RATIOS:
        t = R.ticket(summary, f"{p:g}")
        masks[f"{p:g}"] = load_ticket(os.path.join(run_dir, t["path"]), with_info=True)[1]["mask"]
    return {"summary": summary, "recs": recs, "masks": masks, "settings": s, "run_dir": run_dir}


def _same_epoch_distance(job, ref, pk):
    """Distance between the detector's masks of two runs at the epoch ``ref``'s ticket was drawn (the packed
    mask history of masks.npz): the trajectories' divergence without the draw epochs' difference."""
    a, b = (np.load(os.path.join(j["run_dir"], "masks.npz")) for j in (job, ref))
    e = R.ticket(ref["summary"], pk)["epoch"]
    x = np.bitwise_xor(a[f"p{pk}"][e - 1], b[f"p{pk}"][e - 1]).astype("<u4").view(np.uint8)
    return float(np.unpackbits(x).sum()) / int(b["channels"])


def _at(recs, epoch, key):
    return next((r[key] for r in recs if r["epoch"] == epoch), None)


def _mean_to(recs, epoch, key):
    """Mean over the epochs 1..epoch (the lr-0.1 phase: less noisy than one epoch)."""
    return statistics.fmean(r[key] for r in recs if r["epoch"] <= epoch)


def main(argv=None):
    p = R.parser(__doc__.splitlines()[0], "low_precision")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    args = p.parse_args(argv)
    if args.scale == "cpu" and args.epochs is None:
        args.epochs = 12  # int8 on CPU is the reference path: the 12-epoch schedule of issue 22's measurements
    seeds = [int(v) for v in args.seeds.split(",")]
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--rows {bad}: accepted: {', '.join(ROWS)}")
    t0 = time.perf_counter()
    jobs = {(row, seed): _job(args, row, seed) for row in rows for seed in seeds}
    wall = time.perf_counter() - t0
    any_job = next(iter(jobs.values()))
    epochs = R.train.resolve_settings(any_job["settings"]).epochs
    half = epochs // 2  # the last epoch at lr 0.1 (÷10 from 50 % of the epochs on)

    dense = []
    for row in rows:
        js = [jobs[row, s] for s in seeds]
        dense.append([WORDS[row], _ms([_at(j["recs"], epochs, "test_acc") for j in js]),
                      _ms([_at(j["recs"], epochs, "test_acc_running") for j in js]),
                      _ms([_at(j["recs"], half, "test_acc") for j in js]),
                      _ms([_at(j["recs"], half, "test_acc_running") for j in js]),
                      _ms([_mean_to(j["recs"], half, "test_acc") for j in js]),
                      _ms([_mean_to(j["recs"], half, "test_acc_running") for j in js]),
                      _ms([_at(j["recs"], epochs, "train_loss") for j in js], 4),
                      _ms([_at(j["recs"], half, "train_loss") for j in js], 4),
                      _ms([statistics.fmean(r["time"] for r in j["recs"]) for j in js], 1)])
    dense_md = R.write_table(args.results, "low_precision_dense",
                             ["search", f"dense acc. epoch {epochs}, BN re-estimated (%)",
                              f"epoch {epochs}, running BN (%)", f"epoch {half} (lr 0.1), BN re-estimated (%)",
                              f"epoch {half}, running BN (%)", f"epochs 1-{half} mean, BN re-estimated (%)",
                              f"epochs 1-{half} mean, running BN (%)", f"train loss epoch {epochs}",
                              f"train loss epoch {half}", "s / search epoch"], dense)

    have_fp32 = "fp32" in rows
    tickets, seed_to_seed = [], {}
    for pk in (f"{q:g}" for q in R.RATIOS):
        if have_fp32:
            pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
            seed_to_seed[pk] = [mask_distance(jobs["fp32", a]["masks"][pk], jobs["fp32", b]["masks"][pk])
                                for a, b in pairs]
        for row in rows:
            js = [jobs[row, s] for s in seeds]
            ts = [R.ticket(j["summary"], pk) for j in js]
            drawn = "/".join(f"{t['epoch']}{'' if t['by_detector'] else '*'}" for t in ts)
            dist = same = "–"
            if have_fp32 and row != "fp32":
                dist = _ms([mask_distance(j["masks"][pk], jobs["fp32", s]["masks"][pk]) for j, s in zip(js, seeds)], 3)
                same = _ms([_same_epoch_distance(j, jobs["fp32", s], pk) for j, s in zip(js, seeds)], 3)
            tickets.append([pk, WORDS[row], drawn, dist, same, _ms([t.get("retrain_acc") for t in ts])])
    note = ("Drawn at: the search epoch of each seed's ticket (* = the detector had not fired by the last "
            "epoch). Mask distance: normalised Hamming distance to the fp32 ticket of the same seed; at the same "
            "epoch: between the two searches' masks at the epoch the fp32 ticket was drawn. ")
    if have_fp32 and len(seeds) > 1:
        note += ("fp32 seed-to-seed distance (mean over seed pairs): "
                 + ", ".join(f"p = {k} {_ms(v, 3)}" for k, v in seed_to_seed.items()) + ". ")
    note += (f"Mean ± sd over seeds {', '.join(map(str, seeds))}; recipe wall time {wall:.0f} s (jobs reused when "
             f"finished). Setup: {R.describe_setup(args, any_job['settings'])}; --search-to-end, BN statistics "
             f"re-estimated on 8 training batches for the dense accuracy.")
    tickets_md = R.write_table(args.results, "low_precision_tickets",
                               ["p", "search", "drawn at epoch (per seed)", "mask distance to fp32 ticket",
                                "same epoch", "retrain acc. (%)"], tickets, note=note)
    text = "## Dense network\n\n" + dense_md + "\n## Tickets\n\n" + tickets_md
    with open(os.path.join(args.results, "low_precision.md"), "w") as f:
        f.write(text)
    print(text)
    _plot(args, rows, seeds, jobs)
    R.write_meta(args.results, {f"{row} seed {s}": j["summary"]["run_dir"] for (row, s), j in jobs.items()})
    print(f"wrote {args.results}/low_precision.md, low_precision_*.csv, low_precision.png")


def _plot(args, rows, seeds, jobs):
    plt = R.plt()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, row in enumerate(rows):
        recs = [jobs[row, s]["recs"] for s in seeds]
        xs = [r["epoch"] for r in recs[0]]
        for key, style, words in (("test_acc", "-", "BN re-estimated"), ("test_acc_running", ":", "running BN")):
            ys = [statistics.fmean(_at(rs, e, key) for rs in recs) for e in xs]
            ax.plot(xs, ys, ls=style, color=f"C{i}", marker="." if style == "-" else None,
                    label=f"{WORDS[row]}, {words}")
    ax.set_xlabel("search epoch")
    ax.set_ylabel(f"dense test accuracy (%), mean of {len(seeds)} seed(s)")
    ax.set_title("search in fp32 / bf16 / int8: dense accuracy with re-estimated (solid) and running (dotted) "
                 "BN statistics", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "low_precision.png"), dpi=120)


if __name__ == "__main__":
    main()
