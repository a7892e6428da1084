"""Timing, environment and table helpers shared by the benchmark suites and ``run.py``.

GPU timing: ``triton.testing.do_bench`` (CUDA events, warm-up first, L2 flushed before every call,
median of the repeats), with the inputs additionally rotated through enough copies to exceed twice the
L2 cache. CPU (smoke mode only): ``time.perf_counter`` medians of a few calls. CPU figures exist only to
keep the code paths alive and are always labelled ``CPU smoke — not a GPU result``.
"""
from __future__ import annotations

import contextlib
import datetime
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

CPU_LABEL = "CPU smoke — not a GPU result"
INT8_PEAK_TOPS = 1979.0  # H100 SXM dense int8 tensor peak (SPEC §5)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_gpu(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: torch.device) -> None:
    if is_gpu(device):
        torch.cuda.synchronize(device)


def run_pedantic(benchmark, fn: Callable[[], object], device: torch.device, *, gpu_rounds: int,
                 cpu_rounds: int = 3, gpu_warmup: int = 3, cpu_warmup: int = 1) -> None:
    """pytest-benchmark ``pedantic`` timing of ``fn``, each call synchronised on a GPU (the rounds and
    warm-up rounds per device kind are each benchmark file's choice)."""
    def call():
        fn()
        sync(device)

    gpu = is_gpu(device)
    benchmark.pedantic(call, rounds=gpu_rounds if gpu else cpu_rounds,
                       warmup_rounds=gpu_warmup if gpu else cpu_warmup)


def environment(device: torch.device) -> dict[str, str]:
    """What produced the numbers: card, date, versions."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
    }
    if is_gpu(device):
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory"] = f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        env["cudnn"] = str(torch.backends.cudnn.version())
        env["driver"] = _driver_version()
    else:
        env["gpu"] = f"none ({CPU_LABEL})"
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = str(torch.get_num_threads())
    return env


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # NVML missing is fine: the driver is only a note
        return "n/a (pynvml not available)"


def l2_bytes(device: torch.device) -> int:
    if is_gpu(device):
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    return 0


def rotation_copies(bytes_per_set: int, device: torch.device, cap: int = 32) -> int:
    """How many input copies make the rotation exceed 2× L2 (1 on CPU)."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_set <= 0:
        return 1
    return max(1, min(cap, -(-2 * l2 // bytes_per_set)))


class Rotating:
    """Calls ``fn(*inputs[i])`` with i cycling over the input copies (defeats cache reuse)."""

    def __init__(self, fn: Callable, input_sets: Sequence[tuple]):
        self.fn, self.sets, self.i = fn, list(input_sets), 0

    def __call__(self):
        args = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*args)


def measure_ms(fn: Callable[[], object], device: torch.device, smoke: bool) -> float:
    """Median milliseconds of one call of ``fn``."""
    if is_gpu(device):
        import triton.testing

        warmup, rep = (5, 20) if smoke else (25, 200)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()  # warm-up (allocator, first-call dispatch)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for cuBLAS and cuDNN on (``True``) or off (strict fp32), restored afterwards."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def cudnn_benchmark():
    """Let cuDNN pick its fastest algorithm per shape (the fair baseline)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def saved_tensor_bytes(fn: Callable[[], object], exclude: Sequence[torch.Tensor] = ()) -> tuple[int, object]:
    """Bytes of the tensors autograd saves for backward while running ``fn`` (each storage counted once).

    Returns (bytes, fn's result). Storages of ``exclude`` (e.g. the parameters, which autograd saves by
    reference and so cost no extra memory) are not counted.
    """
    skip = {(t.untyped_storage().data_ptr(), t.device.type) for t in exclude}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device.type)
        if key not in skip:
            seen[key] = max(seen.get(key, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)
