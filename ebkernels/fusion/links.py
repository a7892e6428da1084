"""Which fused blocks hand a gradient to another instead of returning it to autograd (``ops.fused.spec.GradLink``),
so that autograd's separate sum of two gradients of one tensor is done in a kernel that already writes one of
them (``bn_relu_bwd``'s addend). Two shapes of graph, both checked so that the taker's backward always runs
after the putter's:

- **a pre-activation shortcut**: ``x`` read only by a ``BN → act → conv`` chain and, as the residual, by a conv on
  codes whose epilogue adds it (PreResNet's block); the conv puts x's gradient from the add, the BN chain
  (whose output the conv depends on) takes it;
  when x is itself the output of a conv on codes (the previous block's conv3), x's whole gradient is the BN
  chain's, which also hands its max (and random ticket) to that conv, whose E quantization then skips its
  own max pass (``bn_relu_bwd(mode="float_absmax")``, ``quantize(amax=)``);
- **a dense block**: concatenation j = concatenation j-1 + one new piece, where concatenation j-1 is read only by
  a ``BN → act → conv`` chain and the new piece is the output of the chain that reads that chain's codes
  (DenseNet's layer); concatenation j (``ops.fused.dense_cat``) puts its whole gradient, the chain on
  concatenation j-1 takes its channel prefix, and concatenation j returns gradients for its new piece only.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from .patterns import CONV_ON_CODES, PRE_ACTIVATION

__all__ = ["Links", "grad_links", "cat_pieces"]


@dataclasses.dataclass
class Links:
    """Link ids: ``takes`` chain index -> link (the chain adds the link's gradient to its input's), ``puts`` chain
    index -> link (the chain's residual gradient goes there), ``cats`` concatenation node -> (link, passed: how
    many of its first pieces' gradients the link carries); ``amax_puts`` chain index -> link (the chain hands its
    input's gradient with its max), ``amax_takes`` chain index -> link (the chain quantizes that gradient, its
    output's, as its E with the max it gets)."""

    takes: dict = dataclasses.field(default_factory=dict)
    puts: dict = dataclasses.field(default_factory=dict)
    cats: dict = dataclasses.field(default_factory=dict)
    amax_puts: dict = dataclasses.field(default_factory=dict)
    amax_takes: dict = dataclasses.field(default_factory=dict)

    def new(self) -> int:
        return len(self.takes)


def cat_pieces(node: fx.Node) -> Optional[list]:
    """The pieces of a ``torch.cat`` along channels (dim 1 of NCHW) of graph values, or None."""
    if node.op != "call_function" or node.target is not torch.cat or not node.args:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    pieces = node.args[0]
    if dim not in (1, -3) or not isinstance(pieces, (list, tuple)) or \
            not all(isinstance(a, fx.Node) for a in pieces):
        return None
    return list(pieces)


def grad_links(graph: fx.Graph, chains: list) -> Links:
    """The links of ``graph`` between its ``chains`` (module docstring)."""
    links = Links()
    by_first = {c.nodes[0]: i for i, c in enumerate(chains)}
    by_last = {c.last: c for c in chains}
    index = {id(c): k for k, c in enumerate(chains)}
    for j, r in enumerate(chains):  # pre-activation shortcuts
        x = r.residual if r.pattern is CONV_ON_CODES else None
        if x is None or len(x.users) != 2:
            continue
        readers = [by_first.get(u) for u in x.users if u is not r.last]
        i = readers[0] if len(readers) == 1 else None
        if i is not None and chains[i].pattern is PRE_ACTIVATION and chains[i].source is x:
            links.takes[i] = links.puts[j] = links.new()
            r = by_last.get(x)  # x's whole gradient is then the BN chain's: its producer's E
            if r is not None and r.pattern is CONV_ON_CODES:
                links.amax_puts[i] = links.amax_takes[index[id(r)]] = ("amax", i)
    cats = {}
    for n in graph.nodes:  # dense blocks
        pieces = cat_pieces(n)
        if pieces is None:
            continue
        cats[tuple(pieces)] = n
        prev = cats.get(tuple(pieces[:-1]))
        if prev is None or len(prev.users) != 1:
            continue
        i = by_first.get(next(iter(prev.users)))
        if i is None or i in links.takes or chains[i].pattern is not PRE_ACTIVATION or chains[i].source is not prev:
            continue
        newest = by_last.get(pieces[-1])
        if newest is None or newest.source is not chains[i].last:
            continue  # the new piece must be computed from the taker's output (it then runs its backward later)
        links.takes[i] = lid = links.new()
        links.cats[n] = (lid, len(pieces) - 1)
    return links
