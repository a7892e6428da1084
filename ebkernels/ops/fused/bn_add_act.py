"""BatchNorm-apply + residual add + activation in one pass, keeping a 1-byte mask (SPEC §9): the end of a
post-activation residual block, ``act(bn(y) + r)`` (torchvision's ResNet / RegNet blocks, MobileNet-V2's
``x + bn(conv(...))``), where the float output goes on as the residual stream.

The pass reads y (the conv's bfloat16 output, NHWC) and the residual r (any float dtype and layout) once and
writes ``z = act(y * a + b + r)`` in the output dtype (NHWC) and, for ReLU / ReLU6, the mask of the elements
whose gradient passes (``bn_math.act_grad``'s rule: ``threshold_backward`` / ``hardtanh_backward``), one byte
per element: the backward of the add and the activation is ``where(mask, dz, 0)``, for the residual and the
BatchNorm alike, so neither z nor r is kept. One kernel instead of BatchNorm-apply, add, activation and the
activation's mask. The float32 operations are those of the reference, in the same order, rounded once each.
"""
from __future__ import annotations


import torch

from ..._backend import use_triton
from ..._registry import aot_kernel
from ..._triton import tl, triton
from .._buffers import empty_output
from .._dispatch import absent, present
from .._dispatch import custom_op
from .._launch import ELEMENTWISE_WARPS, NO_FP_FUSION, elementwise_tiles, nhwc_rows
from .._tl import cast_rne, decode_rows, elementwise_tile
from .bn_math import act_apply, act_code, act_grad, act_grad_reference, act_reference, bn_act_reference

__all__ = ["bn_add_act", "bn_add_act_reference", "MASKED_ACTIVATIONS"]

MASKED_ACTIVATIONS = ("relu", "relu6")  # whose backward is a mask: what may follow the add
_SIG = {"y_ptr": "*bf16", "r_ptr": "*bf16", "bnp_ptr": "*fp32", "out_ptr": "*bf16", "mask_ptr": "*i8",
        "nbt_ptr": "*i64", "M": "i32", "C": "i32", "H": "i32", "W": "i32", "sy_n": "i64", "sy_c": "i64",
        "sy_h": "i64", "sy_w": "i64", "sr_n": "i64", "sr_c": "i64", "sr_h": "i64", "sr_w": "i64"}


@aot_kernel(signature=_SIG, constexprs=[{"ACT": a, "MASK": a != 0, "UPDATE_NBT": True, "BP": 32, "CB": 128}
                                        for a in (0, 1)], num_warps=ELEMENTWISE_WARPS, fp_fusion=False)
@triton.jit
def bn_add_act_kernel(y_ptr, r_ptr, bnp_ptr, out_ptr, mask_ptr, nbt_ptr, M, C, H, W, sy_n, sy_c, sy_h, sy_w, sr_n,
                      sr_c, sr_h, sr_w, ACT: tl.constexpr, MASK: tl.constexpr, UPDATE_NBT: tl.constexpr,
                      BP: tl.constexpr, CB: tl.constexpr):
    """Grid (row tiles, channel blocks): z and the mask at ``m * C + c`` (NHWC)."""
    pid_m, pid_n, m, c, m_ok, c_ok = elementwise_tile(M, C, BP, CB)
    n, h, w = decode_rows(m, H, W)
    n, h, w = n.to(tl.int64), h.to(tl.int64), w.to(tl.int64)
    ok = m_ok[:, None] & c_ok[None, :]
    cc = c.to(tl.int64)[None, :]
    y = tl.load(y_ptr + (n * sy_n + h * sy_h + w * sy_w)[:, None] + cc * sy_c, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + (n * sr_n + h * sr_h + w * sr_w)[:, None] + cc * sr_c, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(bnp_ptr + c, mask=c_ok, other=0.0)[None, :]
    b = tl.load(bnp_ptr + C + c, mask=c_ok, other=0.0)[None, :]
    t = (y * a + b) + r
    offs = m.to(tl.int64)[:, None] * C + cc
    tl.store(out_ptr + offs, cast_rne(act_apply(t, ACT), out_ptr.dtype.element_ty), mask=ok)
    if MASK:
        tl.store(mask_ptr + offs, (act_grad(t, 1.0, ACT) != 0.0).to(tl.int8), mask=ok)
    if UPDATE_NBT:
        if (pid_m == 0) & (pid_n == 0):
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


def bn_add_act_reference(y, bnp, residual, num_batches_tracked, act, out_dtype):
    """``bn_add_act`` in PyTorch: (z NHWC in out_dtype, mask NHWC bool or an empty tensor)."""
    t = bn_act_reference(y, bnp, "identity") + residual.float()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    z = act_reference(t, act).to(out_dtype).contiguous(memory_format=torch.channels_last)
    if act == "identity":
        return z, t.new_empty((0,), dtype=torch.bool)
    mask = act_grad_reference(t, torch.ones_like(t), act) != 0
    return z, mask.contiguous(memory_format=torch.channels_last)


def _bn_add_act_triton(y, bnp, residual, num_batches_tracked, act, out_dtype):
    N, C, H, W = y.shape
    out = empty_output((N, C, H, W), out_dtype, y.device, torch.channels_last)
    masked = act != "identity"
    mask = empty_output((N, C, H, W) if masked else (0,), torch.int8, y.device,
                        torch.channels_last if masked else torch.contiguous_format)
    BP, CB = elementwise_tiles(C)
    grid = (triton.cdiv(N * H * W, BP), triton.cdiv(C, CB))
    bn_add_act_kernel[grid](y, residual, bnp, out, mask if masked else out,
                            num_batches_tracked if num_batches_tracked is not None else bnp, N * H * W, C, H, W,
                            *nhwc_rows(y), *nhwc_rows(residual), ACT=act_code(act), MASK=masked,
                            UPDATE_NBT=num_batches_tracked is not None, BP=BP, CB=CB, num_warps=ELEMENTWISE_WARPS,
                            **NO_FP_FUSION)
    return out, mask.view(torch.bool)


@custom_op("ebkernels::bn_add_act", mutates_args=("num_batches_tracked",))
def _bn_add_act_op(y: torch.Tensor, bnp: torch.Tensor, residual: torch.Tensor, num_batches_tracked: torch.Tensor,
                   act: str, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # num_batches_tracked: ``absent`` for none (a mutable argument is never optional)
    num_batches_tracked = present(num_batches_tracked)
    if use_triton(y, bnp, residual) and y.numel() < 2**31:
        return _bn_add_act_triton(y, bnp, residual, num_batches_tracked, act, out_dtype)
    return bn_add_act_reference(y, bnp, residual, num_batches_tracked, act, out_dtype)


@_bn_add_act_op.register_fake
def _(y, bnp, residual, num_batches_tracked, act, out_dtype):
    z = torch.empty(y.shape, dtype=out_dtype, device=y.device, memory_format=torch.channels_last)
    if act == "identity":
        return z, y.new_empty((0,), dtype=torch.bool)
    return z, torch.empty(y.shape, dtype=torch.bool, device=y.device, memory_format=torch.channels_last)


def bn_add_act(y, bnp, residual, num_batches_tracked=None, act="relu", out_dtype=torch.bfloat16):
    """``z = act(y * a + b + residual)`` per channel (``bnp`` rows a, b; ``act``: identity or one of
    ``MASKED_ACTIVATIONS``), NHWC in ``out_dtype``, and the bool mask where the gradient passes (NHWC; an empty
    tensor for the identity). ``num_batches_tracked``: incremented by one (a training step of a BatchNorm that
    tracks)."""
    if act != "identity" and act not in MASKED_ACTIVATIONS:
        raise ValueError(f"act={act!r} is not supported after a residual add; accepted: identity, "
                         f"{', '.join(MASKED_ACTIVATIONS)}")
    if residual.shape != y.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from the BatchNorm's output "
                         f"{tuple(y.shape)}")
    return _bn_add_act_op(y, bnp, residual, absent(y) if num_batches_tracked is None else num_batches_tracked, act,
                          out_dtype)
