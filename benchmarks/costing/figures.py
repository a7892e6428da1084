"""``gpu_session.py``'s side of the model figures: start ``python -m benchmarks.costing.session`` in the
background (it records on the CPU while the session's CUDA tests run), then read its JSON and format the
model's figure for each layer, kernel, weight-grad and step the session times. Imports nothing of the
model itself (that module sets ``TRITON_INTERPRET``, which a GPU run must not)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["ModelFigures"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _norm(name: str) -> str:
    """The profiler's spelling of an op: ``aten.convolution.default`` -> ``aten::convolution``."""
    if name.startswith("aten."):
        return "aten::" + name.split(".")[1]
    return name


class ModelFigures:
    """The cost model's predictions for what the session measures (µs on the priced card)."""

    def __init__(self, out_dir: str, dry: bool, enabled: bool = True):
        self.path = os.path.join(out_dir, "logs", "model.json")
        self.data, self.note, self.proc = None, "", None
        if not enabled:
            self.note = "model: off"
            return
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
        env["CUDA_VISIBLE_DEVICES"] = ""  # the model records on the CPU; the GPU is the session's
        self.log = open(os.path.join(out_dir, "logs", "model.log"), "w")
        cmd = [sys.executable, "-m", "benchmarks.costing.session", "--out", self.path] + (["--dry-run"] if dry else [])
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the figures; False (with ``note``) when they are not there."""
        if self.data is not None:
            return True
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                self.note = "model: not ready in time"
                return False
        try:
            with open(self.path) as f:
                self.data = json.load(f)
        except (OSError, ValueError):
            self.note = self.note or "model: failed (logs/model.log)"
            return False
        return True

    def _get(self, *keys):
        d = self.data or {}
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def us(self, *keys) -> str:
        v = self._get(*keys)
        return f"{v:.0f}" if isinstance(v, (int, float)) else (self.note or "-")

    def kernel_us(self, label: str, name: str, calls: int = 1) -> str:
        """Model µs of ``calls`` launches of kernel ``name`` in the profiled layer ``label`` (per layer call)."""
        k = {_norm(n): u for n, u in (self._get("profile", label, "int8", "kernels") or {}).items()}
        name = _norm(name)
        v = k.get(name) if name in k else next((u for n, u in k.items() if n in name or name in n), None)
        return f"{v:.1f}" if v is not None else "-"
