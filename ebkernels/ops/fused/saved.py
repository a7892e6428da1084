"""The records a fused block's stages (``stages``) hand on: ``Saved`` (what backward needs, through
``save_for_backward``), ``Meta`` (the block input's shape and layouts) and ``Error`` (E's codes and the gradients
formed on the way to them)."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from .spec import BlockInput, BlockSpec

__all__ = ["Saved", "Meta", "Error"]


@dataclasses.dataclass
class Saved:
    """What backward needs. Tensors (``TENSORS``, in this order through ``save_for_backward``): the conv's
    input codes ``qx`` (the previous block's output: no new storage; for a ``BN`` input nothing, recomputed
    from ``xb``), scales, weight, bias; the pre-activation BatchNorm's bfloat16 input ``xb``, ``bnp_in``,
    ``zmax_in`` and gather maps; a small weight's codes; the BatchNorm's ``bnp``; y where kept; the max-pool's
    window positions; the mask of an activation after a residual add (``bn_add_act``); then ``source``, what rebuilds ``xb`` when it is not kept (``keep_bn_input``). Flags: which
    BatchNorms used batch statistics, the pre-pool size, how ``xb`` comes back (``source_kind``)."""

    qx: Optional[torch.Tensor] = None
    sx: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    sw: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    xb: Optional[torch.Tensor] = None
    bnp_in: Optional[torch.Tensor] = None
    zmax_in: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    inv: Optional[torch.Tensor] = None
    qw_f: Optional[torch.Tensor] = None
    qw_d: Optional[torch.Tensor] = None
    bnp: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    pos: Optional[torch.Tensor] = None
    qx_cm: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    source: tuple = ()
    batch_in: bool = False
    batch_stats: bool = False
    pre_pool_hw: tuple = ()
    source_kind: str = ""
    codes_again: Optional[tuple] = None  # (weight_step.BackwardCodes, index) of a large weight
    source_again: Optional[tuple] = None  # the same for the weight of a replayed residual source
    zero_bias: Optional[tuple] = None  # the conv bias's zero gradient (weight_step.reserve_zero_grad)

    TENSORS = ("qx", "sx", "weight", "sw", "bias", "xb", "bnp_in", "zmax_in", "index", "inv", "qw_f", "qw_d",
               "bnp", "y", "pos", "qx_cm", "mask")
    FLAGS = ("batch_in", "batch_stats", "pre_pool_hw", "source_kind", "codes_again", "source_again", "zero_bias")

    def save(self, ctx, spec: BlockSpec) -> None:
        if spec.input is BlockInput.BN:
            self.qx = None  # recomputed in backward from the bfloat16 input
        # spelled out, not a loop of getattr: this runs for every block of every step (issue 20 item 5)
        ctx.save_for_backward(self.qx, self.sx, self.weight, self.sw, self.bias, self.xb, self.bnp_in, self.zmax_in,
                              self.index, self.inv, self.qw_f, self.qw_d, self.bnp, self.y, self.pos, self.qx_cm,
                              self.mask, *self.source)
        ctx.saved_flags = (self.batch_in, self.batch_stats, self.pre_pool_hw, self.source_kind, self.codes_again,
                           self.source_again, self.zero_bias)

    @classmethod
    def load(cls, ctx) -> "Saved":
        t = ctx.saved_tensors
        n = len(cls.TENSORS)  # the first fields, in this order; then ``source``, then the flags (FLAGS' order)
        return cls(*t[:n], tuple(t[n:]), *ctx.saved_flags)


class Meta(NamedTuple):
    """The block input's shape, dtype, real channels (after a gather) and layout, and the weight's layout
    (``weight_layout``: read in forward, as backward may not ask a tensor for its strides under torch.compile)."""

    x_shape: tuple
    x_dtype: torch.dtype
    cin: int
    channels_last: bool
    weight_channels_last: bool = False


class Error(NamedTuple):
    """What ``output_backward`` hands ``conv_backward``: E's codes (NHWC and channel-major) and scale, and
    the gradients it computed on the way (BatchNorm affine, conv bias, the residual of ``spec.residual``)."""

    qe: torch.Tensor
    qe_cm: torch.Tensor
    se: torch.Tensor
    g_bn_w: Optional[torch.Tensor]
    g_bn_b: Optional[torch.Tensor]
    g_bias: Optional[torch.Tensor]
    g_residual: Optional[torch.Tensor] = None
