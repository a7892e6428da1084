"""The one command a session with a lent H100 / H200 runs, once, inside 8 minutes.

    python benchmarks/gpu_session.py                  # on the GPU: everything, into benchmarks/gpu_session/
    python benchmarks/gpu_session.py --out DIR        # elsewhere
    python benchmarks/gpu_session.py --dry-run        # on CPU, tiny shapes, a few seconds (the test suite runs it)

Sections, in order of what the first GPU run must not miss (each one fails alone: its traceback goes to
the log and the next section runs; a section that would overrun the time budget is skipped, and says so):

1. ``tests``: the CUDA half of the test suite (``pytest -k cuda``: every kernel exact on the GPU);
2. ``ceiling``: device-to-device copy GB/s and a bf16 8192³ matmul TFLOP/s (what the card really does);
3. ``layers``: per distinct conv layer of VGG16 and PreResNet-101 at batch 256, one fwd+bwd of the int8
   ``QConv2d`` against bf16 channels-last ``nn.Conv2d``, device time eagerly and under CUDA-graph replay,
   and the host µs to issue one eager fwd+bwd (launch overhead: what graphs remove);
4. ``profile``: per-kernel device times (torch.profiler) of three representative layers: 16→16 3×3 @32²,
   64→64 3×3 @32², 512→512 3×3 @2²;
5. ``wgrad``: the weight-grad alone on the layers rule 8 of the tile table gives to the sm_90 TMA kernel
   (the 3×3 stride-1 layers at 32² and 16²): TMA (copies included) against the generic kernel, device
   ms, and whether both give the same bits;
6. ``epoch``: search-epoch steps of both networks, int8 vs bf16 autocast eagerly, and the int8 step
   captured in a CUDA graph (``ebkernels.train.graphs.GraphedStep``), extrapolated to a 196-step epoch.

Next to every layer, kernel, weight-grad and step it times, the report prints the cost model's figure for
the same work (``benchmarks/cost_model.py``; µs on an H100, predictions: computed on the CPU in the
background while the tests run, ``logs/model.json``), so that the first GPU run calibrates the model.

Output folder: ``RESULTS.md`` (the report) and ``logs/`` (one raw log and one JSON per section). A GPU run
also copies the report to ``benchmarks/RESULTS.md``; ``--dry-run`` never touches it. ``--dry-run`` runs
the same code on CPU (the int8 layers on the PyTorch reference path, no graphs: "skipped: no CUDA") so
that this script cannot rot before a GPU arrives.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.common import environment, markdown_table  # noqa: E402
from benchmarks.costing.figures import ModelFigures  # noqa: E402
from benchmarks.shapes import CONV_SHAPES, SMOKE_CONV_SHAPES, ConvShape  # noqa: E402
from ebkernels._cli import comma_list  # noqa: E402

SECTIONS = ("tests", "ceiling", "layers", "profile", "wgrad", "epoch")
# the three profiled layers: narrow channels (the tile table's small-N tiles), the common 64-channel layer,
# the under-filled 512-channel tail
PROFILE_SHAPES = (ConvShape("profile", 16, 16, 32, 32, 3, 1, 1), ConvShape("profile", 64, 64, 32, 32, 3, 1, 1),
                  ConvShape("profile", 512, 512, 2, 2, 3, 1, 1))
# --dry-run: the same kinds of layers, small enough for the CPU reference path (a 512² weight-grad's
# stochastic G rounding alone takes seconds there); one network in the epoch section
DRY_PROFILE_SHAPES = (ConvShape("dry", 8, 8, 4, 4, 3, 1, 1), ConvShape("dry", 16, 16, 4, 4, 3, 1, 1),
                      ConvShape("dry", 32, 32, 2, 2, 3, 1, 1))
DRY = {"batch": 2, "copy_mib": 4, "matmul": 128, "reps": 1, "prof_reps": 1, "epoch_steps": 1, "profile": DRY_PROFILE_SHAPES,
       "models": ("vgg16",)}
FULL = {"batch": 256, "copy_mib": 1024, "matmul": 8192, "reps": 20, "prof_reps": 3, "epoch_steps": 20, "profile": PROFILE_SHAPES,
        "models": ("vgg16", "preresnet101")}
EPOCH_STEPS = 196  # a CIFAR-10 epoch at batch 256


class Session:
    def __init__(self, out: str, dry: bool, budget_s: float, model: bool = True):
        self.out, self.dry, self.t0, self.budget = out, dry, time.monotonic(), budget_s
        self.cfg = DRY if dry else FULL
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.gpu = self.device.type == "cuda"
        self.md: list[str] = []
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        self.model = ModelFigures(out, dry, model)  # the cost model's figures, computed in the background

    def model_ready(self) -> bool:
        return self.model.ready(min(240.0, max(1.0, self.left() - 120)))

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def log_path(self, name: str) -> str:
        return os.path.join(self.out, "logs", name)

    def sync(self):
        if self.gpu:
            torch.cuda.synchronize()

    def time_ms(self, fn, reps=None) -> float:
        """Median device ms of ``fn`` (CUDA events; CPU: wall clock)."""
        reps = reps or self.cfg["reps"]
        fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.gpu:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def host_us(self, fn, reps=None) -> float:
        """Median host µs to issue one call of ``fn`` (no synchronisation inside: the launch overhead)."""
        reps = reps or self.cfg["reps"]
        fn()
        self.sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
            self.sync()
        return statistics.median(times)

    def graph_ms(self, fn):
        """(device ms per replay of ``fn`` captured in a CUDA graph, or the reason it was not)."""
        if not self.gpu:
            return None, "skipped: no CUDA"
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return self.time_ms(g.replay), ""
        except Exception as e:  # report: a failed capture is a finding of the first GPU run
            return None, f"capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]


# --------------------------------------------------------------------------------------------------
# sections: each returns (markdown, raw JSON-able data)
# --------------------------------------------------------------------------------------------------
def section_tests(s: Session):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda", "tests"]
    if s.dry:  # the command itself, collection only (the CPU suite runs in CI anyway)
        cmd = [sys.executable, "-m", "pytest", "-q", "--co", "tests/test_tiles.py"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" or s.dry}
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=max(30.0, min(180.0, s.left() - 240)))
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)
    with open(s.log_path("tests.log"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + text)
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    md = (f"`{' '.join(cmd[1:])}`: exit {rc} in {time.monotonic() - t:.0f} s — {tail[0]} "
          f"(full log: `logs/tests.log`)")
    return md, {"cmd": cmd, "rc": rc, "summary": tail[0]}


def section_ceiling(s: Session):
    n = s.cfg["copy_mib"] * 2**20
    x = torch.empty(n, dtype=torch.uint8, device=s.device)
    y = torch.empty_like(x)
    ms = s.time_ms(lambda: y.copy_(x))
    copy_gbs = 2 * n / (ms * 1e-3) / 1e9
    m = s.cfg["matmul"]
    dt = torch.bfloat16 if s.gpu else torch.float32
    a = torch.randn(m, m, device=s.device, dtype=dt)
    b = torch.randn(m, m, device=s.device, dtype=dt)
    mm_ms = s.time_ms(lambda: a @ b)
    tflops = 2 * m**3 / (mm_ms * 1e-3) / 1e12
    rows = [[f"device copy {s.cfg['copy_mib']} MiB (read + write)", f"{ms:.3f} ms", f"{copy_gbs:.1f} GB/s"],
            [f"{'bf16' if s.gpu else 'fp32 (CPU)'} matmul {m}³", f"{mm_ms:.3f} ms", f"{tflops:.1f} TFLOP/s"]]
    return markdown_table(["what", "median", "rate"], rows), {"copy_gbs": copy_gbs, "matmul_tflops": tflops}


def _layer(shape: ConvShape, impl: str, batch: int, device):
    """(fwd+bwd closure) of one layer: int8 ``QConv2d`` fp32 channels-last, or bf16 channels-last conv."""
    from ebkernels.modules import QConv2d

    torch.manual_seed(0)
    cls = QConv2d if impl == "int8" else nn.Conv2d
    dt = torch.bfloat16 if impl == "bf16-cl" else torch.float32
    layer = cls(shape.cin, shape.cout, shape.k, stride=shape.stride, padding=shape.pad, bias=False)
    layer = layer.to(device=device, dtype=dt, memory_format=torch.channels_last)
    x = torch.randn(batch, shape.cin, shape.h, shape.w, device=device, dtype=dt)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.no_grad():
        gy = torch.randn_like(layer(x)).contiguous(memory_format=torch.channels_last)
    params = tuple(layer.parameters())
    return lambda: torch.autograd.grad(layer(x), (x, *params), gy)


def section_layers(s: Session):
    shapes = ([("smoke", sh) for sh in SMOKE_CONV_SHAPES] if s.dry else
              [(net, sh) for net in ("vgg16", "preresnet101") for sh in CONV_SHAPES[net]])
    rows, raw = [], []
    s.model_ready()
    m = s.model
    for net, sh in shapes:
        if s.left() < 150:  # keep time for profile and epoch
            rows.append([net, sh.label(), "skipped: time budget"] + [""] * 9)
            continue
        r = {"net": net, "layer": sh.label(), "count": sh.count}
        for impl in ("int8", "bf16-cl"):
            try:
                fn = _layer(sh, impl, s.cfg["batch"], s.device)
                r[impl] = {"eager_ms": s.time_ms(fn), "host_us": s.host_us(fn)}
                r[impl]["graph_ms"], r[impl]["graph_note"] = s.graph_ms(fn)
            except Exception as e:
                r[impl] = {"error": f"{type(e).__name__}: {e}"[:200]}
                with open(s.log_path("layers.log"), "a") as f:
                    f.write(f"{net} {sh.label()} {impl}\n{traceback.format_exc()}\n")
        raw.append(r)
        cell = lambda d, k: (f"{d[k]:.3f}" if d.get(k) is not None else d.get("graph_note") or d.get("error", ""))  # noqa: E731
        i8, bf = r["int8"], r["bf16-cl"]
        ratio = (f"{bf['eager_ms'] / i8['eager_ms']:.2f}" if "eager_ms" in i8 and "eager_ms" in bf else "")
        lab = sh.label()
        rows.append([net, lab, sh.count, cell(i8, "eager_ms"), cell(i8, "graph_ms"), f"{i8.get('host_us', 0):.0f}",
                     cell(bf, "eager_ms"), cell(bf, "graph_ms"), ratio, m.us("layers", lab, "int8", "graph_us"),
                     m.us("layers", lab, "int8", "host_cpu_us"), m.us("layers", lab, "bf16-cl", "graph_us")])
    headers = ["net", "layer", "×", "int8 eager ms", "int8 graph ms", "int8 host µs", "bf16-cl eager ms",
               "bf16-cl graph ms", "bf16 / int8 (eager)", "model int8 graph µs", "model int8 host µs (CPU)",
               "model bf16 graph µs"]
    return markdown_table(headers, rows), raw


def section_profile(s: Session):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.gpu else [])
    parts, raw = [], {}
    for sh in s.cfg["profile"]:
        fn = _layer(sh, "int8", s.cfg["batch"], s.device)
        fn()
        s.sync()
        reps = s.cfg["prof_reps"]
        with profile(activities=acts) as prof:
            for _ in range(reps):
                fn()
            s.sync()
        key = "device_time_total" if s.gpu else "cpu_time_total"
        events = [e for e in prof.key_averages() if (getattr(e, key, 0) or 0) > 0]
        if s.gpu:  # kernels only (device activity), not their host-side callers
            events = [e for e in events if getattr(e, "self_device_time_total", 0) > 0]
        events.sort(key=lambda e: -getattr(e, key))
        s.model_ready()
        rows = [[e.key[:80], e.count // reps, f"{getattr(e, key) / reps:.1f}", s.model.kernel_us(sh.label(), e.key)]
                for e in events[:12]]
        raw[sh.label()] = rows
        parts.append(f"**{sh.label()}**, batch {s.cfg['batch']}, one fwd+bwd "
                     f"({'device' if s.gpu else 'CPU'} µs):\n\n"
                     + markdown_table(["kernel / op", "calls", "µs", "model µs (H100)"], rows))
        with open(s.log_path("profile.log"), "a") as f:
            f.write(f"== {sh.label()}\n{prof.key_averages().table(sort_by=key, row_limit=30)}\n")
    return "\n\n".join(parts), raw


def section_wgrad(s: Session):
    """Rule 8 measured: the weight-grad of each layer it takes, ``override(wgrad_tma=True)`` (TMA kernel and its copies)
    and off (generic kernel, E permute-copy included), same int8 codes, same G rounding stream."""
    from ebkernels import _rng
    from ebkernels.config import QConfig
    from ebkernels.config import override
    from ebkernels.ops.gemm import wgrad_tiles as _wgrad_tiles
    from ebkernels.ops._launch import code_channels
    from ebkernels.ops.gemm.conv import weight_grad_op

    shapes = {(sh.cin, sh.cout, sh.h, sh.k): sh for net in s.cfg["models"] for sh in CONV_SHAPES[net]}
    batch = s.cfg["batch"]
    rows, raw = [], []
    for sh in shapes.values():
        C, CO = code_channels(sh.cin), code_channels(sh.cout)
        OH = (sh.h + 2 * sh.pad - sh.k) // sh.stride + 1
        tile = _wgrad_tiles.wgrad_tile(CO, C, 16, sh.k * sh.k)
        box = _wgrad_tiles.wgrad_tma_rows(batch, sh.h, sh.w, OH, OH, sh.k, sh.k, (sh.stride,) * 2, (sh.pad,) * 2, C,
                                          CO, tile)
        if box is None:
            continue
        if s.left() < 60:
            rows.append([sh.label(), "", "skipped: time budget", "", "", "", "", ""])
            continue
        g = torch.Generator().manual_seed(sh.cin + sh.h)
        qx = torch.randint(-127, 128, (batch, C, sh.h, sh.w), generator=g, dtype=torch.int8)
        qe = torch.randint(-127, 128, (batch, CO, OH, OH), generator=g, dtype=torch.int8)
        qx = qx.contiguous(memory_format=torch.channels_last).to(s.device)
        qe = qe.contiguous(memory_format=torch.channels_last).to(s.device)
        se = torch.tensor(2.0 ** -12, device=s.device)
        sx = torch.tensor(2.0 ** -6, device=s.device)
        r, out = {"layer": sh.label(), "box": f"{box.BH}x{box.BW}"}, {}
        for tma in (True, False):
            def fn(copy=not tma, tma=tma):  # the generic kernel: with QConv2dFunction's channel-major copy of E
                with override(wgrad_tma=tma):
                    e = qe.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3) if copy else qe
                    return weight_grad_op(e, qx, se, sx, [sh.k, sh.k], [sh.stride] * 2, [sh.pad] * 2, [1, 1], 1,
                                          QConfig(), [sh.cout, sh.cin])
            _rng.manual_seed(1)
            out[tma] = fn()
            r["tma_ms" if tma else "generic_ms"] = s.time_ms(fn)
        r["same_bits"] = bool(torch.equal(out[True], out[False]))
        raw.append(r)
        s.model_ready()
        rows.append([sh.label(), r["box"], f"{r['tma_ms']:.3f}", f"{r['generic_ms']:.3f}",
                     f"{r['generic_ms'] / r['tma_ms']:.2f}", "yes" if r["same_bits"] else "**NO**",
                     s.model.us("wgrad", sh.label(), "tma", "graph_us"),
                     s.model.us("wgrad", sh.label(), "generic", "graph_us")])
    note = "" if s.gpu else "(dry run: the PyTorch reference path on CPU, the flag has no effect)\n\n"
    headers = ["layer", "box", "TMA ms", "generic ms", "generic / TMA", "same bits", "model TMA µs", "model generic µs"]
    return note + markdown_table(headers, rows), raw


def section_epoch(s: Session):
    from benchmarks import bench_epoch as be

    rows, raw = [], []
    steps = s.cfg["epoch_steps"]
    s.model_ready()
    model = {"int8": ("int8-fused", "eager_us"), "bf16-autocast": ("bf16", "eager_us")}
    for name in s.cfg["models"]:
        for mode in ("int8", "bf16-autocast"):
            if s.left() < 20:
                rows.append([name, mode, "skipped: time budget", "", "", ""])
                continue
            r = be.epoch_result(name, mode, s.device, s.dry, steps=steps)
            per = r["seconds"] / r["steps"]
            raw.append(r)
            rows.append([name, mode, f"{r['steps']} × {r['batch']}", f"{1e3 * per:.2f}", f"{per * EPOCH_STEPS:.2f}",
                         s.model.us("steps", name, *model[mode])])
        graphed = _graphed_int8_step(s, name) if s.left() > 20 else (None, "skipped: time budget")
        ms, note = graphed
        rows.append([name, "int8, CUDA graph", f"{s.cfg['epoch_steps']} × {s.cfg['batch']}",
                     f"{ms:.2f}" if ms is not None else note, f"{ms * EPOCH_STEPS / 1e3:.2f}" if ms is not None else "",
                     s.model.us("steps", name, "int8-fused", "graph_us")])
        raw.append({"model": name, "mode": "int8-graph", "ms_per_step": ms, "note": note})
    headers = ["model", "mode", "steps × batch", "ms / step", f"s / epoch ({EPOCH_STEPS} steps, extrapolated)",
               "model µs / step (H100; eager incl. host)"]
    return markdown_table(headers, rows), raw


def _graphed_int8_step(s: Session, name: str):
    """ms per replayed int8 training step (forward, loss, backward, L1 term) plus the eager SGD step."""
    if not s.gpu:
        return None, "skipped: no CUDA"
    try:
        from benchmarks import bench_epoch as be
        from ebkernels.train.graphs import GraphedStep

        model = be._build(name, "int8", s.device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        x = torch.randn(s.cfg["batch"], 3, 32, 32, device=s.device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (s.cfg["batch"],), device=s.device)
        gs = GraphedStep(model, bns, be.L1_GAMMA, contextlib.nullcontext)

        def step():
            gs.step(x, y, opt)
            opt.step()
        return s.time_ms(step, reps=s.cfg["epoch_steps"]), ""
    except Exception as e:
        with open(s.log_path("epoch.log"), "a") as f:
            f.write(traceback.format_exc())
        return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]


RUNNERS = {"tests": section_tests, "ceiling": section_ceiling, "layers": section_layers,
           "profile": section_profile, "wgrad": section_wgrad, "epoch": section_epoch}
TITLES = {"tests": "CUDA test suite", "ceiling": "Ceiling: copy and bf16 matmul",
          "layers": "Per-layer fwd+bwd, int8 vs bf16 channels-last (eager, CUDA graph, host µs)",
          "profile": "Per-kernel times of three representative layers",
          "wgrad": "Weight-grad on the TMA layers (rule 8): TMA vs generic kernel",
          "epoch": "Search-epoch steps (eager and graph-captured int8)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds (what the test suite runs)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "gpu_session"), help="output folder")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget (default 8 minutes)")
    ap.add_argument("--sections", type=comma_list(accepted=SECTIONS), default=list(SECTIONS),
                    help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--no-model", action="store_true", help="do not compute the cost model's figures")
    args = ap.parse_args(argv)
    sections = args.sections
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run (CPU, tiny shapes) or on the GPU machine")
    s = Session(args.out, args.dry_run, args.budget_s, not args.no_model)
    label = "DRY RUN on CPU (tiny shapes) — not a GPU result" if s.dry else "GPU session"
    s.md += [f"# ebkernels GPU session ({label})", ""]
    s.md += [f"- **{k}**: {v}" for k, v in environment(s.device).items()] + [""]
    failed = 0
    for name in sections:
        t = time.monotonic()
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                md, raw = RUNNERS[name](s)
        except Exception:
            failed += 1
            md, raw = f"FAILED (traceback in `logs/{name}.log`)", {"error": traceback.format_exc()}
            with open(s.log_path(f"{name}.log"), "a") as f:
                f.write(traceback.format_exc())
        with open(s.log_path(f"{name}.json"), "w") as f:
            json.dump(raw, f, indent=1, default=str)
        s.md += [f"## {TITLES[name]}", "", md, "", f"_{time.monotonic() - t:.1f} s; {s.left():.0f} s of budget left_", ""]
        print(f"[gpu_session] {name}: {time.monotonic() - t:.1f} s", flush=True)
    if s.model.proc is not None and s.model.proc.poll() is None:  # sections that never needed it
        s.model.proc.kill()
    report = "\n".join(s.md)
    with open(os.path.join(s.out, "RESULTS.md"), "w") as f:
        f.write(report)
    if not s.dry and sections == list(SECTIONS):
        with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "w") as f:
            f.write(report)
    print(f"[gpu_session] wrote {os.path.join(s.out, 'RESULTS.md')} ({failed} sections failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
