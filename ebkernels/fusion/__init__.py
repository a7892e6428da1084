"""The fuser: finds, in the traced graph of any model (``torch.fx``), every chain the fused int8 kernels
compute and runs it as one fused block (``ops.fused.block``), handing int8 codes from chain to chain
(SPEC §9).

What fuses (``patterns``; ``matcher`` walks the graph): ``conv → BatchNorm [→ residual add] [→ act] [→
max-pool]``, pre-activation ``BatchNorm [→ channel gather] [→ act] → conv [→ BatchNorm [→ residual add] [→
act]] [→ max-pool]`` (the chain may start at a residual add, a concatenation, an input: anything whose value is
a float tensor), ``BatchNorm → act`` before a layer that is not an int8 conv, and a conv alone where its input
arrives as codes. After a residual add the activation is ReLU, ReLU6 or none and the output float (the add
changes the per-channel extremes codes need). ``act`` is
ReLU, ReLU6, SiLU, Hardswish (module, function or method) or none. The conv is a ``QConv2d`` the fused block
computes exactly (``ops.fused.block.supports``), the BatchNorm an ``nn.BatchNorm2d``, every layer float32
without hooks; a chain hands int8 codes to the chains that read it when all its users are convs with the same
activation quantizer, a bfloat16 tensor otherwise. Between the chains runs the int8 region (``region``):
residual adds, concatenations, grouped / depthwise convs and the int8 layers outside chains in bfloat16, with
or without autocast.

What does not: a model whose forward ``torch.fx`` cannot trace (a container that cannot be traced runs as one
layer; the root: the whole model runs the per-layer path), chains through layers with hooks, ``SyncBatchNorm``,
other dtypes or convs the kernels do not compute (grouped, float operands, non-zero padding modes): one log
line (INFO, logger "ebkernels") each, saying which module and why.

``fuse(model)`` installs a ``FusedForward`` (``runner``) as the model's ``forward`` (an instance attribute: the
modules, Parameters, buffers, ``state_dict`` and type stay); ``fused_chains(model)`` lists what was fused, one
line per chain; ``unfuse(model)`` removes it (``dequantize_model`` does).

The weight codes of every fused conv come from one batch at the start of the fused forward
(``ops.weight_batch``: two multi-program launches for all weights instead of launches per layer); a block
run outside it quantizes its own weight.
"""
from __future__ import annotations

import logging

import torch.nn as nn

from .runner import FusedForward

__all__ = ["fuse", "unfuse", "fused_chains", "FusedForward"]

log = logging.getLogger("ebkernels")


def unfuse(model: nn.Module) -> int:
    """Remove every fused forward from ``model`` and its modules (back to their own forward); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), FusedForward):
            del m.__dict__["forward"]
            n += 1
    return n


def fuse(model: nn.Module) -> list:
    """Trace ``model`` and install the fused forward when any chain fuses (quantize first: only ``QConv2d``
    layers fuse). Returns the fused chains, one line each (also logged at INFO)."""
    unfuse(model)
    if not model._modules:  # a bare layer: nothing to chain
        return []
    ff = FusedForward(model)
    plan = ff.plan()
    if plan.fn is None:
        return []
    model.forward = ff
    for line in plan.lines:
        log.info("fused int8 chain: %s", line)
    return list(plan.lines)


def fused_chains(model: nn.Module) -> list:
    """One line per fused chain of ``model`` (empty when nothing is fused)."""
    lines = []
    for m in model.modules():
        ff = m.__dict__.get("forward")
        if isinstance(ff, FusedForward):
            lines += ff.describe()
    return lines
