"""Drop-in int8 layers (SPEC §1, §6): ``QConv2d`` and ``QLinear``; the whole-model swap is ``convert``.

``QConv2d`` / ``QLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``: same constructor (plus the keyword
``qconfig``), same parameters, same ``state_dict`` keys, and ``isinstance(m, nn.Conv2d)`` holds, so
optimizers, checkpoints, BN folding and the early-bird pruner treat them like the float layers. Only
``forward`` differs: it calls the int8 ops (``qconv2d`` / ``qlinear``), which train with the WAGE-style
quantized forward, input-grad and weight-grad (Triton kernels on CUDA, the PyTorch reference path on
CPU tensors: same numbers, slower).

``from_float`` / ``to_float`` (which ``convert.quantize_model`` / ``dequantize_model`` call for every
layer) *reuse the layer's Parameter objects* (no copy): an optimizer built before the swap keeps
updating the same tensors and its state (momentum buffers, keyed by Parameter) stays valid.

The ``qconfig`` is a plain attribute, not a tensor: it is not part of the ``state_dict`` (a checkpoint
of a QConv2d model loads into the float model and vice versa). It is pickled with the module.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize  # noqa: F401 (is_parametrized)

from . import _rng
from .config import QConfig, as_qconfig
from .ops.gemm.conv import qconv2d
from .ops.gemm.linear import qlinear

__all__ = ["QConv2d", "QLinear", "first_and_last_layers"]

# The hook dictionaries a swap carries over, so e.g. a forward pre-hook registered on the float layer
# keeps running on the int8 one. (Removing such a hook later needs the hook's handle *and* the new
# module: a handle points at the dict it was registered in.)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def _check_plain(layer: nn.Module) -> None:
    if torch.nn.utils.parametrize.is_parametrized(layer):
        raise ValueError(f"layer {type(layer).__name__} has parametrizations (e.g. weight/spectral norm); "
                         "not supported: call torch.nn.utils.parametrize.remove_parametrizations first")


def _move_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` the very Parameter/buffer objects, hooks and train/eval flag of ``src``."""
    dst._parameters = src._parameters.copy()  # same Parameter objects, separate dict
    dst._buffers = src._buffers.copy()
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    for name in _HOOK_DICTS:
        hooks = getattr(src, name, None)
        if hooks is not None:
            setattr(dst, name, copy.copy(hooks))
    dst.train(src.training)
    return dst


def _own_rng_state(layer: nn.Module) -> nn.Module:
    """Create the device random state of ``layer``'s device now (module build or move, eagerly), so that
    a ``torch.compile`` trace of the forward only looks it up (``ebkernels._rng``)."""
    device = layer.weight.device
    if device.type != "meta":
        _rng.device_state(device)
    return layer


def _qconfig_repr(qconfig: QConfig) -> str:
    return repr(qconfig)


def _check_input_dtype(layer: nn.Module, input) -> None:
    """``nn.Conv2d`` / ``nn.Linear`` refuse an input whose dtype is not their weight's (outside autocast);
    the int8 layers quantize any float input and would return its dtype instead, so they refuse too."""
    if (isinstance(input, torch.Tensor) and input.dtype != layer.weight.dtype
            and not torch.is_autocast_enabled(input.device.type)):
        dtype = lambda d: str(d).replace("torch.", "")  # noqa: E731
        raise RuntimeError(f"{type(layer).__name__}: input dtype {dtype(input.dtype)} and weight dtype "
                           f"{dtype(layer.weight.dtype)} should be the same, as in nn.{'Conv2d' if isinstance(layer, nn.Conv2d) else 'Linear'}; "
                           f"accepted: an input of dtype {dtype(layer.weight.dtype)} (x.to(...)), or the call under "
                           f"torch.autocast")


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward and backward run in int8 (WAGE-style, per-tensor scales).

    Same arguments as ``nn.Conv2d`` plus ``qconfig`` (an ``ebkernels.QConfig``; default ``QConfig()``,
    8 bit for W, A, E, G). ``padding_mode`` other than ``"zeros"`` pads the input with ``F.pad`` first,
    exactly like ``nn.Conv2d``, then convolves without padding. ``padding="same"`` with an even
    effective kernel pads asymmetrically the way ``nn.Conv2d`` does.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *, qconfig=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.qconfig = as_qconfig(qconfig)
        _own_rng_state(self)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        _own_rng_state(self)
        return out

    def _conv_forward(self, input, weight, bias):
        stride, dilation, groups = self.stride, self.dilation, self.groups
        if self.padding_mode != "zeros":
            # same as nn.Conv2d: explicit non-zero padding, then a convolution with padding 0
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        elif isinstance(self.padding, str):
            padding = self._string_padding()
            if isinstance(padding, list):  # asymmetric "same": pad the extra element on the right
                input = F.pad(input, padding)
                padding = (0, 0)
        else:
            padding = self.padding
        return qconv2d(input, weight, bias, stride=stride, padding=padding, dilation=dilation,
                       groups=groups, qconfig=self.qconfig)

    def _string_padding(self):
        """Explicit padding for ``padding="valid"/"same"``: a (ph, pw) pair when symmetric, else the
        F.pad list (left, right, top, bottom)."""
        if self.padding == "valid":
            return (0, 0)
        pads = []
        for d, k in zip(self.dilation, self.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        if all(lo == hi for lo, hi in pads):
            return tuple(lo for lo, _ in pads)
        (top, bottom), (left, right) = pads
        return [left, right, top, bottom]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input_dtype(self, input)
        return self._conv_forward(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qconfig={_qconfig_repr(self.qconfig)}"

    @classmethod
    def from_float(cls, layer: nn.Conv2d, qconfig: QConfig | None = None) -> "QConv2d":
        """A QConv2d sharing ``layer``'s Parameter objects (no copy), hooks and train/eval mode."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer must be an nn.Conv2d, got {type(layer).__name__}")
        _check_plain(layer)
        qconfig = as_qconfig(qconfig)
        # build on the meta device (no allocation), then take over the layer's own tensors
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta",
                  qconfig=qconfig)
        return _own_rng_state(_move_state(layer, new))

    def to_float(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` sharing this layer's Parameter objects."""
        new = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                        padding=self.padding, dilation=self.dilation, groups=self.groups,
                        bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        return _move_state(self, new)


class QLinear(nn.Linear):
    """``nn.Linear`` whose forward and backward run in int8 (WAGE-style, per-tensor scales).

    Same arguments as ``nn.Linear`` plus ``qconfig`` (an ``ebkernels.QConfig``; default ``QConfig()``).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, qconfig=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.qconfig = as_qconfig(qconfig)
        _own_rng_state(self)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        _own_rng_state(self)
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input_dtype(self, input)
        return qlinear(input, self.weight, self.bias, qconfig=self.qconfig)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qconfig={_qconfig_repr(self.qconfig)}"

    @classmethod
    def from_float(cls, layer: nn.Linear, qconfig: QConfig | None = None) -> "QLinear":
        """A QLinear sharing ``layer``'s Parameter objects (no copy), hooks and train/eval mode."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        _check_plain(layer)
        qconfig = as_qconfig(qconfig)
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                  qconfig=qconfig)
        return _own_rng_state(_move_state(layer, new))

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` sharing this layer's Parameter objects."""
        new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return _move_state(self, new)


def first_and_last_layers(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the first and the last ``nn.Conv2d``/``nn.Linear`` in module order.

    Handy as ``quantize_model(model, skip=first_and_last_layers(model))``: the stem convolution (3 input
    channels) and the classifier are the layers most sensitive to 8-bit quantization.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return tuple(dict.fromkeys(names[:1] + names[-1:]))
