"""Table 2 analogue: EB Train (inherited weights and re-initialised) against the progressive pruning
baseline (train fully, prune, retrain), p = 0.3 / 0.5 / 0.7: final accuracy, training FLOPs, wall time.

Two trainer jobs with the same model, data and schedules:

- EB: fp32 search with the L1 penalty, stopped by the detector (eps 0.1, FIFO 5) once all three
  ratios have their ticket; each ticket retrained twice, inherited and re-initialised;
- baseline (``--baseline``): the dense network trained for all search epochs, pruned at the end,
  retrained with its inherited weights.

Training FLOPs follow the paper's accounting: 3 x forward multiply-adds x training images x epochs,
search epochs counted up to each ticket's draw epoch, retraining on the pruned network. Wall time:
the measured train+eval seconds of those same epochs (from metrics.jsonl). GPU energy (NVML) per
phase is listed where a GPU measured it.

    python python/table2_eb_vs_baseline.py --scale cpu     # ~6 min on 2 CPU cores
    python python/table2_eb_vs_baseline.py --scale gpu

Writes ``results/table2/table2.{md,csv,png}``.
"""
from __future__ import annotations

import os

import _recipe as R
from ebkernels import load_ticket


def main(argv=None):
    args = R.parser(__doc__.splitlines()[0], "table2").parse_args(argv)
    eb_s = R.base_settings(args, retrain_init="both")
    base_s = R.base_settings(args, baseline=True)
    eb, eb_dir = R.run_job(eb_s, "EB training (fp32 search, detector stop; retrain inherited + re-init)")
    base, base_dir = R.run_job(base_s, "progressive baseline (train fully, prune, retrain)")
    eb_recs, base_recs = R.records(eb_dir), R.records(base_dir)
    epochs = R.train.resolve_settings(base_s).epochs
    retrain_epochs = R.train.resolve_settings(base_s).retrain_epochs
    # per-epoch training time of the dense network and of each ticket, timed back to back (robust to
    # a shared machine, unlike the runs' own epoch times)
    models = {"dense": R.dense_model(base_s)}
    for p in R.RATIOS:
        models[f"eb {p:g}"] = load_ticket(os.path.join(eb_dir, R.ticket(eb, f"{p:g}")["path"]))
        models[f"base {p:g}"] = load_ticket(os.path.join(base_dir, R.ticket(base, f"{p:g}")["path"]))
    t_epoch = R.epoch_seconds(models, base_s)
    print("seconds per training epoch (fastest of 3 back-to-back rounds):",
          {k: round(v, 2) for k, v in t_epoch.items()})

    rows, plot = [], {}
    for p in R.RATIOS:
        key = f"{p:g}"
        bt, et = R.ticket(base, key), R.ticket(eb, key)
        b_flops, e_flops = bt["train_flops"]["total"], et["train_flops"]["total"]
        b_wall = R.search_seconds(base_recs, epochs) + R.retrain_seconds(base_recs, key)
        e_wall = R.search_seconds(eb_recs, et["epoch"]) + R.retrain_seconds(eb_recs, key)
        e_wall_re = R.search_seconds(eb_recs, et["epoch"]) + R.retrain_seconds(eb_recs, key + "+reinit")
        found = eb["search"]["found_epoch"][key]
        b_steady = epochs * t_epoch["dense"] + retrain_epochs * t_epoch[f"base {key}"]
        e_steady = et["epoch"] * t_epoch["dense"] + retrain_epochs * t_epoch[f"eb {key}"]
        e_steady_re = e_steady  # same architecture, same epochs
        rows += [
            [key, "progressive baseline", epochs, bt["retrain_acc"], f"{b_flops / 1e12:.3g}", round(b_wall, 1),
             round(b_steady, 1), 1.0, 1.0],
            [key, "EB Train", f"{et['epoch']}" + ("" if found else " (not found)"), et["retrain_acc"],
             f"{e_flops / 1e12:.3g}", round(e_wall, 1), round(e_steady, 1), round(b_flops / e_flops, 2),
             round(b_steady / e_steady, 2)],
            [key, "EB Train (re-init)", f"{et['epoch']}" + ("" if found else " (not found)"),
             et["retrain_reinit_acc"], f"{e_flops / 1e12:.3g}", round(e_wall_re, 1), round(e_steady_re, 1),
             round(b_flops / e_flops, 2), round(b_steady / e_steady_re, 2)],
        ]
        plot[key] = (bt["retrain_acc"], et["retrain_acc"], et["retrain_reinit_acc"], b_flops, e_flops)
    energy = {"EB": eb.get("energy_j"), "baseline": base.get("energy_j")}
    note = (f"Dense network after {epochs} epochs: {base['search']['final_test_acc']:.2f}% "
            f"(baseline run); dense forward cost {base['dense']['flops'] / 1e6:.2f} M multiply-adds per image. "
            f"Training FLOPs in 10^12 (3 x forward multiply-adds x images x epochs). Wall time: the measured "
            f"train+eval seconds of those epochs in the runs (on a shared machine: other processes took the cores "
            f"for stretches of them). Timed training: epochs x seconds per training epoch of the dense network "
            f"and of each ticket, timed back to back (fastest of 3 rounds; "
            + ", ".join(f"{k} {v:.1f}s" for k, v in t_epoch.items())
            + "); time saving uses it. "
            f"GPU energy (J, NVML): {energy if any(energy.values()) else 'not measured (no GPU)'}.\n"
            f"Setup: {R.describe_setup(args, base_s)}.")
    table = R.write_table(args.results, "table2",
                          ["p", "method", "search epochs", "retrain acc. (%)", "training FLOPs (1e12)",
                           "wall time (s)", "timed training (s)", "FLOPs saving (x)", "time saving (x)"],
                          rows, note=note)
    print(table)

    plt = R.plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    xs = range(len(plot))
    w = 0.27
    for i, (label, idx) in enumerate((("baseline", 0), ("EB Train", 1), ("EB Train (re-init)", 2))):
        a1.bar([x + (i - 1) * w for x in xs], [v[idx] for v in plot.values()], w, label=label)
    a1.set_xticks(list(xs), [f"p = {k}" for k in plot])
    lo = min(min(v[:3]) for v in plot.values())
    a1.set_ylim(max(0, lo - 5), 100)
    a1.set_ylabel("retrain accuracy (%)")
    a1.legend(fontsize=8)
    a2.bar([x - w / 2 for x in xs], [v[3] / 1e12 for v in plot.values()], w, label="baseline")
    a2.bar([x + w / 2 for x in xs], [v[4] / 1e12 for v in plot.values()], w, label="EB Train")
    a2.set_xticks(list(xs), [f"p = {k}" for k in plot])
    a2.set_ylabel("training FLOPs (1e12)")
    a2.legend(fontsize=8)
    fig.suptitle("Table 2 analogue: EB training vs progressive pruning", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "table2.png"), dpi=120)
    R.write_meta(args.results, {"eb_run": eb_dir, "baseline_run": base_dir, "energy_j": energy,
                                "eb_found": eb["search"]["found_epoch"]})
    print(f"wrote {args.results}/table2.md, table2.csv, table2.png")


if __name__ == "__main__":
    main()
