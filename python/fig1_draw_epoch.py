"""Fig. 1 analogue: retraining accuracy of tickets drawn at different epochs, p = 0.3 / 0.5 / 0.7,
against the dense network.

One dense training run (the trainer's ``--baseline`` mode: all search epochs, fp32) draws tickets at
several epochs (``--draw-at``) and at the last one, for the three pruning ratios; every ticket is
pruned physically and retrained with its inherited weights on the same schedule. The detector runs
alongside and marks the epoch it would have stopped at (paper eps = 0.1, FIFO of 5).

    python python/fig1_draw_epoch.py --scale cpu        # ~10 min on 2 CPU cores (Fashion-MNIST subset)
    python python/fig1_draw_epoch.py --scale gpu        # VGG-16, full set, 160 epochs

Writes ``results/fig1/fig1.{md,csv,png}``.
"""
from __future__ import annotations

import os

import _recipe as R

DRAWS = {"cpu": [2, 4, 8, 12, 16], "gpu": [10, 20, 40, 80, 120], "smoke": [2]}


def draw_epochs(args, epochs: int) -> list[int]:
    if args.epochs is None and args.scale in DRAWS:
        return [e for e in DRAWS[args.scale] if e < epochs]
    return sorted({max(1, round(epochs * f)) for f in (1 / 12, 1 / 6, 1 / 3, 1 / 2, 2 / 3)} - {epochs})


def main(argv=None):
    args = R.parser(__doc__.splitlines()[0], "fig1").parse_args(argv)
    s = R.base_settings(args)
    epochs = R.train.resolve_settings(s).epochs
    s.baseline, s.draw_at = True, tuple(draw_epochs(args, epochs))
    summary, run_dir = R.run_job(s, f"dense run with tickets drawn at epochs {list(s.draw_at)} and {epochs}")

    dense_acc = summary["search"]["final_test_acc"]
    found = summary["search"]["found_epoch"]
    draws = list(s.draw_at) + [epochs]
    rows, curves = [], {}
    for p in R.RATIOS:
        key = f"{p:g}"
        accs = []
        for e in draws:
            t = R.ticket(summary, key if e == epochs else f"{key}@{e}")
            accs.append(t["retrain_acc"])
            rows.append([key, e, round(t["acc_before_retrain"], 2), round(t["retrain_acc"], 2),
                         round(100 * (1 - t["flops_after"] / t["flops_before"]), 1),
                         "yes" if found.get(key) == e else ""])
        curves[key] = accs
    table = R.write_table(
        args.results, "fig1", ["p", "draw epoch", "acc. as pruned (%)", "retrain acc. (%)", "FLOPs removed (%)",
                               "detector epoch"],
        rows, note=f"Dense network: {dense_acc:.2f}% after {epochs} epochs. Detector (eps 0.1, FIFO 5) epochs: "
                   + ", ".join(f"p={k}: {v if v else 'not found'}" for k, v in found.items())
                   + f".\nSetup: {R.describe_setup(args, s)}.")
    print(table)

    plt = R.plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, accs in curves.items():
        line, = ax.plot(draws, accs, marker="o", label=f"p = {key}")
        if found.get(key):
            ax.axvline(found[key], color=line.get_color(), ls=":", lw=1)
    ax.axhline(dense_acc, color="black", ls="--", lw=1, label=f"dense ({dense_acc:.1f}%)")
    ax.set_xlabel("epoch at which the ticket is drawn")
    ax.set_ylabel("retrain accuracy (%)")
    ax.set_title(f"Fig. 1 analogue: {s.dataset}, {R.train.resolve_settings(s).model} "
                 f"(dotted: detector epoch)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fig1.png"), dpi=120)
    R.write_meta(args.results, {"run_dir": run_dir, "draws": draws, "dense_acc": dense_acc, "found": found,
                                "wall_time_s": summary["wall_time_s"]})
    print(f"wrote {args.results}/fig1.md, fig1.csv, fig1.png")


if __name__ == "__main__":
    main()
