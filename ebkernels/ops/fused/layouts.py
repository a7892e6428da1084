"""Which layout and channel padding a fused block's int8 codes take (a leaf of ``ops.fused``): the channel
multiple of a conv's input codes, whether its weight-grad reads them channel-major (then their producer writes
that layout too), and what the model's weight batch must quantize for a block (``ops.weight_batch``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..._backend import use_triton
from .._launch import CHANNEL_PAD, code_channels, reads_codes_channel_major
from ..weight_batch import WeightItem
from .spec import BlockInput, BlockSpec

__all__ = ["channel_major_input", "pad_of", "input_pad", "weight_item"]


def channel_major_input(conv: nn.Module) -> bool:
    """Whether a conv's weight-grad reads its input codes channel-major (a 1×1 kernel, stride 1, no padding:
    X̃ = X, both GEMM operands K-major): then their producer writes that layout too, no copy."""
    return reads_codes_channel_major(conv.kernel_size, conv.stride, conv.padding)


def pad_of(channels: int, x: torch.Tensor) -> int:
    return CHANNEL_PAD if use_triton(x) and channels % CHANNEL_PAD else 0


def input_pad(spec: BlockSpec, cin: int, x: torch.Tensor) -> int:
    """The channel multiple of the conv's int8 input codes as ``input_forward`` writes them: a float input
    (the first layer) as the per-layer path does (``_launch.code_channels``: fewer than 16 channels packed,
    not padded: the Cin = 3 first layer reads 3 bytes per pixel, as the tile plan counts), codes and the
    pre-activation BatchNorm's output padded to 16."""
    if spec.input is BlockInput.FLOAT:
        return CHANNEL_PAD if use_triton(x) and code_channels(cin) != cin else 0
    return pad_of(cin, x)


def weight_item(spec: BlockSpec, x: torch.Tensor) -> WeightItem:
    """What ``weight_forward`` will ask of the model's weight batch for this block (``fusion`` prepares the
    batch from these at the start of the model's forward; input ``x`` gives the device)."""
    w = spec.conv.weight
    qc = spec.conv.qconfig
    return WeightItem(w, qc.bits_w, qc.mode, input_pad(spec, w.shape[1], x),
                      CHANNEL_PAD if use_triton(x) else 0)
