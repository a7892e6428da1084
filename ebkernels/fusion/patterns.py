"""What the fused kernels can compute, as small declarative patterns over the nodes of a traced graph, and
what each node is (its *role*): the only place that names layer types.

A pattern is a sequence of steps, each a role, optional (``?``) or not; ``matcher`` walks the graph along
single-use edges and takes the longest match. The roles:

- ``conv``: a ``QConv2d`` call the fused block computes exactly (``ops.fused.block.supports`` says so);
- ``bn``: an ``nn.BatchNorm2d`` call (exact type: a subclass or ``SyncBatchNorm`` may compute differently);
- ``act``: ReLU, ReLU6, SiLU, Hardswish as a module (``nn.ReLU`` ...), a function (``F.relu``, ``torch.relu``
  ...) or a tensor method (``x.relu()``); no activation is the identity;
- ``gather``: a channel gather between a BatchNorm and its activation: a module whose type says
  ``gathers_channels = True`` and holds the kept channels as the int64 buffer ``indices`` (the pruned
  pre-activation ResNets' ``ChannelSelection``);
- ``pool``: an ``nn.MaxPool2d`` the codes max-pool runs (dilation 1, no indices returned);
- ``add``: a residual add (``operator.add`` / ``torch.add`` of two tensors, or ``x.add(y)``) right after a conv's
  BatchNorm, then at most a ReLU / ReLU6 (their backward is a mask: ``ops.fused.bn_add_act``); or right after a
  conv on codes (the pre-activation shortcut: added in the GEMM's epilogue).

Each role also has a *reason* why a node that looks like it (a BatchNorm of another type, a layer with hooks,
a double-precision layer) cannot fuse: ``matcher`` logs it, once, and leaves the chain on the per-layer path.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..modules import QConv2d
from ..ops.fused.block import supports

__all__ = ["Pattern", "PRE_ACTIVATION", "POST_ACTIVATION", "BN_ACT", "CONV_ON_CODES", "PATTERNS", "Role", "role_of",
           "hooked", "pool_args", "HOOK_DICTS", "FUSED_DTYPE"]

# the hook dictionaries a fused chain would bypass (its modules are not called)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
FUSED_DTYPE = torch.float32  # the parameter dtype of the layers a fused chain takes

_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
                  F.silu: "silu", F.hardswish: "hardswish"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A chain the fused kernels compute: ``steps`` are roles in graph order, ``?`` marks an optional one."""

    name: str
    steps: tuple

    def __str__(self) -> str:
        return self.name


# pre-activation (the residual stream of PreResNet, DenseNet's concatenations, a float conv's output):
# BN [→ gather] [→ act] → conv [→ BN [→ add] [→ act]] [→ max-pool]
PRE_ACTIVATION = Pattern("BN → act → conv", ("bn", "gather?", "act?", "conv", "bn?", "add?", "act?", "pool?"))
# post-activation (VGG, ResNet, MobileNet, EfficientNet, RegNet): conv → BN [→ add] [→ act] [→ max-pool]
POST_ACTIVATION = Pattern("conv → BN → act", ("conv", "bn", "add?", "act?", "pool?"))
# a BatchNorm + activation whose output feeds no int8 conv (before a depthwise conv, a squeeze-excitation,
# the global pool)
BN_ACT = Pattern("BN → act", ("bn", "gather?", "act"))
# a conv alone, only where its input arrives as int8 codes from another chain (PreResNet's conv3, DenseNet's
# conv2): the block reads the codes as they are; a residual add right after it (PreResNet's shortcut) runs in
# the conv's epilogue
CONV_ON_CODES = Pattern("conv on codes", ("conv", "add?"))
PATTERNS = (PRE_ACTIVATION, POST_ACTIVATION, BN_ACT)  # tried from their first node; CONV_ON_CODES after them


@dataclasses.dataclass
class Role:
    """What a node is: ``kind`` (a role of the patterns, or None), the module it calls (None for a function),
    the activation name (``act``), and ``refused``: why it looks like that role but cannot fuse (or None)."""

    kind: Optional[str]
    module: Optional[nn.Module] = None
    act: Optional[str] = None
    refused: Optional[str] = None


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has a hook in one of ``HOOK_DICTS`` (the fused forward asks this of every fused module at every
    call, ``runner.Plan.current``)."""
    d = m.__dict__
    for h in HOOK_DICTS:  # a plain loop over the instance dict (no getattr, no generator)
        if d.get(h):
            return True
    return False


def _dtype_refusal(m: nn.Module) -> Optional[str]:
    for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t is not None and t.is_floating_point() and t.dtype != FUSED_DTYPE:
            return f"its {name} is {str(t.dtype)[6:]} (fused chains take {str(FUSED_DTYPE)[6:]} layers)"
    return None


def _module_role(m: nn.Module) -> Role:
    t = type(m)
    if isinstance(m, nn.Conv2d):
        if t is not QConv2d:
            return Role(None)  # a float conv (skipped by quantize_model): not a candidate
        why = supports(m) or _dtype_refusal(m) or ("it has hooks" if hooked(m) else None)
        return Role("conv", m, refused=why)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        why = None if t is nn.BatchNorm2d else f"it is a {t.__name__}, not an nn.BatchNorm2d"
        return Role("bn", m, refused=why or _dtype_refusal(m) or ("it has hooks" if hooked(m) else None))
    if t in _ACT_MODULES:
        return Role("act", m, _ACT_MODULES[t], refused="it has hooks" if hooked(m) else None)
    if getattr(t, "gathers_channels", False) and isinstance(getattr(m, "indices", None), torch.Tensor):
        return Role("gather", m, refused="it has hooks" if hooked(m) else None)
    if t is nn.MaxPool2d:
        k, s, d = (_pair(v) for v in (m.kernel_size, m.stride if m.stride is not None else m.kernel_size,
                                      m.dilation))
        why = ("it returns indices" if m.return_indices else "its dilation is not 1" if d != (1, 1)
               else "its window is larger than 11" if max(k) > 11 else "it has hooks" if hooked(m) else None)
        return Role("pool", m, refused=why)
    return Role(None)


def _pair(v) -> tuple:
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


_ADD_FUNCTIONS = (operator.add, torch.add)


def role_of(node: fx.Node, modules: dict) -> Role:
    """The role of ``node`` of a graph traced from a model whose ``named_modules()`` are ``modules``. A
    function or method activation counts only with the tensor as its one positional argument (``inplace``
    as a keyword is fine: the fused chain writes a new tensor, which no one else sees)."""
    if node.op == "call_module":
        return _module_role(modules[node.target])
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and len(node.args) == 1:
        return Role("act", act=_ACT_FUNCTIONS[node.target])
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1 and not node.kwargs:
        return Role("act", act=_ACT_METHODS[node.target])
    two_tensors = len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    if two_tensors and ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
                        or (node.op == "call_method" and node.target == "add")):
        return Role("add")
    return Role(None)


def pool_args(m: nn.MaxPool2d) -> tuple:
    """(kernel, stride, padding, ceil_mode) pairs as ``BlockSpec.pool`` takes them."""
    k = list(_pair(m.kernel_size))
    s = list(_pair(m.stride if m.stride is not None else m.kernel_size))
    return k, s, list(_pair(m.padding)), bool(m.ceil_mode)

