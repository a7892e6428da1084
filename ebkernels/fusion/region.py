"""The int8 region of a fused model: the values between its fused chains and int8 layers travel in bfloat16,
with or without ``torch.autocast`` (as the conv output y and the error between fused blocks already do).

Which nodes of the graph are in the region (``plan_region``): every chain's output; every ``QConv2d`` call
outside a chain and every float ``nn.Conv2d`` that reads a region value (a depthwise conv): these run under a
local bfloat16 autocast (``call_in_bf16``) when the caller has none, so an int8 layer hands on bfloat16 and a
float conv computes in bfloat16, as under autocast; every parameter-free operation (an add, a concatenation,
an activation, a pool) and every BatchNorm (which takes a bfloat16 input with float32 parameters) whose input
is in the region. A value leaves the region, cast back to the dtype its consumer expects (``exit_cast``; a
no-op under autocast, which casts by itself), where it reaches a layer with float parameters of its own (the
classifier head, a LayerNorm, a leaf container), an operation on a parameter of the model, or the model's
output (the model's parameter dtype). So the model's output, and what its float head reads, have the
dtype the per-layer path would give them.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..modules import QConv2d
from .patterns import role_of

__all__ = ["REGION_DTYPE", "Region", "plan_region", "call_in_bf16", "exit_cast"]

REGION_DTYPE = torch.bfloat16


@dataclasses.dataclass
class Region:
    """``in_bf16``: the call_module nodes run under a local bfloat16 autocast; ``casts``: node -> the dtype its
    region arguments are cast to before it runs; ``masked``: the ReLUs that keep a 1-byte mask instead of their
    output (``ops.fused.relu_mask``: no user of their output keeps it)."""

    in_bf16: set
    casts: dict
    masked: set = dataclasses.field(default_factory=set)


# operations that keep nothing of their inputs for backward (a ReLU feeding only these, chains and int8 layers
# need not keep its output)
_KEEP_NOTHING = {operator.add, operator.sub, torch.add, torch.sub, torch.cat, operator.getitem}


def _float_dtype(m: nn.Module) -> Optional[torch.dtype]:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _attr_dtype(root: nn.Module, target: str) -> Optional[torch.dtype]:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj.dtype if isinstance(obj, torch.Tensor) and obj.is_floating_point() else None


def _keeps_nothing_of(user: fx.Node, heads: set, in_bf16: set, modules: dict) -> bool:
    """Whether ``user`` keeps no copy of its input for backward: a chain that starts with its conv (it keeps
    codes; one that starts with a BatchNorm may keep its input itself), an int8 conv outside chains (codes), an
    add / concatenation, the model's output."""
    if user in heads or user.op == "output":
        return True
    if user in in_bf16:
        m = modules[user.target]
        return type(m) is QConv2d and m.qconfig.bits_a is not None
    return (user.op == "call_function" and user.target in _KEEP_NOTHING) or \
        (user.op == "call_method" and user.target in ("add", "sub"))


def _masked_relus(graph: fx.Graph, chains: list, in_bf16: set, modules: dict) -> set:
    heads = {c.nodes[0] for c in chains if c.role("conv") is c.roles[0]}  # a conv first: it keeps codes only
    taken = {n for c in chains for n in c.nodes}
    out = set()
    for n in graph.nodes:
        if n in taken or not n.all_input_nodes:
            continue
        role = role_of(n, modules)
        if role.kind == "act" and role.act == "relu" and role.refused is None and \
                all(_keeps_nothing_of(u, heads, in_bf16, modules) for u in n.users):
            out.add(n)
    return out


def plan_region(graph: fx.Graph, chains: list, modules: dict, root: nn.Module, model_dtype: torch.dtype) -> Region:
    """The region of ``graph`` given its ``chains`` (module docstring)."""
    inner = {n for c in chains for n in c.nodes[:-1]}
    outputs = {c.last for c in chains}
    inside, in_bf16, casts = set(), set(), {}
    for n in graph.nodes:
        if n in inner:
            continue
        if n in outputs:
            inside.add(n)
            continue
        reads = any(a in inside for a in n.all_input_nodes)
        if n.op == "call_module":
            m = modules[n.target]
            if type(m) is QConv2d or (reads and isinstance(m, nn.Conv2d)):
                in_bf16.add(n)
                inside.add(n)
            elif reads:
                dtype = _float_dtype(m)
                if dtype is None or isinstance(m, nn.modules.batchnorm._BatchNorm):
                    inside.add(n)
                else:
                    casts[n] = dtype
        elif n.op in ("call_function", "call_method") and reads:
            params = [d for d in (_attr_dtype(root, a.target) for a in n.all_input_nodes if a.op == "get_attr")
                      if d is not None]
            if params:
                casts[n] = params[0]
            else:
                inside.add(n)
        elif n.op == "output" and reads:
            casts[n] = model_dtype
    return Region(in_bf16, casts, _masked_relus(graph, chains, in_bf16, modules))


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def call_in_bf16(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` under a bfloat16 autocast, unless the caller already has one."""
    dev = _device_type(args)
    if torch.is_autocast_enabled(dev):
        return module(*args, **kwargs)
    with torch.autocast(dev, dtype=REGION_DTYPE):
        return module(*args, **kwargs)


def exit_cast(value, dtype: torch.dtype):
    """``value`` (a tensor or a structure of them) with its floating tensors in ``dtype``; as it is under
    autocast."""
    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype \
                and not torch.is_autocast_enabled(t.device.type):
            return t.to(dtype)
        return t

    return tree_map(cast, value)
