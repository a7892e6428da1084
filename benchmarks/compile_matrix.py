"""``torch.compile(fullgraph=True)`` of quantized models against eager (issue 24 part 1), CPU or GPU.

For each model, fused (``quantize_model(m)``) and per-layer (``fuse=False``): graph breaks of the forward
(``torch._dynamo.explain``), then

- cold: a compiled before it ever ran, two steps (forward + ``sum().backward()``) against an eager twin b
  after the same ``ebkernels.manual_seed``;
- warm: b (after its eager steps) compiled, two steps against a (same state) eager.

Each row: pass (it compiled and ran), graph breaks, and bit-identical outputs, gradients, buffers (BatchNorm
running statistics) and random state, else the largest absolute / relative difference. Prints a markdown table.
On a GPU the Triton kernels run; on CPU the int8 ops take the PyTorch reference path, or the Triton kernels under
the interpreter with ``TRITON_INTERPRET=1`` (seconds per step: small models only). Per-layer models keep
``nn.BatchNorm2d``, whose float math inductor generates afresh: an ulp there may move an int8 code downstream, so
expect small differences (not bit-identity) from the per-layer rows on inductor.

    python benchmarks/compile_matrix.py [--models vgg11,preresnet20,resnet18] [--backends inductor,aot_eager]
        [--size 8] [--modes fused,per-layer]
"""
from __future__ import annotations

import argparse
import os
import time
import traceback

import torch

import ebkernels
from ebkernels import _rng
from ebkernels._cli import comma_list
from ebkernels.models import build_model

MODELS = {
    "vgg11": lambda: build_model("vgg11", num_classes=10, in_channels=1, width=0.25),
    "preresnet20": lambda: build_model("preresnet20", num_classes=10, in_channels=1, width=0.25),
    "resnet18": lambda: build_model("torchvision:resnet18", num_classes=10, in_channels=1, small_stem=True),
}


def _model(name: str, fuse: bool, seed: int):
    torch.manual_seed(seed)
    return ebkernels.quantize_model(MODELS[name](), fuse=fuse)


def _step(f, model, x):
    out = f(x)
    out.float().sum().backward()
    grads = []
    for p in model.parameters():
        grads.append(p.grad.clone() if p.grad is not None else None)
        p.grad = None
    return [out.detach(), *grads, *[b.clone() for b in model.buffers()]]


def _diff(got: list, want: list) -> tuple[bool, float, float]:
    """(bit-identical, max abs diff, max rel diff) over paired tensors."""
    same, mabs, mrel = True, 0.0, 0.0
    for g, w in zip(got, want):
        if g is None or w is None:
            same = same and g is None and w is None
            continue
        if torch.equal(g, w):
            continue
        same = False
        if g.is_floating_point():
            d = (g.double() - w.double()).abs()
            mabs = max(mabs, d.max().item())
            mrel = max(mrel, (d / w.double().abs().clamp_min(1e-12)).max().item())
        else:
            mabs = max(mabs, (g.long() - w.long()).abs().max().item())
    return same, mabs, mrel


def run_case(name: str, fuse: bool, backend: str, size: int, seed: int = 1234) -> dict:
    x = torch.randn((2, 1, size, size), generator=torch.Generator().manual_seed(seed))
    a, b = _model(name, fuse, seed), _model(name, fuse, seed)
    row = {"model": name, "mode": "fused" if fuse else "per-layer", "backend": backend}
    torch._dynamo.reset()
    try:  # on a third twin: explain runs the model, and a must be cold (no plan, no state) when compiled
        explained = torch._dynamo.explain(_model(name, fuse, seed))(x)
        breaks = explained.graph_break_count
    except Exception as e:  # noqa: BLE001 - reported in the table
        breaks = f"explain failed: {type(e).__name__}"
    torch._dynamo.reset()
    for phase, (comp, eager) in (("cold", (a, b)), ("warm", (b, a))):
        r = dict(row, phase=phase, breaks=breaks)
        t0 = time.perf_counter()
        try:
            cm = torch.compile(comp, fullgraph=True, backend=backend)
            ebkernels.manual_seed(seed % 1000 + (phase == "warm"))
            got = [_step(cm, comp, x) for _ in range(2)]
            rng_c = _rng.get_state()
            ebkernels.manual_seed(seed % 1000 + (phase == "warm"))
            want = [_step(eager, eager, x) for _ in range(2)]
            same, mabs, mrel = _diff([t for s in got for t in s], [t for s in want for t in s])
            r.update(ok=True, same=same, abs=mabs, rel=mrel, rng=rng_c == _rng.get_state())
        except Exception as e:  # noqa: BLE001 - reported in the table
            r.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            traceback.print_exc()
        r["seconds"] = time.perf_counter() - t0
        print(r, flush=True)
        yield r


def table(rows: list) -> str:
    lines = ["| model | mode | phase | backend | result | graph breaks | vs eager | random state | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["ok"]:
            cmp = "bit-identical" if r["same"] else f"max abs {r['abs']:.3g}, rel {r['rel']:.3g}"
            res, rng = "pass", "same" if r["rng"] else "differs"
        else:
            cmp, res, rng = r["error"], "FAIL", "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['phase']} | {r['backend']} | {res} | {r['breaks']} | "
                     f"{cmp} | {rng} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=comma_list(accepted=MODELS, what="models"), default=list(MODELS),
                    help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--backends", type=comma_list(), default=["inductor"])
    ap.add_argument("--modes", type=comma_list(accepted=("fused", "per-layer"), what="modes"),
                    default=["fused", "per-layer"])
    ap.add_argument("--size", type=int, default=8, help="input side (batch 2, 1 channel)")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        for mode in args.modes:
            for backend in args.backends:
                rows += list(run_case(name, mode == "fused", backend, args.size))
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernels = "Triton kernels" if torch.cuda.is_available() else \
        "Triton interpreter" if interp else "PyTorch reference path"
    print(f"\ninput 2x1x{args.size}x{args.size}, torch {torch.__version__}, int8 ops: {kernels}\n")
    print(table(rows))
    return 0 if all(r["ok"] and r["breaks"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
