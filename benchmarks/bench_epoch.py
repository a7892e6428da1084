"""One search epoch (SPEC §4 settings) of VGG16 and PreResNet-101 on CIFAR-shaped synthetic data.

Three precisions of the same network and step:
- ``int8``: ``ebkernels.quantize_model(model)`` (every conv and the classifier, W/A/E/G 8 bit),
- ``fp32``: float32 with TF32 off,
- ``bf16-autocast``: ``torch.autocast(dtype=torch.bfloat16)`` around forward and loss.
A step is forward, cross-entropy, backward, the network-slimming L1 term on BN gamma
(``gamma.grad += 1e-4 * sign(gamma)``) and SGD (lr 0.1, momentum 0.9, weight decay 1e-4). An epoch is
50,000 images at batch 256 (195 full batches and one of 80), drawn from a pool of synthetic batches
that live on the device (no data loader in the timing). Model and data are channels-last on a GPU.

Reported per epoch: wall time (CUDA events around the whole epoch, after warm-up steps; median over
``repeats`` epochs), peak allocated memory during the epoch, GPU energy from NVML's total-energy
counter when ``pynvml`` is importable, and the bytes autograd saves for backward in one forward at the
epoch's batch size (``saved_tensors_hooks``; parameters saved by reference are not counted).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import cudnn_benchmark, is_gpu, saved_tensor_bytes, sync, tf32
from benchmarks.shapes import EPOCH_BATCH, EPOCH_IMAGES

MODELS = ("vgg16", "preresnet101")
MODES = ("int8", "fp32", "bf16-autocast")
L1_GAMMA = 1e-4  # SPEC §4 sparsity term on BN scaling factors

# smoke: the same architectures at 1/8 width, two tiny steps at 16×16 (the models pool adaptively)
SMOKE = {"images": 4, "batch": 2, "hw": 16, "warmup": 1, "pool": 1, "width": 0.125}
FULL = {"images": EPOCH_IMAGES, "batch": EPOCH_BATCH, "hw": 32, "warmup": 5, "pool": 8, "width": 1.0}


def _build(name: str, mode: str, device, width: float = 1.0):
    from ebkernels.models import build_model

    torch.manual_seed(0)
    kw = {} if width == 1.0 else {"width": width}
    model = build_model(name, num_classes=10, in_channels=3, **kw).to(device)
    if mode == "int8":
        from ebkernels.convert import quantize_model

        quantize_model(model)
    if is_gpu(device):
        model = model.to(memory_format=torch.channels_last)
    return model


def _mode_context(mode: str, device):
    stack = contextlib.ExitStack()
    if is_gpu(device):
        stack.enter_context(cudnn_benchmark())
        stack.enter_context(tf32(False))
    return stack


def _autocast(mode: str, device):
    if mode == "bf16-autocast":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Energy:
    """NVML total energy (mJ since driver load) before/after; None when unavailable."""

    def __init__(self, device):
        self.handle = None
        if not is_gpu(device):
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.device(device).index or 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._read()
        except Exception:  # no pynvml, or the card does not report energy
            self.handle = None

    def read(self):
        return self._read() if self.handle is not None else None


def epoch_result(name: str, mode: str, device, smoke: bool, repeats: int = 1, steps: int | None = None) -> dict:
    cfg = SMOKE if smoke else FULL
    fmt = torch.channels_last if is_gpu(device) else torch.contiguous_format
    with _mode_context(mode, device):
        model = _build(name, mode, device, cfg["width"])
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        gen = torch.Generator(device="cpu").manual_seed(0)
        pool = [(torch.randn(cfg["batch"], 3, cfg["hw"], cfg["hw"], generator=gen).to(device, memory_format=fmt),
                 torch.randint(0, 10, (cfg["batch"],), generator=gen).to(device)) for _ in range(cfg["pool"])]
        n_steps = steps if steps is not None else math.ceil(cfg["images"] / cfg["batch"])
        last = cfg["images"] - (n_steps - 1) * cfg["batch"] if steps is None else cfg["batch"]

        def step(i):
            x, y = pool[i % len(pool)]
            if i == n_steps - 1 and last != cfg["batch"]:
                x, y = x[:last], y[:last]
            with _autocast(mode, device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for bn in bns:  # network-slimming L1 subgradient on gamma
                if bn.weight is not None and bn.weight.grad is not None:
                    bn.weight.grad.add_(torch.sign(bn.weight.detach()), alpha=L1_GAMMA)
            opt.step()
            return loss

        for i in range(cfg["warmup"]):
            step(i)
        # also warm the short last batch (a new shape: kernel selection/compilation)
        if last != cfg["batch"]:
            step(n_steps - 1)
        sync(device)

        saved = saved_activation_bytes(model, pool[0][0], mode, device)

        energy = _Energy(device)
        times, energies, peaks = [], [], []
        for _ in range(repeats):
            if is_gpu(device):
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync(device)
                e0 = energy.read()
                start.record()
                for i in range(n_steps):
                    step(i)
                end.record()
                sync(device)
                e1 = energy.read()
                times.append(start.elapsed_time(end) / 1e3)
                peaks.append(torch.cuda.max_memory_allocated(device))
                if e0 is not None and e1 is not None:
                    energies.append((e1 - e0) / 1e3)  # mJ -> J
            else:
                import time

                t0 = time.perf_counter()
                for i in range(n_steps):
                    step(i)
                times.append(time.perf_counter() - t0)
    times.sort()
    return {"model": name, "mode": mode, "steps": n_steps, "batch": cfg["batch"], "hw": cfg["hw"],
            "width": cfg["width"],
            "seconds": times[len(times) // 2], "peak_bytes": max(peaks) if peaks else None,
            "joules": sorted(energies)[len(energies) // 2] if energies else None, "saved_bytes": saved}


def saved_activation_bytes(model, x, mode, device) -> int:
    """Bytes autograd saves in one training forward, parameters (saved by reference) excluded."""
    params = [p for p in model.parameters()]
    with _autocast(mode, device):
        saved, _ = saved_tensor_bytes(lambda: model(x), exclude=params)
    return saved


def epoch_rows(device, smoke: bool, models=MODELS, repeats: int = 1, steps: int | None = None, log=print):
    headers = ["model", "mode", "steps × batch", "epoch s", "vs bf16", "peak MiB", "saved act. MiB / step",
               "saved vs bf16", "energy J"]
    results = []
    for name in models:
        for mode in MODES:
            r = epoch_result(name, mode, device, smoke, repeats=repeats, steps=steps)
            results.append(r)
            log(f"  epoch {name} {mode}: {r['seconds']:.3f} s")
    rows = []
    for r in results:
        ref = next(b for b in results if b["model"] == r["model"] and b["mode"] == "bf16-autocast")
        model = r["model"] if r["width"] == 1.0 else f"{r['model']} (width ×{r['width']})"
        rows.append([model, r["mode"], f"{r['steps']} × {r['batch']} @{r['hw']}²", r["seconds"],
                     r["seconds"] / ref["seconds"],
                     None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20, r["saved_bytes"] / 2**20,
                     r["saved_bytes"] / ref["saved_bytes"],
                     r["joules"] if r["joules"] is not None else ("n/a (no NVML)" if is_gpu(device) else "n/a")])
    return [("Search epoch (synthetic CIFAR-shaped data on the device)", headers, rows)]


# --------------------------------------------------------------------------------------------------
# pytest-benchmark entry point (one short run per model and mode; run.py gives the full epoch)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_epoch(benchmark, bench_device, bench_backend, name, mode):
    pytest.importorskip("ebkernels.models")
    smoke = not is_gpu(bench_device)
    with bench_backend:
        result = benchmark.pedantic(epoch_result, args=(name, mode, bench_device, smoke),
                                    kwargs={"steps": None if not smoke else 2}, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if isinstance(v, (int, float, str))})
