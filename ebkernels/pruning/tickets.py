"""Re-initialisation ("EB Train (re-init)") and ticket files that load without pickled modules."""
from __future__ import annotations

import copy
import functools
import json
import os
import warnings

import torch
from torch import nn

from .._io import NotPlainData, atomic_torch_save, content_digest, load_plain
from ..models import PreResNet, VGG, architecture, build_model
from ..models.torchvision_models import is_torchvision_name
from ..models.resnet import init_resnet, is_basic_resnet
from .costs import _input_shape, _unwrap
from .masks import _as_bool_tensor

__all__ = ["reinit", "save_ticket", "load_ticket", "TICKET_FORMAT", "TICKET_VERSION", "MODULE_TICKET_VERSION"]

TICKET_FORMAT = "ebkernels.ticket"
TICKET_VERSION = 1  # a build_model network: name, widths, weights
MODULE_TICKET_VERSION = 2  # any other network: + kept channels per BN, the torch.export program


# ---------------------------------------------------------------------------------------- re-init

def _rebuild_fresh(model: nn.Module) -> None:
    """A torchvision model's re-init: a freshly built twin (torchvision's own initialisation; resized
    layers take the leading slice of the fresh full-width layers) lends its values."""
    arch = architecture(model)
    fresh = build_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                        cfg=arch["cfg"], **arch["kwargs"])
    model.load_state_dict(fresh.state_dict())  # copies into the model's tensors: device and dtype stay


def reinit(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-initialise all weights in place with the model's own scheme ("EB Train (re-init)").

    The architecture (pruned widths, channel gathers) stays; weights, BN affine parameters and
    running statistics start afresh. ``seed`` makes it reproducible without touching the global RNG.
    ``torchvision:`` models take torchvision's initialisation through a freshly built twin.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    if is_torchvision_name(getattr(model, "ebk_arch", {}).get("name")):
        init = functools.partial(_rebuild_fresh, model)
    elif isinstance(model, (VGG, PreResNet)):
        init = model.reset_parameters
    elif is_basic_resnet(model):
        init = functools.partial(init_resnet, model)
    else:
        raise TypeError(f"reinit supports VGG, PreResNet, BasicBlock ResNets and models built by "
                        f"build_model('torchvision:<name>'); got {type(model).__name__}")
    if seed is None:
        with torch.no_grad():
            init()
        return model
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(int(seed))
        init()
    return model


# ------------------------------------------------------------------------------------ ticket files

def _json_text(name: str, value) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be JSON-able data (dict/list/str/number/bool/None): {exc}") from None


def _keep_masks(report: dict | None) -> dict | None:
    """``{bn_name: bool tensor over its channels before pruning}`` from prune's report: what
    ``load_ticket(path, model=...)`` prunes a fresh copy of the user's model by."""
    mask = report.get("effective_mask") if isinstance(report, dict) else None
    layers = report.get("layers") if isinstance(report, dict) else None
    if not isinstance(mask, torch.Tensor) or not isinstance(layers, list):
        return None
    sizes = [int(layer["channels"]) for layer in layers]
    if sum(sizes) != mask.numel():
        raise ValueError(f"report['effective_mask'] has {mask.numel()} entries but report['layers'] counts "
                         f"{sum(sizes)} channels; pass the report prune() returned with its model")
    parts = torch.split(_as_bool_tensor("report['effective_mask']", mask).flatten(), sizes)
    return {layer["name"]: part.clone() for layer, part in zip(layers, parts)}


def _module_record(model: nn.Module, report: dict | None, input_shape, export: bool) -> dict:
    """What a ticket of a model not built by ``build_model`` holds besides its state_dict: the class
    name (for messages), the input shape, the pruner's engine, the per-BN kept channels and, with
    ``export``, the eval-mode ``torch.export`` program (``programs.py``)."""
    from .programs import export_program

    if input_shape is None and isinstance(report, dict) and report.get("input_shape"):
        input_shape = report["input_shape"]
    shape = None
    if input_shape is not None or export:
        try:
            shape = list(_input_shape(model, input_shape, "save_ticket")[1:])
        except ValueError as exc:
            raise ValueError(f"{exc} (to export its program); or pass the (pruned_model, report) pair prune() "
                             f"returned, whose report records it") from None
    engine = report.get("engine") if isinstance(report, dict) else None
    return {
        "arch": {"name": None, "class": type(model).__name__, "input_shape": shape, "engine": engine},
        "keep": _keep_masks(report),
        "program": export_program(model, shape) if export else None,
    }


def save_ticket(path, model_or_pruned, *, mask=None, report=None, meta=None, input_shape=None,
                export: bool = True) -> str:
    """Write a ticket file that loads without this code's classes or any pickled module.

    model_or_pruned: a model (pruned or not), or the ``(pruned_model, report)`` pair :func:`prune`
    returns. The file holds the architecture as JSON text, a plain dict of tensors (the state_dict),
    the optional bool ``mask`` (default: the report's effective mask), the report (JSON part),
    ``meta`` (any JSON-able data: epoch, ratio…) and the SHA-256 digest of all of that
    (``ebkernels._io.content_digest``). Written atomically: temp file in the same directory, fsync,
    ``os.replace``. Returns the path.

    A model from :func:`ebkernels.models.build_model` is described by name and widths (format
    version 1). Any other model (format version 2) cannot be rebuilt by name, so its ticket also holds
    the kept channels of every BatchNorm2d (from the report) and, with ``export=True``, the network as
    an eval-mode ``torch.export`` program for inputs ``(N, *input_shape)`` (``input_shape``: (C, H, W),
    default the report's): :func:`load_ticket` returns that program's module with no class of yours,
    or, given ``model=``, prunes your freshly built model by the saved channels and loads the weights.
    """
    model = model_or_pruned
    if isinstance(model_or_pruned, tuple):
        if len(model_or_pruned) != 2 or not isinstance(model_or_pruned[0], nn.Module):
            raise TypeError("model_or_pruned must be a model or the (pruned_model, report) pair from prune()")
        model, pair_report = model_or_pruned
        report = pair_report if report is None else report
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_or_pruned must be a torch.nn.Module or (model, report), got {type(model).__name__}")
    if not isinstance(export, bool):
        raise TypeError(f"export must be True or False, got {type(export).__name__}")
    model = _unwrap(model)
    report_json = None
    if report is not None:
        if not isinstance(report, dict):
            raise TypeError(f"report must be the dict prune() returns, got {type(report).__name__}")
        if mask is None and isinstance(report.get("effective_mask"), torch.Tensor):
            mask = report["effective_mask"]
        report_json = _json_text("report", {k: v for k, v in report.items() if k != "effective_mask"})
    if mask is not None:
        mask = _as_bool_tensor("mask", mask).flatten().clone()
    meta_json = _json_text("meta", meta)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save ticket to {path!r}: directory {directory!r} does not exist")
    built = isinstance(getattr(model, "ebk_arch", None), dict)
    record = {} if built else _module_record(model, report, input_shape, export)
    payload = {
        "format": TICKET_FORMAT,
        "version": TICKET_VERSION if built else MODULE_TICKET_VERSION,
        "arch": _json_text("architecture", architecture(model) if built else record.pop("arch")),
        "meta": meta_json,
        "report": report_json,
        "state_dict": {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
        "mask": mask,
        **record,
    }
    payload["digest"] = content_digest(payload)  # load_ticket recomputes it: a changed byte is caught
    return atomic_torch_save(payload, path)


_SAID_NO_DIGEST: set = set()  # ticket files already reported as carrying no digest


def _verify_digest(path: str, payload: dict) -> None:
    """Compare the stored SHA-256 of the ticket's content with its content; tickets written before
    digests existed load unverified, with one warning per file."""
    stored = payload.get("digest")
    if stored is None:
        key = os.path.abspath(path)
        if key not in _SAID_NO_DIGEST:
            _SAID_NO_DIGEST.add(key)
            warnings.warn(f"{path!r} carries no content digest (written by an older ebkernels): loaded without "
                          f"an integrity check; save it again with save_ticket to add one", stacklevel=3)
        return
    try:
        actual = content_digest({k: v for k, v in payload.items() if k != "digest"})
    except TypeError as exc:
        raise ValueError(f"{path!r} is corrupt: {exc}") from None
    if actual != stored:
        raise ValueError(f"{path!r} is corrupt: its content does not match the SHA-256 digest stored in it "
                         f"(changed bytes in its data); use another copy of the ticket or draw it again")


def _read_payload(path: str, map_location) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ticket file {path!r} does not exist")
    try:
        payload = load_plain(path, map_location=map_location)
    except NotPlainData as exc:
        raise ValueError(f"ticket file {exc}") from None
    except Exception as exc:
        raise ValueError(f"{path!r} is not a readable ticket file (corrupt, truncated or not written by "
                         f"save_ticket): {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != TICKET_FORMAT:
        raise ValueError(f"{path!r} is not an ebkernels ticket (no '{TICKET_FORMAT}' format marker)")
    if payload.get("version") not in (TICKET_VERSION, MODULE_TICKET_VERSION):
        raise ValueError(f"{path!r} is ticket format version {payload.get('version')!r}; this ebkernels reads "
                         f"versions {TICKET_VERSION} and {MODULE_TICKET_VERSION}")
    _verify_digest(path, payload)
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} has no tensor state_dict")
    return payload


def _load_weights(model: nn.Module, state: dict, path: str, what: str) -> nn.Module:
    """``state`` into ``model`` (cast to the saved float dtype when there is one); a ValueError if it does
    not fit."""
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: weights do not fit {what}: {exc}") from exc
    return model


def _build_by_name(path: str, arch: dict, state: dict) -> nn.Module:
    try:
        kwargs = dict(arch.get("kwargs", {}))
        model = build_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                            cfg=arch["cfg"], **kwargs)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an unusable architecture record: {type(exc).__name__}: {exc}") from exc
    return _load_weights(model, state, path, f"the architecture {arch['name']} cfg={arch['cfg']}")


def _apply_to(model: nn.Module, payload: dict, arch: dict, path: str) -> nn.Module:
    """A copy of the user's ``model`` with the ticket's widths and weights: loaded as it is when its
    shapes are the ticket's already (the user rebuilt the pruned network, or it was never pruned), else
    pruned first by the saved kept channels of every BatchNorm2d."""
    from .engine import prune

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a fresh {arch.get('class')}), got {type(model).__name__}")
    state = payload["state_dict"]
    model = copy.deepcopy(_unwrap(model))
    if {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}:
        return _load_weights(model, state, path, f"your {type(model).__name__}")
    keep = payload.get("keep")
    if not isinstance(keep, dict):
        raise ValueError(f"{path!r}: your {type(model).__name__} has other widths than the ticket's "
                         f"{arch.get('class')}, and the ticket holds no kept channels to prune it by (it was saved "
                         f"without prune's report); pass a model built with the ticket's widths")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rescue warning was given when the ticket was drawn
            pruned, _ = prune(model, keep, input_shape=arch.get("input_shape"), engine=arch.get("engine") or "auto")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r}: your {type(model).__name__} is not the network this ticket of a "
                         f"{arch.get('class')} was pruned from: {exc}") from exc
    return _load_weights(pruned, state, path, f"your {type(model).__name__} pruned by the ticket's channels")


def load_ticket(path, *, model=None, map_location="cpu", with_info: bool = False):
    """Rebuild a ticket saved by :func:`save_ticket`.

    Reads with ``torch.load(weights_only=True)``: no pickled code runs; the SHA-256 content digest the
    file carries is checked (a mismatch is a ValueError saying the file is corrupt; a ticket written
    before digests existed loads with one warning).

    - A ticket of a ``build_model`` network: ``build_model(name, cfg=...)`` + its weights (same dtype as
      saved, on ``map_location``). ``model`` must be None.
    - A ticket of any other network, without ``model``: the module of its ``torch.export`` program
      (``ebkernels.pruning.programs``; the archive is checked before torch reads it), for inference:
      eval-mode, moved to ``map_location``; it refuses ``.train()``.
    - With ``model=`` a freshly built network of the ticket's class: a copy of it pruned by the saved
      kept channels of every BatchNorm2d (or taken as it is when it has the ticket's widths already),
      holding the ticket's weights: an ordinary module of your class, trainable, on ``model``'s device.

    Returns the model, or ``(model, info)`` with ``with_info=True``; info holds ``arch``, ``meta``,
    ``report`` (JSON part), ``mask`` and ``program`` (the ExportedProgram, or None).
    """
    path = os.fspath(path)
    payload = _read_payload(path, map_location)
    try:
        arch = json.loads(payload["arch"])
        meta = json.loads(payload["meta"])
        report = json.loads(payload["report"]) if payload.get("report") is not None else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an unusable architecture record: {type(exc).__name__}: {exc}") from exc
    program = None
    if payload["version"] == TICKET_VERSION:
        if model is not None:
            raise ValueError(f"{path!r} is a ticket of ebkernels' {arch.get('name')}, which it rebuilds by name; "
                             f"load it without model=")
        net = _build_by_name(path, arch, payload["state_dict"])
        if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
            net = net.to(map_location)
    elif model is not None:
        net = _apply_to(model, payload, arch, path)
    else:
        if payload.get("program") is None:
            raise ValueError(f"{path!r} is a ticket of a {arch.get('class')} saved without its program "
                             f"(export=False): load it into a freshly built one, load_ticket(path, model=...)")
        from .programs import load_program

        program = load_program(payload["program"], path, map_location)
        net = program.module()
    if with_info:
        return net, {"arch": arch, "meta": meta, "report": report, "mask": payload.get("mask"), "program": program}
    return net
