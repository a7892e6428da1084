"""The concatenation of a dense block (DenseNet) as the fused chains read it: the same ``torch.cat`` forward, and
a backward that hands the gradient of the older pieces on instead of returning it.

In a dense block, layer j's BatchNorm chain reads ``cat(p0, ..., p_{j-1})`` and every piece is read again by
every later layer: autograd would sum each piece's gradients from all its readers, one ``aten.add`` per piece
and reader (535 per DenseNet-121 step). Here the gradient of concatenation j (which already holds the later
readers' part, see below) is ``put`` into a ``GradLink``; the chain that reads concatenation j-1, whose backward
always runs later (the newest piece of j is computed from its output), ``take``s it and adds its channel prefix
in its input-grad kernel (``bn_relu_bwd``'s addend): its own gradient is then the sum of all later readers'.
So concatenation j returns a gradient only for the pieces j-1 does not have (``passed`` counts those it has):
channel slices of its gradient, views, no copy.

Under ``torch.compile`` (no link) it is ``torch.cat``. The pure-PyTorch reference is ``torch.cat`` and
autograd's sums, which the fused models' tests compare against.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import GradLink

__all__ = ["DenseCatFunction", "dense_cat"]


class DenseCatFunction(torch.autograd.Function):
    """``torch.cat(pieces, 1)``; backward: the whole gradient to ``grad_to``, slices of it for the pieces after
    the first ``passed``, None for those."""

    @staticmethod
    def forward(ctx, grad_to: GradLink, passed: int, *pieces):
        ctx.set_materialize_grads(False)
        ctx.grad_to, ctx.passed = grad_to, passed
        bounds, c0 = [], 0
        for p in pieces:
            bounds.append((c0, c0 + p.shape[1]))
            c0 += p.shape[1]
        ctx.bounds = bounds
        return torch.cat(pieces, 1)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None, None) + (None,) * len(ctx.bounds)
        ctx.grad_to.put(grad)
        return (None, None) + tuple(None if i < ctx.passed else grad[:, c0:c1]
                                    for i, (c0, c1) in enumerate(ctx.bounds))


def dense_cat(pieces: tuple, grad_to: Optional[GradLink] = None, passed: int = 0) -> torch.Tensor:
    """The concatenation along channels of ``pieces``; with a ``grad_to`` link, the gradients of the first
    ``passed`` pieces go to it (module docstring)."""
    if grad_to is None:
        return torch.cat(pieces, 1)
    return DenseCatFunction.apply(grad_to, passed, *pieces)
