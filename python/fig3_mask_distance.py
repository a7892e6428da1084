"""Fig. 3 analogue: pairwise mask-distance matrices over a full dense training run, p = 0.3 / 0.5 / 0.7,
with the epoch the detector fires under both stopping rules.

One dense run (``--baseline``, no retraining) records the channel mask of every epoch. Both rules are
functions of the pairwise distances, so they are replayed here on the recorded masks:

- consecutive (paper Algorithm 1): the last 5 distances between consecutive epochs all < eps;
- window (reference code): the newest mask within <= eps of each of the 4 before it.

The consecutive-rule epoch is cross-checked against the trainer's own detector. Plot as in the paper:
1 - (distance normalised to [0, 1]), warmer = closer; red line: consecutive rule, dashed: window rule.

    python python/fig3_mask_distance.py --scale cpu     # ~3 min on 2 CPU cores
    python python/fig3_mask_distance.py --scale gpu

Writes ``results/fig3/fig3.{md,csv,png}`` and ``fig3_distance.png``.
"""
from __future__ import annotations

import os

import numpy as np

import _recipe as R


def unpack(words: np.ndarray, total: int) -> np.ndarray:
    """[T, W] int32 words (channel i at word i//32, bit i%32) -> [T, total] bool."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    bits = (w[:, :, None] >> np.arange(32)) & 1
    return bits.reshape(len(words), -1)[:, :total].astype(bool)


def pairwise(masks: np.ndarray) -> np.ndarray:
    m = masks.astype(np.float64)
    return (m @ (1 - m).T + (1 - m) @ m.T) / masks.shape[1]


def consecutive_rule(d: np.ndarray, eps: float, window: int):
    """1-based epoch at which the last `window` consecutive distances are all < eps, or None."""
    seq = [d[t, t - 1] for t in range(1, len(d))]
    for t in range(window, len(seq) + 1):
        if max(seq[t - window:t]) < eps:
            return t + 1
    return None


def window_rule(d: np.ndarray, eps: float, window: int):
    """1-based epoch at which the newest mask is within <= eps of each of the window-1 before it."""
    for t in range(window - 1, len(d)):
        if all(d[t, t - j] <= eps for j in range(1, window)):
            return t + 1
    return None


def main(argv=None):
    args = R.parser(__doc__.splitlines()[0], "fig3").parse_args(argv)
    s = R.base_settings(args, retrain_epochs=0)
    s.baseline = True
    summary, run_dir = R.run_job(s, "dense run recording every epoch's masks")
    r = R.train.resolve_settings(s)
    packed = np.load(os.path.join(run_dir, "masks.npz"))
    total = int(packed["channels"])

    rows, mats, rules = [], {}, {}
    for p in R.RATIOS:
        key = f"{p:g}"
        d = pairwise(unpack(packed[f"p{key}"], total))
        mats[key] = d
        cons, win = consecutive_rule(d, r.eps, r.window), window_rule(d, r.eps, r.window)
        rules[key] = (cons, win)
        trainer_epoch = summary["search"]["found_epoch"][key]
        assert cons == trainer_epoch, f"replayed rule {cons} != trainer's detector {trainer_epoch} (p={key})"
        final = d[-1]
        rows.append([key, cons, win, len(d), f"{d[-1, -2]:.3f}" if len(d) > 1 else None,
                     f"{final[cons - 1]:.3f}" if cons else None])
    table = R.write_table(
        args.results, "fig3",
        ["p", "consecutive rule: epoch", "window rule: epoch", "epochs trained",
         "distance last two epochs", "distance(ticket at detector epoch, final mask)"],
        rows, note=f"eps = {r.eps:g}, {r.window} distances / masks; {total} BN channels. "
                   f"Setup: {R.describe_setup(args, s)}.")
    print(table)

    plt = R.plt()
    fig, axes = plt.subplots(1, len(mats), figsize=(4.3 * len(mats), 4.0), squeeze=False)
    for ax, (key, d) in zip(axes[0], mats.items()):
        span = d.max() - d.min()
        img = 1 - (d - d.min()) / span if span > 0 else np.ones_like(d)
        n = len(d)
        im = ax.imshow(img, cmap="viridis", extent=(0.5, n + 0.5, n + 0.5, 0.5))
        cons, win = rules[key]
        if cons:
            ax.axvline(cons, color="red", lw=1.3)
            ax.axhline(cons, color="red", lw=1.3)
        if win:
            ax.axvline(win, color="orange", lw=1.3, ls="--")
            ax.axhline(win, color="orange", lw=1.3, ls="--")
        ax.set_title(f"p = {key}: consecutive {cons or '–'}, window {win or '–'}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Fig. 3 analogue ({r.dataset}, {r.model}): 1 - normalised mask distance; "
                 f"red = consecutive rule, dashed = window rule", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fig3.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key, d in mats.items():
        ax.plot(range(2, len(d) + 1), [d[t, t - 1] for t in range(1, len(d))], marker=".", label=f"p = {key}")
    ax.axhline(r.eps, color="red", ls="--", lw=1, label=f"eps = {r.eps:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("distance to the previous epoch's mask")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "fig3_distance.png"), dpi=120)
    R.write_meta(args.results, {"run_dir": run_dir, "rules": rules, "wall_time_s": summary["wall_time_s"]})
    print(f"wrote {args.results}/fig3.md, fig3.csv, fig3.png, fig3_distance.png")


if __name__ == "__main__":
    main()
