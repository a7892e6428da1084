"""The cost model: one real training step, every launch recorded, priced on an H100 / H200 (predictions).

    python benchmarks/cost_model.py --net vgg16 --batch 256 [--card h100] [--modes int8-fused,int8-layer,bf16,fp32]
                                    [--per-kernel] [--json out.json] [--small-stem] [--width 0.25]
    python benchmarks/cost_model.py --refresh-fences     # rebuild costing/fences_sm90.json from the sm_90 AOT build

Runs on a CPU in tens of seconds: the int8 step runs for real under ``TRITON_INTERPRET=1`` with every Triton
launch recorded and not executed, the tile table planning for the priced card (``EBKERNELS_PLAN_SMS``,
132 SMs: H100 and H200); the float steps run on fake tensors. Each launch and PyTorch op is priced by a
roofline that counts bytes with re-reads (L2 rule), MMA work with padding and recompute, programs against
SMs, serial one-program loops, fences and atomics from the compiled SASS, launch latency, and the host time
measured here with the launches stubbed (by the recorder; for the int8 modes also forward + backward timed
plainly, without it: ``costing.step.plain_host_us``, a cross-check table under the totals). The rules and every constant: ``benchmarks/costing/`` (cards.py
holds the numbers, its package docstring the rules). Output: markdown on stdout; ``--json`` the same data.
Every figure is a model prediction, not a measurement: ``gpu_session.py`` prints these next to what it
measures, so that the first GPU run calibrates the model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

PLAN_SMS = 132  # H100 SXM and H200 SXM: the priced cards' SM count (costing/cards.py)
os.environ["TRITON_INTERPRET"] = "1"  # before triton / ebkernels are imported
os.environ.setdefault("EBKERNELS_PLAN_SMS", str(PLAN_SMS))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.common import markdown_table  # noqa: E402
from benchmarks.costing import fences, report  # noqa: E402
from benchmarks.costing.cards import RULES, card  # noqa: E402
from benchmarks.costing.price import price_trace, step_totals  # noqa: E402
from benchmarks.costing.step import MODES, plain_host_us, record_steps  # noqa: E402
from ebkernels._cli import comma_list  # noqa: E402


def price_modes(net: str, batch: int, card_name: str, modes, small_stem=False, width=1.0, hw=32, repeats=2):
    """{mode: {"trace", "priced", "totals"}} of one step per mode on ``card_name``, the modes' steps recorded in
    turns (``record_steps``: their host times from the same spells of this CPU)."""
    c = card(card_name)
    out = {}
    traces = record_steps(net, modes, batch, small_stem, width, hw, repeats)
    for mode in modes:
        tr = traces[mode]
        priced = price_trace(tr, c, RULES)
        out[mode] = {"trace": tr, "priced": priced, "totals": step_totals(priced, tr.host_tail_us, RULES),
                     "plain": plain_host_us(net, mode, small_stem, width, hw)}
    return out


def markdown(net: str, batch: int, card_name: str, results: dict, per_kernel: bool = False, limit: int = 25) -> str:
    c = card(card_name)
    traces = {m: r["trace"] for m, r in results.items()}
    any_tr = next(iter(traces.values()))
    lines = [f"## {net}, batch {batch}, {c.name}: model predictions (not measurements)", "",
             f"One training step (forward, cross-entropy, backward, SGD) recorded on a CPU "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
             f"{datetime.date.today().isoformat()}; host times measured there with the launches stubbed (CPU time of "
             f"the Python thread; the dispatch mode's cost subtracted per op, as measured for its op overload (add: "
             f"{1e6 * any_tr.calibration[0]:.1f} µs), a trivial aten dispatch {1e6 * any_tr.calibration[1]:.1f} µs "
             f"added per PyTorch op, the frees of op results after the step).", "",
             markdown_table(*report.totals_table(results)), "",
             markdown_table(*report.targets(results, traces)), ""]
    check = report.host_check_table(results)
    if check[1]:
        lines += ["Host time cross-check (int8 modes): forward + backward, the recorder's figure against the CPU "
                  "time of the same Python thread with the launches stubbed and no recorder at all (batch 2: its aten ops do "
                  "no real arithmetic; the least of 15 steps). The totals above keep the recorder's, the larger. The last "
                  "column counts the aten ops forward + backward calls (allocations and views included): exact, where "
                  "the times move with the CPU.", "",
                  markdown_table(*check), ""]
    for mode in ("int8-fused", "int8-layer"):
        if mode in results:
            r = results[mode]
            lines += [f"What the model sees of the review's findings ({report.LABEL[mode]}):", ""]
            lines += [f"- {s}" for s in report.findings(mode, r["priced"], r["trace"], r["totals"])] + [""]
    for mode, r in results.items():
        if mode != "int8-fused" and not per_kernel:
            continue
        lines += [f"### Per kernel, {report.LABEL[mode]} (µs on {c.name}; "
                  f"{'all' if per_kernel else f'the {limit} longest'} launch groups)", "",
                  markdown_table(*report.kernel_table(r["priced"], None if per_kernel else limit)), "",
                  f"By kernel / op, {report.LABEL[mode]}:", "", markdown_table(*report.name_table(r["priced"])), ""]
    return "\n".join(lines)


def as_json(results: dict) -> dict:
    out = {}
    for mode, r in results.items():
        t = {k: v for k, v in r["totals"].items() if k not in ("copies",)}
        rows = [{"name": g["p"].name, "count": g["n"], "grid": list(g["p"].grid), "programs": g["p"].programs,
                 "dram_bytes": g["p"].hbm, "l2_bytes": g["p"].l2, "ops": g["p"].ops, "useful_ops": g["p"].useful,
                 "bound": g["p"].bound, "us_each": g["p"].device_us, "us_total": g["us"], "serial_us": g["p"].serial_us,
                 "fence_us": g["p"].fence_us, "fences": g["p"].fences, "program_bytes": g["p"].program_bytes,
                 "host_cpu_us": g["host"], "op": g["p"].op}
                for g in report.kernel_rows(r["priced"])]
        seen = report.findings(mode, r["priced"], r["trace"], r["totals"]) if mode.startswith("int8") else []
        t["host_fwd_bwd_recorder_us"] = r["trace"].fwd_bwd_host_us
        plain = r.get("plain")
        t["host_fwd_bwd_plain_us"] = plain.total_us if plain else None
        t["launch_layer_us_per_launch"] = plain.per_launch_us if plain else None
        t["aten_calls_fwd_bwd"] = r["trace"].fwd_bwd_aten_calls
        out[mode] = {"totals": t, "kernels": rows, "findings": seen}
    return out


def document(sections: list) -> str:
    """A whole report: the rules once, then each network's tables."""
    return "\n\n".join([report.rules_markdown(), *sections])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="vgg16", help="any name ebkernels.build_model takes (torchvision:resnet50 ...)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--card", default="h100", help="h100 or h200")
    ap.add_argument("--modes", type=comma_list(accepted=MODES), default=list(MODES), help=",".join(MODES))
    ap.add_argument("--per-kernel", action="store_true", help="every launch group of every mode")
    ap.add_argument("--limit", type=int, default=25, help="launch groups in the int8 fused table (default 25)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--small-stem", action="store_true", help="torchvision models: the 3×3 stride-1 CIFAR stem")
    ap.add_argument("--width", type=float, default=1.0, help="channel width multiplier (ebkernels' own models)")
    ap.add_argument("--hw", type=int, default=32, help="input height and width (default 32: CIFAR)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="recorded steps per mode, the modes taking turns (host time: each event's minimum)")
    ap.add_argument("--refresh-fences", action="store_true", help="rebuild costing/fences_sm90.json (AOT, minutes)")
    args = ap.parse_args(argv)
    if args.refresh_fences:
        data = fences.refresh()
        print(f"wrote {fences.CACHE}: {sum(len(v) for v in data.values())} builds of {len(data)} kernels")
        return 0
    if int(os.environ["EBKERNELS_PLAN_SMS"]) != card(args.card).sms:
        ap.error(f"EBKERNELS_PLAN_SMS={os.environ['EBKERNELS_PLAN_SMS']} but {args.card} has {card(args.card).sms} SMs")
    results = price_modes(args.net, args.batch, args.card, args.modes, args.small_stem, args.width, args.hw,
                          args.repeats)
    print(document([markdown(args.net, args.batch, args.card, results, args.per_kernel, args.limit)]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"net": args.net, "batch": args.batch, "card": args.card, "modes": as_json(results)}, f,
                      indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
