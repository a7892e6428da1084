"""The model's figures for what ``benchmarks/gpu_session.py`` times, so that the first GPU run calibrates the
model instead of trusting it: per conv layer (int8 ``QConv2d`` and bf16 channels-last fwd+bwd), per kernel
of the profiled layers, per weight-grad (TMA kernel and generic one) and per training step (int8 fused and
bf16, eager and graph-captured). All predictions on the priced card (H100 unless ``--card``).

    python -m benchmarks.costing.session --out model.json [--dry-run] [--card h100]

It records on the CPU under the Triton interpreter (launches stubbed), so ``gpu_session.py`` runs it as a
subprocess, in the background while its CUDA tests run, and reads the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("EBKERNELS_PLAN_SMS", "132")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.costing.cards import RULES, card  # noqa: E402
from benchmarks.costing.price import price_trace, step_totals  # noqa: E402
from benchmarks.costing.step import StepTrace, _fake  # noqa: E402
from benchmarks.costing.trace import Recorder, calibrate  # noqa: E402

__all__ = ["record_call", "layer_figures", "main"]


def record_call(fn, batch: int, fake=None, repeats: int = 2):
    """Priced figures of one call of ``fn`` (after a warm-up): {device_us, graph_us, eager_us, host_cpu_us,
    kernels: {name: µs per call summed over its launches}}."""
    tramp, floor = calibrate(500)
    with Recorder(tramp, floor):
        fn()
    best = None
    for _ in range(repeats):
        rec = Recorder(tramp, floor)
        with rec:
            fn()
        if best is None or sum(e.host_us for e in rec.events) < sum(e.host_us for e in best.events):
            best = rec
    trace = StepTrace("call", "call", batch, best.events, best.host_tail_us, 0.0, (tramp, floor), [], 1)
    priced = price_trace(trace, card(CARD), RULES)
    t = step_totals(priced, best.host_tail_us, RULES)
    kernels: dict = {}
    for p in priced:
        if p.launches:
            kernels[p.name] = kernels.get(p.name, 0.0) + p.device_us
    return {"device_us": t["device_us"], "graph_us": t["graph_us"], "eager_us": t["eager_us"],
            "host_cpu_us": t["host_cpu_us"], "launches": t["launches"], "kernels": kernels}


CARD = "h100"


def _conv_closure(shape, impl: str, batch: int):
    """gpu_session's ``_layer`` on CPU tensors: int8 QConv2d fp32 channels-last, or a bf16 nn.Conv2d."""
    from ebkernels.modules import QConv2d

    torch.manual_seed(0)
    cls = QConv2d if impl == "int8" else nn.Conv2d
    dt = torch.bfloat16 if impl == "bf16-cl" else torch.float32
    layer = cls(shape.cin, shape.cout, shape.k, stride=shape.stride, padding=shape.pad, bias=False)
    layer = layer.to(dtype=dt, memory_format=torch.channels_last)
    return layer, dt


def layer_figures(shape, batch: int) -> dict:
    out = {}
    layer, dt = _conv_closure(shape, "int8", batch)
    x = torch.randn(batch, shape.cin, shape.h, shape.w).contiguous(memory_format=torch.channels_last).requires_grad_()
    gy = torch.empty_like(layer(x).detach()).contiguous(memory_format=torch.channels_last)
    params = tuple(layer.parameters())
    out["int8"] = record_call(lambda: torch.autograd.grad(layer(x), (x, *params), gy), batch)
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer, dt = _conv_closure(shape, "bf16-cl", batch)
    fm = FakeTensorMode()
    _fake(layer, fm)
    with fm:
        xb = torch.randn(batch, shape.cin, shape.h, shape.w, dtype=dt).contiguous(memory_format=torch.channels_last)
        xb.requires_grad_()
        gb = torch.empty_like(layer(xb).detach())
        pb = tuple(layer.parameters())
        out["bf16-cl"] = record_call(lambda: torch.autograd.grad(layer(xb), (xb, *pb), gb), batch)
    return out


def wgrad_figures(shape, batch: int) -> dict:
    """The weight-grad alone, TMA kernel (with its copies) and generic kernel (with the E copy)."""
    from ebkernels.config import QConfig, override
    from ebkernels.ops._launch import code_channels
    from ebkernels.ops.gemm.conv import weight_grad_op

    C, CO = code_channels(shape.cin), code_channels(shape.cout)
    OH = (shape.h + 2 * shape.pad - shape.k) // shape.stride + 1
    qx = torch.zeros(batch, C, shape.h, shape.w, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    qe = torch.zeros(batch, CO, OH, OH, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    s = torch.tensor(1.0)
    out = {}
    for tma in (True, False):
        def fn(copy=not tma, tma=tma):
            with override(wgrad_tma=tma):
                e = qe.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3) if copy else qe
                return weight_grad_op(e, qx, s, s, [shape.k] * 2, [shape.stride] * 2, [shape.pad] * 2, [1, 1], 1,
                                      QConfig(), [shape.cout, shape.cin])
        out["tma" if tma else "generic"] = record_call(fn, batch)
    return out


def compute(dry: bool) -> dict:
    from benchmarks import gpu_session as gs
    from benchmarks.cost_model import price_modes
    from benchmarks.shapes import CONV_SHAPES, SMOKE_CONV_SHAPES

    cfg = gs.DRY if dry else gs.FULL
    batch = cfg["batch"]
    shapes = list(SMOKE_CONV_SHAPES) if dry else [sh for net in ("vgg16", "preresnet101") for sh in CONV_SHAPES[net]]
    out = {"card": card(CARD).name, "batch": batch, "layers": {}, "profile": {}, "wgrad": {}, "steps": {}}
    for sh in shapes:
        out["layers"].setdefault(sh.label(), layer_figures(sh, batch))
    for sh in cfg["profile"]:
        out["profile"][sh.label()] = out["layers"].get(sh.label()) or layer_figures(sh, batch)
    for net in cfg["models"]:
        for sh in CONV_SHAPES[net]:
            if sh.stride == 1 and sh.k > 1 and sh.label() not in out["wgrad"]:
                out["wgrad"][sh.label()] = wgrad_figures(sh, batch)
        res = price_modes(net, batch, CARD, ("int8-fused", "bf16"), repeats=1)
        out["steps"][net] = {m: {k: v for k, v in r["totals"].items() if isinstance(v, (int, float))}
                             for m, r in res.items()}
    return out


def main(argv=None) -> int:
    global CARD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="gpu_session's --dry-run shapes (tiny, seconds)")
    ap.add_argument("--card", default="h100")
    args = ap.parse_args(argv)
    CARD = args.card
    data = compute(args.dry_run)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
