"""Drop-in int8 layers and the whole-model swap (SPEC §1, §6).

``QConv2d`` / ``QLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``: same constructor (plus the keyword
``qconfig``), same parameters, same ``state_dict`` keys, and ``isinstance(m, nn.Conv2d)`` holds, so
optimizers, checkpoints, BN folding and the early-bird pruner treat them like the float layers. Only
``forward`` differs: it calls the int8 ops (``qconv2d`` / ``qlinear``), which train with the WAGE-style
quantized forward, input-grad and weight-grad (Triton kernels on CUDA, the PyTorch reference path on
CPU tensors: same numbers, slower).

``quantize_model`` swaps every eligible layer of a model in place and ``dequantize_model`` swaps back.
Both *reuse the layer's Parameter objects* (no copy): an optimizer built before the swap keeps
updating the same tensors and its state (momentum buffers, keyed by Parameter) stays valid.

The ``qconfig`` is a plain attribute, not a tensor: it is not part of the ``state_dict`` (a checkpoint
of a QConv2d model loads into the float model and vice versa). It is pickled with the module.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Callable, Iterable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize  # noqa: F401 (is_parametrized)

from .config import QConfig
from .ops.conv2d_int8 import qconv2d
from .ops.linear_int8 import qlinear

__all__ = ["QConv2d", "QLinear", "quantize_model", "dequantize_model", "first_and_last_layers"]

SkipSpec = Union[None, str, Callable[[str, nn.Module], bool], Iterable[Union[str, Callable]]]

# The hook dictionaries a swap carries over, so e.g. a forward pre-hook registered on the float layer
# keeps running on the int8 one. (Removing such a hook later needs the hook's handle *and* the new
# module: a handle points at the dict it was registered in.)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def _check_qconfig(qconfig) -> QConfig:
    if qconfig is None:
        return QConfig()
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"qconfig must be an ebkernels.QConfig or None (defaults), got "
                        f"{type(qconfig).__name__}: {qconfig!r}")
    return qconfig


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
    """``nn.Conv2d`` whose forward and backward run in int8 (WAGE-style, per-tensor power-of-two scales).

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
        self.qconfig = _check_qconfig(qconfig)

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
        qconfig = _check_qconfig(qconfig)
        # build on the meta device (no allocation), then take over the layer's own tensors
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta",
                  qconfig=qconfig)
        return _move_state(layer, new)

    def to_float(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` sharing this layer's Parameter objects."""
        new = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                        padding=self.padding, dilation=self.dilation, groups=self.groups,
                        bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        return _move_state(self, new)


class QLinear(nn.Linear):
    """``nn.Linear`` whose forward and backward run in int8 (WAGE-style, per-tensor power-of-two scales).

    Same arguments as ``nn.Linear`` plus ``qconfig`` (an ``ebkernels.QConfig``; default ``QConfig()``).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, qconfig=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.qconfig = _check_qconfig(qconfig)

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
        qconfig = _check_qconfig(qconfig)
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                  qconfig=qconfig)
        return _move_state(layer, new)

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` sharing this layer's Parameter objects."""
        new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return _move_state(self, new)


# --------------------------------------------------------------------------------------------------
# Whole-model swap
# --------------------------------------------------------------------------------------------------
# Exact types only: a subclass of nn.Conv2d/nn.Linear may override forward (or, like
# MultiheadAttention's out_proj, never have its forward called), so swapping it could change behaviour.
_FLOAT_TO_Q = {nn.Conv2d: QConv2d, nn.Linear: QLinear}
_Q_TYPES = (QConv2d, QLinear)


def _skip_matcher(skip: SkipSpec):
    """``skip`` as (name test, predicate test, the name patterns)."""
    if skip is None:
        items = []
    elif isinstance(skip, str) or callable(skip):
        items = [skip]
    else:
        try:
            items = list(skip)
        except TypeError:
            raise TypeError(f"skip must be a module name or glob pattern, a predicate (name, module) -> "
                            f"bool, or an iterable of those; got {type(skip).__name__}: {skip!r}") from None
    patterns, predicates = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif callable(item):
            predicates.append(item)
        else:
            raise TypeError(f"skip entry {item!r} ({type(item).__name__}) is not supported; accepted: a "
                            f"module name or glob pattern (str) or a predicate (name, module) -> bool")

    def name_matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def predicate_matches(name: str, module: nn.Module) -> bool:
        return any(bool(pred(name, module)) for pred in predicates)

    return name_matches, predicate_matches, patterns


def _swap(model: nn.Module, convert: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace modules top-down; ``convert(name, module)`` returns the replacement (``module`` itself
    to keep it and not look inside) or None to keep it and visit its children.

    A module reachable under several names (weight sharing) is converted once and the same new module
    is put at every place, so the sharing survives.
    """
    done: dict[int, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = convert(prefix, module)
        if new is None:
            new = module
            for child_name, child in list(module._modules.items()):
                if child is None:
                    continue
                qualified = f"{prefix}.{child_name}" if prefix else child_name
                replacement = visit(qualified, child)
                if replacement is not child:
                    module._modules[child_name] = replacement
        done[id(module)] = new
        return new

    return visit("", model)


def quantize_model(model: nn.Module, qconfig: QConfig | None = None, skip: SkipSpec = (),
                   inplace: bool = True, fuse: bool = True) -> nn.Module:
    """Swap every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` for ``QConv2d`` / ``QLinear``.

    ``qconfig``: an ``ebkernels.QConfig`` for all swapped layers (default ``QConfig()``).
    ``skip``: layers to keep in float, given as qualified module names (as in ``named_modules()``),
    glob patterns (``"features.0"``, ``"classifier*"``, ``"*.downsample.*"``), a predicate
    ``(name, module) -> bool`` (called on eligible layers only), or an iterable mixing those. A name
    or pattern that matches a container skips everything inside it. ``first_and_last_layers(model)``
    names the first and last eligible layer (the usual ones to keep in float). A name pattern that
    matches no module gives a warning (likely a typo).
    ``inplace=True`` (default) swaps inside ``model`` and the new layers reuse the *same Parameter
    objects*, so an existing optimizer and its state keep working. ``inplace=False`` deep-copies the
    model first (new Parameters; the original is untouched).

    Eligible: modules whose type is exactly ``nn.Conv2d`` or ``nn.Linear`` (subclasses may override
    ``forward``, so they stay as they are); layers already quantized are left untouched, whatever
    their qconfig. Returns the model (the new layer itself if ``model`` is a bare eligible layer).

    ``fuse=True`` (default): the conv → BatchNorm → ReLU (→ max-pool) chains it can prove (runs inside
    ``nn.Sequential``, the residual blocks of ``ebkernels.models``) then run as fused int8 blocks that
    hand each other int8 codes (``ebkernels.fusion``; SPEC §9): same modules, Parameters, buffers and
    ``state_dict``, far less saved memory and fewer kernels. ``ebkernels.fusion.fused_chains(model)``
    lists them (also logged at INFO level on the "ebkernels" logger); ``fuse=False`` keeps every layer
    on its own.
    """
    qconfig = _check_qconfig(qconfig)
    name_matches, predicate_matches, patterns = _skip_matcher(skip)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            warnings.warn(f"quantize_model: skip pattern {p!r} matches no module name of the model",
                          stacklevel=2)

    def convert(name: str, module: nn.Module):
        if name and name_matches(name):
            return module  # skipped with its whole subtree
        qcls = _FLOAT_TO_Q.get(type(module))
        if qcls is None:
            return None  # not a layer: look inside
        if predicate_matches(name, module):
            return module
        return qcls.from_float(module, qconfig)

    model = _swap(model, convert)
    if fuse:
        from .fusion import fuse as fuse_chains

        fuse_chains(model)
    return model


def dequantize_model(model: nn.Module, inplace: bool = True) -> nn.Module:
    """The inverse of ``quantize_model``: every ``QConv2d`` / ``QLinear`` becomes ``nn.Conv2d`` /
    ``nn.Linear`` with the same Parameter objects (``inplace=False`` deep-copies the model first)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    from .fusion import unfuse

    unfuse(model)
    return _swap(model, lambda name, m: m.to_float() if isinstance(m, _Q_TYPES) else None)


def first_and_last_layers(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the first and the last ``nn.Conv2d``/``nn.Linear`` in module order.

    Handy as ``quantize_model(model, skip=first_and_last_layers(model))``: the stem convolution (3 input
    channels) and the classifier are the layers most sensitive to 8-bit quantization.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return tuple(dict.fromkeys(names[:1] + names[-1:]))
