"""What a network costs: parameters and multiply-adds (SPEC §4 "report the achieved reduction")."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

__all__ = ["count_params", "count_flops"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (each shared parameter once; buffers not counted)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in _unwrap(model).parameters())


def _plain_conv_forward(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return nn.Conv2d._conv_forward(m, x, m.weight, m.bias)


def _plain_linear_forward(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, m.weight, m.bias)


def _input_shape(model: nn.Module, input_shape) -> tuple:
    if input_shape is None:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else 3
        return (1, channels, 32, 32)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) not in (3, 4) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"input_shape={input_shape!r} is not supported; accepted: (C, H, W) or "
                         "(N, C, H, W) with positive ints")
    return shape if len(shape) == 4 else (1, *shape)


def count_flops(model: nn.Module, input_shape=None) -> int:
    """Multiply-adds of every Conv2d and Linear for one sample of ``input_shape`` ((C,H,W) or (N,C,H,W)).

    Counted with forward hooks on a no-grad eval-mode forward (train/eval flags are restored).
    Quantized subclasses (``QConv2d``/``QLinear``) run the plain float op for this pass: same
    shapes, same count, no quantization kernels. Default input: the first conv's channels at 32×32.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    shape = _input_shape(model, input_shape)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    total = [0]

    def hook(m, inputs, output):
        per_output = m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) \
            else m.in_features
        total[0] += output.numel() * per_output

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    modes = {m: m.training for m in model.modules()}
    handles, patched = [], []
    try:
        for m in layers:
            handles.append(m.register_forward_hook(hook))
            if "forward" not in m.__dict__:
                plain = _plain_conv_forward if isinstance(m, nn.Conv2d) else _plain_linear_forward
                m.forward = functools.partial(plain, m)
                patched.append(m)
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
        for m, mode in modes.items():
            m.training = mode
    return total[0] // shape[0]

