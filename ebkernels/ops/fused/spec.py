"""What a fused block is (``BlockSpec``: its layers, what feeds it, what it hands on; ``BnActSpec``: a
BatchNorm + activation with no conv after it) and what blocks hand each other (``Int8Activation``); read by
``block`` (the autograd Function), ``bn_act``, ``stages`` and ``fusion``."""
from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ...config import QConfig

__all__ = ["BlockInput", "BlockOutput", "BlockSpec", "BlockLinks", "BnActSpec", "BnSource", "GradLink",
           "Int8Activation"]


class BlockInput(enum.Enum):
    """What feeds a block's conv (see ``block``)."""

    CODES = "codes"
    FLOAT = "float"
    BN = "bn"


class BlockOutput(enum.Enum):
    """What a block hands on: int8 codes for the next block, or a float tensor."""

    CODES = "codes"
    FLOAT = "float"


class Int8Activation(NamedTuple):
    """What one fused block hands the next: ``codes`` (N, Cp, H, W) int8 NHWC with ``channels`` real
    channels, their ``scale`` (0-dim float32), and ``carrier``: an (N, channels, H, W) bfloat16 tensor
    with a single element of storage (stride 0) whose only job is to carry the gradient w.r.t. these
    codes from the next block's backward to this block's (autograd needs a differentiable tensor of the
    right shape; int8 tensors cannot require grad)."""

    carrier: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    channels: int
    codes_cm: Optional[torch.Tensor] = None  # the same codes channel-major, where the next conv's weight-grad reads them so


class GradLink:
    """One forward's hand-over of a gradient between two fused blocks that read the same tensor x: the block
    whose epilogue adds x as its residual (``y + x``, the pre-activation shortcut) ``put``s x's gradient from
    that add instead of returning it, and the block whose pre-activation BatchNorm reads x, whose backward
    always runs later (it feeds the first), ``take``s it and adds it in its input-grad kernel: autograd's
    separate sum of the two gradients of x is gone. Made by the fusion runner per call (never under
    ``torch.compile``, which gets the plain returns)."""

    __slots__ = ("grad", "stochastic")

    def __init__(self, stochastic: bool = False):
        self.grad = None
        self.stochastic = stochastic  # (an E-absmax link) the taker rounds stochastically: take a ticket

    def put(self, grad) -> None:
        self.grad = grad

    def take(self):
        grad, self.grad = self.grad, None
        return grad


class BlockLinks(NamedTuple):
    """The ``GradLink``s of one fused block in one forward: ``grad_from``, whose gradient its ``BN`` input's
    gradient gets added; ``grad_to``, where its residual's gradient goes; ``amax_to``, where its input's
    gradient goes with ``[bits of max |·|, ticket]`` (the block that produced the input quantizes that gradient
    as its E, without a pass of its own); ``amax_from``, where it takes its output gradient's; in forward,
    ``stats_to``, where its output goes with the next block's BatchNorm parameters and max |z| (``next_bn``), and
    ``stats_from``, where its ``BN`` input's come from."""

    grad_from: Optional[GradLink] = None
    grad_to: Optional[GradLink] = None
    amax_to: Optional[GradLink] = None
    amax_from: Optional[GradLink] = None
    stats_to: Optional[GradLink] = None
    stats_from: Optional[GradLink] = None


@dataclasses.dataclass
class BnSource:
    """Where a pre-activation BatchNorm's input comes from, so that backward can rebuild it instead of keeping
    it (``stages.keep_bn_input``): ``"cat"``, a concatenation along channels (the caller hands the pieces:
    DenseNet's layers keep each piece once, not every concatenation); ``"residual"``, ``conv(codes) + xprev``
    where ``conv`` (a ``BlockSpec`` of a conv on codes, float output, the add fused: ``residual``) ran just before (the caller
    hands the codes' ``Int8Activation`` and ``xprev``, which the previous block keeps: a pre-activation
    ResNet's stream is then kept for every other block only, the others replay one int8 GEMM)."""

    kind: str
    conv: Optional["BlockSpec"] = None


@dataclasses.dataclass
class BlockSpec:
    """A fused block. ``conv`` is a QConv2d (``supports(conv)`` is None); ``bn``/``act``/``pool`` follow it
    (``act``: one of ``bn_math.ACTIVATIONS``, applied only with a ``bn``; ``pool``: (kernel, stride, padding,
    ceil_mode) pairs); ``input``: what feeds the conv (``BN``: then ``bn_in``/``act_in`` and the gather
    ``select`` (a module with int64 ``indices``; None = all) precede it); ``output``: ``CODES`` (quantized with
    ``out_qconfig``'s bits_a/mode) or ``FLOAT`` (in ``out_dtype``; None: the float input's dtype, after codes
    the weight's). A ``BN`` input's ``bn_source`` says how backward may rebuild it, ``keep_input`` that the block
    may keep the input tensor itself (when bfloat16 channels-last: no one changes it in place) rather than a
    copy. ``residual``: the ``FLOAT`` output is ``act(bn(y) + residual)`` (the block gets the residual tensor; ``act``
    identity, ReLU or ReLU6), the end of a post-activation residual block, or without ``bn`` ``y + residual``
    added in the GEMM's epilogue (a pre-activation residual block's last conv). ``out_channel_major``: the
    codes also channel-major (the next conv is 1×1, stride 1, unpadded: its weight-grad reads them so).
    ``next_bn`` / ``next_act`` / ``next_select`` (such a last conv): the next block's pre-activation BatchNorm,
    whose statistics of this block's bfloat16 output the same launch forms (``conv_bn``; while its gather keeps
    every channel), handed on by ``BlockLinks.stats_to``."""

    conv: nn.Module
    input: BlockInput = BlockInput.CODES
    bn: Optional[nn.Module] = None
    act: str = "identity"
    pool: Optional[tuple] = None
    output: BlockOutput = BlockOutput.FLOAT
    out_qconfig: Optional[QConfig] = None
    bn_in: Optional[nn.Module] = None
    act_in: str = "relu"
    select: Optional[nn.Module] = None
    out_channel_major: bool = False
    out_dtype: Optional[torch.dtype] = None
    bn_source: Optional[BnSource] = None
    keep_input: bool = False
    residual: bool = False
    next_bn: Optional[nn.Module] = None
    next_act: str = "relu"
    next_select: Optional[nn.Module] = None

    def conv_geometry(self):
        c = self.conv
        return list(c.stride), list(c.padding), list(c.dilation)


@dataclasses.dataclass
class BnActSpec:
    """A BatchNorm (+ gather ``select``) + activation on a float tensor, no convolution after it (what
    ``bn_act`` runs): its float output in ``out_dtype`` (None: the input's dtype); ``bn_source``, ``keep_input``
    as ``BlockSpec``'s."""

    bn: nn.Module
    act: str = "relu"
    select: Optional[nn.Module] = None
    out_dtype: Optional[torch.dtype] = None
    bn_source: Optional[BnSource] = None
    keep_input: bool = False
