"""Time of every recorded event on the priced card, and of the whole step, eager and graph-captured.

A Triton launch's body (``launch_time``) is the longest of

- DRAM bytes at ``stream_eff`` × copy bandwidth × its share of the machine (``min(1, programs / SMs)``: a
  launch with fewer programs than SMs gets that share),
- L2 → SM bytes at the L2 rate × the same share,
- MMA work at ``int8_mma_eff`` × the int8 peak, wave-quantised: ``ceil(programs / SMs)`` waves of its
  largest program at one SM's share of that rate (one GEMM program per SM at a time), plus the issue slots of
  byte-wise shared-memory transposes (``smem_b8`` stores per thread per K step, 4 warp-instructions per SM
  cycle at 1.755 GHz),
- ``min_kernel_us``;

then the fences (``fences`` per thread × ``fence_us`` for every wave of programs that run them, a wave being
SMs × the programs an SM holds at once by the build's threads, shared memory and registers; added to the
body where an SM holds one program, overlapped with it where it holds several: another program works
while one waits) and the serial phase (``kernel_rules``), which follows the parallel body.

The step: graph-captured = Σ (device time + ``graph_launch_us`` per kernel) + one replay's host cost;
eager = a two-clock timeline: the host issues event after event (its measured host time plus the GPU-only
launch costs of ``cards.Rules``), the device runs each kernel when it is issued and the previous one is
done, plus ``eager_launch_us``; the step ends when both are done.
"""
from __future__ import annotations

import dataclasses
import math

from . import fences as fence_cache
from .aten_rules import aten_work, base_name, is_copy
from .kernel_rules import RULED, kernel_work
from .layers import useful_counter
from .trace import AtenOp, Launch

__all__ = ["Priced", "price_trace", "launch_time", "step_totals", "CLOCK_HZ"]

CLOCK_HZ = 1.755e9  # sustained SM clock under tensor-core load (H100 / H200 SXM)


@dataclasses.dataclass
class Priced:
    kind: str  # "triton" or "aten"
    name: str
    op: str  # the ebkernels custom op it ran in
    grid: tuple
    programs: int
    launches: int  # device kernels (0: host-only)
    hbm: float
    l2: float
    ops: float  # int8 MMA ops issued (Triton) or flops (aten)
    useful: float
    device_us: float
    bound: str
    serial_us: float = 0.0
    serial_what: str = ""
    fence_us: float = 0.0
    fences: int = 0  # per thread per program (SASS)
    atomics: int = 0
    program_bytes: float = 0.0
    host_cpu_us: float = 0.0  # measured on this CPU (stubbed launches)
    host_gpu_us: float = 0.0  # + the GPU-only launch costs
    unmatched: bool = False  # useful work not found for a conv GEMM
    generic: bool = False  # no kernel rule
    event: object = None

    def signature(self) -> str:
        e = self.event
        if self.kind == "triton":
            shapes = ",".join("x".join(map(str, t.shape)) for t in list(e.tensors.values())[:2])
            return f"{self.name} {self.grid} {shapes}"
        shapes = ",".join("x".join(map(str, t.shape)) + ":" + t.dtype for t in e.inputs[:2])
        return f"{self.name} {shapes}"


SMEM_PER_SM, REGS_PER_SM, THREADS_PER_SM = 228 * 1024, 65536, 2048


def resident_programs(launch: Launch, build: dict | None) -> int:
    """Programs one SM holds at once: threads, and the build's shared memory and registers (sm_90 limits)."""
    threads = 32 * launch.get("num_warps", 4)
    n = THREADS_PER_SM // threads
    if build and build.get("shared"):
        n = min(n, SMEM_PER_SM // build["shared"])
    if build and build.get("registers"):
        n = min(n, REGS_PER_SM // (build["registers"] * threads))
    return max(1, min(n, 32))


def launch_time(work, launch: Launch, card, rules, fence: dict | None) -> dict:
    sms = card.sms
    programs = max(1, launch.programs)
    share = min(1.0, programs / sms)
    t_hbm = work.hbm_bytes / (card.copy_bw * rules.stream_eff * share) * 1e6
    t_l2 = work.l2_bytes / (card.l2_bw * share) * 1e6
    t_mma = 0.0
    fences = fence["fences"] if fence else 0
    if work.mma_ops:
        rate = card.int8_peak * rules.int8_mma_eff
        waves = math.ceil(programs / sms)
        steps = work.program_mma_ops / (2 * launch.get("BM") * launch.get("BN") * launch.get("BK"))
        b8 = (fence or {}).get("smem_b8", 0) * launch.get("num_warps", 4) / 4 / CLOCK_HZ * 1e6
        t_mma = max(work.mma_ops / rate * 1e6, waves * (work.program_mma_ops / (rate / sms) * 1e6 + steps * b8))
    t_atom = work.same_address_atomics * rules.atomic_same_address_ns * 1e-3
    if work.all_serial:
        body = rules.min_kernel_us
        parts = {"serial": work.serial_us}
    else:
        body = max(t_hbm, t_l2, t_mma, t_atom, rules.min_kernel_us)
        parts = {"HBM": t_hbm, "L2": t_l2, "MMA": t_mma, "atomics": t_atom, "serial": work.serial_us}
    t_fence = 0.0
    if fences and (work.fence_programs or work.gemm):
        resident = resident_programs(launch, fence)
        waves = math.ceil((work.fence_programs or programs) / (sms * resident))
        t_fence = waves * fences * rules.fence_us
        parts["fence"] = t_fence
        if resident > 1:
            body, t_fence = max(body, t_fence), 0.0
    total = body + t_fence + work.serial_us
    bound = max(parts, key=parts.get) if max(parts.values()) >= rules.min_kernel_us else "latency"
    return {"us": total, "bound": bound, "fence_us": t_fence if work.gemm else parts.get("fence", 0.0)}


def _price_launch(e: Launch, card, rules, useful) -> Priced:
    work = kernel_work(e, useful)
    if not work.program_bytes and not work.gemm:  # an elementwise program: its share of the traffic
        work.program_bytes = work.hbm_bytes / max(1, e.programs)
    fence = fence_cache.lookup(e.kernel, {**e.scalars, **e.constexprs})
    t = launch_time(work, e, card, rules, fence)
    unmatched = work.gemm and not work.matched
    host_gpu = e.host_us + rules.triton_launch_us + rules.triton_launch_per_arg_us * max(0, e.nargs - 19)
    return Priced("triton", e.kernel, e.op, e.grid, e.programs, 1, work.hbm_bytes, work.l2_bytes, work.mma_ops,
                  work.useful_ops, t["us"], t["bound"], work.serial_us, work.serial_what, t["fence_us"],
                  fence["fences"] if fence else 0, fence["atomics"] if fence else 0, work.program_bytes,
                  e.host_us, host_gpu, unmatched, e.kernel not in RULED, e)


def _price_aten(e: AtenOp, card, rules) -> Priced:
    w = aten_work(e, card, rules)
    host_gpu = e.host_us + rules.aten_cuda_launch_us * w["launches"]
    return Priced("aten", e.name, e.op, (), 0, w["launches"], w["bytes"], 0.0, w["flops"], w["flops"], w["us"],
                  w["bound"], host_cpu_us=e.host_us, host_gpu_us=host_gpu, event=e)


def price_trace(trace, card, rules) -> list:
    useful = useful_counter(trace)
    out = []
    for e in trace.events:
        out.append(_price_launch(e, card, rules, useful) if isinstance(e, Launch) else _price_aten(e, card, rules))
    return out


def step_totals(priced: list, host_tail_us: float, rules) -> dict:
    device = sum(p.device_us for p in priced)
    launches = sum(p.launches for p in priced)
    graph = device + launches * rules.graph_launch_us + rules.graph_replay_us
    host_clock = dev_free = 0.0
    for p in priced:
        host_clock += p.host_gpu_us
        if p.launches:
            dev_free = max(dev_free, host_clock) + p.device_us + p.launches * rules.eager_launch_us
    host_gpu = host_clock + host_tail_us
    host_cpu = sum(p.host_cpu_us for p in priced) + host_tail_us
    triton = sum(1 for p in priced if p.kind == "triton")
    return {"device_us": device, "dram_bytes": sum(p.hbm for p in priced), "launches": launches,
            "triton_launches": triton,
            "aten_launches": launches - triton, "graph_us": graph, "eager_us": max(dev_free, host_gpu),
            "host_gpu_us": host_gpu, "host_cpu_us": host_cpu,
            "host_cpu_per_launch_us": host_cpu / max(launches, 1),
            "copies": [p for p in priced if p.kind == "aten" and p.launches and is_copy(p.event)],
            "aten_names": sorted({base_name(p.event) for p in priced if p.kind == "aten" and p.launches})}
