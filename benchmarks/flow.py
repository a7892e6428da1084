"""The int8 data flow in figures a CPU measures exactly (SPEC §9): saved activations, kernels per
training step, modelled bytes per step, for int8 fused / int8 per-layer / bf16 autocast / fp32.

    python benchmarks/flow.py                  # all tables (a few minutes on 2 cores)
    python benchmarks/flow.py --tables models  # one of: memory, kernels, bytes, models
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
- **models** (issue 21's table): any CNN through the graph fuser, batch 16 at 32×32 (torchvision models with
  the small stem), ``quantize_model(m, skip=is_grouped_conv)``: the fused chains, saved activations of int8
  without and with bf16 autocast against bf16 autocast, and kernels per conv in one training step under
  autocast (the trainer's default), counted as in **kernels** ("all ops") and by the rule of
  ``../shared/tools/measure_flow.py`` ("on activations": Triton launches plus the PyTorch ops outside the
  ebkernels namespace that touch a tensor at least as large as the model's smallest conv activation, so
  weight-sized and scalar bookkeeping does not count); "nothing fusable" is a GroupNorm CNN whose only int8
  layers are per-layer ``QConv2d``/``QLinear``.
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
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import ebkernels  # noqa: E402
from benchmarks.common import markdown_table  # noqa: E402
from ebkernels._cli import comma_list  # noqa: E402

MODES = ("int8 fused", "int8 per-layer", "bf16 autocast", "fp32")
MODEL_CASES = ("torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:densenet121",
               "torchvision:efficientnet_b0", "torchvision:regnet_x_400mf", "torchvision:resnet18",
               "torchvision:vgg16_bn", "vgg16", "preresnet101", "resnet18", "nothing fusable")
SMOKE_MODEL_CASES = ("torchvision:mobilenet_v2", "nothing fusable")
MEMORY_CASES = (("vgg16", 32), ("preresnet101", 16))
NETS = ("vgg16", "preresnet101")
# --smoke (the test suite): the same kinds of network, small, so every table is computed in seconds
SMOKE_MEMORY_CASES = (("vgg11", 4), ("preresnet20", 4))
SMOKE_NETS = ("vgg11", "preresnet20")
SMOKE_WIDTH = 0.25
VIEWS = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "detach", "alias", "unsqueeze",
         "squeeze", "slice", "select", "_reshape_alias", "reshape", "split", "unbind", "view_as", "lift_fresh",
         "empty_like", "empty", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "narrow",
         "split_with_sizes"}


def _nothing_fusable() -> nn.Module:
    """A CNN with no conv → BatchNorm chain (GroupNorm after every conv, a ReLU before a pool)."""
    layers, c = [], 3
    for w in (64, 128, 256):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1),
                   nn.GroupNorm(8, w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def build(name: str, mode: str, device, width: float = 1.0):
    """``name`` in ``mode``: torchvision models with the small stem, grouped convs left float (as the trainer)."""
    from ebkernels.models import is_grouped_conv

    torch.manual_seed(0)
    kw = {} if width == 1.0 else {"width": width}
    if name.startswith("torchvision:"):
        kw["small_stem"] = True
    model = (_nothing_fusable() if name == "nothing fusable" else
             ebkernels.build_model(name, num_classes=10, in_channels=3, **kw)).to(device).train()
    if mode.startswith("int8"):
        ebkernels.quantize_model(model, fuse=mode == "int8 fused", skip=is_grouped_conv)
    return model


def _autocast(mode: str, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16 autocast")


def saved_bytes(model: nn.Module, x: torch.Tensor, mode: str, autocast: bool | None = None) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    ac = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast) if autocast is not None else \
        _autocast(mode, x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ac:
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


class _ActivationOps(TorchDispatchMode):
    """measure_flow's rule: PyTorch ops outside the ebkernels namespace (views excluded) that touch a tensor of
    at least ``big`` elements."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.count = big, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "ebkernels" and func.overloadpacket.__name__ not in VIEWS:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            if any(isinstance(t, torch.Tensor) and t.numel() >= self.big for t in leaves):
                self.count += 1
        return out


def kernel_counts(name: str, mode: str, device, batch: int = 2, hw: int = 32, width: float = 1.0,
                  autocast: bool | None = None, activations: bool = False):
    """(Triton launches, PyTorch ops, convolutions) of one training step after a warm-up (``autocast``: bf16
    autocast on / off; None: as ``mode`` has it; ``activations``: PyTorch ops by measure_flow's rule)."""
    model = build(name, mode, device, width)
    x = torch.randn(batch, 3, hw, hw, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (batch,), device=device)
    dry = device.type == "cpu"
    ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)) if autocast is not None \
        else (lambda: _autocast(mode, device))

    def step():
        with ac():
            out = model(x)
        F.cross_entropy(out.float(), t).backward()

    with _Launches(dry):
        step()  # warm-up: lazy state
    for p in model.parameters():
        p.grad = None  # as after optimizer.zero_grad(): no gradient accumulation ops
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if activations:
        sizes = []
        hooks = [m.register_forward_hook(lambda mod, i, o: sizes.append(o.numel())) for m in convs]
        fusion_off = model.__dict__.pop("forward", None)  # the hooks see every conv on the per-layer path
        with torch.no_grad(), torch.autocast(device.type, enabled=False), ebkernels.force_backend("reference"):
            model.eval()(x.float())
        model.train()
        if fusion_off is not None:
            model.forward = fusion_off
        for h in hooks:
            h.remove()
        with _Launches(dry) as launches, _ActivationOps(min(sizes)) as ops:
            step()
        return sum(launches.count.values()), ops.count, len(convs)
    with _Launches(dry) as launches, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(launches.count.values()), sum(_device_ops(prof).values()), len(convs)


def kernel_rows(device, smoke: bool = False):
    rows = []
    for name in (SMOKE_NETS if smoke else NETS):
        for mode in MODES:
            tri, ops, convs = kernel_counts(name, mode, device, hw=16 if smoke else 32,
                                            width=SMOKE_WIDTH if smoke else 1.0)
            rows.append([name, mode, tri, ops, tri + ops, f"{(tri + ops) / convs:.1f}"])
    return ["network", "mode", "Triton launches", "PyTorch ops", "kernels per step", "per conv block"], rows


def model_rows(device, smoke: bool = False):
    """Issue 21's table: chains, saved MiB int8 (without / with autocast) vs bf16 autocast, kernels per conv."""
    rows = []
    batch, hw = (4, 16) if smoke else (16, 32)
    for name in (SMOKE_MODEL_CASES if smoke else MODEL_CASES):
        x = torch.randn(batch, 3, hw, hw, device=device)
        with ebkernels.force_backend("reference"):
            bf16 = saved_bytes(build(name, "bf16 autocast", device), x, "bf16 autocast") / 2**20
            model = build(name, "int8 fused", device)
            chains = len(ebkernels.fusion.fused_chains(model))
            plain = saved_bytes(model, x, "int8 fused", autocast=False) / 2**20
            ac = saved_bytes(model, x, "int8 fused", autocast=True) / 2**20
        per_conv = []
        for mode, act in (("int8 fused", False), ("int8 fused", True), ("bf16 autocast", True)):
            tri, ops, convs = kernel_counts(name, mode, device, hw=hw, autocast=True, activations=act)
            per_conv.append(f"{(tri + ops) / convs:.1f}")
        rows.append([name, chains, f"{plain:.1f}", f"{ac:.1f}", f"{bf16:.1f}", f"{plain / bf16:.2f}",
                     f"{ac / bf16:.2f}", *per_conv])
    return ["network", "fused chains", "int8 MiB", "int8 + autocast MiB", "bf16 autocast MiB", "int8 / bf16",
            "int8 + autocast / bf16", "kernels/conv int8 (all ops)", "kernels/conv int8 (on activations)",
            "kernels/conv bf16 (on activations)"], rows


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
    ap.add_argument("--tables", type=comma_list(accepted=("memory", "kernels", "bytes", "models")), default=None,
                    help="comma-separated: memory, kernels, bytes, models (default: all; with --smoke all but "
                         "models, a minute of its own: --smoke --tables models)")
    ap.add_argument("--smoke", action="store_true", help="small networks (VGG-11 / PreResNet-20 at width 0.25)")
    args = ap.parse_args(argv)
    tables = args.tables or (["memory", "kernels", "bytes"] if args.smoke else ["memory", "kernels", "bytes", "models"])
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
    if "models" in tables:
        size = "batch 4 at 16×16" if args.smoke else "batch 16 at 32×32"
        print(f"\nAny CNN through the graph fuser: saved activations ({size}) and kernels per conv in a training "
              f"step under bf16 autocast ({where}):\n")
        print(markdown_table(*model_rows(device, args.smoke)))
    if "bytes" in tables:
        print("\nModelled DRAM traffic per training step on an H100 (benchmarks/cost_model.py; a model, not a "
              "measurement):\n")
        print(markdown_table(*bytes_rows(args.smoke)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
