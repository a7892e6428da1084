"""What each PyTorch (aten) op of a step costs a GPU: kernels launched, bytes moved, floating-point work.

- Metadata ops (views, allocations, ``set_``...) launch nothing: host time only.
- Convolutions and matmuls: 2·M·N·K per GEMM (a convolution's backward: one GEMM per requested gradient,
  a third kernel for a bias gradient), at the input dtype's dense peak times the stated cuDNN/cuBLAS
  efficiency (bf16: ``bf16_conv_eff`` of 989 TFLOP/s; fp32 without TF32: ``fp32_conv_eff`` of 67, as
  ``bench_epoch.py`` times it), or their bytes at the streaming rate, whichever is longer. No layout
  transform or workspace of cuDNN is charged (the baselines are not made slower than they might be).
- BatchNorm: two kernels each way; the forward reads x twice (statistics, normalise) and writes y, the
  backward reads dy and x twice (reduce, apply) and writes dx.
- ``_foreach_*`` (the optimizer): one kernel per 48 tensors, every tensor read / written once.
- Everything else: one kernel, every input read once and every output written once.
Memory-bound work runs at ``stream_eff`` × the card's copy bandwidth; no op is shorter than ``min_kernel_us``.
"""
from __future__ import annotations

import math

from .trace import AtenOp

__all__ = ["aten_work", "HOST_ONLY", "COPY_OPS", "is_copy"]

HOST_ONLY = {"view", "_unsafe_view", "as_strided", "as_strided_", "t", "transpose", "permute", "expand", "detach",
             "alias", "unsqueeze", "squeeze", "slice", "select", "_reshape_alias", "reshape", "split",
             "split_with_sizes",
             "unbind", "view_as", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
             "new_empty_strided", "set_", "resize_", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type", "record_stream", "unfold",
             "diagonal", "narrow", "movedim", "_to_copy_noop"}
# ops that only copy or re-lay out data (item 4 of issue 20 counts them on activation-sized tensors)
COPY_OPS = {"copy_", "clone", "_to_copy", "contiguous", "constant_pad_nd", "cat", "index_select", "stack",
            "permute_copy", "transpose_copy", "new_zeros", "pad"}
CONV = {"convolution", "_convolution", "cudnn_convolution", "convolution_backward", "mkldnn_convolution"}
MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv"}
BN_FWD = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
          "_batch_norm_with_update", "_batch_norm_with_update_functional", "cudnn_batch_norm",
          "miopen_batch_norm", "batch_norm"}
BN_BWD = {"native_batch_norm_backward", "batch_norm_backward", "cudnn_batch_norm_backward"}


def base_name(op: AtenOp) -> str:
    return op.name.split(".")[1]


def is_copy(op: AtenOp) -> bool:
    return base_name(op) in COPY_OPS


def _bytes(ts) -> float:
    return float(sum(t.nbytes for t in ts))


def _conv_flops(op: AtenOp) -> tuple[float, int]:
    """(flops, kernels) of a convolution or its backward: 2 · (N·OH·OW·Cout) · (Cin/groups·KH·KW) per GEMM."""
    if base_name(op) == "convolution_backward":
        gy, w = op.inputs[0], op.inputs[2]
        mask = op.params.get("output_mask") or [True, True, False]
        gemms = int(bool(mask[0])) + int(bool(mask[1]))
        return 2.0 * gy.numel * (w.numel / max(w.shape[0], 1)) * gemms, gemms + int(bool(mask[2]))
    y, w = op.outputs[0], op.inputs[1]
    return 2.0 * y.numel * (w.numel / max(w.shape[0], 1)), 1


def _matmul_flops(op: AtenOp) -> float:
    out = op.outputs[0]
    # the reduction length: the inner dimension of the second matrix operand
    mats = [t for t in op.inputs if len(t.shape) >= 2]
    k = mats[-1].shape[-2] if mats else 1
    return 2.0 * out.numel * k


def aten_work(op: AtenOp, card, rules) -> dict:
    """{launches, bytes, flops, peak (ops/s at the stated efficiency), us, bound} of one aten op."""
    name = base_name(op)
    same = op.inputs and op.outputs and op.outputs[0].storage == op.inputs[0].storage
    if name in HOST_ONLY or (name == "contiguous" and same):  # (already contiguous: returns itself)
        return {"launches": 0, "bytes": 0.0, "flops": 0.0, "us": 0.0, "bound": "host"}
    bw = card.copy_bw * rules.stream_eff
    ins, outs = _bytes(op.inputs), _bytes(op.outputs)
    flops, launches = 0.0, 1
    moved = ins + outs
    dtype = op.inputs[0].dtype if op.inputs else (op.outputs[0].dtype if op.outputs else "float32")
    if name in CONV:
        flops, launches = _conv_flops(op)
        if name == "convolution_backward":  # dy read by each GEMM, x by the weight-grad, w by the input-grad
            moved = ins + outs + _bytes(op.inputs[:1]) * max(0, launches - 1)
    elif name in MATMUL:
        flops = _matmul_flops(op)
    elif name in BN_FWD:
        launches = 2
        moved = 2 * _bytes(op.inputs[:1]) + ins + outs
    elif name in BN_BWD:
        launches = 2
        moved = 2 * _bytes(op.inputs[:2]) + ins + outs
    elif name.startswith("_foreach_"):
        per_arg: dict = {}
        for t in op.inputs + op.outputs:
            per_arg[t.name] = per_arg.get(t.name, 0) + 1
        launches = max(1, math.ceil(max(per_arg.values(), default=1) / 48))
    peak = 0.0
    if flops:
        if dtype in ("bfloat16", "float16"):
            peak = card.bf16_peak * rules.bf16_conv_eff
        else:
            peak = card.fp32_peak * rules.fp32_conv_eff
    t_bytes = moved / bw * 1e6
    t_flops = flops / peak * 1e6 if peak else 0.0
    us = max(t_bytes, t_flops, launches * rules.min_kernel_us)
    bound = "math" if t_flops >= t_bytes and t_flops > launches * rules.min_kernel_us else (
        "HBM" if t_bytes >= launches * rules.min_kernel_us else "latency")
    return {"launches": launches, "bytes": moved, "flops": flops, "us": us, "bound": bound}
