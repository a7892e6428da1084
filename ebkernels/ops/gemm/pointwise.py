"""A 1×1 convolution of 1×1 maps is a Linear: ``y[n, co] = Σ_ci W[co, ci] · x[n, ci] + b``. Squeeze-and-excitation
blocks (EfficientNet, MobileNet-V3, RegNet-Y) run two of them per block on pooled features, and a head may run one.

``qconv2d`` sends such a layer down the Linear's path (``QLinearFunction``'s forward and backward helpers): the
same per-tensor codes and scales as the conv path, the same exact integer sums (forward and input-grad equal the
conv path's bit for bit; the weight-grad too with nearest G rounding), and the same G quantization. What changes is
the cost of a tiny GEMM: one ``quantize_small`` launch for A and one for E (no second, channel-major layout: the
Linear's GEMM reads any strides), no zero padding of channels, and the weight's codes from the step's weight batch
(``fusion.runner`` adds these layers to it, keyed by ``pointwise_weight``): about 6 launches per layer instead of 10.

The applicability test, ``is_pointwise_on_pixels``, depends on the input's shape only at call time: the same
module on larger maps takes the conv path.
"""
from __future__ import annotations

import torch

from ...config import QConfig
from .host import no_autocast, refuse_double_backward
from .linear import QLinearFunction

__all__ = ["is_pointwise_on_pixels", "pointwise_weight", "PointwiseConv2dFunction"]


def is_pointwise_on_pixels(x: torch.Tensor, weight: torch.Tensor, padding, groups: int) -> bool:
    """Whether ``conv2d(x, weight)`` is a Linear of x's channels: a 1×1 kernel, no padding, one group, 1×1 input
    maps (the stride and dilation then change nothing: the output is 1×1 as well)."""
    return (groups == 1 and tuple(weight.shape[2:]) == (1, 1) and tuple(x.shape[2:]) == (1, 1)
            and tuple(padding) == (0, 0))


def pointwise_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) Linear weight of a (out, in, 1, 1) conv weight: a view (either memory format), the tensor the
    step's weight batch is keyed on."""
    return weight.reshape(weight.shape[0], weight.shape[1])


class PointwiseConv2dFunction(torch.autograd.Function):
    """``QConv2dFunction`` for a layer ``is_pointwise_on_pixels`` accepts: x (N, Cin, 1, 1) and the weight as
    their (N, Cin) and (Cout, Cin) views through ``QLinearFunction``'s forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, qc: QConfig, out_dtype):
        n, cin, cout = x.shape[0], x.shape[1], weight.shape[0]
        with no_autocast(x):
            y = QLinearFunction._forward(ctx, x.reshape(n, cin), pointwise_weight(weight), bias, qc, out_dtype)
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        # detached: a fresh result for autograd, not a view of ``y`` (nothing else holds y), so an in-place
        # activation after the layer (SE's SiLU(inplace=True)) is allowed, as on a conv's result
        return y.view(n, cout, 1, 1).detach()

    @staticmethod
    def backward(ctx, gy):
        refuse_double_backward()
        with no_autocast(gy):
            gx, gw, gb, _, _ = QLinearFunction._backward(ctx, gy.reshape(gy.shape[0], gy.shape[1]))
        gx = None if gx is None else gx.view(ctx.x_shape)
        gw = None if gw is None else gw.view(ctx.w_shape)
        return gx, gw, gb, None, None
