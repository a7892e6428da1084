"""The PyTorch references of ``bn_relu_bwd`` (same float32 operations, same outputs as the ops; stochastic
rounding draws the kernels' Philox numbers through ``_rng``): what the tests hold the kernels to, and the path
where Triton does not run."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _rng
from .._scale import scale_reference
from .bn_math import bn_grad_in_reference

__all__ = ["bn_relu_bwd_reduce_reference", "bn_relu_bwd_reference"]


def _gathered(dz: torch.Tensor, inv: Optional[torch.Tensor], C: int) -> torch.Tensor:
    """dz brought to y's C channels through the channel map (0 where not gathered)."""
    if inv is None:
        return dz
    idx = inv.long().clamp(min=0)
    out = dz.index_select(1, idx)
    return torch.where((inv >= 0).view(1, -1, 1, 1), out, torch.zeros_like(out))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def bn_relu_bwd_reduce_reference(dz, y, bnp, inv, act):
    _, g, xhat = bn_grad_in_reference(_gathered(dz, inv, y.shape[1]), y, bnp, None, 1, act)
    return torch.stack([_rows(g).double().sum(0), _rows(g * xhat).double().sum(0)]).float()


def _absmax_reference(v, stochastic, device):
    """[bits of max |v|, ticket (stochastic) or 0] (int32 [2]), as modes 0 and 3 write them."""
    a = v.abs().amax().reshape(1) if v.numel() else v.new_zeros(1)
    out = torch.zeros(2, dtype=torch.int32, device=device)
    out[0] = a.view(torch.int32)[0]
    if stochastic:
        out[1] = _rng.take_ticket_reference(device).to(torch.int32)
    return out


def bn_relu_bwd_reference(dz, y, bnp, sums, inv, act, mode, bits, stochastic, pad_to, amax, out_dtype,
                          channels_last_out, scale_mode="shift", addend=None):
    """``bn_relu_bwd`` in PyTorch (same outputs as the op)."""
    N, C, H, W = y.shape
    dy, _, _ = bn_grad_in_reference(_gathered(dz, inv, C), y, bnp, sums, N * H * W, act)
    if mode in ("float", "float_absmax"):
        if addend is not None:
            dy = dy + addend.float()
        fmt = torch.channels_last if channels_last_out else torch.contiguous_format
        out = dy.to(out_dtype).contiguous(memory_format=fmt)
        if mode == "float":
            return (out,)
        return out, _absmax_reference(out.float(), stochastic, y.device)
    if mode == "absmax":
        return (_absmax_reference(dy, stochastic, y.device),)
    scale = scale_reference(amax[0:1].view(torch.float32).reshape(()), scale_mode, bits)
    S = float(2 ** (bits - 1))
    q = ((dy / scale) * S).clamp(-(S - 1), S - 1)
    if stochastic:
        offs = torch.arange(N * H * W, device=y.device).view(N, H, W, 1) * C + torch.arange(C, device=y.device)
        u = _rng.philox_uniform_reference(_rng.device_state(y.device)[0], amax[1].long(), offs)
        q = torch.floor(q + u.permute(0, 3, 1, 2))
    else:
        q = torch.round(q)
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8)
    Cp = C if pad_to <= 1 else -(-C // pad_to) * pad_to
    nhwc = torch.zeros((N, H, W, Cp), dtype=torch.int8, device=y.device)
    nhwc[..., :C] = q.permute(0, 2, 3, 1)
    cm = nhwc.permute(3, 0, 1, 2).clone(memory_format=torch.contiguous_format)  # never a view of nhwc
    return nhwc.permute(0, 3, 1, 2), cm.permute(1, 0, 2, 3), scale
