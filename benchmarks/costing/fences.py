"""Fences and atomics per program of each kernel build, read from the sm_90 AOT build (no GPU needed).

``python -m ebkernels.aot --arch 90 --json`` counts, per kernel and configuration, the ``MEMBAR`` and
``ATOM``/``RED`` instructions of the SASS (``nvdisasm`` bundled with Triton), and the byte-wise shared-memory
stores of the PTX (an int8 operand transposed one byte at a time: issue slots the K loop spends). The counts
are cached in
``fences_sm90.json`` next to this file (kernel name -> configurations) so that pricing does not recompile;
``python benchmarks/cost_model.py --refresh-fences`` rebuilds the cache (a few minutes of both cores).

A launch is matched to the build of its kernel whose constexprs agree with the launch's on the most keys
(ties: the most fences: charge more). The counts are static instruction counts: per thread and program
for straight-line code such as a GEMM epilogue (``split_fixup`` adds one release atomic per element: one
``MEMBAR`` + ``REDG`` each); inside a loop they count once, and the loops the model knows are priced by
their own rules (``kernel_rules``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "fences_sm90.json")
REPO = os.path.dirname(os.path.dirname(HERE))

_loaded: Optional[dict] = None


def load() -> dict:
    global _loaded
    if _loaded is None:
        _loaded = json.load(open(CACHE)) if os.path.exists(CACHE) else {}
    return _loaded


def condense(rows: list) -> dict:
    """AOT JSON rows -> {kernel: [{"config": ..., "fences": n, "atomics": m, "source": "sass"}]} (sm_90)."""
    out: dict = {}
    for r in rows:
        if r.get("arch") != 90 or not r.get("compiled") or r.get("fences") is None:
            continue
        out.setdefault(r["kernel"], []).append({"config": r["config"], "fences": r["fences"],
                                                "atomics": r["atomics"], "smem_b8": r.get("smem_b8_stores") or 0,
                                                "shared": r.get("shared"), "registers": r.get("registers"),
                                                "source": r.get("fence_source")})
    return out


def dump(data: dict, path: str = CACHE) -> None:
    """One build per line (a readable diff when a kernel changes)."""
    with open(path, "w") as f:
        f.write("{\n")
        for i, (k, builds) in enumerate(sorted(data.items())):
            f.write(f" {json.dumps(k)}: [\n")
            f.write(",\n".join("  " + json.dumps(b, sort_keys=True, separators=(",", ":")) for b in builds))
            f.write("\n ]" + (",\n" if i < len(data) - 1 else "\n"))
        f.write("}\n")


def refresh(path: str = CACHE) -> dict:
    """Rebuild the cache from a fresh ``python -m ebkernels.aot --arch 90`` run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "aot.json")
        subprocess.run([sys.executable, "-m", "ebkernels.aot", "--arch", "90", "--json", out], cwd=REPO, env=env,
                       check=False, stdout=subprocess.DEVNULL)
        data = condense(json.load(open(out)))
    dump(data, path)
    global _loaded
    _loaded = data
    return data


def lookup(kernel: str, settings: dict) -> Optional[dict]:
    """The cached build closest to a launch's ``settings`` (constexprs and scalars), or None."""
    builds = load().get(kernel)
    if not builds:
        return None

    def score(b):
        cfg = b["config"]
        agree = sum(1 for k, v in cfg.items() if k in settings and settings[k] == v)
        clash = sum(1 for k, v in cfg.items() if k in settings and settings[k] != v)
        return (agree - clash, b["fences"])

    return max(builds, key=score)
