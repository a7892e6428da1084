"""Finds the conv → BatchNorm → ReLU (→ max-pool) chains of a quantized model and runs them as fused
int8 blocks (``ops.fused.block``), carrying int8 codes from block to block (SPEC §9).

What it fuses, because it can prove what the forward computes:

- inside an ``nn.Sequential``: runs ``QConv2d, BatchNorm2d, ReLU[, MaxPool2d]`` (VGG's ``features``) and
  ``QConv2d, BatchNorm2d`` (no ReLU); consecutive runs hand each other int8 codes, the last one of a run
  of runs returns a float tensor;
- a pre-activation bottleneck of ``ebkernels.models`` (``Bottleneck``): ``bn1 → select → relu → conv1 →
  bn2 → relu`` as one block reading the residual stream, ``conv2 → bn3 → relu``, and ``conv3`` on codes;
  the residual add and a projection shortcut stay as they are;
- a ResNet ``BasicBlock`` (``ebkernels.models.resnet`` or torchvision's): ``conv1 → bn1 → relu`` and
  ``conv2 → bn2`` on codes; the residual add and the final ReLU stay as they are.

Each fused container keeps its modules, Parameters, buffers, ``state_dict`` keys and type: only its
``forward`` is replaced, by an instance attribute (a ``FusedForward``), which ``unfuse`` removes
(``dequantize_model`` does). The ``FusedForward`` looks its layers up by name on every call and checks
them (types, hooks, settings), so pruning, ``SyncBatchNorm`` swaps or hooks added later fall back to the
original forward instead of running something else; so do autocast, double precision and inputs
other than float NCHW tensors.

A chain is left on the per-layer path when a layer has forward hooks, a conv has groups > 1, non-zero
padding modes, string padding, a float operand (``bits_* = None``) or WAGE's ``alpha != 1``, a BatchNorm
is not a plain ``nn.BatchNorm2d``, or a max-pool has dilation or returns indices (``ops.fused.block.supports``
says why for a conv). ``fused_chains(model)``
lists what was fused.

The weight codes of every fused conv come from one batch at the start of the model's forward (a forward
pre-hook on the model that ``fuse`` was given, ``ops.weight_batch``: two multi-program launches for all
weights instead of one single-program launch per layer); a block run outside it quantizes its own weight.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from .modules import QConv2d
from .ops.fused.block import BlockInput, BlockOutput, BlockSpec, fused_block, supports
from .ops.fused.stages import channel_major_input, weight_item
from .ops.weight_batch import pop_weight_batch, prepare_weight_batch, push_weight_batch

__all__ = ["fuse", "unfuse", "fused_chains", "FusedForward"]

log = logging.getLogger("ebkernels")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks")


def _no_hooks(m: nn.Module) -> bool:
    return not any(getattr(m, h, None) for h in _HOOKS)


def conv_ok(m) -> bool:
    """A QConv2d whose forward the fused block computes exactly."""
    return type(m) is QConv2d and _no_hooks(m) and supports(m) is None


def bn_ok(m) -> bool:
    return type(m) is nn.BatchNorm2d and _no_hooks(m)


def relu_ok(m) -> bool:
    return type(m) is nn.ReLU and _no_hooks(m)


def pool_ok(m) -> bool:
    if type(m) is not nn.MaxPool2d or not _no_hooks(m) or m.return_indices:
        return False
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    k, s, d = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.dilation)
    return d == (1, 1) and max(k) <= 11 and min(s) >= 1


def _pool_args(m: nn.MaxPool2d) -> tuple:
    pair = lambda v: [int(v[0]), int(v[1])] if isinstance(v, (tuple, list)) else [int(v), int(v)]  # noqa: E731
    return (pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding),
            bool(m.ceil_mode))


def _runnable(x) -> bool:
    """Inputs the fused blocks take; anything else runs the original forward."""
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and not torch.is_autocast_enabled(x.device.type) and x.numel() > 0)


# --------------------------------------------------------------------------------------------------
# Sequential runs
# --------------------------------------------------------------------------------------------------
def _sequential_chains(seq: nn.Sequential) -> list[tuple[int, int]]:
    """[start, end) index ranges of the fusable chains among the children of ``seq``."""
    mods = list(seq._modules.values())
    out, i = [], 0
    while i < len(mods):
        if i + 1 < len(mods) and conv_ok(mods[i]) and bn_ok(mods[i + 1]):
            end = i + 2
            if end < len(mods) and relu_ok(mods[end]):
                end += 1
                if end < len(mods) and pool_ok(mods[end]):
                    end += 1
            out.append((i, end))
            i = end
        else:
            i += 1
    return out


def _seq_specs(seq: nn.Sequential, chains) -> Optional[list]:
    """The segments of a fused Sequential: ("block", spec) or ("module", module); None if a chain no
    longer checks out."""
    mods = list(seq._modules.values())
    segs, i, c = [], 0, 0
    while i < len(mods):
        if c < len(chains) and chains[c][0] == i:
            start, end = chains[c]
            conv, bn = mods[start], mods[start + 1]
            rest = mods[start + 2:end]
            if not (conv_ok(conv) and bn_ok(bn) and all(relu_ok(m) or pool_ok(m) for m in rest)):
                return None
            relu = any(relu_ok(m) for m in rest)
            pool = next((_pool_args(m) for m in rest if type(m) is nn.MaxPool2d), None)
            segs.append(["block", BlockSpec(conv=conv, bn=bn, relu=relu, pool=pool)])
            i, c = end, c + 1
        else:
            segs.append(["module", mods[i]])
            i += 1
    for k, seg in enumerate(segs):  # codes between adjacent blocks, float elsewhere
        if seg[0] != "block":
            continue
        prev_block = k > 0 and segs[k - 1][0] == "block" and segs[k - 1][1].output is BlockOutput.CODES
        seg[1].input = BlockInput.CODES if prev_block else BlockInput.FLOAT
        nxt = segs[k + 1] if k + 1 < len(segs) else None
        if nxt is not None and nxt[0] == "block":
            seg[1].output, seg[1].out_qconfig = BlockOutput.CODES, nxt[1].conv.qconfig
            seg[1].out_channel_major = seg[1].pool is None and channel_major_input(nxt[1].conv)
        else:
            seg[1].output = BlockOutput.FLOAT
    return segs


# --------------------------------------------------------------------------------------------------
# Residual blocks of ebkernels.models / torchvision
# --------------------------------------------------------------------------------------------------
def _is_preact_bottleneck(m) -> bool:
    from .models.preresnet import Bottleneck, ChannelSelection
    return (isinstance(m, Bottleneck) and type(m).forward is Bottleneck.forward
            and isinstance(getattr(m, "select", None), ChannelSelection))


def _bottleneck_specs(b) -> Optional[list]:
    if not (bn_ok(b.bn1) and relu_ok(b.relu) and conv_ok(b.conv1) and bn_ok(b.bn2) and conv_ok(b.conv2)
            and bn_ok(b.bn3) and conv_ok(b.conv3) and _no_hooks(b.select)):
        return None
    return [BlockSpec(conv=b.conv1, input=BlockInput.BN, bn_in=b.bn1, relu_in=True, select=b.select, bn=b.bn2,
                      relu=True, output=BlockOutput.CODES, out_qconfig=b.conv2.qconfig),
            BlockSpec(conv=b.conv2, bn=b.bn3, relu=True, output=BlockOutput.CODES, out_qconfig=b.conv3.qconfig,
                      out_channel_major=channel_major_input(b.conv3)),
            BlockSpec(conv=b.conv3, output=BlockOutput.FLOAT)]


def _is_basic_block(m) -> bool:
    f = type(m).forward
    from .models.resnet import BasicBlock
    known = f is BasicBlock.forward or (f.__module__ == "torchvision.models.resnet"
                                        and f.__qualname__ == "BasicBlock.forward")
    return known and all(hasattr(m, a) for a in ("conv1", "bn1", "relu", "conv2", "bn2", "downsample"))


def _basic_specs(b) -> Optional[list]:
    if not (conv_ok(b.conv1) and bn_ok(b.bn1) and relu_ok(b.relu) and conv_ok(b.conv2) and bn_ok(b.bn2)):
        return None
    return [BlockSpec(conv=b.conv1, input=BlockInput.FLOAT, bn=b.bn1, relu=True, output=BlockOutput.CODES,
                      out_qconfig=b.conv2.qconfig),
            BlockSpec(conv=b.conv2, bn=b.bn2, relu=False, output=BlockOutput.FLOAT)]


# --------------------------------------------------------------------------------------------------
class FusedForward:
    """The replacement ``forward`` of one container (see the module docstring). ``kind``: "sequential",
    "bottleneck" or "basic"."""

    def __init__(self, module: nn.Module, kind: str, chains=None):
        self.module = module
        self.kind = kind
        self.chains = chains
        self._cache_key = None
        self._cache = None

    def _specs(self):
        # rebuilt (and re-checked) whenever a layer is replaced, retyped, hooked or re-configured
        key = tuple((id(m), type(m), _no_hooks(m), id(getattr(m, "qconfig", None)))
                    for m in self.module._modules.values())
        if key != self._cache_key:
            m = self.module
            if self.kind == "sequential":
                self._cache = _seq_specs(m, self.chains)
            elif self.kind == "bottleneck":
                self._cache = _bottleneck_specs(m)
            else:
                self._cache = _basic_specs(m)
            self._cache_key = key
        return self._cache

    def original(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != 1 or not _runnable(args[0]):
            return self.original(*args, **kwargs)
        specs = self._specs()
        if specs is None:
            return self.original(*args)
        x = args[0]
        if self.kind == "sequential":
            return self._run_sequential(specs, x)
        if self.kind == "bottleneck":
            return self._run_bottleneck(specs, x)
        return self._run_basic(specs, x)

    @staticmethod
    def _run_sequential(segs, x):
        for kind, item in segs:
            if kind == "block":
                x = fused_block(item, x)
            else:
                x = item(x)
        return x

    def _run_bottleneck(self, specs, x):
        b = self.module
        a = fused_block(specs[0], x)
        a = fused_block(specs[1], a)
        out = fused_block(specs[2], a)
        residual = x if b.downsample is None else b.downsample(x)
        return out + residual

    def _run_basic(self, specs, x):
        b = self.module
        a = fused_block(specs[0], x)
        out = fused_block(specs[1], a)
        identity = x if b.downsample is None else b.downsample(x)
        return b.relu(out + identity)

    def block_specs(self) -> list:
        """The ``BlockSpec`` of every fused block of this container (none when it falls back)."""
        specs = self._specs() or []
        if self.kind == "sequential":
            return [item for kind, item in specs if kind == "block"]
        return list(specs)

    def describe(self, name: str) -> list[str]:
        specs = self._specs() or []
        if self.kind == "sequential":
            mods = list(self.module._modules.keys())
            return [f"{name}[{mods[s]}..{mods[e - 1]}]: " + "→".join(
                type(self.module._modules[mods[j]]).__name__ for j in range(s, e)) for s, e in self.chains]
        if self.kind == "bottleneck":
            return [f"{name}: bn1→select→relu→conv1→bn2→relu, conv2→bn3→relu, conv3 (int8 codes between)"] if specs else []
        return [f"{name}: conv1→bn1→relu, conv2→bn2 (int8 codes between)"] if specs else []

    def __repr__(self) -> str:
        return f"FusedForward({self.kind})"


def _weight_batch_pre_hook(model: nn.Module, args) -> None:
    """Forward pre-hook of the fused model: the codes of every fused conv weight in one batch
    (``ops.weight_batch``), active until the forward returns (``_weight_batch_hook``). Not under
    ``torch.compile``: the batch is a host-side cache keyed on storage addresses and versions, which a trace
    cannot guard; there every block quantizes its own weight (the same codes, a batch of one)."""
    if torch.compiler.is_compiling():
        return
    x = args[0] if len(args) == 1 else None
    batch = None
    if _runnable(x):  # what the fused blocks take; otherwise they run the original forwards
        items = [weight_item(spec, x) for m in model.modules()
                 if isinstance(m.__dict__.get("forward"), FusedForward) for spec in m.forward.block_specs()]
        if items:
            batch = prepare_weight_batch(items)
    push_weight_batch(batch)


def _weight_batch_hook(model: nn.Module, args, out) -> None:
    if not torch.compiler.is_compiling():
        pop_weight_batch()


def _weight_batch_hooks(model: nn.Module, install: bool) -> None:
    """Install (once) or remove the weight-batch hooks of ``model``."""
    for hooks, fn in ((model._forward_pre_hooks, _weight_batch_pre_hook), (model._forward_hooks, _weight_batch_hook)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    if install:
        model.register_forward_pre_hook(_weight_batch_pre_hook)
        model.register_forward_hook(_weight_batch_hook, always_call=True)


def fuse(model: nn.Module) -> list[str]:
    """Install fused forwards on every container of ``model`` with a provable chain (quantize first:
    only QConv2d layers fuse). Returns the fused chains, one line each."""
    lines = []
    for name, m in model.named_modules():
        if isinstance(m.__dict__.get("forward"), FusedForward):
            lines += m.forward.describe(name or "<model>")
            continue
        ff = None
        if type(m) is nn.Sequential:
            chains = _sequential_chains(m)
            if chains:
                ff = FusedForward(m, "sequential", chains)
        elif _is_preact_bottleneck(m) and _bottleneck_specs(m) is not None:
            ff = FusedForward(m, "bottleneck")
        elif _is_basic_block(m) and _basic_specs(m) is not None:
            ff = FusedForward(m, "basic")
        if ff is not None:
            m.forward = ff
            lines += ff.describe(name or "<model>")
    _weight_batch_hooks(model, bool(lines))
    for line in lines:
        log.info("fused int8 chain: %s", line)
    return lines


def unfuse(model: nn.Module) -> int:
    """Remove every fused forward (back to the modules' own forward); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), FusedForward):
            del m.__dict__["forward"]
            n += 1
    _weight_batch_hooks(model, False)
    return n


def fused_chains(model: nn.Module) -> list[str]:
    """One line per fused chain of ``model`` (empty when nothing is fused)."""
    lines = []
    for name, m in model.named_modules():
        ff = m.__dict__.get("forward")
        if isinstance(ff, FusedForward):
            lines += ff.describe(name or "<model>")
    return lines
