"""Benchmark shapes, as data.

The conv lists are every *distinct* convolution of the two search-phase networks on 32×32 CIFAR input,
derived by running the architectures (network-slimming / early-bird CIFAR VGG16 and pre-activation
ResNet-101 with bottleneck blocks, widths 16/32/64, expansion 4) with a forward hook on every
``nn.Conv2d`` and recording (C_in, C_out, H, W, kernel, stride, padding) of its input; ``count`` is
how many layers of the network share the shape. ``conv_shapes_of_model`` redoes that derivation on any
model (the test suite checks these tables against ``ebkernels.models.build_model`` when it exists).
All convolutions are bias-free, dilation 1, groups 1.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ConvShape:
    net: str
    cin: int
    cout: int
    h: int  # input height/width
    w: int
    k: int  # square kernel
    stride: int
    pad: int
    count: int = 1  # layers of `net` with this shape

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.pad - self.k) // self.stride + 1

    def gemm_ops(self, batch: int) -> int:
        """Multiply-adds × 2 of one of the three GEMMs (forward, dgrad or wgrad) at this batch."""
        return 2 * batch * self.oh * self.ow * self.cout * self.cin * self.k * self.k

    def label(self) -> str:
        return (f"{self.cin}→{self.cout} {self.k}×{self.k}/s{self.stride} @{self.h}×{self.w}")


def _rows(net, rows):
    return tuple(ConvShape(net, *r) for r in rows)


#                    cin, cout,  H,  W, k, s, p, count
VGG16_CIFAR = _rows("vgg16", [
    (3, 64, 32, 32, 3, 1, 1, 1),
    (64, 64, 32, 32, 3, 1, 1, 1),
    (64, 128, 16, 16, 3, 1, 1, 1),
    (128, 128, 16, 16, 3, 1, 1, 1),
    (128, 256, 8, 8, 3, 1, 1, 1),
    (256, 256, 8, 8, 3, 1, 1, 2),
    (256, 512, 4, 4, 3, 1, 1, 1),
    (512, 512, 4, 4, 3, 1, 1, 2),
    (512, 512, 2, 2, 3, 1, 1, 3),
])

PRERESNET101_CIFAR = _rows("preresnet101", [
    (3, 16, 32, 32, 3, 1, 1, 1),
    (16, 16, 32, 32, 1, 1, 0, 1),
    (16, 16, 32, 32, 3, 1, 1, 11),
    (16, 64, 32, 32, 1, 1, 0, 12),  # 11 block outputs + the first block's shortcut
    (64, 16, 32, 32, 1, 1, 0, 10),
    (64, 32, 32, 32, 1, 1, 0, 1),
    (32, 32, 32, 32, 3, 2, 1, 1),
    (32, 128, 16, 16, 1, 1, 0, 11),
    (64, 128, 32, 32, 1, 2, 0, 1),
    (128, 32, 16, 16, 1, 1, 0, 10),
    (32, 32, 16, 16, 3, 1, 1, 10),
    (128, 64, 16, 16, 1, 1, 0, 1),
    (64, 64, 16, 16, 3, 2, 1, 1),
    (64, 256, 8, 8, 1, 1, 0, 11),
    (128, 256, 16, 16, 1, 2, 0, 1),
    (256, 64, 8, 8, 1, 1, 0, 10),
    (64, 64, 8, 8, 3, 1, 1, 10),
])

CONV_SHAPES = {"vgg16": VGG16_CIFAR, "preresnet101": PRERESNET101_CIFAR}
BATCHES = (64, 256)

# CPU smoke mode: a few tiny shapes of the same kinds (3×3 stride 1 and 2, 1×1 stride 1 and 2).
SMOKE_CONV_SHAPES = _rows("smoke", [
    (3, 8, 8, 8, 3, 1, 1, 1),
    (8, 16, 8, 8, 3, 2, 1, 1),
    (16, 8, 4, 4, 1, 1, 0, 1),
    (8, 16, 8, 8, 1, 2, 0, 1),
])
SMOKE_BATCHES = (2,)


@dataclasses.dataclass(frozen=True)
class LinearShape:
    name: str
    m: int  # rows of x (tokens or batch)
    k: int  # in_features
    n: int  # out_features

    def gemm_ops(self) -> int:
        return 2 * self.m * self.k * self.n


# QLinear: the CIFAR classifiers (small, launch-bound) and square GEMMs where tensor cores saturate.
LINEAR_SHAPES = (
    LinearShape("vgg16 classifier, batch 256", 256, 512, 10),
    LinearShape("MLP 256×512→512", 256, 512, 512),
    LinearShape("4096×4096×4096", 4096, 4096, 4096),
    LinearShape("8192×8192×8192", 8192, 8192, 8192),
)
SMOKE_LINEAR_SHAPES = (
    LinearShape("smoke 8×16→4", 8, 16, 4),
    LinearShape("smoke 32×64→32", 32, 64, 32),
)

# Search-epoch benchmark: CIFAR-10 training set, SPEC §4 batch size.
EPOCH_IMAGES = 50_000
EPOCH_BATCH = 256


def conv_shapes_of_model(model, input_shape=(1, 3, 32, 32), net: str = "model") -> tuple[ConvShape, ...]:
    """Distinct conv shapes of ``model`` (first-seen order, with counts), by one forward pass with hooks.

    Only square kernels/strides/padding and dilation 1 are representable; anything else raises
    ValueError.
    """
    import torch
    import torch.nn as nn

    counts: dict[tuple, int] = {}

    def hook(mod, args, _out):
        x = args[0]
        if (len(set(mod.kernel_size)) != 1 or len(set(mod.stride)) != 1 or isinstance(mod.padding, str)
                or len(set(mod.padding)) != 1 or mod.dilation != (1, 1) or mod.groups != 1):
            raise ValueError(f"conv {mod} is not a square, dilation-1, groups-1 convolution")
        key = (mod.in_channels, mod.out_channels, x.shape[-2], x.shape[-1], mod.kernel_size[0],
               mod.stride[0], mod.padding[0])
        counts[key] = counts.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(input_shape, device=p.device, dtype=p.dtype))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return tuple(ConvShape(net, *key, count=c) for key, c in counts.items())
