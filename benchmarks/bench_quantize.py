"""Quantizer bandwidth against a measured device-to-device copy of the same tensor.

Bytes counted for ``ebkernels.quantize`` (two passes over fp32 input): the absmax pass reads x (4 B per
element), the code pass reads x again (4 B) and writes int8 codes (1 B): 9 B per element. A copy of the
fp32 tensor moves 8 B per element (read + write). The ratio of the two bandwidths is the figure the
target in issue 6 ("quantizers ≥ 70 % of copy bandwidth") refers to.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.common import Rotating, is_gpu, measure_ms, rotation_copies, run_pedantic

QUANT_BYTES_PER_ELEM = 9  # read 4 (absmax) + read 4 (codes) + write 1
COPY_BYTES_PER_ELEM = 8  # fp32 read + write

# (label, shape, variant): activations and gradients of the size a search-phase layer sees
QUANT_CASES = (
    ("VGG16 conv1_2 input, batch 256", (256, 64, 32, 32), "nearest"),
    ("same, NCHW -> NHWC codes (fused layout change)", (256, 64, 32, 32), "nearest-cl"),
    ("same, stochastic rounding (G/E)", (256, 64, 32, 32), "stochastic"),
    ("PreResNet-101 stage-3 output, batch 256", (256, 256, 8, 8), "nearest"),
    ("VGG16 conv5 weight (512×512×3×3)", (512, 512, 3, 3), "nearest"),
)
SMOKE_QUANT_CASES = (
    ("smoke 4×8×8×8", (4, 8, 8, 8), "nearest"),
    ("smoke 4×8×8×8 -> NHWC", (4, 8, 8, 8), "nearest-cl"),
    ("smoke 4×8×8×8 stochastic", (4, 8, 8, 8), "stochastic"),
)


def quantize_fn(shape, variant: str, device, smoke: bool):
    import ebkernels

    numel = 1
    for d in shape:
        numel *= d
    n = 1 if smoke else rotation_copies(numel * 4, device)
    xs = [(torch.randn(shape, device=device),) for _ in range(n)]
    if variant == "nearest-cl":
        return Rotating(lambda x: ebkernels.quantize(x, channels_last=True), xs), numel
    if variant == "stochastic":
        return Rotating(lambda x: ebkernels.quantize(x, rounding="stochastic", seed=1234), xs), numel
    return Rotating(lambda x: ebkernels.quantize(x), xs), numel


def copy_fn(shape, device, smoke: bool):
    numel = 1
    for d in shape:
        numel *= d
    n = 1 if smoke else rotation_copies(numel * 8, device)
    pairs = [(torch.randn(shape, device=device), torch.empty(shape, device=device)) for _ in range(n)]
    return Rotating(lambda src, dst: dst.copy_(src), pairs), numel


def quantize_rows(device, smoke: bool, log=print):
    headers = ["tensor", "shape", "variant", "quantize ms", "GB/s (9 B/elem)", "copy ms", "copy GB/s (8 B/elem)",
               "% of copy bandwidth"]
    rows = []
    for label, shape, variant in (SMOKE_QUANT_CASES if smoke else QUANT_CASES):
        torch.manual_seed(0)
        qfn, numel = quantize_fn(shape, variant, device, smoke)
        q_ms = measure_ms(qfn, device, smoke)
        cfn, _ = copy_fn(shape, device, smoke)
        c_ms = measure_ms(cfn, device, smoke)
        q_bw = numel * QUANT_BYTES_PER_ELEM / (q_ms * 1e-3) / 1e9
        c_bw = numel * COPY_BYTES_PER_ELEM / (c_ms * 1e-3) / 1e9
        rows.append([label, "×".join(map(str, shape)), variant, q_ms, q_bw, c_ms, c_bw, 100.0 * q_bw / c_bw])
        log(f"  quantize {label}: {q_ms:.4f} ms ({q_bw:.1f} GB/s), copy {c_ms:.4f} ms ({c_bw:.1f} GB/s)")
    return [("Quantizer bandwidth vs device-to-device copy", headers, rows)]


# --------------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# --------------------------------------------------------------------------------------------------
_CASES = QUANT_CASES if torch.cuda.is_available() else SMOKE_QUANT_CASES


def _ascii_id(text: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in text.replace("×", "x"))


def _run(benchmark, fn, device):
    run_pedantic(benchmark, fn, device, gpu_rounds=50)


@pytest.mark.parametrize("label,shape,variant", _CASES, ids=[_ascii_id(c[0]) for c in _CASES])
def test_quantize(benchmark, bench_device, bench_backend, label, shape, variant):
    with bench_backend:
        fn, numel = quantize_fn(shape, variant, bench_device, not is_gpu(bench_device))
        benchmark.extra_info["bytes"] = numel * QUANT_BYTES_PER_ELEM
        _run(benchmark, fn, bench_device)


@pytest.mark.parametrize("label,shape,variant", _CASES, ids=[_ascii_id(c[0]) for c in _CASES])
def test_copy(benchmark, bench_device, label, shape, variant):
    fn, numel = copy_fn(shape, bench_device, not is_gpu(bench_device))
    benchmark.extra_info["bytes"] = numel * COPY_BYTES_PER_ELEM
    _run(benchmark, fn, bench_device)
