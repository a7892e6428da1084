"""Run every benchmark table and write the report.

    python benchmarks/run.py                 # on a GPU: full tables -> stdout and benchmarks/RESULTS.md
    python benchmarks/run.py --smoke         # anywhere: tiny shapes, a few seconds; stdout only
    python benchmarks/run.py --sections layers,quantize --batches 256

Sections: ``layers`` (QConv2d per conv shape of VGG16-CIFAR and PreResNet-101-CIFAR at batch 64 and
256, and QLinear), ``quantize`` (quantizer bandwidth vs copy), ``detector`` (from
``benchmarks/bench_detector.py: detector_rows(device, smoke)``, skipped with a note if absent) and
``epoch`` (one search epoch, int8 vs fp32 vs bf16 autocast), ``flow`` (``benchmarks/flow.py``: saved
activations, kernels per training step and modelled bytes per step of int8 fused / per-layer, bf16, fp32:
exact counts that a CPU measures too, ``--sections flow`` without ``--smoke`` on a CPU).

Without CUDA only ``--smoke`` runs: the reference (PyTorch) path on tiny shapes, every figure labelled
"CPU smoke — not a GPU result". ``benchmarks/RESULTS.md`` is written only by a full run on a GPU, so a
CPU run can never overwrite GPU results; ``--out PATH`` writes the report elsewhere too (a GPU smoke run
or a CPU smoke run may not target RESULTS.md).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.common import CPU_LABEL, default_device, environment, is_gpu, markdown_table  # noqa: E402
from benchmarks.shapes import CONV_SHAPES  # noqa: E402
from ebkernels._cli import comma_list, positive_int  # noqa: E402

RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")
SECTIONS = ("layers", "quantize", "detector", "epoch", "flow")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds (CPU: reference path)")
    ap.add_argument("--sections", type=comma_list(accepted=SECTIONS), default=list(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--batches", type=comma_list(positive_int, what="positive ints, e.g. 64,256"), default=None,
                    help="conv batch sizes, e.g. 64,256 (default: 64,256)")
    ap.add_argument("--nets", type=comma_list(accepted=CONV_SHAPES), default=None,
                    help="conv shape lists: vgg16,preresnet101 (default: both)")
    ap.add_argument("--epoch-models", type=comma_list(), default=["vgg16", "preresnet101"],
                    help="models of the epoch section")
    ap.add_argument("--epoch-repeats", type=int, default=1, help="epochs timed per model and mode (median)")
    ap.add_argument("--epoch-steps", type=int, default=None,
                    help="steps per timed epoch (default: a full CIFAR-10 epoch, 196 steps)")
    ap.add_argument("--out", default=None, help="also write the markdown report to this path")
    args = ap.parse_args(argv)
    if args.epoch_repeats < 1:
        ap.error(f"--epoch-repeats={args.epoch_repeats}: must be >= 1")
    if args.epoch_steps is not None and args.epoch_steps < 1:
        ap.error(f"--epoch-steps={args.epoch_steps}: must be >= 1")
    return args


class Report:
    def __init__(self, label: str | None):
        self.parts: list[str] = []
        self.label = label  # appended to every table title on CPU

    def text(self, s: str):
        self.parts.append(s)
        print(s, flush=True)

    def table(self, title: str, headers, rows):
        title = f"{title} — {self.label}" if self.label else title
        self.text(f"\n### {title}\n\n{markdown_table(headers, rows)}")

    def markdown(self) -> str:
        return "\n".join(self.parts) + "\n"


def _section_layers(report, device, smoke, args, log):
    from benchmarks import bench_layers

    report.text("\n## Per-layer: QConv2d and QLinear vs float layers\n\n"
                "int8 = `QConv2d`/`QLinear`, quantization of A, W, E and G included, fp32 channels-last "
                "input; fp32 = `nn.Conv2d` TF32 off, NCHW; tf32 = TF32 on; bf16-cl = bf16 weights and "
                "channels-last input. `bwd` = input-grad + weight-grad. Ratios > 1 mean int8 is faster. "
                "TOPS count 2·MACs per GEMM (fwd 1, bwd 2, fwd+bwd 3 GEMMs) against the 1979 TOPS "
                "int8 peak (H100 SXM, SPEC §5).")
    results = bench_layers.conv_results(device, smoke, batches=args.batches, nets=args.nets, log=log)
    for title, headers, rows in bench_layers.conv_tables(results, device):
        report.table(title, headers, rows)
    lresults = bench_layers.linear_results(device, smoke, log=log)
    for title, headers, rows in bench_layers.linear_tables(lresults, device):
        report.table(title, headers, rows)


def _section_quantize(report, device, smoke, args, log):
    from benchmarks import bench_quantize

    report.text("\n## Quantizers\n\n`ebkernels.quantize` moves 9 B per fp32 element (absmax read, code "
                "read, int8 write); the copy moves 8 B (fp32 read + write), measured on the same tensor.")
    for title, headers, rows in bench_quantize.quantize_rows(device, smoke, log=log):
        report.table(title, headers, rows)


def _section_detector(report, device, smoke, args, log):
    report.text("\n## Early-bird detector")
    try:
        mod = importlib.import_module("benchmarks.bench_detector")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks.bench_detector", "benchmarks"):
            raise  # the file exists but one of its own imports is broken: a failure, not a skip
        report.text("\n_Skipped: `benchmarks/bench_detector.py` (with `detector_rows(device, smoke)`) "
                    "does not exist yet._")
        return
    detector_rows = getattr(mod, "detector_rows", None)
    if detector_rows is None:
        report.text("\n_Skipped: `benchmarks/bench_detector.py` has no `detector_rows(device, smoke)`._")
        return
    result = detector_rows(device, smoke)
    for title, headers, rows in _normalise_tables(result, "Detector"):
        report.table(title, headers, rows)


def _normalise_tables(result, default_title: str):
    """Accepts a list of dicts (one per row), ``(headers, rows)``, ``(title, headers, rows)`` or a list
    of such tuples."""
    if isinstance(result, tuple) and len(result) in (2, 3) and not isinstance(result[0], dict):
        result = [result]
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        headers = list(dict.fromkeys(k for r in result for k in r))
        return [(default_title, headers, [[r.get(h) for h in headers] for r in result])]
    tables = []
    for item in result or []:
        if len(item) == 3:
            tables.append(tuple(item))
        elif len(item) == 2:
            tables.append((default_title, item[0], item[1]))
        else:
            raise TypeError(f"detector_rows returned an item of length {len(item)}; accepted: a list of "
                            "dicts, (headers, rows) or (title, headers, rows)")
    return tables


def _section_epoch(report, device, smoke, args, log):
    report.text("\n## Search epoch\n\nOne epoch of the SPEC §4 search step (SGD, L1 on BN gamma) on "
                "synthetic device tensors; int8 = `quantize_model(model)`; fp32 with TF32 off; "
                "\"saved act.\" = bytes autograd keeps for backward in one forward (parameters excluded; "
                "int8 weight codes and autocast's bf16 weight copies included, which dominate at tiny "
                "batch sizes).")
    try:
        importlib.import_module("ebkernels.models")
    except ImportError as exc:
        report.text(f"\n_Skipped: `ebkernels.models.build_model` is not available ({exc})._")
        return
    from benchmarks import bench_epoch

    for title, headers, rows in bench_epoch.epoch_rows(device, smoke, models=args.epoch_models,
                                                        repeats=args.epoch_repeats, steps=args.epoch_steps,
                                                        log=log):
        report.table(title, headers, rows)


def _section_flow(report, device, smoke, args, log):
    """The int8 data-flow figures of ``benchmarks/flow.py`` (its own process: on a CPU it counts Triton
    launches under the interpreter, which must be set before triton is imported)."""
    import subprocess

    report.text("\n## The int8 data flow: saved activations, kernels per step, modelled bytes\n\n"
                "int8 fused (`quantize_model(model)`), int8 per-layer (`fuse=False`), bf16 autocast, fp32; "
                "exact counts, measurable on a CPU (see `benchmarks/flow.py`).")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "flow.py")] + (["--smoke"] if smoke else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks/flow.py failed: {proc.stderr.strip().splitlines()[-1:]}")
    report.text(proc.stdout.rstrip())


_RUNNERS = {"layers": _section_layers, "quantize": _section_quantize, "detector": _section_detector,
            "epoch": _section_epoch, "flow": _section_flow}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = default_device()
    gpu = is_gpu(device)
    if not gpu and not args.smoke and args.sections != ["flow"]:
        print("run.py: no CUDA device. Full benchmarks need a GPU; run with --smoke for the CPU smoke "
              "tables (reference path, not GPU results), or --sections flow for the exact data-flow counts.",
              file=sys.stderr)
        return 2
    out_paths = []
    if args.out:
        if os.path.abspath(args.out) == RESULTS_MD and (args.smoke or not gpu):
            print(f"run.py: refusing to write a smoke/CPU report to {RESULTS_MD} (GPU results live "
                  "there); pick another --out", file=sys.stderr)
            return 2
        out_paths.append(args.out)
    if gpu and not args.smoke:
        out_paths.append(RESULTS_MD)

    if not gpu:
        # smoke tensors are tiny: extra threads only add OpenMP spin/contention on shared CI cores
        torch.set_num_threads(1)
    label = None if gpu else CPU_LABEL
    report = Report(label)
    env = environment(device)
    title = "# ebkernels benchmark results"
    if args.smoke:
        title += f" (smoke mode{'' if gpu else ', ' + CPU_LABEL})"
    report.text(title + "\n")
    report.text("\n".join(f"- **{k}**: {v}" for k, v in env.items()))
    report.text(f"- **command**: `python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    # CPU: always the reference path (the Triton interpreter is for correctness, far too slow to time)
    if gpu:
        backend = contextlib.nullcontext()
    else:
        from ebkernels._backend import force_backend

        backend = force_backend("reference")
    failed = []
    t_start = time.perf_counter()
    with backend:
        for name in args.sections:
            t0 = time.perf_counter()
            try:
                _RUNNERS[name](report, device, args.smoke, args, log)
            except Exception as exc:  # record and go on: one broken section must not lose the others
                failed.append(name)
                report.text(f"\n**Section `{name}` failed**: `{type(exc).__name__}: {exc}`")
                traceback.print_exc()
            log(f"[{name}: {time.perf_counter() - t0:.1f} s]")
    report.text(f"\n_Total benchmark time: {time.perf_counter() - t_start:.1f} s._")
    for path in out_paths:
        with open(path, "w") as f:
            f.write(report.markdown())
        log(f"wrote {path}")
    if failed:
        log(f"run.py: sections failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
