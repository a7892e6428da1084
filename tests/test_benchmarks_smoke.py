"""The benchmark suite stays alive on CPU: ``benchmarks/run.py --smoke`` end to end, labelled as CPU
smoke figures and never touching the GPU results file; the benchmark shape tables match the models."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "benchmarks", "run.py")
RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")
CPU_LABEL = "CPU smoke — not a GPU result"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="checks the CPU smoke behaviour; on a GPU run.py times the real kernels")


def _run(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user would run it
    return subprocess.run([sys.executable, RUN, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _results_state():
    return os.stat(RESULTS_MD).st_mtime_ns if os.path.exists(RESULTS_MD) else None


def _table_rows(markdown: str, title_start: str) -> list[list[str]]:
    """Data rows of the first table whose ### title starts with ``title_start``."""
    block = markdown.split(f"### {title_start}", 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_run_smoke_end_to_end(tmp_path):
    before = _results_state()
    out = tmp_path / "smoke.md"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = proc.stdout
    assert out.read_text() == md  # --out holds exactly the printed report
    assert _results_state() == before, "a CPU smoke run must not write benchmarks/RESULTS.md"

    assert md.startswith(f"# ebkernels benchmark results (smoke mode, {CPU_LABEL})")
    assert "- **torch**: " + torch.__version__ in md
    for section in ("## Per-layer", "## Quantizers", "## Early-bird detector", "## Search epoch"):
        assert section in md
    titles = re.findall(r"^### (.*)$", md, flags=re.M)
    assert len(titles) >= 9
    assert all(t.endswith(CPU_LABEL) for t in titles), titles  # no CPU figure passes for a GPU one

    from benchmarks.shapes import SMOKE_CONV_SHAPES, SMOKE_LINEAR_SHAPES

    conv = _table_rows(md, "Conv fwd+bwd —")
    assert len(conv) == len(SMOKE_CONV_SHAPES)
    for row in conv:
        times = [float(c) for c in row[4:7]]  # int8, fp32, bf16-cl ms
        assert all(t > 0 for t in times), row
    assert len(_table_rows(md, "Linear fwd+bwd")) == len(SMOKE_LINEAR_SHAPES)
    quant = _table_rows(md, "Quantizer bandwidth")
    assert len(quant) == 3 and all(float(r[3]) > 0 for r in quant)
    # the data-flow section: saved MiB for the four modes, exact kernel counts, the fused flow saving memory
    assert "## The int8 data flow" in md
    flow = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.split("## The int8 data flow", 1)[1].splitlines()
            if ln.startswith("|")]
    mem = [r for r in flow if r[0] in ("vgg11 b4", "preresnet20 b4")]
    assert len(mem) == 2 and all(float(r[5]) < 1.0 for r in mem), mem  # int8 fused / bf16 < 1
    counts = [r for r in flow if len(r) == 6 and r[1] == "int8 fused"]
    assert len(counts) == 2 and all(int(r[2]) > 0 for r in counts), counts
    assert "ebkernels.models" not in md  # the epoch section ran (run.py skips it only without the models)
    epoch = _table_rows(md, "Search epoch")
    assert [r[1] for r in epoch] == ["int8", "fp32", "bf16-autocast"] * 2
    assert all(float(r[3]) > 0 and float(r[6]) > 0 for r in epoch)


def test_run_refuses_full_or_results_md_on_cpu(capsys):
    from benchmarks import run

    before = _results_state()
    assert run.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert run.main(["--smoke", "--out", RESULTS_MD, "--sections", "detector"]) == 2
    assert "refusing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run.main(["--smoke", "--sections", "layers,nope"])
    assert exc.value.code == 2 and "unknown ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--smoke", "--batches", "64,x"])
    assert "--batches" in capsys.readouterr().err
    assert _results_state() == before


def test_shape_tables_match_the_models():
    from ebkernels import models
    from benchmarks.shapes import CONV_SHAPES, conv_shapes_of_model

    for name, table in CONV_SHAPES.items():
        derived = conv_shapes_of_model(models.build_model(name, num_classes=10, in_channels=3), net=name)
        assert derived == table, name
    assert sum(s.count for s in CONV_SHAPES["vgg16"]) == 13
    assert sum(s.count for s in CONV_SHAPES["preresnet101"]) == 1 + 3 * 11 * 3 + 3  # stem, blocks, shortcuts
