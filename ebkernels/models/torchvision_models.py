"""Any torchvision classification model by name, adapted to a dataset: ``torchvision:<name>``.

``build_model("torchvision:resnet50", num_classes=10, in_channels=1, small_stem=True)`` builds
``torchvision.models.get_model("resnet50", weights=None, num_classes=10)`` (randomly initialised by
torchvision's own scheme) and adapts it:

- the classifier has ``num_classes`` outputs (torchvision's constructor argument);
- the first convolution (the first ``nn.Conv2d`` in module order) reads ``in_channels``;
- ``small_stem=True`` (for 8–64 px images, e.g. CIFAR): that first convolution becomes 3×3, stride 1,
  padding 1; if it was a downsampling stem (stride > 1), a max-pool that directly follows it (the
  first ``nn.MaxPool2d``, when it comes before the second convolution: ResNet's ``maxpool``,
  DenseNet's ``pool0``) becomes ``nn.Identity``. VGG's stem already is 3×3 / 1 and keeps all its
  pools; MobileNet's loses only its stride. A replaced convolution is initialised like torchvision's
  ResNet stem (Kaiming normal, fan-out, ReLU gain; bias 0).

A pruned model is described by :func:`layer_widths` (the in/out width and groups of every Conv2d,
the width of every BatchNorm2d, in/out of every Linear, by module name): plain JSON data, stored in
tickets as the architecture's ``cfg``. ``cfg=`` rebuilds those widths; each resized layer starts from
the leading slice of the freshly initialised full-width layer (so ``reinit`` draws from the same
distribution as the dense network's initialisation), and a ticket then loads its weights into it.
torchvision is imported only when such a model is asked for.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

__all__ = ["PREFIX", "import_torchvision", "import_torchvision_package", "torchvision_names", "build_torchvision", "layer_widths",
           "apply_widths", "is_torchvision_name"]

PREFIX = "torchvision:"
# constructor arguments some models need so that forward returns plain logits in training mode too
_CONSTRUCTOR_ARGS = {"googlenet": dict(aux_logits=False, init_weights=True),
                     "inception_v3": dict(aux_logits=False, init_weights=True)}


def is_torchvision_name(name) -> bool:
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


_OP_SCHEMAS = []  # torch.library.Library objects: the schemas live as long as they do


def _define_missing_torchvision_ops() -> None:
    """Declare the two operator schemas torchvision's Python import registers fakes for.

    PyPI's torchvision wheel is a CUDA build; next to a CPU-only torch (the CI machine's) its compiled ops
    do not load and ``import torchvision`` stops at ``register_fake("torchvision::nms")``. The
    classification models are pure Python and never call those ops, so declaring the schemas (with no
    kernel: calling ``nms`` stays an error) is enough to build them.
    """
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _OP_SCHEMAS.append(lib)


def _mismatch(exc: Exception, what: str = "") -> ImportError:
    return ImportError(f"torchvision is installed but does not import next to torch {torch.__version__}{what} "
                       f"({type(exc).__name__}: {exc}); install the torchvision release built for this torch")


def import_torchvision_package():
    """The ``torchvision`` package (models, datasets), or an ImportError saying why it is unusable and what
    to install. Every torchvision import of ebkernels goes through here, so the op schemas are declared
    (``_define_missing_torchvision_ops``) the same way whichever part imports it first."""
    import sys

    try:
        import torchvision
        return torchvision
    except ImportError:
        raise ImportError(f"torchvision models need torchvision: `pip install torchvision` (the release built for "
                          f"torch {torch.__version__.split('+')[0]})") from None
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc) or _OP_SCHEMAS:
            raise _mismatch(exc) from exc
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # the failed, half-initialised import
    _define_missing_torchvision_ops()
    try:
        import torchvision
    except Exception as exc:
        raise _mismatch(exc, ", even with its detection ops declared") from exc
    return torchvision


def import_torchvision():
    """``torchvision.models``, or an ImportError saying why it is unusable and what to install."""
    return import_torchvision_package().models


def torchvision_names() -> list[str]:
    """torchvision's classification model names (``torchvision.models.list_models``)."""
    tv_models = import_torchvision()
    return sorted(tv_models.list_models(module=tv_models))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _adapt_stem(model: nn.Module, in_channels: int, small_stem: bool) -> None:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d; accepted: convolutional classification models")
    name, first = convs[0]
    if in_channels != first.in_channels or small_stem:
        kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if small_stem else \
            (first.kernel_size, first.stride, first.padding)
        stem = nn.Conv2d(in_channels, first.out_channels, kernel, stride=stride, padding=padding,
                         bias=first.bias is not None)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
        if stem.bias is not None:
            nn.init.zeros_(stem.bias)
        _replace(model, name, stem)
    if small_stem and max(first.stride) > 1:
        order = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
        if len(order) > 1 and isinstance(order[1][1], nn.MaxPool2d):
            _replace(model, order[1][0], nn.Identity())


def build_torchvision(name: str, num_classes: int = 10, in_channels: int = 3, small_stem: bool = False,
                      cfg=None) -> nn.Module:
    """The torchvision model ``name`` (without the ``torchvision:`` prefix), adapted (module docstring)."""
    if not isinstance(small_stem, bool):
        raise TypeError(f"small_stem must be a bool, got {type(small_stem).__name__}")
    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise ValueError(f"torchvision has no classification model {name!r}{hint}; accepted: "
                         f"{', '.join(PREFIX + n for n in names)}")
    model = import_torchvision().get_model(name, weights=None, num_classes=num_classes,
                                           **_CONSTRUCTOR_ARGS.get(name, {}))
    _adapt_stem(model, in_channels, small_stem)
    if cfg is not None:
        apply_widths(model, cfg)
    return model


def layer_widths(model: nn.Module) -> dict:
    """``{name: [in, out, groups]}`` per Conv2d, ``[features]`` per BatchNorm2d, ``[in, out]`` per Linear."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[name] = [int(m.in_channels), int(m.out_channels), int(m.groups)]
        elif isinstance(m, nn.BatchNorm2d):
            widths[name] = [int(m.num_features)]
        elif isinstance(m, nn.Linear):
            widths[name] = [int(m.in_features), int(m.out_features)]
    return widths


def _resized(old: nn.Module, shape: list) -> nn.Module:
    """A layer like ``old`` with the widths ``shape``, holding the leading slice of ``old``'s values."""
    with torch.no_grad():
        if isinstance(old, nn.Conv2d):
            cin, cout, groups = shape
            new = nn.Conv2d(cin, cout, old.kernel_size, stride=old.stride, padding=old.padding,
                            dilation=old.dilation, groups=groups, bias=old.bias is not None,
                            padding_mode=old.padding_mode)
            new.weight.copy_(old.weight[:cout, :cin // groups])
        elif isinstance(old, nn.BatchNorm2d):
            (n,) = shape
            new = nn.BatchNorm2d(n, eps=old.eps, momentum=old.momentum, affine=old.affine,
                                 track_running_stats=old.track_running_stats)
            for attr in ("weight", "running_mean", "running_var"):
                if getattr(old, attr) is not None:
                    getattr(new, attr).copy_(getattr(old, attr)[:n])
        else:
            cin, cout = shape
            new = nn.Linear(cin, cout, bias=old.bias is not None)
            new.weight.copy_(old.weight[:cout, :cin])
        if getattr(old, "bias", None) is not None:
            new.bias.copy_(old.bias[:new.bias.numel()])
    return new


def _check_shape(name: str, old: nn.Module, shape) -> list:
    full = layer_widths(nn.Sequential(old))["0"]
    if not isinstance(shape, (list, tuple)) or len(shape) != len(full) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= f for v, f in zip(shape, full)):
        raise ValueError(f"cfg[{name!r}]={shape!r} is not supported; accepted: {len(full)} ints, each from 1 to "
                         f"the full width {full}")
    if isinstance(old, nn.Conv2d):
        cin, cout, groups = shape
        depthwise = old.groups > 1 and old.groups == old.in_channels == old.out_channels
        if (groups != old.groups and not (depthwise and groups == cin == cout)) or cin % groups or cout % groups:
            raise ValueError(f"cfg[{name!r}]={shape!r}: groups={groups} does not fit in={cin}, out={cout} of a "
                             f"convolution with groups={old.groups}")
    return list(shape)


def apply_widths(model: nn.Module, widths) -> nn.Module:
    """Resize the layers of ``model`` (in place) to the :func:`layer_widths` record ``widths``."""
    if not isinstance(widths, dict):
        raise TypeError(f"cfg of a torchvision model must be the dict layer_widths() gives, got "
                        f"{type(widths).__name__}")
    layers = dict(model.named_modules())
    current = layer_widths(model)
    unknown = sorted(k for k in widths if k not in current)
    if unknown:
        raise ValueError(f"cfg names layers this model does not have: {unknown[:5]}; accepted: Conv2d, "
                         f"BatchNorm2d and Linear module names of {type(model).__name__}")
    for name, shape in widths.items():
        shape = _check_shape(name, layers[name], shape)
        if shape != current[name]:
            _replace(model, name, _resized(layers[name], shape))
    return model
