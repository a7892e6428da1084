"""Traces a model with ``torch.fx`` for the fuser: which modules are leaves (called as they are), which
containers the trace looked inside, and what to do with a module fx cannot trace.

Leaves: the int8 layers, every module without children (a layer: its forward may do anything), ``torch.nn``'s
own modules but ``nn.Sequential`` (fx's rule), and a module with hooks (looking inside it would skip them).
A container whose forward fx cannot trace (data-dependent control flow, a Python call on a traced value) is
found by name, reported in one line and traced again as a leaf: its layers then run the per-layer path while
the rest of the model still fuses. If the root's own forward cannot be traced, the whole model runs the
per-layer path (``trace`` returns None).

The graph is then simplified: ``nn.Identity`` calls (a stem's removed max-pool) are dropped, so chains run
through them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.fx as fx
import torch.nn as nn

from ..modules import QConv2d, QLinear
from .patterns import hooked

__all__ = ["Traced", "trace"]

_MAX_RETRIES = 64


class Traced:
    """A traced graph and the names of the containers the trace looked inside (their forward is baked into the
    graph: their hooks and ``training`` flags matter to it)."""

    def __init__(self, graph: fx.Graph, containers: list):
        self.graph = graph
        self.containers = containers


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set):
        super().__init__()
        self.leaves = leaves
        self.failed: Optional[str] = None
        self.containers: list = []

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaves or isinstance(m, (QConv2d, QLinear)) or not m._modules or hooked(m):
            return True
        return type(m) is not nn.Sequential and super().is_leaf_module(m, qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        self.containers.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost container the error came out of
                self.failed = name
            raise


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _drop_identities(graph: fx.Graph, modules: dict) -> None:
    for node in list(graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity and len(node.args) == 1 \
                and not node.kwargs and not hooked(modules[node.target]) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def trace(model: nn.Module, report: Callable[[str], None]) -> Optional[Traced]:
    """The simplified graph of ``model``'s forward, or None when its own forward is not traceable;
    ``report(line)`` gets one line per module that had to become a leaf, or for the whole model."""
    leaves: set = set()
    modules = dict(model.named_modules())
    for _ in range(_MAX_RETRIES):
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any failure of the trace is a reason to fall back
            name = tracer.failed
            if name is None or name in leaves:
                report(f"'{type(model).__name__}' is not traceable by torch.fx ({_why(exc)}): the whole model runs "
                       f"the per-layer path")
                return None
            report(f"'{name}' ({type(modules[name]).__name__}) is not traceable by torch.fx ({_why(exc)}): it runs "
                   f"as one layer on the per-layer path")
            leaves.add(name)
            continue
        _drop_identities(graph, modules)
        return Traced(graph, sorted(set(tracer.containers)))
    report(f"'{type(model).__name__}': more than {_MAX_RETRIES} modules are not traceable by torch.fx: the whole "
           f"model runs the per-layer path")
    return None
