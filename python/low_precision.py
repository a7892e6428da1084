"""Low-precision search: the ticket drawn by an int8 (WAGE-style, QConv2d/QLinear) search against the
one drawn by an fp32 search, p = 0.3 / 0.5 / 0.7: mask distance between the two tickets, epoch found,
retrain accuracy of each (retraining is fp32 for both, as in the paper §3.2).

Two EB jobs that differ only in the search precision (both: L1 on BN gammas, detector eps 0.1, FIFO
5, tickets retrained in fp32 with inherited weights). On CPU the int8 layers take the PyTorch reference
path (float64 on the integer codes: exact, but several times slower than fp32), so the CPU scale
searches on a 3,000-image subset, and the int8 wall time here says nothing about GPU speed (the int8
kernels' speed is measured by ``benchmarks/``).

    python python/low_precision.py --scale cpu      # ~5-10 min on 2 CPU cores
    python python/low_precision.py --scale gpu

Writes ``results/low_precision/low_precision.{md,csv,png}``.
"""
from __future__ import annotations

import os

import _recipe as R
from ebkernels import load_ticket, mask_distance


def main(argv=None):
    args = R.parser(__doc__.splitlines()[0], "low_precision").parse_args(argv)
    subset = {"train_subset": 3000} if args.scale == "cpu" else {}  # int8 on CPU: the float64 reference
    fp32_s = R.base_settings(args, **subset)
    int8_s = R.base_settings(args, precision="int8", **subset)
    fp32, fp32_dir = R.run_job(fp32_s, "EB search in fp32")
    int8, int8_dir = R.run_job(int8_s, "EB search in int8 (QConv2d / QLinear)")
    recs = {"fp32": R.records(fp32_dir), "int8": R.records(int8_dir)}

    rows = []
    for p in R.RATIOS:
        key = f"{p:g}"
        t32, t8 = R.ticket(fp32, key), R.ticket(int8, key)
        m32 = load_ticket(os.path.join(fp32_dir, t32["path"]), with_info=True)[1]["mask"]
        m8 = load_ticket(os.path.join(int8_dir, t8["path"]), with_info=True)[1]["mask"]
        f32, f8 = fp32["search"]["found_epoch"][key], int8["search"]["found_epoch"][key]
        rows.append([key, f32 or f"not found ({t32['epoch']})", f8 or f"not found ({t8['epoch']})",
                     round(mask_distance(m8, m32), 4), t32["retrain_acc"], t8["retrain_acc"],
                     round(100 * (1 - t32["params_after"] / t32["params_before"]), 1),
                     round(100 * (1 - t8["params_after"] / t8["params_before"]), 1),
                     round(R.search_seconds(recs["fp32"], t32["epoch"]), 1),
                     round(R.search_seconds(recs["int8"], t8["epoch"]), 1)])
    note = (f"Dense test accuracy at the end of the search: fp32 {fp32['search']['final_test_acc']:.2f}% "
            f"(epoch {fp32['search']['epochs_run']}), int8 {int8['search']['final_test_acc']:.2f}% "
            f"(epoch {int8['search']['epochs_run']}). Mask distance: normalised Hamming distance between the "
            f"two tickets' channel masks. Search seconds on this machine (int8 on CPU = float64 reference path).\n"
            f"Setup: {R.describe_setup(args, fp32_s)}.")
    table = R.write_table(args.results, "low_precision",
                          ["p", "fp32 search: epoch", "int8 search: epoch", "mask distance int8 vs fp32",
                           "retrain acc. fp32 ticket (%)", "retrain acc. int8 ticket (%)",
                           "params removed fp32 (%)", "params removed int8 (%)", "search s fp32", "search s int8"],
                          rows, note=note)
    print(table)

    plt = R.plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for prec, style in (("fp32", "-"), ("int8", "--")):
        search = [r for r in recs[prec] if r["phase"] == "search"]
        for i, p in enumerate(R.RATIOS):
            key = f"{p:g}"
            xs = [r["epoch"] for r in search if r["distances"].get(key) is not None]
            ys = [r["distances"][key] for r in search if r["distances"].get(key) is not None]
            ax.plot(xs, ys, ls=style, color=f"C{i}", marker=".", label=f"{prec}, p = {key}")
    ax.axhline(fp32_s.eps, color="red", lw=1, ls=":", label=f"eps = {fp32_s.eps:g}")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("mask distance to the previous epoch")
    ax.set_title("int8 vs fp32 search: mask distance per epoch", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "low_precision.png"), dpi=120)
    R.write_meta(args.results, {"fp32_run": fp32_dir, "int8_run": int8_dir})
    print(f"wrote {args.results}/low_precision.md, low_precision.csv, low_precision.png")


if __name__ == "__main__":
    main()
