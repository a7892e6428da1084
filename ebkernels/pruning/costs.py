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


def _input_shape(model: nn.Module, input_shape, who: str = "prune") -> tuple:
    """(N, C, H, W) from ``input_shape`` ((C, H, W) or (N, C, H, W)); when None, the shape a model from
    ``build_model`` is built for (``models.design_input_shape``). Any other model's image size cannot
    be read from it (convolutions and adaptive pools run on any size), so it is a ValueError asking
    for ``input_shape``, never a guess."""
    if input_shape is None:
        from ..models import design_input_shape

        shape = design_input_shape(model)
        if shape is not None:
            return (1, *shape)
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        example = f"{first_conv.in_channels}, 32, 32" if first_conv is not None else "3, 32, 32"
        raise ValueError(f"{who} needs input_shape=(C, H, W) for this {type(model).__name__}: it runs the network "
                         f"on one input of that shape, and the image size of a model not built by "
                         f"ebkernels.build_model cannot be read from it; e.g. input_shape=({example}) for "
                         f"{example.split(', ', 1)[1].replace(', ', 'x')} images with the channels its first "
                         f"conv reads")
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
    shapes, same count, no quantization kernels. Default input: the size a model from ``build_model``
    is built for (``ebkernels.models.design_input_shape``); any other model needs ``input_shape``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    shape = _input_shape(model, input_shape, "count_flops")
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

