"""Per-layer benchmarks: QConv2d / QLinear against the float layers (cuDNN / cuBLAS on a GPU).

Implementations compared, per conv shape and batch:
- ``int8``: ``ebkernels.QConv2d`` (W/A/E/G 8 bit), fp32 channels-last input and output; every timing
  *includes* the quantization of A, W, E and G.
- ``fp32``: ``nn.Conv2d`` fp32, NCHW, TF32 off (strict fp32).
- ``tf32``: the same with TF32 allowed (GPU only).
- ``bf16-cl``: ``nn.Conv2d`` with bf16 weights, bf16 channels-last input (the fastest cuDNN baseline).
Passes: ``fwd`` (training forward: autograd records the graph), ``bwd`` (input-grad + weight-grad via
``torch.autograd.grad`` on a retained graph, so no ``.grad`` accumulation is timed) and ``fwd+bwd``.
Every layer computes its input-grad, the stem layer too (uniform; a real first layer would skip it).

``python -m pytest benchmarks/bench_layers.py --benchmark-enable`` runs these through pytest-benchmark
(GPU: each call synchronises, so small shapes read slower than ``run.py``'s CUDA-event medians, which
are the reference figures). Without CUDA the smoke shapes run on the reference path.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import pytest
import torch
import torch.nn as nn

from benchmarks.common import (INT8_PEAK_TOPS, Rotating, cudnn_benchmark, is_gpu, measure_ms,
                               rotation_copies, run_pedantic, tf32)
from benchmarks.shapes import (BATCHES, CONV_SHAPES, LINEAR_SHAPES, SMOKE_BATCHES, SMOKE_CONV_SHAPES,
                               SMOKE_LINEAR_SHAPES, ConvShape, LinearShape)

CONV_IMPLS = ("int8", "fp32", "tf32", "bf16-cl")
LINEAR_IMPLS = ("int8", "fp32", "tf32", "bf16")
PASSES = ("fwd", "bwd", "fwd+bwd")
GEMMS_PER_PASS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # forward; dgrad + wgrad; all three


def impls_for(device: torch.device, impls) -> tuple[str, ...]:
    """TF32 exists only on a GPU; on CPU that column would just repeat fp32."""
    return tuple(i for i in impls if is_gpu(device) or i != "tf32")


def impl_context(impl: str, device: torch.device):
    if not is_gpu(device):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(cudnn_benchmark())
    stack.enter_context(tf32(impl == "tf32"))
    return stack


def _layer_and_inputs(make_layer: Callable[[], nn.Module], in_shape, impl: str, device, conv: bool):
    """The layer and a factory of (x, grad_out) pairs in the implementation's dtype and layout."""
    layer = make_layer().to(device)
    dtype = torch.bfloat16 if impl.startswith("bf16") else torch.float32
    channels_last = conv and impl in ("int8", "bf16-cl")
    layer = layer.to(dtype=dtype)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make_inputs():
        x = torch.randn(in_shape, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_(True)
        with torch.no_grad():
            y_shape = layer(x).shape
        gy = torch.randn(y_shape, device=device, dtype=dtype)
        if channels_last:
            gy = gy.contiguous(memory_format=fmt)
        return x, gy

    return layer, make_inputs


def pass_fns(layer: nn.Module, make_inputs, device, smoke: bool) -> dict[str, Callable[[], object]]:
    """Closures timing one call of each pass, rotating over input copies beyond 2× L2."""
    x0, gy0 = make_inputs()
    set_bytes = 2 * x0.numel() * x0.element_size() + 2 * gy0.numel() * gy0.element_size()
    n = 1 if smoke else rotation_copies(set_bytes, device)
    sets = [(x0, gy0)] + [make_inputs() for _ in range(n - 1)]
    params = tuple(p for p in layer.parameters() if p.requires_grad)

    def fwd(x, gy):
        return layer(x)

    def fwd_bwd(x, gy):
        return torch.autograd.grad(layer(x), (x, *params), gy)

    # backward alone: one retained graph per input copy
    graphs = [(layer(x), x, gy) for x, gy in sets]

    def bwd(y, x, gy):
        return torch.autograd.grad(y, (x, *params), gy, retain_graph=True)

    return {"fwd": Rotating(fwd, sets), "bwd": Rotating(bwd, graphs), "fwd+bwd": Rotating(fwd_bwd, sets)}


def conv_layer_factory(shape: ConvShape, impl: str):
    from ebkernels.modules import QConv2d

    cls = QConv2d if impl == "int8" else nn.Conv2d
    return lambda: cls(shape.cin, shape.cout, shape.k, stride=shape.stride, padding=shape.pad, bias=False)


def linear_layer_factory(shape: LinearShape, impl: str):
    from ebkernels.modules import QLinear

    cls = QLinear if impl == "int8" else nn.Linear
    return lambda: cls(shape.k, shape.n, bias=True)


def time_conv(shape: ConvShape, batch: int, impl: str, device, smoke: bool, passes=PASSES) -> dict:
    """Median ms per pass for one (shape, batch, impl)."""
    torch.manual_seed(0)
    with impl_context(impl, device):
        layer, make_inputs = _layer_and_inputs(conv_layer_factory(shape, impl),
                                               (batch, shape.cin, shape.h, shape.w), impl, device, True)
        fns = pass_fns(layer, make_inputs, device, smoke)
        return {p: measure_ms(fns[p], device, smoke) for p in passes}


def time_linear(shape: LinearShape, impl: str, device, smoke: bool, passes=PASSES) -> dict:
    torch.manual_seed(0)
    with impl_context(impl, device):
        layer, make_inputs = _layer_and_inputs(linear_layer_factory(shape, impl), (shape.m, shape.k),
                                               impl, device, False)
        fns = pass_fns(layer, make_inputs, device, smoke)
        return {p: measure_ms(fns[p], device, smoke) for p in passes}


def tops(ops: float, ms: float) -> float:
    return ops / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------------
# Tables for run.py
# --------------------------------------------------------------------------------------------------
def conv_results(device, smoke: bool, batches=None, nets=None, log=print) -> list[dict]:
    """One dict per (net, shape, batch): times[impl][pass] in ms."""
    if smoke:
        plan = [(s, b) for b in (batches or SMOKE_BATCHES) for s in SMOKE_CONV_SHAPES]
    else:
        plan = [(s, b) for net in (nets or CONV_SHAPES) for b in (batches or BATCHES)
                for s in CONV_SHAPES[net]]
    impls = impls_for(device, CONV_IMPLS)
    results = []
    for shape, batch in plan:
        times = {impl: time_conv(shape, batch, impl, device, smoke) for impl in impls}
        results.append({"shape": shape, "batch": batch, "times": times})
        log(f"  conv {shape.net} {shape.label()} batch {batch}: "
            + ", ".join(f"{i} {times[i]['fwd+bwd']:.3f} ms" for i in impls))
    return results


def conv_tables(results: list[dict], device) -> list[tuple[str, list[str], list[list]]]:
    """(title, headers, rows) per pass, plus the per-network conv-time sums."""
    impls = impls_for(device, CONV_IMPLS)
    tables = []
    for p in PASSES:
        headers = (["net", "layer", "batch", "×"] + [f"{i} ms" for i in impls]
                   + ["bf16/int8", "fp32/int8", "int8 TOPS", "% of 1979"])
        rows = []
        for r in results:
            s, b, t = r["shape"], r["batch"], r["times"]
            int8_ms = t["int8"][p]
            ops = GEMMS_PER_PASS[p] * s.gemm_ops(b)
            achieved = tops(ops, int8_ms)
            rows.append([s.net, s.label(), b, s.count] + [t[i][p] for i in impls]
                        + [t["bf16-cl"][p] / int8_ms, t["fp32"][p] / int8_ms, achieved,
                           100.0 * achieved / INT8_PEAK_TOPS])
        tables.append((f"Conv {p}", headers, rows))
    # whole-network conv time: every layer counted as often as it occurs
    headers = ["net", "batch"] + [f"{i} ms" for i in impls] + ["bf16/int8", "fp32/int8"]
    sums: dict[tuple, dict] = {}
    for r in results:
        key = (r["shape"].net, r["batch"])
        acc = sums.setdefault(key, {i: 0.0 for i in impls})
        for i in impls:
            acc[i] += r["shape"].count * r["times"][i]["fwd+bwd"]
    rows = [[net, b] + [acc[i] for i in impls] + [acc["bf16-cl"] / acc["int8"], acc["fp32"] / acc["int8"]]
            for (net, b), acc in sums.items()]
    tables.append(("Conv fwd+bwd summed over all layers of the network (shape time × layer count)",
                   headers, rows))
    return tables


def linear_results(device, smoke: bool, log=print) -> list[dict]:
    impls = impls_for(device, LINEAR_IMPLS)
    results = []
    for shape in (SMOKE_LINEAR_SHAPES if smoke else LINEAR_SHAPES):
        times = {impl: time_linear(shape, impl, device, smoke) for impl in impls}
        results.append({"shape": shape, "times": times})
        log(f"  linear {shape.name}: " + ", ".join(f"{i} {times[i]['fwd+bwd']:.3f} ms" for i in impls))
    return results


def linear_tables(results: list[dict], device):
    impls = impls_for(device, LINEAR_IMPLS)
    tables = []
    for p in PASSES:
        headers = ["shape (M×K→N)", "M", "K", "N"] + [f"{i} ms" for i in impls] + [
            "bf16/int8", "fp32/int8", "int8 TOPS", "% of 1979"]
        rows = []
        for r in results:
            s, t = r["shape"], r["times"]
            int8_ms = t["int8"][p]
            achieved = tops(GEMMS_PER_PASS[p] * s.gemm_ops(), int8_ms)
            rows.append([s.name, s.m, s.k, s.n] + [t[i][p] for i in impls]
                        + [t["bf16"][p] / int8_ms, t["fp32"][p] / int8_ms, achieved,
                           100.0 * achieved / INT8_PEAK_TOPS])
        tables.append((f"Linear {p}", headers, rows))
    return tables


# --------------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# --------------------------------------------------------------------------------------------------
def _ascii_id(text: str) -> str:
    return text.replace("×", "x").replace("→", "-").replace(" ", "_").replace("/", "_").replace("@", "at")


def _bench_cases():
    gpu = torch.cuda.is_available()
    shapes = ([(s, b) for net in CONV_SHAPES for b in BATCHES for s in CONV_SHAPES[net]] if gpu
              else [(s, b) for b in SMOKE_BATCHES for s in SMOKE_CONV_SHAPES])
    return shapes


def _run_benchmark(benchmark, fn, device):
    run_pedantic(benchmark, fn, device, gpu_rounds=20)


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("shape,batch", _bench_cases(),
                         ids=lambda v: _ascii_id(v.label()) if isinstance(v, ConvShape) else f"b{v}")
def test_conv(benchmark, bench_device, bench_backend, shape, batch, impl, pass_name):
    if impl not in impls_for(bench_device, CONV_IMPLS):
        pytest.skip("TF32 needs a GPU")
    smoke = not is_gpu(bench_device)
    with bench_backend, impl_context(impl, bench_device):
        layer, make_inputs = _layer_and_inputs(conv_layer_factory(shape, impl),
                                               (batch, shape.cin, shape.h, shape.w), impl, bench_device,
                                               True)
        fn = pass_fns(layer, make_inputs, bench_device, smoke)[pass_name]
        benchmark.extra_info.update(net=shape.net, batch=batch, impl=impl, pass_name=pass_name)
        _run_benchmark(benchmark, fn, bench_device)


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES if torch.cuda.is_available() else SMOKE_LINEAR_SHAPES,
                         ids=lambda s: _ascii_id(s.name))
def test_linear(benchmark, bench_device, bench_backend, shape, impl, pass_name):
    if impl not in impls_for(bench_device, LINEAR_IMPLS):
        pytest.skip("TF32 needs a GPU")
    smoke = not is_gpu(bench_device)
    with bench_backend, impl_context(impl, bench_device):
        layer, make_inputs = _layer_and_inputs(linear_layer_factory(shape, impl), (shape.m, shape.k), impl,
                                               bench_device, False)
        fn = pass_fns(layer, make_inputs, bench_device, smoke)[pass_name]
        _run_benchmark(benchmark, fn, bench_device)
