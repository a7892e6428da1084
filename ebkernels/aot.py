"""Ahead-of-time compile of every registered Triton kernel for real GPU targets, without a GPU.

    python -m ebkernels.aot --arch 80,90 [--kernel NAME ...] [--json out.json]
    python -m ebkernels.aot --plan vgg16,preresnet101 --batch 256 [--tiles legacy]

For each kernel, configuration and architecture it prints: compiled or the error, the int8
tensor-core instructions found in the PTX (``mma.sync…s8`` on sm_80, ``wgmma…s8`` on sm_90), the
byte-wise shared-memory stores (an int8 operand transposed into shared memory one byte at a time), TMA
tile loads (``cp.async.bulk.tensor``: operands the Tensor Memory Accelerator puts in shared memory), GPU-scope
memory fences and atomics per thread (``MEMBAR.*.GPU``/``.SYS`` and ``ATOM``/``RED`` in the SASS from the
``nvdisasm`` bundled with Triton, else ``fence``/``membar`` and ``atom``/``red`` in the PTX: ptxas adds a fence
to a release atomic, so the PTX count is a floor; static counts, i.e. per program where the code has no loop
around them; a fence executed by one thread of the program, as the split fix-up's one release, counts once), shared
memory, and registers/spills from ``ptxas -v`` where the ptxas bundled with Triton is present.
Exits non-zero if any kernel fails to compile, or if a kernel declared ``int8_mma`` shows no int8 MMA.
``--plan`` prints the convolution tile table's choices instead (``print_plan``; no compile).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from ._cli import comma_list, positive_int

MMA_S8 = re.compile(r"\b((?:wgmma\.mma_async|mma\.sync)[\w.]*\.s8[\w.]*)")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# byte-wise shared-memory stores: how Triton transposes an int8 operand that is not K-major (int8 wgmma on
# sm_90 takes K-major operands only), one byte per instruction
SMEM_B8 = re.compile(r"\bst\.shared(?:\.v\d)?\.[bsu]8\b")
# TMA tile loads (global -> shared by the Tensor Memory Accelerator: the TMA weight-grad's operands)
TMA_LOADS = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.shared[\w:.]*\.global\b")
# GPU-scope memory fences and global atomics: SASS (what runs: a release atomic is a MEMBAR.*.GPU + RED/ATOM
# there), or PTX. A CTA-scope MEMBAR (``fence.proxy.async`` before wgmma reads an operand the threads stored
# into shared memory) waits for shared memory only and is not counted: the column is the fences that wait for L2
SASS_FENCE = re.compile(r"\bMEMBAR(?:\.\w+)*\.(?:GPU|SYS)\b")
SASS_ATOMIC = re.compile(r"\b(?:ATOMG|ATOM|REDG|RED)\.")
PTX_FENCE = re.compile(r"\b(?:fence\.(?:sc|acq_rel)\.(?:gpu|sys)|membar\.(?:gl|sys))\b")
PTX_ATOMIC = re.compile(r"\b(?:atom|red)\.global\.")
PTX_ANY_ATOMIC = re.compile(r"\b(?:atom|red)\.")


def _ptxas() -> str | None:
    try:
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("ptxas")


def _nvdisasm() -> str | None:
    try:
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", "nvdisasm")
        return path if os.path.exists(path) else shutil.which("nvdisasm")
    except ImportError:
        return shutil.which("nvdisasm")


def fences_and_atomics(cubin: bytes | None, ptx: str) -> tuple[int, int, str]:
    """(memory fences, global atomics, "sass" or "ptx"): instruction counts of one build (see the docstring).
    A build whose PTX has no atomic and no fence has none in its SASS either (ptxas adds fences only to
    release/acquire atomics): no disassembly then (most builds: it keeps the full build's time down)."""
    if not (PTX_FENCE.search(ptx) or PTX_ANY_ATOMIC.search(ptx)):
        return 0, 0, "sass" if cubin and _nvdisasm() else "ptx"
    tool = _nvdisasm() if cubin else None
    if tool:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            res = subprocess.run([tool, path], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout:
            return len(SASS_FENCE.findall(res.stdout)), len(SASS_ATOMIC.findall(res.stdout)), "sass"
    return len(PTX_FENCE.findall(ptx)), len(PTX_ATOMIC.findall(ptx)), "ptx"


def _usage_from_log(log: str) -> tuple[int | None, int | None]:
    """(registers, spill bytes) from a ``ptxas -v`` log; (None, None) if it has none."""
    regs, spill = PTXAS_REGS.search(log), PTXAS_SPILL.search(log)
    return (int(regs.group(1)) if regs else None,
            int(spill.group(1)) + int(spill.group(2)) if spill else None)


def _compile_with_log(src, target, options):
    """``triton.compile`` with the log of the ``ptxas -v`` it runs captured (Triton prints it when
    ``TRITON_DUMP_PTXAS_LOG`` is on): a cold build then needs no second ptxas run for its registers and spills
    (issue 20: the suite's AOT build). Returns (kernel, log); the log is empty when the build came from Triton's
    cache."""
    import triton

    out = io.StringIO()
    old = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(out):
            ck = triton.compile(src, target=target, options=options)
    finally:
        if old is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = old
    return ck, out.getvalue()


_REPORT_KEYS = ("fences", "atomics", "fence_source", "registers", "spills")


def _binary_report(cubin: bytes | None, ptx: str, arch: int, log: str) -> dict:
    """Fences, atomics, registers and spills of one build, kept on disk by the binary's hash beside Triton's
    cache: a build Triton takes from its cache then needs no ptxas or nvdisasm run either (the suite's AOT
    test, a rebuild after changing one kernel)."""
    from triton import knobs

    digest = hashlib.sha256((cubin or ptx.encode()) + f"|sm_{arch}|v1".encode()).hexdigest()
    path = os.path.join(knobs.cache.dir, "ebkernels_aot", digest[:2], digest + ".json")
    try:
        with open(path) as f:
            got = json.load(f)
        if set(got) == set(_REPORT_KEYS):
            return got
    except (OSError, ValueError):
        pass
    fences, atomics, source = fences_and_atomics(cubin, ptx)
    usage = _usage_from_log(log)  # the log of the build's own ptxas run, else ptxas again (a cached build)
    registers, spills = usage if usage[0] is not None else _resource_usage(ptx, arch)
    got = dict(zip(_REPORT_KEYS, (fences, atomics, source, registers, spills)))
    if registers is not None:  # (no ptxas here: nothing worth keeping)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(got, f)
            os.replace(tmp, path)  # whole or absent: parallel builds may write the same report
        except OSError:
            pass
    return got


def _resource_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spill bytes) from ``ptxas -v`` on the kernel's PTX; (None, None) if unavailable."""
    ptxas = _ptxas()
    if ptxas is None:
        return None, None
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    return _usage_from_log(res.stdout + res.stderr)


def _import_extra(paths: tuple[str, ...]) -> None:
    """Import extra kernel files (``--extra-module``) so their ``@aot_kernel`` declarations register."""
    import importlib.util

    for i, path in enumerate(paths):
        name = f"_ebk_aot_extra_{i}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)


def compile_one(name: str, cfg_index: int, arch: int, extra: tuple[str, ...] = ()) -> dict:
    """Compile one (kernel, configuration, arch); never raises."""
    os.environ.pop("TRITON_INTERPRET", None)
    _import_extra(extra)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._registry import registered_kernels

    k = {k.name: k for k in registered_kernels()}[name]
    cfg = dict(k.constexprs[cfg_index])
    # a configuration may carry its own warps / stages (the tile table's), else the kernel's, and a register cap
    num_warps, num_stages = cfg.pop("num_warps", k.num_warps), cfg.pop("num_stages", k.num_stages)
    maxnreg = {"maxnreg": cfg.pop("maxnreg")} if "maxnreg" in cfg else {}
    row = {"kernel": name, "config": {**cfg, "num_warps": num_warps, "num_stages": num_stages, **maxnreg},
           "arch": arch, "compiled": False, "error": None, "mma_s8": [], "smem_b8_stores": None, "tma_loads": None,
           "shared": None, "registers": None, "spills": None, "fences": None, "atomics": None, "fence_source": None,
           "int8_mma_expected": k.int8_mma}
    try:
        signature = k.signature_for(cfg)
        signature.update({c: "constexpr" for c in cfg})
        src = ASTSource(fn=k.fn, signature=signature, constexprs=dict(cfg), attrs=k.attrs())
        ck, log = _compile_with_log(src, GPUTarget("cuda", arch, 32),
                                    {"num_warps": num_warps, "num_stages": num_stages,
                                     "enable_fp_fusion": k.fp_fusion, **maxnreg})
        ptx = ck.asm["ptx"]
        row["compiled"] = True
        row["mma_s8"] = sorted(set(MMA_S8.findall(ptx)))
        row["smem_b8_stores"] = len(SMEM_B8.findall(ptx))
        row["tma_loads"] = len(TMA_LOADS.findall(ptx))
        row["shared"] = int(ck.metadata.shared)
        row.update(_binary_report(ck.asm.get("cubin"), ptx, arch, log))
    except Exception as e:  # report, keep going
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return row


def _short_cfg(cfg: dict) -> str:
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items()) or "-"


def print_plan(nets: list[str], batch: int, sms: int, tiles: str, out=sys.stdout) -> float:
    """The tile table's choice for every distinct conv layer of ``nets`` (``benchmarks/shapes.py``) at
    ``batch``: per GEMM the tile, the grid (CTAs) against ``sms`` SMs and the useful-MMA fraction (useful
    multiply-adds / multiply-adds the MMA tiles issue, ``ebkernels.ops.gemm.tiles``). ``tiles="legacy"``: the
    one 128×128×64 tile every GEMM ran before the table. The weight-grads are planned as on sm_90 (an
    H100/H200): the TMA kernel where rule 8 takes the shape ("TMA BH×BW"). Returns the minimum fraction over the GEMMs
    that run in training (the first layer's input-grad does not: the images need no gradient)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's benchmarks/
    from benchmarks.shapes import CONV_SHAPES

    from .ops._launch import code_channels
    from .ops.gemm.plans import layer_plans, legacy_plans

    worst = 1.0
    for net in nets:
        useful = issued = 0
        if net not in CONV_SHAPES:
            raise SystemExit(f"--plan: unknown network {net!r}; known: {', '.join(CONV_SHAPES)}")
        print(f"\n## {net}, batch {batch}, {sms} SMs, tiles: {tiles}\n", file=out)
        print("| layer | × | GEMM | tile | grid (CTAs) | vs SMs | useful MMA |", file=out)
        print("|---|---|---|---|---|---|---|", file=out)
        for i, c in enumerate(CONV_SHAPES[net]):
            if tiles == "legacy":
                plans = legacy_plans(batch, c.cin, c.h, c.w, c.cout, c.k, c.stride, c.pad, sms)
            else:
                plans = layer_plans(batch, c.cin, c.cout, c.h, c.w, c.k, c.stride, c.pad, sms, code_channels)
            for p in plans:
                runs = not (i == 0 and p.kind == "dgrad")
                if runs:
                    worst = min(worst, p.fraction)
                    useful, issued = useful + c.count * p.useful, issued + c.count * p.issued
                extra = f" {p.mode['phases']} phases" if p.mode.get("phases", 1) > 1 else ""
                if p.mode.get("tma"):  # rule 8: the sm_90 TMA weight-grad, boxes of BH×BW output pixels
                    extra = f" TMA {p.mode['tma'].BH}×{p.mode['tma'].BW}"
                note = "" if runs else " (not run: the input needs no gradient)"
                print(f"| {c.label()} | {c.count} | {p.kind}{extra} | {p.tile.name} | {p.programs}×{p.splits} "
                      f"({p.ctas}) | {p.ctas / sms:.2f} | {100 * p.fraction:.1f}%{note} |", file=out)
        print(f"\n{net}: useful MMA over all its GEMMs (layer counts included): {100 * useful / issued:.1f}%",
              file=out)
    print(f"\nmin useful MMA fraction: {100 * worst:.1f}%", file=out)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ebkernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=comma_list(int, what="compute capabilities such as 80,90"), default=[80, 90],
                   help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--extra-module", action="append", default=[],
                   help="also compile the kernels declared in this Python file (for testing the tool)")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--plan", type=comma_list(), help="print the tile table's plan for these networks "
                   "(comma-separated: vgg16, preresnet101) instead of compiling")
    p.add_argument("--batch", type=positive_int, default=256, help="batch size of --plan (default 256)")
    p.add_argument("--sms", type=positive_int, default=132, help="SMs of the GPU --plan fills (default 132: H100/H200)")
    p.add_argument("--tiles", choices=("table", "legacy"), default="table",
                   help="--plan with the tile table (default) or the former one-size 128x128x64 tile")
    args = p.parse_args(argv)
    if args.plan:
        print_plan(args.plan, args.batch, args.sms, args.tiles)
        return 0
    arches = args.arch
    bad = [a for a in arches if a < 80]
    if bad:
        p.error(f"--arch {bad}: int8 tensor-core kernels need compute capability 80 or newer")

    os.environ.pop("TRITON_INTERPRET", None)
    from ._registry import registered_kernels

    extra = tuple(os.path.abspath(m) for m in args.extra_module)
    _import_extra(extra)
    kernels = registered_kernels()
    if args.kernel:
        kernels = [k for k in kernels if any(s in k.name for s in args.kernel)]
    if not kernels:
        print("no kernels matched", file=sys.stderr)
        return 2
    jobs = [(k.name, i, a, extra) for k in kernels for i in range(len(k.constexprs)) for a in arches
            if k.arches is None or a in k.arches]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        rows = list(ex.map(compile_one, *zip(*jobs)))

    failed = 0
    print("| kernel | config | arch | compiled | int8 tensor-core instructions | byte-wise smem stores | TMA loads "
          "| fences | atomics | shared (B) | registers | spills (B) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = r["compiled"] and (not r["int8_mma_expected"] or r["mma_s8"])
        failed += not ok
        if r["compiled"]:
            mma = ", ".join(r["mma_s8"]) or ("MISSING" if r["int8_mma_expected"] else "none (not a GEMM)")
            status = "yes"
        else:
            mma, status = "-", f"NO: {r['error']}"
        fmt = lambda v: "?" if v is None else str(v)  # noqa: E731
        print(f"| {r['kernel']} | {_short_cfg(r['config'])} | sm_{r['arch']} | {status} | {mma} | "
              f"{fmt(r['smem_b8_stores'])} | {fmt(r['tma_loads'])} | {fmt(r['fences'])} | {fmt(r['atomics'])} | {fmt(r['shared'])} | {fmt(r['registers'])} | {fmt(r['spills'])} |")
    print(f"\n{len(rows) - failed}/{len(rows)} builds passed ({len(kernels)} kernels, arch {','.join(map(str, arches))})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
