"""The int8 data flow in figures a CPU measures exactly (SPEC §9): saved activations, kernels per
training step, modelled bytes per step, for int8 fused / int8 per-layer / bf16 autocast / fp32.

    python benchmarks/flow.py                  # all tables (about a minute on 2 cores)
    python benchmarks/flow.py --tables memory  # one of: memory, kernels, bytes
    python benchmarks/flow.py --smoke          # small networks, seconds (the test suite runs this)

- **memory**: bytes autograd saves in one training forward (``saved_tensors_hooks``, storages counted
  once, parameters excluded) of VGG16 at batch 32 and PreResNet-101 at batch 16, 32×32 input, the
  method of ``../shared/tools/measure_flow.py``; the CPU reference path (the same tensors are saved on
  every backend).
- **kernels**: launches in one training step (forward, loss, backward) after a warm-up. The int8
  Triton launches are counted under the interpreter *without running them* (a dry run: the launch
  decisions are made on the host from shapes alone, so the count is exact and a full-width network
  takes seconds); PyTorch ops from the profiler: every outermost aten op (at least one kernel on a GPU;
  cuDNN may launch several for one convolution, so the bf16/fp32 rows are lower bounds) and the work
  inside the ebkernels custom ops (buffer zeroing, copies); views and allocations excluded.
  "per block": divided by the number of convolutions. On a GPU the Triton launches are counted as they
  run instead.
- **bytes**: DRAM bytes of one training step as ``benchmarks/cost_model.py`` prices it on an H100 (every
  launch and PyTorch op of the recorded step, re-reads by its L2 rule): a model, not a measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before ebkernels / triton kernels are imported

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ebkernels  # noqa: E402
from benchmarks.common import markdown_table  # noqa: E402
from ebkernels._cli import comma_list  # noqa: E402

MODES = ("int8 fused", "int8 per-layer", "bf16 autocast", "fp32")
MEMORY_CASES = (("vgg16", 32), ("preresnet101", 16))
NETS = ("vgg16", "preresnet101")
# --smoke (the test suite): the same kinds of network, small, so every table is computed in seconds
SMOKE_MEMORY_CASES = (("vgg11", 4), ("preresnet20", 4))
SMOKE_NETS = ("vgg11", "preresnet20")
SMOKE_WIDTH = 0.25
VIEWS = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "detach", "alias", "unsqueeze",
         "squeeze", "slice", "select", "_reshape_alias", "reshape", "split", "unbind", "view_as", "lift_fresh",
         "empty_like", "empty", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense"}


def build(name: str, mode: str, device, width: float = 1.0):
    torch.manual_seed(0)
    kw = {} if width == 1.0 else {"width": width}
    model = ebkernels.build_model(name, num_classes=10, in_channels=3, **kw).to(device).train()
    if mode.startswith("int8"):
        ebkernels.quantize_model(model, fuse=mode == "int8 fused")
    return model


def _autocast(mode: str, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16 autocast")


def saved_bytes(model: nn.Module, x: torch.Tensor, mode: str) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(mode, x.device):
        model(x)
    return sum(seen.values())


def memory_rows(device, smoke: bool = False):
    rows = []
    width = SMOKE_WIDTH if smoke else 1.0
    for name, batch in (SMOKE_MEMORY_CASES if smoke else MEMORY_CASES):
        x = torch.randn(batch, 3, 32, 32, device=device)
        with ebkernels.force_backend("reference"):
            mib = {m: saved_bytes(build(name, m, device, width), x, m) / 2**20 for m in MODES}
        rows.append([f"{name} b{batch}", *(f"{mib[m]:.1f}" for m in MODES),
                     f"{mib['int8 fused'] / mib['bf16 autocast']:.2f}",
                     f"{mib['int8 per-layer'] / mib['bf16 autocast']:.2f}"])
    return ["network", *(f"{m} MiB" for m in MODES), "int8 fused / bf16", "int8 per-layer / bf16"], rows


def _device_ops(prof) -> Counter:
    """PyTorch ops that run device work in one profiled step: every outermost aten op (one call the
    framework makes: at least one GPU kernel), and, inside the ebkernels custom ops (whose own work is
    Triton launches, counted apart), every innermost aten op (their buffer zeroing and copies); views,
    allocations and no-op conversions excluded."""
    skip = VIEWS | {"to", "resize_", "resolve_conj", "resolve_neg"}
    ops = Counter()
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.name[6:] in skip:
            continue
        chain, p = [], ev.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        in_custom = any(n.startswith("ebkernels::") for n in chain)
        outermost = not any(n.startswith(("aten::", "ebkernels::")) for n in chain)
        innermost = not any(c.name.startswith("aten::") for c in ev.cpu_children)
        if outermost or (in_custom and innermost):
            ops[ev.name] += 1
    return ops


class _Launches:
    """Counts Triton launches; under the interpreter without running them (``dry``)."""

    def __init__(self, dry: bool):
        self.count = Counter()
        self.dry = dry

    def __enter__(self):
        if os.environ.get("TRITON_INTERPRET") == "1":
            import triton.runtime.interpreter as ti

            self._cls, self._name = ti.GridExecutor, "__call__"
        else:
            import triton.runtime.jit as tj

            self._cls, self._name = tj.JITFunction, "run"
        orig = getattr(self._cls, self._name)
        self._orig = orig
        counter, dry = self.count, self.dry

        def counted(obj, *a, **k):
            counter[getattr(obj, "fn", obj).__name__ if hasattr(getattr(obj, "fn", obj), "__name__") else "?"] += 1
            return None if dry else orig(obj, *a, **k)

        setattr(self._cls, self._name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self._cls, self._name, self._orig)


def kernel_counts(name: str, mode: str, device, batch: int = 2, hw: int = 32, width: float = 1.0):
    """(Triton launches, PyTorch ops, convolutions) of one training step after a warm-up."""
    model = build(name, mode, device, width)
    x = torch.randn(batch, 3, hw, hw, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (batch,), device=device)
    dry = device.type == "cpu"

    def step():
        with _autocast(mode, device):
            out = model(x)
        F.cross_entropy(out.float(), t).backward()

    with _Launches(dry):
        step()  # warm-up: lazy state
    for p in model.parameters():
        p.grad = None  # as after optimizer.zero_grad(): no gradient accumulation ops
    with _Launches(dry) as launches, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return sum(launches.count.values()), sum(_device_ops(prof).values()), convs


def kernel_rows(device, smoke: bool = False):
    rows = []
    for name in (SMOKE_NETS if smoke else NETS):
        for mode in MODES:
            tri, ops, convs = kernel_counts(name, mode, device, hw=16 if smoke else 32,
                                            width=SMOKE_WIDTH if smoke else 1.0)
            rows.append([name, mode, tri, ops, tri + ops, f"{(tri + ops) / convs:.1f}"])
    return ["network", "mode", "Triton launches", "PyTorch ops", "kernels per step", "per conv block"], rows


def bytes_rows(smoke: bool = False):
    """DRAM MB per training step from the cost model (its own process: it plans for the H100)."""
    import json
    import subprocess
    import tempfile

    modes = ("int8-fused", "int8-layer", "bf16")
    batch = 4 if smoke else 256
    rows = []
    for net in (SMOKE_NETS if smoke else NETS):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "cost.json")
            cmd = [sys.executable, os.path.join(REPO, "benchmarks", "cost_model.py"), "--net", net, "--batch",
                   str(batch), "--modes", ",".join(modes), "--repeats", "1", "--json", out]
            cmd += ["--width", str(SMOKE_WIDTH), "--hw", "16"] if smoke else []
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"cost_model.py failed: {proc.stderr.strip().splitlines()[-1:]}")
            totals = {m: v["totals"] for m, v in json.load(open(out))["modes"].items()}
        mb = {m: totals[m]["dram_bytes"] / 1e6 for m in modes}
        rows.append([net, batch, *(f"{mb[m]:.0f}" for m in modes), f"{mb['int8-fused'] / mb['bf16']:.2f}"])
    return ["network", "batch", *(f"{m} MB" for m in ("int8 fused", "int8 per-layer", "bf16 autocast")),
            "int8 fused / bf16"], rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", type=comma_list(accepted=("memory", "kernels", "bytes")),
                    default=["memory", "kernels", "bytes"], help="comma-separated: memory, kernels, bytes")
    ap.add_argument("--smoke", action="store_true", help="small networks (VGG-11 / PreResNet-20 at width 0.25)")
    args = ap.parse_args(argv)
    tables = args.tables
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = "GPU" if device.type == "cuda" else "CPU (exact counts; no timing)"
    if args.smoke:
        where += f"; smoke: {', '.join(SMOKE_NETS)} at width {SMOKE_WIDTH}"
    if "memory" in tables:
        print(f"\nSaved activations, one training forward at 32×32 ({where}):\n")
        print(markdown_table(*memory_rows(device, args.smoke)))
    if "kernels" in tables:
        hw = 16 if args.smoke else 32
        dry = ", Triton launches counted dry" if device.type == "cpu" else ""
        print(f"\nKernels per training step, batch 2 at {hw}×{hw} ({where}{dry}):\n")
        print(markdown_table(*kernel_rows(device, args.smoke)))
    if "bytes" in tables:
        print("\nModelled DRAM traffic per training step on an H100 (benchmarks/cost_model.py; a model, not a "
              "measurement):\n")
        print(markdown_table(*bytes_rows(args.smoke)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
