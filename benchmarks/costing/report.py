"""The cost model's markdown: step totals per mode, issue 20's target rows, what the model sees of the
review's five findings, and the per-kernel table. Every figure is a prediction of the model, labelled so."""
from __future__ import annotations

from collections import defaultdict

from benchmarks.common import markdown_table

from .aten_rules import base_name
from .cards import RULES, card_table

__all__ = ["totals_table", "host_check_table", "targets",
           "findings", "kernel_rows", "kernel_table", "name_table", "rules_markdown"]

LABEL = {"int8-fused": "int8 fused", "int8-layer": "int8 per-layer", "bf16": "bf16 autocast", "fp32": "fp32"}


def _us(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def totals_table(results: dict) -> tuple:
    """``results``: mode -> {"totals": step_totals(...), ...}."""
    base = results.get("bf16")
    rows = []
    for mode, r in results.items():
        t = r["totals"]
        rel = lambda k: f"{base['totals'][k] / t[k]:.2f}×" if base else "-"  # noqa: E731
        rows.append([LABEL[mode], t["triton_launches"], t["aten_launches"], _us(t["device_us"]), _us(t["graph_us"]),
                     rel("graph_us"), _us(t["host_cpu_us"]), f"{t['host_cpu_per_launch_us']:.1f}",
                     _us(t["host_gpu_us"]), _us(t["eager_us"]), rel("eager_us")])
    headers = ["mode", "Triton launches", "PyTorch kernels", "device µs (kernels)", "graph-captured µs",
               "speed vs bf16 (graph)", "host µs (CPU, stubbed)", "host µs / launch", "host µs + GPU launch API",
               "eager µs", "speed vs bf16 (eager)"]
    return headers, rows


def host_check_table(results: dict) -> tuple:
    """Per int8 mode: forward + backward host µs by the recorder and by the plain thread time (``step.plain_host_us``),
    per launch of forward + backward (Triton launches and PyTorch kernels before the optimizer's first event), the
    plain time's part inside the custom ops per Triton launch (the launch layer), and the aten ops they call
    (``StepTrace.fwd_bwd_aten_calls``: exact, where the times move with the CPU)."""
    rows = []
    for mode, r in results.items():
        plain = r.get("plain")
        if plain is None:
            continue
        tr = r["trace"]
        before = {id(e) for e in tr.fwd_bwd_events}
        launches = sum(p.launches for p in r["priced"] if id(p.event) in before) or 1
        rec, aten = tr.fwd_bwd_host_us, tr.fwd_bwd_aten_calls
        rows.append([LABEL[mode], launches, _us(rec), f"{rec / launches:.1f}", _us(plain.total_us),
                     f"{plain.total_us / launches:.1f}", f"{rec / plain.total_us:.2f}", _us(plain.ops_us),
                     f"{plain.per_launch_us:.1f}", f"{aten:,} ({aten / launches:.1f})"])
    headers = ["mode", "launches (fwd + bwd)", "host µs, recorder", "per launch", "host µs, plain (batch 2)",
               "per launch", "recorder / plain", "of it in the custom ops (launch layer)", "per Triton launch",
               "aten calls (per launch)"]
    return headers, rows


def _big_few(priced) -> list:
    return [p for p in priced
            if p.kind == "triton" and p.hbm >= RULES.big_launch_bytes and p.programs < RULES.few_programs]


def _heavy_programs(priced) -> list:
    return [p for p in priced if p.kind == "triton" and p.program_bytes > RULES.program_bytes]


def _split_fences(priced) -> list:
    return [p for p in priced if p.kind == "triton" and p.event.constexprs.get("SPLIT_FIX")]


def _activation(t, trace) -> bool:
    """An activation-sized tensor: (batch, C, H, W) at one of the network's feature-map sizes, at least as
    large as the smallest convolution input (a weight of Cout = batch is not one); also (C, batch, H, W): a
    channel-major copy (``permute(1, 0, 2, 3).contiguous()``) is one too."""
    return (len(t.shape) == 4 and trace.batch in tuple(t.shape[:2]) and t.numel >= trace.input_numel
            and tuple(t.shape[2:]) in trace.map_sizes)


def _act_copies(priced, trace) -> list:
    return [p for p in priced if p.kind == "aten" and p.launches and base_name(p.event) in
            ("copy_", "clone", "_to_copy", "constant_pad_nd", "cat", "contiguous")
            and any(_activation(t, trace) for t in p.event.outputs)]


def targets(results: dict, traces: dict) -> tuple:
    """Issue 20's target rows for the int8 fused step."""
    rows = []
    f, b = results.get("int8-fused"), results.get("bf16")
    if f and b:
        g = b["totals"]["graph_us"] / f["totals"]["graph_us"]
        e = b["totals"]["eager_us"] / f["totals"]["eager_us"]
        rows.append(["int8 fused / bf16 step speed, graph-captured", "≥ 1.3 (VGG16), ≥ 1.15 (PreResNet-101)",
                     f"{g:.2f}"])
        rows.append(["int8 fused / bf16 step speed, eager with host time", "≥ 1.0", f"{e:.2f}"])
    if f:
        p, tr = f["priced"], traces["int8-fused"]
        fences = [x.fences for x in _split_fences(p)]
        rows += [["launches ≥ 256 KiB with < 33 programs", "0", len(_big_few(p))],
                 ["launches with a program processing > 64 KiB", "0", len(_heavy_programs(p))],
                 ["fences per program in split fix-ups (max, SASS per thread)", "≤ 1", max(fences, default=0)],
                 ["PyTorch copies of activation-sized tensors per step", "0", len(_act_copies(p, tr))],
                 ["host µs per launch (CPU, stubbed): the launch layer (custom ops, plain: dispatch, planning, "
                  "argument packing, launcher)", "≤ 10",
                  f"{f['plain'].per_launch_us:.1f}" if f.get("plain") else "-"],
                 ["host µs per launch: the whole step's host time per device launch (recorder)", "(≤ 10)",
                  f"{f['totals']['host_cpu_per_launch_us']:.1f}"]]
    return ["target (issue 20)", "wanted", "model (int8 fused)"], rows


def _fp32_act(priced, trace):
    """Events reading or writing float32 activation-sized tensors: (events, MB, device µs, by name)."""
    hits, mb, us, by = 0, 0.0, 0.0, defaultdict(float)
    for p in priced:
        e = p.event
        ts = list(e.tensors.values()) if p.kind == "triton" else e.inputs + e.outputs
        b = sum(t.nbytes for t in ts if t.dtype == "float32" and _activation(t, trace))
        if b and p.launches:
            hits, mb, us = hits + 1, mb + b / 1e6, us + p.device_us
            by[p.name] += b / 1e6
    top = ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:6])
    return hits, mb, us, top


def findings(mode: str, priced: list, trace, totals: dict) -> list:
    """One line per item of the review (issue 20): what this model sees of it in ``mode``'s step."""
    serial = [p for p in priced if p.serial_us > 0]
    by = defaultdict(lambda: [0, 0.0])
    for p in serial:
        by[p.name][0] += 1
        by[p.name][1] += p.serial_us
    worst = sorted(serial, key=lambda p: -p.serial_us)[:3]
    s1 = (f"**1. serial phases**: {len(serial)} launches per step end in a serial tail (a one-program loop, or a "
          f"last arriver's O(1) round trips), "
          f"{sum(p.serial_us for p in serial):,.0f} µs in all ("
          + "; ".join(f"{k} ×{n}: {us:,.0f} µs" for k, (n, us) in sorted(by.items(), key=lambda kv: -kv[1][1]))
          + "). "
          + "Longest: " + "; ".join(f"{p.name} {p.serial_us:.1f} µs ({p.serial_what})" for p in worst))
    fx = _split_fences(priced)
    s2 = (f"**2. fences**: {len(fx)} split-K launches per step run `split_fixup`, "
          f"{max((p.fences for p in fx), default=0)} fences (MEMBAR.ALL.GPU, SASS) per thread per program at "
          f"most, {sum(p.fence_us for p in fx):,.0f} µs of fence time "
          f"({sum(p.fence_us for p in priced):,.0f} µs over every launch)")
    hits, mb, us, top = _fp32_act(priced, trace)
    s3 = (f"**3. fp32 activation-sized tensors**: {hits} launches/kernels per step read or write float32 tensors of "
          f"at least one activation ({trace.input_numel:,} elements), {mb:,.0f} MB, in kernels totalling "
          f"{us:,.0f} µs; most: {top or 'none'}")
    copies = _act_copies(priced, trace)
    tma = [p for p in priced if p.name == "wgrad_tma_operands_kernel"]
    convs = [p for p in priced if p.kind == "triton" and p.ops and not p.unmatched and "linear" not in p.name]
    low = min(convs, key=lambda p: p.useful / p.ops, default=None)
    s4 = (f"**4. layout copies**: {len(copies)} PyTorch copies of activation-sized tensors per step "
          f"({sum(p.hbm for p in copies) / 1e6:,.0f} MB, {sum(p.device_us for p in copies):,.0f} µs: "
          + ", ".join(sorted({f'{base_name(p.event)} of {p.event.outputs[0].dtype} in {p.op or "autograd"}'
                              for p in copies})[:4])
          + f"); TMA weight-grad operand copies: {len(tma)} launches, {sum(p.hbm for p in tma) / 1e6:,.0f} MB, "
          f"{sum(p.device_us for p in tma):,.0f} µs"
          + (f"; lowest useful MMA: {100 * low.useful / low.ops:.0f} % ({low.name}, grid {low.grid})" if low else ""))
    s5 = (f"**5. host time**: {totals['host_cpu_us']:,.0f} µs per eager step measured on this CPU (launches "
          f"stubbed), {totals['host_cpu_per_launch_us']:.0f} µs per device launch; with the GPU launch API costs "
          f"{totals['host_gpu_us']:,.0f} µs against {totals['device_us']:,.0f} µs of kernels: the eager step is "
          f"{'host' if totals['host_gpu_us'] > totals['device_us'] else 'device'}-bound "
          f"({totals['eager_us']:,.0f} µs eager vs {totals['graph_us']:,.0f} µs graph-captured)")
    return [s1, s2, s3, s4, s5]


def kernel_rows(priced: list) -> list:
    """Launches grouped by kernel/op, grid and leading shapes, with per-launch and total figures."""
    groups: dict = {}
    for p in priced:
        if not p.launches:
            continue
        g = groups.setdefault(p.signature(), {"p": p, "n": 0, "us": 0.0, "host": 0.0})
        g["n"] += 1
        g["us"] += p.device_us
        g["host"] += p.host_cpu_us
    return sorted(groups.values(), key=lambda g: -g["us"])


def kernel_table(priced: list, limit: int | None = 30) -> tuple:
    rows = []
    for g in kernel_rows(priced)[:limit]:
        p = g["p"]
        grid = "×".join(map(str, p.grid)) if p.grid else "-"
        shape = "x".join(map(str, (list(p.event.tensors.values())[0].shape if p.kind == "triton" and p.event.tensors
                                   else (p.event.inputs[0].shape if p.kind == "aten" and p.event.inputs else ()))))
        ops = f"{p.ops / 1e9:.2f}" if p.ops else "-"
        useful = f"{100 * p.useful / p.ops:.0f}%{'?' if p.unmatched else ''}" if p.ops and p.kind == "triton" else "-"
        extra = []
        if p.serial_us:
            extra.append(f"serial {p.serial_us:.1f}")
        if p.fence_us:
            extra.append(f"fences {p.fences}/thread {p.fence_us:.1f}")
        if p.generic:
            extra.append("no rule")
        rows.append([p.name, g["n"], grid, p.programs or "-", shape, f"{p.hbm / 1e6:.2f}", f"{p.l2 / 1e6:.1f}", ops,
                     useful, p.bound, f"{p.device_us:.1f}", f"{g['us']:,.0f}", "; ".join(extra)])
    headers = ["kernel / op", "×", "grid", "programs", "first tensor", "DRAM MB", "L2 MB", "GOP issued", "useful MMA",
               "bound", "µs each", "µs total", "serial / fence µs"]
    return headers, rows


def name_table(priced: list) -> tuple:
    by = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for p in priced:
        if p.launches:
            a = by[p.name]
            a[0] += 1
            a[1] += p.device_us
            a[2] += p.serial_us + p.fence_us
            a[3] += p.host_cpu_us
    total = sum(a[1] for a in by.values()) or 1.0
    rows = [[k, n, _us(us), f"{100 * us / total:.1f}%", _us(ser), _us(host)]
            for k, (n, us, ser, host) in sorted(by.items(), key=lambda kv: -kv[1][1])]
    return ["kernel / op", "launches", "device µs", "share", "of which serial + fence µs", "host µs (CPU)"], rows


def rules_markdown() -> str:
    """The cards and the rules the figures rest on (``cards.Rules``), as the report prints them."""
    r = RULES
    lines = [markdown_table(*card_table()), "",
             "Rules (predictions; `benchmarks/costing/`): "
             f"memory-bound work at {r.stream_eff:.0%} of the copy rate; int8 MMA at {r.int8_mma_eff:.0%} of the dense "
             f"peak (Triton, conservative end), issued work = tiles × BM·BN·BK per K step, wave-quantised; bf16 "
             f"convolutions/matmuls at {r.bf16_conv_eff:.0%} of 989 TFLOP/s (cuDNN/cuBLAS), fp32 without TF32 at "
             f"{r.fp32_conv_eff:.0%} of 67; DRAM = every tensor once, a GEMM operand's re-reads from L2 while it is "
             f"≤ {r.l2_resident_bytes >> 20} MiB, else from DRAM again; every K step's tiles cross L2 → SM; "
             f"a launch "
             f"with fewer programs than SMs gets that share of the machine; a one-program loop costs per iteration "
             f"one dependent round trip ({r.hbm_latency_us} µs DRAM, {r.l2_latency_us} µs L2) or its bytes at "
             f"{r.sm_stream_bw / 1e9:.0f} GB/s; a fence (SASS MEMBAR per thread) {r.fence_us} µs per wave; "
             f"{r.graph_launch_us} µs per launch in a CUDA graph, {r.eager_launch_us} µs eager; host: measured here "
             f"+ {r.triton_launch_us} µs (+{r.triton_launch_per_arg_us} µs per argument past 19) per Triton launch "
             f"and {r.aten_cuda_launch_us} µs per PyTorch kernel for the GPU launch APIs."]
    return "\n".join(lines)
