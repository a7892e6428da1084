"""Finds, on a traced graph, every chain the fused kernels compute (``patterns``), and decides what the chains
hand each other: int8 codes where every user of a chain's output is another chain's conv with the same
activation quantizer, a float tensor otherwise.

Matching is greedy in graph order (a topological order): at each node not yet taken, the patterns that start
with its role are tried in order (pre-activation first, so a BatchNorm that feeds a conv through its
activation starts a ``BN → act → conv`` chain rather than a ``BN → act`` one), and a pattern extends along
single-use edges only: a chain's inner values are never materialised, so nothing else may read them. A node
that has the role a step needs but cannot fuse (``Role.refused``: hooks, ``SyncBatchNorm``, another dtype, an
unsupported conv) ends the chain before it, or leaves it out when the step is required; ``match`` reports it
as one line naming the module and why.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch.fx as fx

from ..ops.fused.bn_add_act import MASKED_ACTIVATIONS
from .patterns import BN_ACT, CONV_ON_CODES, POST_ACTIVATION, PRE_ACTIVATION, Pattern, Role, role_of

__all__ = ["Chain", "match"]

_STARTS = {"bn": (PRE_ACTIVATION, BN_ACT), "conv": (POST_ACTIVATION,)}
_KWARGS_OK = {"inplace"}  # keyword arguments a chain step may carry (an in-place activation writes a new tensor)


@dataclasses.dataclass
class Chain:
    """One matched chain: its ``pattern``, ``nodes`` in graph order with their ``roles``, the node whose value
    feeds it (``source``), and what it takes and hands on (``codes_in`` / ``codes_out``; ``consumers``: the
    conv roles that read its codes)."""

    pattern: Pattern
    nodes: list
    roles: list
    codes_in: bool = False
    codes_out: bool = False
    consumers: list = dataclasses.field(default_factory=list)

    @property
    def source(self) -> fx.Node:
        return self.nodes[0].args[0]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]

    def role(self, kind: str, after_conv: bool = False) -> Optional[Role]:
        """The first role of ``kind`` (before the conv, or with ``after_conv`` after it)."""
        seen_conv = False
        for r in self.roles:
            if r.kind == "conv":
                if kind == "conv":
                    return r
                seen_conv = True
            elif r.kind == kind and seen_conv == after_conv:
                return r
        return None

    @property
    def residual(self) -> Optional[fx.Node]:
        """The tensor a residual add in the chain adds (None without one)."""
        for n, r in zip(self.nodes, self.roles):
            if r.kind == "add":
                return n.args[1] if n.args[0] in self.nodes else n.args[0]
        return None

    def describe(self) -> str:
        names = [n.target if n.op == "call_module" else f"{getattr(n.target, '__name__', n.target)}()"
                 for n in self.nodes]
        return (f"{' → '.join(names)} ({self.pattern}; {'codes' if self.codes_in else 'float'} in, "
                f"{'codes' if self.codes_out else 'float'} out)")


def _plain_args(node: fx.Node, first) -> bool:
    """``node`` reads ``first`` as its only positional argument, with no keyword but ``inplace``."""
    return len(node.args) == 1 and node.args[0] is first and set(node.kwargs) <= _KWARGS_OK


def _fits(cand: fx.Node, prev: Optional[fx.Node], kind: str, after_add: bool) -> bool:
    """The arguments of a step: the chain's value first and alone (an add: the chain's value and one other
    tensor, the residual); after an add, only an activation whose backward is a mask, and no pool."""
    if prev is None:
        return len(cand.args) == 1 and isinstance(cand.args[0], fx.Node) and set(cand.kwargs) <= _KWARGS_OK
    if kind == "add":
        return prev in cand.args and cand.args[0] is not cand.args[1]
    return _plain_args(cand, prev) and not (after_add and kind == "pool")


def _extend(pattern: Pattern, start: fx.Node, roles: dict, taken: set, strict: bool) -> Optional[list]:
    """The longest run of ``pattern`` from ``start`` (its nodes), or None. ``strict``: refused nodes do not
    fit (the real match); else they do (what would match without the refusals, for the report)."""
    nodes, prev, after_add = [], None, False
    for step in pattern.steps:
        kind, optional = step.rstrip("?"), step.endswith("?")
        if prev is None:
            cand = start
        else:
            users = list(prev.users)
            cand = users[0] if len(users) == 1 else None
        fits = (cand is not None and cand not in taken and roles[cand].kind == kind
                and (not strict or roles[cand].refused is None) and _fits(cand, prev, kind, after_add)
                and not (after_add and kind == "act" and roles[cand].act not in MASKED_ACTIVATIONS))
        if fits:
            after_add = after_add or kind == "add"
            nodes.append(cand)
            prev = cand
        elif not optional:
            return None
        elif kind == "bn" and prev is not None and roles[prev].kind == "conv":
            break  # what follows a conv's BatchNorm (its activation, the pool) needs that BatchNorm
    return nodes


def _refusals(pattern: Pattern, start: fx.Node, roles: dict, taken: set, got: Optional[list]) -> list:
    """Lines for the refused nodes that kept ``pattern`` from matching further than ``got``."""
    loose = _extend(pattern, start, roles, taken, strict=False)
    if not loose or (got is not None and len(loose) <= len(got)):
        return []
    out = []
    for n in loose[len(got or []):]:
        r = roles[n]
        if r.refused is not None:
            where = n.target if n.op == "call_module" else str(n.target)
            kind = type(r.module).__name__ if r.module is not None else "function"
            out.append(f"'{where}' ({kind}) does not fuse: {r.refused}; "
                       + (f"the {pattern} chain at '{start.target}' stops before it" if got else
                          "it stays on the per-layer path"))
            break
    return out


def _decide_codes(chains: list, roles: dict, taken: set) -> list:
    """Sets ``codes_in`` / ``codes_out``; adds a ``CONV_ON_CODES`` chain (with the residual add right after it, if
    any) for every free conv that reads a chain's codes; drops a trailing max-pool from a chain whose output stays float (the pool runs on codes only)."""
    heads = {c.nodes[0]: c for c in chains if c.pattern is POST_ACTIVATION}
    added = []
    for c in chains:
        if c.pattern is BN_ACT:
            continue
        out = c.last
        convs, fresh = [], []
        for u in out.users:
            if u in heads and u.args[0] is out:
                convs.append((u, heads[u]))
            elif (u not in taken and roles[u].kind == "conv" and roles[u].refused is None and _plain_args(u, out)):
                convs.append((u, None))
                fresh.append(u)
            else:
                convs = None
                break
        last_role = roles[out]
        # codes need the BatchNorm's per-channel extremes, which a residual add changes
        can_code = c.role("bn", after_conv=True) is not None and c.residual is None
        quant = {(r.module.qconfig.bits_a, r.module.qconfig.mode) for r in
                 (roles[u] for u, _ in convs or [])}
        if convs and can_code and len(quant) == 1:
            c.codes_out = True
            c.consumers = [roles[u] for u, _ in convs]
            for u, head in convs:
                if head is not None:
                    head.codes_in = True
            for u in fresh:
                nodes = _extend(CONV_ON_CODES, u, roles, taken, strict=True)
                taken.update(nodes)
                added.append(Chain(CONV_ON_CODES, nodes, [roles[n] for n in nodes], codes_in=True))
        elif last_role.kind == "pool":
            taken.discard(out)
            c.nodes.pop()
            c.roles.pop()
    return chains + added


def match(graph: fx.Graph, modules: dict, report: Callable[[str], None]) -> list:
    """The chains of ``graph`` (traced from a model whose ``named_modules()`` are ``modules``), in graph
    order; ``report(line)`` gets one line per refused layer that kept a chain from forming or growing."""
    roles = {n: role_of(n, modules) for n in graph.nodes}
    taken, chains = set(), []
    for node in graph.nodes:
        if node in taken or roles[node].kind not in _STARTS:
            continue
        for pattern in _STARTS[roles[node].kind]:
            nodes = _extend(pattern, node, roles, taken, strict=True)
            for line in _refusals(pattern, node, roles, taken, nodes):
                report(line)
            if nodes and (pattern is not BN_ACT or roles[nodes[-1]].kind == "act"):
                taken.update(nodes)
                chains.append(Chain(pattern, nodes, [roles[n] for n in nodes]))
                break
    chains = _decide_codes(chains, roles, taken)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(chains, key=lambda c: order[c.nodes[0]])
