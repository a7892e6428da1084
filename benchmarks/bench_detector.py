"""Early-bird detector: the fused per-epoch step against the reference code's routine.

Both do the same job once per epoch for three ratios (0.3, 0.5, 0.7) on the BatchNorm sets of the two
search networks (VGG16-CIFAR: 13 BN, 4,224 channels; PreResNet-101-CIFAR: 100 BN, 7,408 channels):
masks from the BN gammas, distances of the newest mask to the 4 older ones (``window`` mode, as the
reference code).

- ``reference routine``: what the EB reference code does — copy every layer's |gamma| into a host
  buffer, sort it on the host, threshold each layer on the device, and compute each distance with its
  own ``float(torch.sum(m_i == m_j))`` (a host sync per distance); ratio by ratio.
- ``EarlyBird.step``: ``torch.cat`` of the gammas, one fused launch for all ratios (threshold select,
  packing, XOR + popcount against the on-device history), one host read of the distances.
- ``fused update only``: the single launch on a prepared flat buffer (no cat, no host read).

GPU times: CUDA events (``triton.testing.do_bench`` medians, see ``benchmarks/common.py``); CPU times:
``time.perf_counter`` medians, labelled CPU (the C++ op when built, else the PyTorch reference — the
Triton interpreter is never timed).

    python -m pytest benchmarks/bench_detector.py --benchmark-enable
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.common import is_gpu, measure_ms, run_pedantic

RATIOS = (0.3, 0.5, 0.7)
WINDOW = 5
VGG16_BN = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def preresnet_bn_widths(depth: int = 101) -> list[int]:
    """BN widths of the CIFAR pre-activation bottleneck ResNet (bn1 over the block input, bn2/bn3 over
    the inner width, expansion 4, widths 16/32/64; a final BN over the stream)."""
    n = (depth - 2) // 9
    widths, inplanes = [], 16
    for planes in (16, 32, 64):
        for _ in range(n):
            widths += [inplanes, planes, planes]
            inplanes = planes * 4
    return widths + [inplanes]


BN_SETS = {"VGG16": VGG16_BN, "PreResNet-101": preresnet_bn_widths(101)}


def bn_weights(widths, device, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(w, generator=gen) * 2 - 1).to(device) for w in widths]


# --------------------------------------------------------------------------------------------------
# the two routines
# --------------------------------------------------------------------------------------------------
class ReferenceRoutine:
    """The EB reference code's per-epoch check (``EarlyBird.pruning`` + ``early_bird_emerge``)."""

    def __init__(self, ratios=RATIOS, window=WINDOW):
        self.ratios, self.window = ratios, window
        self.masks = {p: [] for p in ratios}

    def step(self, weights) -> list[list[float]]:
        total = sum(w.shape[0] for w in weights)
        out = []
        for p in self.ratios:
            bn = torch.zeros(total)  # host buffer, filled layer by layer (a device-to-host copy each)
            index = 0
            for w in weights:
                bn[index:index + w.shape[0]] = w.data.abs().clone()
                index += w.shape[0]
            y, _ = torch.sort(bn)
            thre = y[int(total * p)].to(weights[0].device)
            mask = torch.cat([w.data.abs().gt(thre).float() for w in weights])
            hist = self.masks[p]
            hist.append(mask)
            if len(hist) > self.window:
                hist.pop(0)
            dists = []
            if len(hist) == self.window:
                for older in hist[:-1]:
                    dists.append(1 - float(torch.sum(mask == older)) / older.size(0))
            out.append(dists)
        return out


def fused_backend(device) -> str:
    """The fused implementation a user gets on this device (never the interpreter)."""
    if is_gpu(device):
        return "triton"
    from ebkernels import _native

    return "native" if _native.available("cpu") else "reference"


def make_fused_step(weights, backend):
    from ebkernels import EarlyBird

    eb = EarlyBird(RATIOS, mode="window", window=WINDOW, backend=backend)
    for _ in range(WINDOW):  # a full window: every step computes every distance
        eb.step(weights)
    return eb, (lambda: eb.step(weights))


def make_fused_update(weights, backend):
    from ebkernels.detector.early_bird_mask import early_bird_update, n_words, ratio_ks

    flat = torch.cat([w.detach() for w in weights]).float()
    total = flat.numel()
    ks = torch.tensor(ratio_ks(total, RATIOS), dtype=torch.int32, device=flat.device)
    ring = torch.zeros((len(RATIOS), WINDOW, n_words(total)), dtype=torch.int32, device=flat.device)
    state = {"slot": 0}

    def call():
        state["slot"] = (state["slot"] + 1) % WINDOW
        return early_bird_update(flat, ks, ring, state["slot"], backend=backend)

    return call


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if is_gpu(device) else "CPU"


def detector_rows(device, smoke: bool) -> list[dict]:
    """One row per (BN set, implementation): median microseconds per epoch-check and the speedup over
    the reference routine. CPU rows say CPU in the ``device`` column (and run.py labels the table)."""
    device = torch.device(device)
    backend = fused_backend(device)
    impls = [("EarlyBird.step", backend), ("fused update only", backend)]
    if is_gpu(device):
        from ebkernels import _native

        if _native.available("cuda"):
            impls.append(("fused update only", "native"))  # the CUDA op of csrc/
    rows = []
    for name, widths in BN_SETS.items():
        weights = bn_weights(widths, device)
        ref = ReferenceRoutine()
        for _ in range(WINDOW):
            ref.step(weights)
        ref_ms = measure_ms(lambda: ref.step(weights), device, smoke)
        case = f"{name} ({len(widths)} BN, {sum(widths)} ch), ratios 0.3/0.5/0.7"
        dev = _device_name(device) if is_gpu(device) else "CPU"
        rows.append({"BN set": case, "implementation": "reference routine (host sort, per-distance sync)",
                     "device": dev, "time (µs)": ref_ms * 1e3, "speedup vs reference": 1.0})
        for label, b in impls:
            fn = make_fused_step(weights, b)[1] if label == "EarlyBird.step" else make_fused_update(weights, b)
            ms = measure_ms(fn, device, smoke)
            rows.append({"BN set": case, "implementation": f"{label} ({b})", "device": dev,
                         "time (µs)": ms * 1e3, "speedup vs reference": ref_ms / ms})
    return rows


# --------------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# --------------------------------------------------------------------------------------------------
def _run(benchmark, fn, device):
    run_pedantic(benchmark, fn, device, gpu_rounds=100, cpu_rounds=5, gpu_warmup=5)


@pytest.mark.parametrize("bn_set", list(BN_SETS))
def test_fused_step(benchmark, bench_device, bn_set):
    weights = bn_weights(BN_SETS[bn_set], bench_device)
    backend = fused_backend(bench_device)
    eb, fn = make_fused_step(weights, backend)
    benchmark.extra_info.update(device=_device_name(bench_device), backend=backend, channels=sum(BN_SETS[bn_set]))
    _run(benchmark, fn, bench_device)
    # same verdict inputs as the reference routine: masks and newest-vs-older distances
    ref = ReferenceRoutine()
    for _ in range(WINDOW):
        ref_d = ref.step(weights)
    for r, p in enumerate(RATIOS):
        assert torch.equal(eb.mask(eb.epoch - 1)[p].float(), ref.masks[p][-1])
        assert eb.last_distances[p] == pytest.approx(ref_d[r], abs=1e-12)


@pytest.mark.parametrize("bn_set", list(BN_SETS))
def test_fused_update_only(benchmark, bench_device, bn_set):
    weights = bn_weights(BN_SETS[bn_set], bench_device)
    backend = fused_backend(bench_device)
    benchmark.extra_info.update(device=_device_name(bench_device), backend=backend)
    _run(benchmark, make_fused_update(weights, backend), bench_device)


@pytest.mark.parametrize("bn_set", list(BN_SETS))
def test_reference_routine(benchmark, bench_device, bn_set):
    weights = bn_weights(BN_SETS[bn_set], bench_device)
    ref = ReferenceRoutine()
    for _ in range(WINDOW):
        ref.step(weights)
    benchmark.extra_info.update(device=_device_name(bench_device))
    _run(benchmark, lambda: ref.step(weights), bench_device)
