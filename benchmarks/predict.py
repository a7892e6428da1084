"""Roofline floors for the per-layer benchmark: predictions from SPEC §5 peaks, not measurements.

    python benchmarks/predict.py [--net vgg16] [--batch 256] [--k 3]

For each conv shape, the fwd+bwd time can be no lower than either
- the *compute floor*: 3 GEMMs (forward, dgrad, wgrad) of 2·N·OH·OW·Cout·Cin·KH·KW ops each, at the
  dense tensor peak (int8 1979 TOPS, bf16 989 TFLOP/s), or
- the *bytes floor*: the DRAM traffic of the pipeline at the HBM3 peak (3.35 TB/s).
The traffic models (bytes per element of the activation X (N·Cin·H·W) and of the output / error Y, E
(N·Cout·OH·OW); weights are small and left out):

int8, the current design (fp32 tensors at the layer boundary; quantizers run as separate kernels:
absmax pass, then code pass writing int8, which the GEMM reads back):
  X: quantize 4 (absmax) + 4 (codes) + 1 (write codes) + GEMM read 1 + dX write 4 + wgrad read 1 = 15
  Y: Y write 4 + quantize E 4 + 4 + 1 + dgrad read 1 + wgrad read 1                              = 15
int8, fully fused (absmax produced by the upstream epilogue, quantize-on-load in the GEMMs):
  X: read 4 + write saved codes 1 + wgrad read 1 + dX write 4 = 10;   Y: write 4 + E read 4 = 8
  (with the E read twice, once per backward GEMM: Y = 12)
bf16 cuDNN, channels-last: X: read 2 + wgrad read 2 + dX write 2 = 6;  Y: write 2 + E read 2 + 2 = 6.
Each GEMM is assumed to read each operand once (perfect tile reuse through L2), so all floors are
optimistic.

Blocks (conv → BatchNorm → ReLU, what a search step runs per conv; pools and residual adds, which
every pipeline has, are left out), bytes per element of X and Y for one fwd+bwd:

int8 per-layer (QConv2d + float nn.BatchNorm2d + nn.ReLU, fp32 between them): the conv as "int8
current" (15, 15), plus BN forward (statistics pass 4, normalise 4 + 4), ReLU (4 + 4), ReLU backward
(4 + 4 + 4), BN backward (reduce 4 + 4, apply 4 + 4 + 4): X 15, Y 67.
int8 fused block (ops/fused/block.py: y and dz in bfloat16, y recomputed in backward):
  X: conv reads codes 1 + recompute reads codes 1 + dX write (bf16) 2 + wgrad reads codes 1       = 5
  Y: y write 2 + apply reads y 2, writes codes 1 | recompute: dz read 2, y write 2 | E absmax: dz 2 +
     y 2 | E codes: dz 2 + y 2, writes NHWC 1 + channel-major 1 | dgrad reads E 1 | wgrad reads E 1 = 21
  and 4 GEMMs (forward, recompute, dgrad, wgrad). Where ``keeps_y`` (compute-bound layers, y kept in
  bfloat16 instead of recomputed): X 4 (no recompute read), Y 19 (no second y write), 3 GEMMs.
bf16 block (autocast, cuDNN channels-last, eager BN and ReLU in bf16): conv (6, 6) plus BN forward
(2 + 2 + 2), ReLU (2 + 2), ReLU backward (2 + 2 + 2), BN backward (2 + 2, 2 + 2 + 2): X 6, Y 32.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.common import markdown_table  # noqa: E402
from benchmarks.shapes import CONV_SHAPES  # noqa: E402

INT8_TOPS = 1979e12
BF16_TFLOPS = 989e12
HBM_BYTES_PER_S = 3.35e12

TRAFFIC = {  # bytes per element of (X, Y), the convolution alone
    "int8 current": (15, 15),
    "int8 fused": (10, 8),
    "bf16 cuDNN": (6, 6),
}
# The whole conv → BatchNorm → ReLU block, fwd+bwd (see the module docstring, "blocks"): what a search
# step really moves. GEMMs per block: 3, and 4 for the fused int8 flow (y recomputed in backward).
BLOCK_TRAFFIC = {  # bytes per element of (X, Y), GEMMs
    "int8 per-layer block": (15, 67, 3),
    "int8 fused block": (5, 21, 4),  # y recomputed; where ops/fused/block.keeps_y: FUSED_KEEP_Y
    "bf16 block": (6, 32, 3),
}
FUSED_KEEP_Y = (4, 19, 3)  # y kept in bfloat16: no recompute GEMM, no second y write, one codes read less


def floors(shape, batch: int) -> dict:
    ops = 3 * shape.gemm_ops(batch)
    x = batch * shape.cin * shape.h * shape.w
    y = batch * shape.cout * shape.oh * shape.ow
    out = {"gops": ops / 1e9, "int8 compute us": ops / INT8_TOPS * 1e6, "bf16 compute us": ops / BF16_TFLOPS * 1e6}
    for name, (bx, by) in TRAFFIC.items():
        out[f"{name} MB"] = (bx * x + by * y) / 1e6
        out[f"{name} bytes us"] = (bx * x + by * y) / HBM_BYTES_PER_S * 1e6
    return out


def table(net: str = "vgg16", batch: int = 256, k: int | None = 3):
    headers = ["layer", "×", "GOP fwd+bwd", "int8 compute µs", "int8 bytes µs (current)", "int8 bytes µs (fused)",
               "int8 floor µs (current)", "bf16 compute µs", "bf16 bytes µs", "bf16 floor µs",
               "best int8 speedup over bf16 (current / fused)"]
    rows = []
    for s in CONV_SHAPES[net]:
        if k is not None and s.k != k:
            continue
        f = floors(s, batch)
        int8_cur = max(f["int8 compute us"], f["int8 current bytes us"])
        int8_fused = max(f["int8 compute us"], f["int8 fused bytes us"])
        bf16 = max(f["bf16 compute us"], f["bf16 cuDNN bytes us"])
        rows.append([s.label(), s.count, f["gops"], f["int8 compute us"], f["int8 current bytes us"],
                     f["int8 fused bytes us"], int8_cur, f["bf16 compute us"], f["bf16 cuDNN bytes us"], bf16,
                     f"{bf16 / int8_cur:.2f} / {bf16 / int8_fused:.2f}"])
    return headers, rows


def block_floors(shape, batch: int, y_policy: str = "auto") -> dict:
    """Floor (µs) of each BLOCK_TRAFFIC pipeline for one conv-BN-ReLU block of this shape."""
    x = batch * shape.cin * shape.h * shape.w
    y = batch * shape.cout * shape.oh * shape.ow
    from ebkernels.ops.fused.block import keeps_y

    out = {}
    for name, (bx, by, gemms) in BLOCK_TRAFFIC.items():
        if name == "int8 fused block" and keeps_y(shape.cin, shape.cout, shape.k, shape.k, shape.h * shape.w,
                                                  shape.oh * shape.ow, y_policy):
            bx, by, gemms = FUSED_KEEP_Y
        ops = gemms * shape.gemm_ops(batch)
        peak = INT8_TOPS if name.startswith("int8") else BF16_TFLOPS
        out[name] = max(ops / peak, (bx * x + by * y) / HBM_BYTES_PER_S) * 1e6
        out[f"{name} MB"] = (bx * x + by * y) / 1e6
    return out


def block_totals(batches=(64, 256), y_policy: str = "auto"):
    """Block floors summed over every conv of each network, and the predicted int8 fused / bf16 speed-up
    (``y_policy`` as ``config.KernelSettings.y_policy``: auto, recompute, keep)."""
    headers = ["net", "batch", "int8 per-layer block µs", "int8 fused block µs", "bf16 block µs",
               "modelled MB per step (int8 fused / bf16)", "predicted speed-up int8 fused over bf16",
               "(per-layer over bf16)"]
    rows = []
    for net, shapes in CONV_SHAPES.items():
        for b in batches:
            tot = {k: 0.0 for k in BLOCK_TRAFFIC}
            mb = {k: 0.0 for k in BLOCK_TRAFFIC}
            for s in shapes:
                f = block_floors(s, b, y_policy)
                for k in BLOCK_TRAFFIC:
                    tot[k] += s.count * f[k]
                    mb[k] += s.count * f[f"{k} MB"]
            rows.append([net, b, tot["int8 per-layer block"], tot["int8 fused block"], tot["bf16 block"],
                         f"{mb['int8 fused block']:.0f} / {mb['bf16 block']:.0f}",
                         f"{tot['bf16 block'] / tot['int8 fused block']:.2f}",
                         f"{tot['bf16 block'] / tot['int8 per-layer block']:.2f}"])
    return headers, rows


def network_totals(batches=(64, 256)):
    """Floors summed over every conv of each network (shape floor × layer count)."""
    headers = ["net", "batch", "int8 compute µs", "int8 floor µs (current)", "int8 floor µs (fused)",
               "bf16 floor µs", "best int8 speedup over bf16 (current / fused)"]
    rows = []
    for net, shapes in CONV_SHAPES.items():
        for b in batches:
            comp = cur = fused = bf16 = 0.0
            for s in shapes:
                f = floors(s, b)
                comp += s.count * f["int8 compute us"]
                cur += s.count * max(f["int8 compute us"], f["int8 current bytes us"])
                fused += s.count * max(f["int8 compute us"], f["int8 fused bytes us"])
                bf16 += s.count * max(f["bf16 compute us"], f["bf16 cuDNN bytes us"])
            rows.append([net, b, comp, cur, fused, bf16, f"{bf16 / cur:.2f} / {bf16 / fused:.2f}"])
    return headers, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="roofline floors (predictions, SPEC §5 peaks)")
    ap.add_argument("--net", default="vgg16", choices=sorted(CONV_SHAPES))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k", type=int, default=None, help="only kernels of this size (e.g. 3)")
    args = ap.parse_args(argv)
    headers, rows = table(args.net, args.batch, args.k)
    print(f"Predicted floors (not measurements): {args.net}, batch {args.batch}, fwd+bwd incl. quantization\n")
    print(markdown_table(headers, rows))
    print("\nWhole networks, every conv (all kernel sizes):\n")
    print(markdown_table(*network_totals()))
    print("\nWhole networks, every conv as a conv-BN-ReLU block (BatchNorm and ReLU traffic included):\n")
    for policy in ("auto", "recompute", "keep"):
        print(f"\ny policy {policy!r}:\n" if policy != "auto" else "")
        print(markdown_table(*block_totals(y_policy=policy)))


if __name__ == "__main__":
    main()
