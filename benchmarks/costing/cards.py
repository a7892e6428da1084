"""The priced cards and every rate and rule constant of the cost model, in one place.

Every figure the model prints is a PREDICTION built from these numbers, not a measurement. Peaks are
SPEC §5 (H100 SXM dense: int8 1979 TOPS, bf16 989 TFLOP/s, TF32 495, fp32 67; HBM3 3.35 TB/s; H200: same
compute, 4.8 TB/s); the copy bandwidth 3.0 TB/s is SPEC §5's measured H100 device-to-device copy. Where a
number had to be chosen, the choice charges the int8 path more, never less ("when in doubt, charge more"),
and the float baselines are priced at a good, not a poor, library efficiency (a slow baseline would flatter
int8 just the same). ``gpu_session.py`` prints these figures next to what it measures: the first GPU run
calibrates them.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Card:
    """One GPU's peaks: rates in ops/s or bytes/s, sizes in bytes."""

    name: str
    sms: int
    hbm_peak: float  # bytes/s, datasheet
    copy_bw: float  # bytes/s a device-to-device copy reaches (read + write)
    l2_bytes: int
    l2_bw: float  # bytes/s from L2 to the SMs, all SMs together
    int8_peak: float  # dense tensor ops/s
    bf16_peak: float
    tf32_peak: float
    fp32_peak: float  # non-tensor
    copy_measured: bool  # whether copy_bw was measured on this card (else scaled from H100's)


CARDS = {
    "h100": Card("H100 SXM", 132, 3.35e12, 3.0e12, 50 * 2**20, 5.5e12, 1979e12, 989e12, 495e12, 67e12, True),
    # H200: the H100's die (same SMs, L2, compute) with 4.8 TB/s HBM3e; its copy rate is not measured here:
    # the H100's measured copy / peak ratio (3.0 / 3.35) applied to 4.8 TB/s
    "h200": Card("H200 SXM", 132, 4.8e12, 4.8e12 * 3.0 / 3.35, 50 * 2**20, 5.5e12, 1979e12, 989e12, 495e12, 67e12,
                 False),
}


@dataclasses.dataclass(frozen=True)
class Rules:
    """Efficiencies and per-event costs (µs unless named otherwise); see ``benchmarks/costing/__init__.py``."""

    # --- device rates -------------------------------------------------------------------------------------
    stream_eff: float = 0.85  # of copy_bw, any memory-bound kernel (Triton or PyTorch/cuDNN)
    int8_mma_eff: float = 0.50  # of the int8 dense peak: Triton int8 at the conservative end of 50-60 %
    bf16_conv_eff: float = 0.65  # cuDNN/cuBLAS bf16 at large batch (SPEC §5: 798/989 = 81 % for a big matmul)
    fp32_conv_eff: float = 0.65  # cuDNN fp32 without TF32 (bench_epoch.py times fp32 with TF32 off)
    l2_resident_bytes: int = 25 * 2**20  # an operand re-read by other tiles stays in L2 when at most this big
    sm_stream_bw: float = 30e9  # bytes/s one SM streams in a loop (conservative end of 30-60 GB/s)
    hbm_latency_us: float = 0.7  # one dependent global-memory round trip (unpipelined loop iteration)
    l2_latency_us: float = 0.35  # one dependent L2 round trip (.cg loads of partials just written)
    fence_us: float = 0.5  # one GPU-scope fence (MEMBAR.ALL.GPU: waits for the thread's stores to reach L2)
    # atomics on one word are serialised in its L2 slice: about one per clock at ~1 GHz (charge more: 1 ns)
    atomic_same_address_ns: float = 1.0
    min_kernel_us: float = 2.0  # the shortest kernel body (ramp up + drain), any launch
    # --- launches ------------------------------------------------------------------------------------------
    graph_launch_us: float = 3.0  # device gap per launch when the step is one CUDA graph
    eager_launch_us: float = 4.0  # device gap per launch from a stream fed by the host
    graph_replay_us: float = 10.0  # host cost of replaying the captured step
    # host work the CPU trace cannot see: Triton's JITFunction.run on a GPU (binder, specialisation key,
    # cache lookup, launcher; tritonbench #1002/#1231: ~12.5 µs for a 19-argument kernel on GB200) plus
    # more per argument beyond 19 (our kernels take 20-50); an aten op's CUDA launch and allocator work
    triton_launch_us: float = 12.5
    triton_launch_per_arg_us: float = 0.25
    aten_cuda_launch_us: float = 4.0
    # --- what the report counts --------------------------------------------------------------------------
    big_launch_bytes: int = 256 * 2**10  # "launches >= 256 KiB with < 33 programs"
    few_programs: int = 33
    program_bytes: int = 64 * 2**10  # "programs processing > 64 KiB"


RULES = Rules()


def card(name: str) -> Card:
    try:
        return CARDS[name.lower()]
    except KeyError:
        raise SystemExit(f"unknown card {name!r}; known: {', '.join(CARDS)}") from None


def card_table() -> tuple[list[str], list[list]]:
    """The card parameters, one column per card (the report prints it)."""
    rows = [
        ["SMs", *(c.sms for c in CARDS.values())],
        ["HBM peak TB/s", *(f"{c.hbm_peak / 1e12:.2f}" for c in CARDS.values())],
        ["copy TB/s (used)", *(f"{c.copy_bw / 1e12:.2f}{'' if c.copy_measured else ' (scaled)'}"
                               for c in CARDS.values())],
        ["L2 MiB / TB/s", *(f"{c.l2_bytes / 2**20:.0f} / {c.l2_bw / 1e12:.1f}" for c in CARDS.values())],
        ["int8 dense TOPS", *(f"{c.int8_peak / 1e12:.0f}" for c in CARDS.values())],
        ["bf16 / TF32 / fp32 TFLOP/s", *(f"{c.bf16_peak / 1e12:.0f} / {c.tf32_peak / 1e12:.0f} / "
                                         f"{c.fp32_peak / 1e12:.0f}" for c in CARDS.values())],
    ]
    return ["parameter", *(c.name for c in CARDS.values())], rows
