"""One real training step of a model, recorded: forward, cross-entropy, backward, SGD step.

Modes (what ``--modes`` takes): ``int8-fused`` (``quantize_model``, the default fused blocks), ``int8-layer``
(``quantize_model(fuse=False)``), ``bf16`` (autocast), ``fp32``. Every mode builds the model CIFAR-sized
(32×32 RGB input, 10 classes), channels-last, as ``bench_epoch.py`` runs it on a GPU, with SGD (lr 0.1,
momentum 0.9, weight decay 1e-4; ``foreach=True``: the multi-tensor kernels a GPU step uses). A warm-up
step runs first (momentum buffers, counter pools, kernel rewrites), then the recorded ones: the modes compared
take turns (``record_steps``), so that their host times are measured in the same spells of this CPU.

- int8 modes run for real on CPU tensors under ``TRITON_INTERPRET=1`` with every Triton launch recorded and
  not executed: the wrappers, the tile planning (for the priced card: ``EBKERNELS_PLAN_SMS``, set by
  ``benchmarks/cost_model.py`` before ebkernels is imported) and the PyTorch ops around them run at the
  real shapes (kernel outputs are left unwritten: the values are garbage, the shapes and launches are
  not; nothing in a step reads a value back to the host).
- float modes run under ``FakeTensorMode`` (shapes only, no arithmetic: a batch-256 fp32 VGG16 step would
  take minutes on 2 cores), with CPU autocast for bf16: convolutions and matmuls in bf16, as CUDA autocast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .trace import AtenOp, Recorder, calibrate

__all__ = ["MODES", "ConvLayer", "StepTrace", "conv_layers", "record_steps", "plain_host_us",
           "PlainHost"]

MODES = ("int8-fused", "int8-layer", "bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A convolution of the network as the float model runs it (real channel counts)."""

    cin: int
    cout: int
    kh: int
    kw: int
    stride: tuple
    padding: tuple
    h: int
    w: int
    groups: int


@dataclasses.dataclass
class StepTrace:
    net: str
    mode: str
    batch: int
    events: list
    host_tail_us: float
    wall_s: float  # wall time of the recorded step on this CPU (aten compute included)
    calibration: tuple  # (dispatch-mode entry s, trivial aten dispatch s)
    layers: list  # ConvLayer, in forward order
    input_numel: int  # the smallest convolution input (activation size threshold of the copy count)
    opt_start: int = -1  # index of the optimizer step's first event (-1: not marked)

    @property
    def fwd_bwd_events(self) -> list:
        """The events of forward + backward: those before the optimizer step's first (all when not marked)."""
        return self.events[:self.opt_start] if self.opt_start >= 0 else self.events

    @property
    def fwd_bwd_host_us(self) -> float:
        """The recorder's host time of forward + backward."""
        return sum(e.host_us for e in self.fwd_bwd_events)

    @property
    def fwd_bwd_aten_calls(self) -> int:
        """The aten ops forward + backward calls (allocations and views included, inside the custom ops too): an
        exact count of host work, where the host times move with the CPU (each costs ~2-5 µs of Python and
        dispatch on this CPU)."""
        return sum(1 for e in self.fwd_bwd_events if isinstance(e, AtenOp))

    @property
    def map_sizes(self) -> set:
        """(H, W) of every convolution's input and output: what an activation looks like."""
        out = set()
        for c in self.layers:
            out.add((c.h, c.w))
            out.add(((c.h + 2 * c.padding[0] - c.kh) // c.stride[0] + 1,
                     (c.w + 2 * c.padding[1] - c.kw) // c.stride[1] + 1))
        return out


def _model_kwargs(name: str, small_stem: bool, width: float) -> dict:
    kw = {}
    if name.startswith("torchvision:"):
        kw["small_stem"] = small_stem
    if width != 1.0:
        kw["width"] = width
    return kw


def build(name: str, mode: str, small_stem: bool = False, width: float = 1.0) -> nn.Module:
    import ebkernels
    from ebkernels.models import is_grouped_conv

    torch.manual_seed(0)
    model = ebkernels.build_model(name, num_classes=10, in_channels=3, **_model_kwargs(name, small_stem, width))
    model = model.to(memory_format=torch.channels_last).train()
    if mode.startswith("int8"):
        ebkernels.quantize_model(model, skip=is_grouped_conv, fuse=mode == "int8-fused")
    return model


def conv_layers(name: str, small_stem: bool = False, width: float = 1.0, hw: int = 32) -> list:
    """Every ``nn.Conv2d`` call of one float forward at batch 1, with its input size."""
    model = build(name, "fp32", small_stem, width)
    found = []

    def hook(mod, inp):
        x = inp[0]
        found.append(ConvLayer(mod.in_channels, mod.out_channels, *mod.kernel_size, tuple(mod.stride),
                               tuple(mod.padding), x.shape[2], x.shape[3], mod.groups))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, hw, hw))
    for h in handles:
        h.remove()
    return found


def _fake(model: nn.Module, fm) -> None:
    """Parameters and buffers as fake tensors of ``fm`` (same shapes, strides, dtypes)."""
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = nn.Parameter(fm.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for k, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[k] = fm.from_tensor(b)


def _check_mode(mode: str) -> None:
    """A mode ``MODES`` names; an int8 one only with the interpreter set before ebkernels was imported."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; accepted: {', '.join(MODES)}")
    if mode.startswith("int8") and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("int8 modes need TRITON_INTERPRET=1 set before ebkernels is imported")


class _StepRunner:
    """One mode's model, input, optimizer and step function, built and warmed up (``record_steps``)."""

    def __init__(self, name: str, mode: str, batch: int, small_stem: bool, width: float, hw: int, calibration):
        _check_mode(mode)
        self.mode, self.calibration = mode, calibration
        model = build(name, mode, small_stem, width)
        self.ctx = contextlib.nullcontext()
        if mode in ("bf16", "fp32"):
            from torch._subclasses.fake_tensor import FakeTensorMode

            self.ctx = FakeTensorMode()
            _fake(model, self.ctx)
        with self.ctx:
            self.x = torch.randn(batch, 3, hw, hw).contiguous(memory_format=torch.channels_last)
            self.y = torch.randint(0, 10, (batch,))
            self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
        self.model, self.amp = model, torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")
        self.runs: list = []  # (Recorder, wall s) per recorded step
        self.run(record=False)  # warm-up, launches stubbed too

    def _step(self, rec: Optional[Recorder]):
        self.opt.zero_grad(set_to_none=True)
        with self.amp:
            out = self.model(self.x)
        F.cross_entropy(out.float(), self.y).backward()
        if rec is not None:
            rec.opt_start = len(rec.events)  # where the optimizer's events start
        self.opt.step()

    def run(self, record: bool = True):
        rec = Recorder(*self.calibration)
        gc.collect()
        gc.disable()
        t = time.perf_counter()
        try:
            with self.ctx, rec:
                self._step(rec if record else None)
        finally:
            gc.enable()
        if record:
            self.runs.append((rec, time.perf_counter() - t))


def record_steps(name: str, modes, batch: int, small_stem: bool = False, width: float = 1.0, hw: int = 32,
                 repeats: int = 2) -> dict:
    """{mode: StepTrace}: every mode's model built and warmed up, then ``repeats`` rounds in which each mode records
    one step, the modes in alternating order (forward, then backward), so that a quiet or a busy spell of this
    shared CPU falls on every mode alike and the modes' host times compare (the eager ratios). Each trace has the
    events of its mode's first recorded step, each event's host time the minimum over the repeats (the same
    launches in the same order: a quieter repeat is a truer host cost)."""
    layers = conv_layers(name, small_stem, width, hw)
    calibration = calibrate()
    runners = [_StepRunner(name, mode, batch, small_stem, width, hw, calibration) for mode in modes]
    for r in range(repeats):
        for runner in (runners if r % 2 == 0 else runners[::-1]):
            runner.run()
    smallest = min((batch * c.cin * c.h * c.w for c in layers), default=batch)
    out = {}
    for runner in runners:
        first = runner.runs[0][0]
        for rec, _ in runner.runs[1:]:
            if len(rec.events) == len(first.events):
                for a, b in zip(first.events, rec.events):
                    a.host_us = min(a.host_us, b.host_us)
                first.host_tail_us = min(first.host_tail_us, rec.host_tail_us)
        out[runner.mode] = StepTrace(name, runner.mode, batch, first.events, first.host_tail_us,
                                     min(w for _, w in runner.runs), calibration, layers, smallest,
                                     first.opt_start)
    return out


class PlainHost(NamedTuple):
    """``plain_host_us``'s figures: forward + backward host µs, and the launch layer's part of it."""

    total_us: float  # CPU time of the Python thread, forward + backward (the least of the repeats)
    ops_us: float  # of it, inside the custom ops (dispatch check, planning, allocation, argument packing, the launch)
    launches: int  # Triton launches forward + backward (all of them inside custom ops)

    @property
    def per_launch_us(self) -> float:
        """The launch layer per launch: issue 20's "eager host cost per launch (custom-op dispatch, planning,
        argument packing, the launcher)"."""
        return self.ops_us / max(1, self.launches)


def plain_host_us(name: str, mode: str, small_stem: bool = False, width: float = 1.0, hw: int = 32, batch: int = 2,
                  repeats: int = 15) -> Optional[PlainHost]:
    """The cross-check of the recorder's host figure, int8 modes (None for the float ones, whose ops compute here):
    CPU time of the Python thread for one forward + backward with the Triton launches stubbed and no dispatch
    mode at all (no op charged a mode's cost or a calibrated dispatch floor, no recorder bookkeeping), the least
    of ``repeats`` after two warm-up steps. At a small ``batch``, so that the aten ops an int8 step runs here
    (allocations, views, the loss) do next to no arithmetic and no large buffer is mapped and unmapped; the host
    work itself does not depend on the batch (plans are made once per shape). The optimizer step is left out:
    its foreach ops would compute on the CPU over every parameter.

    Then, in as many more steps, the time inside the custom ops (outermost calls, wall clock: ``perf_counter``
    costs 0.1 µs where ``thread_time`` costs ~0.8; the least of the repeats) and the launches they make: the
    launch layer (``PlainHost.per_launch_us``). The timer's own calls stay in that figure (charge more)."""
    _check_mode(mode)
    if not mode.startswith("int8"):
        return None
    import triton.runtime.interpreter as ti

    from ebkernels.ops import _dispatch

    model = build(name, mode, small_stem, width)
    x = torch.randn(batch, 3, hw, hw).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward():
        for p in params:
            p.grad = None
        F.cross_entropy(model(x).float(), y).backward()

    def least(step) -> float:
        best = float("inf")
        for _ in range(repeats):
            gc.collect()
            gc.disable()
            try:
                best = min(best, step())
            finally:
                gc.enable()
        return best

    def timed_step() -> float:
        t = time.thread_time()
        forward_backward()
        return time.thread_time() - t

    inside = [0.0, 0, 0]  # seconds in ops, launches, nesting depth
    plain_call = _dispatch.DirectOp.__call__

    def timed_call(op, *args, **kwargs):
        if inside[2]:
            return plain_call(op, *args, **kwargs)
        inside[2] = 1
        t = time.perf_counter()
        try:
            return plain_call(op, *args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t
            inside[2] = 0

    def ops_step() -> float:
        inside[0] = 0.0
        forward_backward()
        return inside[0]

    orig = ti.InterpretedFunction.run

    def stub(self, *args, grid, warmup, **kwargs):  # stubbed, as under the recorder
        inside[1] += 1

    ti.InterpretedFunction.run = stub
    try:
        forward_backward()
        forward_backward()
        total = least(timed_step)
        _dispatch.DirectOp.__call__ = timed_call
        inside[1] = 0
        forward_backward()
        launches = inside[1]
        ops = least(ops_step)
    finally:
        ti.InterpretedFunction.run = orig
        _dispatch.DirectOp.__call__ = plain_call
    return PlainHost(total * 1e6, ops * 1e6, launches)
