"""Table 2 analogue: EB Train against the paper's competitors at p = 0.3 / 0.5 / 0.7: final accuracy,
training FLOPs (scoring included), wall time.

One trainer job per method and seed (``ebkernels --method NAME``), same model, data and schedules:

- ``eb``: fp32 search with the L1 penalty, stopped by the detector (eps 0.1, FIFO 5) once all three
  ratios have their ticket; each ticket retrained twice, inherited and re-initialised;
- ``ns`` (the progressive pruning baseline, ``--baseline``): trained all search epochs with L1, pruned
  by |gamma|, retrained with inherited weights;
- ``lt``: trained all search epochs without L1, pruned by filter l1 norm (each layer's norms divided by
  their mean, then one global ranking), rewound to the initial weights, retrained;
- ``thinet``: trained all search epochs without L1, greedy next-layer reconstruction per layer, retrained;
- ``snip``, ``synflow``: scored at initialisation (SNIP on 4 training batches, SynFlow data-free, 100
  rounds), the pruned network trained from its initial weights for the retraining schedule only.

Training FLOPs: 3 x forward multiply-adds x training images x epochs (search epochs up to each
ticket's draw epoch, retraining on the pruned network) plus the criterion's own passes. Wall time:
the measured train+eval seconds of those epochs (metrics.jsonl) plus the criterion's scoring seconds.

    python python/table2_eb_vs_baseline.py --scale cpu                        # all six methods, seed 0
    python python/table2_eb_vs_baseline.py --scale cpu --methods eb,ns --seeds 0,1 --retrain-epochs 24 \\
        --results results/table2_retrain24                                    # the retrain-length question

Jobs live in hashed run directories under ``--runs``: an interrupted recipe resumes, a finished job is
reused. Writes ``<results>/table2.{md,csv,png}`` and ``meta.json``.
"""
from __future__ import annotations

import dataclasses
import os
import statistics

from tqdm import tqdm

import _recipe as R
from ebkernels._cli import comma_list

METHODS = ("eb", "ns", "lt", "snip", "synflow", "thinet")
TITLES = {"eb": "EB Train", "ns": "NS (progressive baseline)", "lt": "LT (rewound)", "snip": "SNIP",
          "synflow": "SynFlow", "thinet": "ThiNet"}


def method_settings(args, method: str, seed: int) -> R.Settings:
    """The recipe's settings for one method; the settings a method does not read are left at their
    defaults (the trainer refuses them otherwise)."""
    extra = {"eb": dict(retrain_init="both"), "ns": dict(baseline=True)}.get(method, {})
    s = R.base_settings(args, seed=seed, **extra)
    if method not in ("eb", "ns"):
        s = dataclasses.replace(s, method=method)
    if method in ("snip", "synflow"):  # no dense training: no search schedule or search precision
        s = dataclasses.replace(s, epochs=None, precision=R.Settings.precision)
    return s


def ticket_row(summary: dict, recs: list, key: str, job: str) -> dict:
    t = R.ticket(summary, key)
    crit = t.get("criterion", {})
    wall = R.search_seconds(recs, t["epoch"]) + float(crit.get("scoring_seconds", 0.0)) + R.retrain_seconds(recs, job)
    acc = t["retrain_acc"] if job == key else t["retrain_reinit_acc"]
    return {"epoch": t["epoch"], "acc": acc, "flops": t["train_flops"]["total"],
            "scoring_flops": t["train_flops"].get("scoring", 0), "wall": wall}


def spread(values: list) -> str:
    """Mean, and with several seeds the half range (max - min) / 2."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def main(argv=None):
    p = R.parser(__doc__.splitlines()[0], "table2")
    p.add_argument("--methods", type=comma_list(accepted=METHODS), default=list(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--seeds", type=comma_list(int, what="ints"), default=None,
                   help="comma-separated seeds (default: --seed)")
    args = p.parse_args(argv)
    methods = args.methods
    seeds = args.seeds or [args.seed]

    jobs = [(m, seed) for seed in seeds for m in methods]
    runs = {}
    bar = tqdm(jobs, desc="table 2 jobs", unit="job")
    for m, seed in bar:
        bar.set_postfix_str(f"{m} seed {seed}")
        summary, run_dir = R.run_job(method_settings(args, m, seed), f"{TITLES[m]}, seed {seed}")
        runs[m, seed] = (summary, R.records(run_dir), run_dir)
    bar.close()

    variants = [(m, "inherit") for m in methods] + ([("eb", "reinit")] if "eb" in methods else [])
    variants.sort(key=lambda v: (methods.index(v[0]), v[1] != "inherit"))
    rows, plot = [], {}
    for ratio in R.RATIOS:
        key = f"{ratio:g}"
        ns_flops = (statistics.mean(ticket_row(runs["ns", s][0], runs["ns", s][1], key, key)["flops"]
                                    for s in seeds) if "ns" in methods else None)
        for m, init in variants:
            cells = [ticket_row(runs[m, s][0], runs[m, s][1], key, key if init == "inherit" else key + "+reinit")
                     for s in seeds]
            flops = statistics.mean(c["flops"] for c in cells)
            title = TITLES[m] + (" (re-init)" if init == "reinit" else "")
            per_seed = ["/".join(f"{c['acc']:.2f}" for c in cells)] if len(seeds) > 1 else []
            rows.append([key, title, "/".join(str(c["epoch"]) for c in cells), spread([c["acc"] for c in cells]),
                         *per_seed,
                         f"{flops / 1e12:.3g}", f"{statistics.mean(c['scoring_flops'] for c in cells) / 1e12:.3g}",
                         spread([c["wall"] for c in cells]),
                         f"{ns_flops / flops:.2f}" if ns_flops else None])
            plot.setdefault(title, {})[key] = (statistics.mean(c["acc"] for c in cells), flops)

    first = runs[methods[0], seeds[0]][0]
    # the dense network trained all search epochs (EB stops early; SNIP and SynFlow train none)
    dense = next((runs[m, seeds[0]][0] for m in ("ns", "lt", "thinet") if m in methods), None)
    note = (f"Seeds {', '.join(map(str, seeds))}" + (" (accuracy and wall time: mean ± half range over seeds)"
                                                    if len(seeds) > 1 else "") + ". "
            + (f"Dense network after {dense['search']['epochs_run']} epochs: "
               f"{dense['search']['final_test_acc']:.2f}% ({dense['method']} run, seed {seeds[0]}); "
               if dense else "")
            + f"dense forward cost {first['dense']['flops'] / 1e6:.2f} M multiply-adds per image. "
            "Drawn at: the search epoch of the ticket (0: at initialisation), per seed. Training FLOPs in 10^12: "
            "3 x forward multiply-adds x images x epochs (search up to the draw epoch, retraining on the pruned "
            "network) + the criterion's scoring passes (its own column). Wall time: measured train+eval seconds "
            "of those epochs plus the scoring seconds (a shared machine: noisy). FLOPs vs NS: NS's training "
            f"FLOPs / the row's.\nSetup: {R.describe_setup(args, method_settings(args, 'ns', seeds[0]))}.")
    table = R.write_table(args.results, "table2",
                          ["p", "method", "drawn at epoch", "retrain acc. (%)"]
                          + (["retrain acc. per seed (%)"] if len(seeds) > 1 else []) + ["training FLOPs (1e12)",
                           "of which scoring (1e12)", "wall time (s)", "FLOPs vs NS (x)"], rows, note=note)
    print(table)

    plt = R.plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(R.RATIOS))
    w = 0.8 / len(plot)
    for i, (title, by_key) in enumerate(plot.items()):
        off = [x + (i - (len(plot) - 1) / 2) * w for x in xs]
        a1.bar(off, [by_key[f"{r:g}"][0] for r in R.RATIOS], w, label=title)
        a2.bar(off, [by_key[f"{r:g}"][1] / 1e12 for r in R.RATIOS], w, label=title)
    for ax, label in ((a1, "retrain accuracy (%)"), (a2, "training FLOPs (1e12)")):
        ax.set_xticks(list(xs), [f"p = {r:g}" for r in R.RATIOS])
        ax.set_ylabel(label)
    lo = min(v[0] for by_key in plot.values() for v in by_key.values())
    a1.set_ylim(max(0, lo - 5), 100)
    a1.legend(fontsize=7)
    fig.suptitle(f"Table 2 analogue: EB Train vs competitors (seeds {', '.join(map(str, seeds))})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "table2.png"), dpi=120)
    R.write_meta(args.results, {"runs": {f"{m} seed {s}": v[2] for (m, s), v in runs.items()},
                                "found_epoch": {f"{m} seed {s}": v[0]["search"]["found_epoch"]
                                                for (m, s), v in runs.items()}})
    print(f"wrote {args.results}/table2.md, table2.csv, table2.png")


if __name__ == "__main__":
    main()
