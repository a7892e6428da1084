"""A ReLU that keeps a 1-byte mask for its backward instead of its output (``relu_keep_mask``).

``torch.relu`` keeps its output (2 bytes per element in bfloat16) for ``threshold_backward``. Where nothing
else keeps that output, the int8 flow needs only which elements passed: the ReLU after a post-activation
ResNet's residual add, whose output the next block's chains quantize (they keep codes) and the next add
reads (it keeps nothing), or a ReLU before a per-layer int8 conv. Same values and gradients as
``torch.relu`` (``threshold_backward``'s rule: the gradient passes where the output is not 0, NaN included).
"""
from __future__ import annotations

import torch

__all__ = ["ReluKeepMask", "relu_keep_mask"]


class ReluKeepMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(out.ne(0))  # >= 0 or NaN: not 0 exactly where threshold_backward passes
        return out

    @staticmethod
    def backward(ctx, g):
        mask, = ctx.saved_tensors
        return torch.where(mask, g, 0.0)


def relu_keep_mask(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu(x)``, keeping a bool mask (1 byte per element) for backward instead of the output."""
    return ReluKeepMask.apply(x)
