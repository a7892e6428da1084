"""``--cuda-graphs`` (experimental: not yet run on a GPU): the search's training step replayed from a
CUDA graph, so the host launches one graph instead of a few hundred kernels per step.

What is captured: forward, loss, backward and the L1 subgradient on the BatchNorm scaling factors, for
one batch shape. The optimizer step stays eager (it reads the gradients the graph wrote). The int8
layers allow this because a training step makes no host read: scales, BatchNorm statistics and the
stochastic-rounding tickets (``ebkernels._rng``) all live on the device, so each replay draws fresh
noise. A batch of another shape (the last, smaller one) runs eagerly.

Capture needs warm-up iterations on a side stream; they run for real, so the model's buffers (running
statistics), the random state and the gradients are put back afterwards: the first replay is the
first training step, as without graphs.

Capturing a step yourself follows the same pattern (PyTorch's "whole network capture")::

    static_x, static_y = x.clone(), y.clone()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                   # warm-up: lazy allocations, Triton compilation
        for _ in range(3):
            F.cross_entropy(model(static_x), static_y).backward()
    torch.cuda.current_stream().wait_stream(s)
    opt.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = F.cross_entropy(model(static_x), static_y)
        loss.backward()
    for x, y in batches:                         # every step:
        static_x.copy_(x); static_y.copy_(y)
        g.replay()                               # writes loss and the .grad tensors
        opt.step()                               # no zero_grad(set_to_none=True): grads are static

(restore the model's buffers after the warm-up if the extra iterations must not count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _rng

__all__ = ["GraphedStep"]

WARMUP = 3


class GraphedStep:
    """One captured training step of ``model`` (see the module docstring)."""

    def __init__(self, model, bns, sparsity: float, autocast):
        self.model, self.bns, self.sparsity, self.autocast = model, bns, sparsity, autocast
        self.graph = None
        self.shape = None

    def _body(self, x, y):
        with self.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        if self.sparsity > 0:
            grads = [bn.weight.grad for bn in self.bns]
            torch._foreach_add_(grads, torch._foreach_sign([bn.weight.detach() for bn in self.bns]),
                                alpha=self.sparsity)
        return loss, logits

    def _capture(self, x, y, opt):
        params = [p for p in self.model.parameters()]
        saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        saved_rng = _rng.get_state()
        self.static_x, self.static_y = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                opt.zero_grad(set_to_none=True)
                self._body(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        for b, v in zip(self.model.buffers(), saved_buffers):  # the warm-up steps do not count
            b.copy_(v)
        _rng.set_state(saved_rng)
        opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.logits = self._body(self.static_x, self.static_y)
        self.shape = (tuple(x.shape), tuple(y.shape))
        self.grads = [p.grad for p in params]

    def step(self, x, y, opt):
        """Loss and logits of one training step on (x, y); the gradients are left for ``opt.step()``."""
        if self.graph is None:
            self._capture(x, y, opt)
        if (tuple(x.shape), tuple(y.shape)) != self.shape:  # eager, into the same gradient tensors
            for g in self.grads:
                if g is not None:
                    g.zero_()
            return self._body(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.loss, self.logits
