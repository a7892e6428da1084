"""Re-initialisation ("EB Train (re-init)") and ticket files that load without pickled modules."""
from __future__ import annotations

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
from .costs import _unwrap
from .masks import _as_bool_tensor

__all__ = ["reinit", "save_ticket", "load_ticket", "TICKET_FORMAT", "TICKET_VERSION"]

TICKET_FORMAT = "ebkernels.ticket"
TICKET_VERSION = 1


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


def save_ticket(path, model_or_pruned, *, mask=None, report=None, meta=None) -> str:
    """Write a ticket file that loads without this code's classes or any pickled module.

    model_or_pruned: a model from :func:`ebkernels.models.build_model` (pruned or not), or the
    ``(pruned_model, report)`` pair :func:`prune` returns. The file holds the architecture as JSON
    text, a plain dict of tensors (the state_dict), the optional bool ``mask`` (default: the
    report's effective mask), the report (JSON part), ``meta`` (any JSON-able data: epoch, ratio…)
    and the SHA-256 digest of all of that (``ebkernels._io.content_digest``).
    Written atomically: temp file in the same directory, fsync, ``os.replace``. Returns the path.
    """
    model = model_or_pruned
    if isinstance(model_or_pruned, tuple):
        if len(model_or_pruned) != 2 or not isinstance(model_or_pruned[0], nn.Module):
            raise TypeError("model_or_pruned must be a model or the (pruned_model, report) pair from prune()")
        model, pair_report = model_or_pruned
        report = pair_report if report is None else report
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_or_pruned must be a torch.nn.Module or (model, report), got {type(model).__name__}")
    model = _unwrap(model)
    arch = architecture(model)
    report_json = None
    if report is not None:
        if not isinstance(report, dict):
            raise TypeError(f"report must be the dict prune() returns, got {type(report).__name__}")
        if mask is None and isinstance(report.get("effective_mask"), torch.Tensor):
            mask = report["effective_mask"]
        report_json = _json_text("report", {k: v for k, v in report.items() if k != "effective_mask"})
    if mask is not None:
        mask = _as_bool_tensor("mask", mask).flatten().clone()
    payload = {
        "format": TICKET_FORMAT,
        "version": TICKET_VERSION,
        "arch": _json_text("architecture", arch),
        "meta": _json_text("meta", meta),
        "report": report_json,
        "state_dict": {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
        "mask": mask,
    }
    payload["digest"] = content_digest(payload)  # load_ticket recomputes it: a changed byte is caught
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save ticket to {path!r}: directory {directory!r} does not exist")
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


def load_ticket(path, *, map_location="cpu", with_info: bool = False):
    """Rebuild a ticket saved by :func:`save_ticket`: ``build_model(name, cfg=...)`` + its weights.

    Reads with ``torch.load(weights_only=True)``: no pickled code runs; the SHA-256 content digest the
    file carries is checked (a mismatch is a ValueError saying the file is corrupt; a ticket written
    before digests existed loads with one warning). Returns the model (same
    dtype as saved, on ``map_location``), or ``(model, info)`` with ``with_info=True``; info holds
    ``arch``, ``meta``, ``report`` (JSON part) and ``mask``.
    """
    path = os.fspath(path)
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
    if payload.get("version") != TICKET_VERSION:
        raise ValueError(f"{path!r} is ticket format version {payload.get('version')!r}; "
                         f"this ebkernels reads version {TICKET_VERSION}")
    _verify_digest(path, payload)
    try:
        arch = json.loads(payload["arch"])
        meta = json.loads(payload["meta"])
        report = json.loads(payload["report"]) if payload.get("report") is not None else None
        state = payload["state_dict"]
        kwargs = dict(arch.get("kwargs", {}))
        model = build_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                            cfg=arch["cfg"], **kwargs)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an unusable architecture record: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} has no tensor state_dict")
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: weights do not fit the architecture {arch['name']} cfg={arch['cfg']}: "
                         f"{exc}") from exc
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(map_location)
    if with_info:
        return model, {"arch": arch, "meta": meta, "report": report, "mask": payload.get("mask")}
    return model
