"""``benchmarks/gpu_session.py --dry-run``: the one-command GPU session runs end to end on CPU (tiny shapes,
no CUDA), writes its report and raw logs into one folder, and never touches ``benchmarks/RESULTS.md``."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_session.py")
RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU check; on a GPU run the real session")
def test_gpu_session_dry_run(tmp_path):
    before = os.stat(RESULTS_MD).st_mtime_ns if os.path.exists(RESULTS_MD) else None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # it must not need CUDA
    t = time.monotonic()
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.startswith("# ebkernels GPU session (DRY RUN on CPU")
    for title in ("## CUDA test suite", "## Ceiling", "## Per-layer fwd+bwd", "## Per-kernel times",
                  "## Weight-grad on the TMA layers", "## Search-epoch steps"):
        assert title in md, title
    assert "FAILED" not in md
    assert "skipped: no CUDA" in md  # the CUDA-graph columns say why they are empty
    for name in ("tests", "ceiling", "layers", "profile", "wgrad", "epoch"):
        json.loads((tmp_path / "logs" / f"{name}.json").read_text())
    wgrad = json.loads((tmp_path / "logs" / "wgrad.json").read_text())
    assert wgrad and all(r["same_bits"] and r["tma_ms"] > 0 for r in wgrad)  # VGG16's 32² and 16² 3×3 layers
    layers = json.loads((tmp_path / "logs" / "layers.json").read_text())
    assert layers and all(r["int8"]["eager_ms"] > 0 and r["bf16-cl"]["eager_ms"] > 0 for r in layers)
    assert (os.stat(RESULTS_MD).st_mtime_ns if os.path.exists(RESULTS_MD) else None) == before
    assert elapsed < 120, f"the dry run took {elapsed:.0f} s"  # ~20 s alone on 2 cores


def test_gpu_session_refuses_a_real_run_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
