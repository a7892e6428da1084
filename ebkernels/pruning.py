"""Physical channel pruning of a drawn ticket, its cost, re-initialisation, and ticket files (SPEC §4).

``prune(model, mask)`` returns a smaller copy whose layers hold copied slices of the original
weights. The mask covers every ``nn.BatchNorm2d`` in ``model.modules()`` order (True = keep), the
order of ``ebkernels.channel_mask``; or it is a dict ``{bn_module_name: bool tensor}``. How each
family shrinks:

- VGG (conv→BN→ReLU(→pool)→conv): a pruned channel leaves the conv's outputs, the BN, and the next
  conv's (or the classifier's) inputs.
- Pre-activation ResNet: the residual stream is never narrowed. BNs that read the stream stay
  whole; their mask becomes the ``ChannelSelection`` gather before the block's first conv (and
  before ``fc``). Inner BNs shrink with the conv that feeds them and the conv that reads them; a
  block's last conv keeps its output width.
- torchvision-style ResNet with BasicBlocks: only each block's inner width (``conv1``/``bn1``
  outputs, ``conv2`` inputs). Mask entries of BNs on the stream cannot be applied; they are listed
  in ``report["unapplied"]`` and those channels are kept.

No layer is left with zero channels: a layer whose mask keeps nothing keeps its largest-|gamma|
channel, with a warning, and is listed in ``report["rescued"]``.

``report["effective_mask"]`` is the mask the pruned network implements: zeroing gamma and beta of
every BN channel where it is False gives a network that computes the same outputs in eval mode.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from ._checks import check_ratio
from ._io import NotPlainData, atomic_torch_save, content_digest, load_plain
from .models import PreResNet, VGG, architecture, build_model, current_cfg
from .models.resnet import basic_blocks, init_resnet, is_basic_resnet

__all__ = ["prune", "count_params", "count_flops", "reinit", "save_ticket", "load_ticket", "bn_layers"]

TICKET_FORMAT = "ebkernels.ticket"
TICKET_VERSION = 1


# ----------------------------------------------------------------------------------------- costs

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


# ------------------------------------------------------------------------------------------ masks

def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every BatchNorm2d in ``model.modules()`` order: the mask's layout."""
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, nn.BatchNorm2d)]


def _ratio_mask(bns, ratio: float) -> list[torch.Tensor]:
    """SPEC §3: thr = sort(|gamma|)[floor(total * p)], keep |gamma| > thr (strict)."""
    gammas = [bn.weight.detach().abs().flatten().cpu() for _, bn in bns]
    flat = torch.cat(gammas)
    thr = torch.sort(flat).values[int(math.floor(flat.numel() * ratio))]
    return [g > thr for g in gammas]


def _as_bool_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor (or a dict of them), got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"{name} has dtype {str(value.dtype).replace('torch.', '')}; accepted: bool "
                        "(True = keep the channel; convert 0/1 values with `mask.bool()`)")
    return value.detach().cpu()


def _split_mask(bns, mask, ratio) -> list[torch.Tensor]:
    sizes = [bn.num_features for _, bn in bns]
    total = sum(sizes)
    if mask is None:
        if ratio is None:
            raise ValueError("prune needs a mask or a ratio; got mask=None and ratio=None")
        return _ratio_mask(bns, ratio)
    if isinstance(mask, dict):
        names = {n: i for i, (n, _) in enumerate(bns)}
        unknown = [k for k in mask if k not in names]
        if unknown:
            raise ValueError(f"mask has keys {unknown} that are not BatchNorm2d layers of the model; "
                             f"accepted: {list(names)}")
        out = [torch.ones(s, dtype=torch.bool) for s in sizes]
        for key, value in mask.items():
            t = _as_bool_tensor(f"mask[{key!r}]", value).flatten()
            if t.numel() != sizes[names[key]]:
                raise ValueError(f"mask[{key!r}] has {t.numel()} entries; that layer has {sizes[names[key]]} channels")
            out[names[key]] = t
        return out
    flat = _as_bool_tensor("mask", mask)
    if flat.dim() != 1:
        raise ValueError(f"mask must be 1-D (one flag per BN channel), got shape {tuple(flat.shape)}")
    if flat.numel() != total:
        raise ValueError(f"mask has {flat.numel()} entries; the model has {total} BatchNorm2d channels "
                         f"in {len(bns)} layers (accepted: a bool tensor of length {total})")
    return list(torch.split(flat, sizes))


# ------------------------------------------------------------------------------- layer surgery

def _construct_like(old: nn.Module, base: type, args: tuple, kwargs: dict) -> nn.Module:
    """A new layer of ``type(old)`` (e.g. QConv2d, with its qconfig); plain ``base`` if that fails."""
    cls = type(old)
    kw = dict(kwargs)
    if hasattr(old, "qconfig"):
        kw["qconfig"] = old.qconfig
    try:
        new = cls(*args, **kw)
    except TypeError as exc:
        warnings.warn(f"could not rebuild {cls.__name__} with its constructor ({exc}); "
                      f"the pruned layer is a plain {base.__name__}", stacklevel=4)
        new = base(*args, **kwargs)
    ref = old.weight
    new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    return new


def _copy_param(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    if dst is not None and src is not None:
        dst.copy_(src)


def _sliced_conv(old: nn.Conv2d, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None) -> nn.Conv2d:
    if old.groups != 1:
        raise ValueError(f"cannot prune a grouped convolution (groups={old.groups}); accepted: groups=1")
    w = old.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = _construct_like(old, nn.Conv2d, (w.shape[1], w.shape[0], old.kernel_size), dict(
        stride=old.stride, padding=old.padding, dilation=old.dilation, groups=1,
        bias=old.bias is not None, padding_mode=old.padding_mode))
    _copy_param(new.weight, w)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        b = old.bias.detach()
        _copy_param(new.bias, b if out_idx is None else b.index_select(0, out_idx.to(b.device)))
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _sliced_linear(old: nn.Linear, in_idx: torch.Tensor) -> nn.Linear:
    w = old.weight.detach().index_select(1, in_idx.to(old.weight.device))
    new = _construct_like(old, nn.Linear, (w.shape[1], w.shape[0]), dict(bias=old.bias is not None))
    _copy_param(new.weight, w)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        _copy_param(new.bias, old.bias.detach())
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _sliced_bn(old: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    kwargs = dict(eps=old.eps, momentum=old.momentum, affine=old.affine,
                  track_running_stats=old.track_running_stats)
    try:
        new = type(old)(idx.numel(), **kwargs)
    except TypeError:
        new = nn.BatchNorm2d(idx.numel(), **kwargs)
    ref = old.weight if old.weight is not None else old.running_mean
    new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(old, name)
            if src is not None:
                _copy_param(getattr(new, name), src.detach().index_select(0, idx.to(src.device)))
        for name in ("weight", "bias"):
            if getattr(old, name) is not None:
                getattr(new, name).requires_grad_(getattr(old, name).requires_grad)
    if old.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    return new


class _Plan:
    """Per-BN bookkeeping: which channels stay, and what the report says about the layer."""

    def __init__(self, bns, masks):
        self.bns = dict(bns)
        self.order = [n for n, _ in bns]
        self.masks = dict(zip(self.order, masks))
        self.effective = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bns}
        self.layers: dict[str, dict] = {}
        self.rescued: list[str] = []
        self.unapplied: list[str] = []

    def keep(self, name: str, role: str, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted indices of kept channels of BN ``name``; ``candidates``: those still available."""
        bn = self.bns[name]
        want = self.masks[name].clone()
        if candidates is not None:
            allowed = torch.zeros_like(want)
            allowed[candidates] = True
            want &= allowed
        else:
            allowed = torch.ones_like(want)
        if not bool(want.any()):
            gamma = bn.weight.detach().abs().cpu().clone()
            gamma[~allowed] = -1.0
            best = int(torch.argmax(gamma))
            want[best] = True
            self.rescued.append(name)
        self.effective[name] = want
        idx = torch.nonzero(want).flatten()
        self.layers[name] = {"name": name, "channels": int(bn.num_features), "kept": int(idx.numel()),
                             "role": role}
        return idx

    def whole(self, name: str) -> None:
        """A BN on a residual stream that this family cannot narrow: all channels stay."""
        bn = self.bns[name]
        if not bool(self.masks[name].all()):
            self.unapplied.append(name)
        self.layers[name] = {"name": name, "channels": int(bn.num_features), "kept": int(bn.num_features),
                             "role": "stream (kept whole)"}


def _names(model: nn.Module) -> dict:
    return {m: n for n, m in model.named_modules()}


def _prune_vgg(model: VGG, plan: _Plan) -> None:
    names = _names(model)
    layers = list(model.features)
    prev_idx = None  # kept input channels of the next conv (None: the image, all channels)
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        bn = layers[i + 1] if i + 1 < len(layers) else None
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"VGG feature {i} ({type(layer).__name__}) is not followed by a BatchNorm2d")
        idx = plan.keep(names[bn], "pruned")
        model.features[i] = _sliced_conv(layer, prev_idx, idx)
        model.features[i + 1] = _sliced_bn(bn, idx)
        prev_idx = idx
    model.classifier = _sliced_linear(model.classifier, prev_idx)


def _positions(selected: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Where each stream channel in ``idx`` sits among the currently ``selected`` ones."""
    return torch.searchsorted(selected.cpu(), idx)


def _prune_preresnet(model: PreResNet, plan: _Plan) -> None:
    names = _names(model)
    for block in model.blocks():
        # bn1 reads the stream: it stays whole and the gather picks the kept channels for conv1
        old_sel = block.select.indices.detach().cpu()
        idx1 = plan.keep(names[block.bn1], "stream (gathered)", candidates=old_sel)
        idx2 = plan.keep(names[block.bn2], "pruned")
        idx3 = plan.keep(names[block.bn3], "pruned")
        block.select.set_indices(idx1)
        block.conv1 = _sliced_conv(block.conv1, _positions(old_sel, idx1), idx2)
        block.bn2 = _sliced_bn(block.bn2, idx2)
        block.conv2 = _sliced_conv(block.conv2, idx2, idx3)
        block.bn3 = _sliced_bn(block.bn3, idx3)
        block.conv3 = _sliced_conv(block.conv3, idx3, None)  # output width = stream width, kept
    old_sel = model.select.indices.detach().cpu()
    idx = plan.keep(names[model.bn], "stream (gathered)", candidates=old_sel)
    model.select.set_indices(idx)
    model.fc = _sliced_linear(model.fc, _positions(old_sel, idx))


def _prune_basic_resnet(model: nn.Module, plan: _Plan) -> None:
    names = _names(model)
    inner = set()
    for block in basic_blocks(model):
        name = names[block.bn1]
        inner.add(name)
        idx = plan.keep(name, "pruned")
        block.conv1 = _sliced_conv(block.conv1, None, idx)
        block.bn1 = _sliced_bn(block.bn1, idx)
        block.conv2 = _sliced_conv(block.conv2, idx, None)
    for name in plan.order:
        if name not in inner:
            plan.whole(name)


def _family(model: nn.Module) -> str:
    if isinstance(model, VGG):
        return "vgg"
    if isinstance(model, PreResNet):
        return "preresnet"
    if is_basic_resnet(model):
        return "resnet"
    raise TypeError(f"prune supports VGG and PreResNet from ebkernels.models and BasicBlock ResNets "
                    f"(torchvision resnet18/34 structure); got {type(model).__name__}")


def prune(model: nn.Module, mask=None, *, ratio=None, input_shape=None) -> tuple[nn.Module, dict]:
    """Physically prune a copy of ``model``; returns ``(pruned_model, report)`` (module docstring).

    mask: bool tensor over all BatchNorm2d channels in module order (True = keep), or
    ``{bn_module_name: bool tensor}`` (layers not named keep everything). With ``mask=None`` the
    mask is computed from the BN gammas at ``ratio`` (SPEC §3 rule); with both, ``ratio`` only labels
    the report. input_shape: (C, H, W) for the FLOP count, default (first conv's channels, 32, 32).

    report: ``family``, ``ratio``, ``params_before/after``, ``flops_before/after`` (multiply-adds per
    sample), their ``*_reduction`` (fraction removed), ``input_shape``, ``channels_total``,
    ``channels_kept``, ``layers`` (per BN: channels, kept, role), ``rescued`` (layers the mask would
    have emptied), ``unapplied`` (stream BNs whose mask entries could not be applied), ``cfg``
    (of the pruned model) and ``effective_mask`` (bool tensor, see module docstring). All but the
    last are JSON-able.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if ratio is not None:
        ratio = check_ratio(ratio)
    model = _unwrap(model)
    bns = bn_layers(model)
    if not bns:
        raise ValueError(f"model ({type(model).__name__}) has no BatchNorm2d layers; channel pruning "
                         "reads importance from BN gammas (accepted: VGG, PreResNet, ResNet with BN)")
    for name, bn in bns:
        if bn.weight is None:
            raise ValueError(f"BatchNorm2d {name!r} has affine=False: no gamma to rank or rescue channels by")
    family = _family(model)
    shape = _input_shape(model, input_shape)
    masks = _split_mask(bns, mask, ratio)

    pruned = copy.deepcopy(model)
    for p in pruned.parameters():
        p.grad = None
    plan = _Plan(bn_layers(pruned), masks)
    with torch.no_grad():
        {"vgg": _prune_vgg, "preresnet": _prune_preresnet, "resnet": _prune_basic_resnet}[family](pruned, plan)

    if plan.rescued:
        warnings.warn(f"the mask prunes every channel of {len(plan.rescued)} layer(s): "
                      f"{', '.join(plan.rescued)}; each keeps its largest-|gamma| channel so no layer is "
                      "empty (listed in report['rescued'])", stacklevel=2)
    params_before, params_after = count_params(model), count_params(pruned)
    flops_before, flops_after = count_flops(model, shape), count_flops(pruned, shape)
    effective = torch.cat([plan.effective[n] for n in plan.order])
    report: dict[str, Any] = {
        "family": family,
        "ratio": ratio,
        "params_before": params_before, "params_after": params_after,
        "params_reduction": 1.0 - params_after / params_before,
        "flops_before": flops_before, "flops_after": flops_after,
        "flops_reduction": 1.0 - flops_after / flops_before if flops_before else 0.0,
        "input_shape": list(shape[1:]),
        "channels_total": int(effective.numel()),
        "channels_kept": int(effective.sum()),
        "layers": [plan.layers[n] for n in plan.order],
        "rescued": plan.rescued,
        "unapplied": plan.unapplied,
        "cfg": current_cfg(pruned),
        "effective_mask": effective,
    }
    return pruned, report


# ---------------------------------------------------------------------------------------- re-init

def reinit(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-initialise all weights in place with the model's own scheme ("EB Train (re-init)").

    The architecture (pruned widths, channel gathers) stays; weights, BN affine parameters and
    running statistics start afresh. ``seed`` makes it reproducible without touching the global RNG.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    if isinstance(model, (VGG, PreResNet)):
        init = model.reset_parameters
    elif is_basic_resnet(model):
        init = functools.partial(init_resnet, model)
    else:
        raise TypeError(f"reinit supports VGG, PreResNet and BasicBlock ResNets; got {type(model).__name__}")
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
