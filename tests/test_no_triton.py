"""Without triton installed (macOS, Windows, a CPU-only install that skipped it) ``import ebkernels`` works,
says once why, and every op runs its PyTorch reference path: a quantized, fused model trains a step, the
quantizer and the detector work. Run in a subprocess in which ``import triton`` fails."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import logging, sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, NoTriton())
logging.basicConfig(level=logging.WARNING, format="LOG %(name)s: %(message)s")

import torch
import torch.nn.functional as F
import ebkernels
from ebkernels._triton import HAS_TRITON

assert not HAS_TRITON and "triton" not in sys.modules
torch.manual_seed(0)
model = ebkernels.build_model("vgg11", num_classes=10, in_channels=3, width=0.25)
ebkernels.quantize_model(model)
assert ebkernels.fusion.fused_chains(model), "the fused chains run on the reference path too"
x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
loss = F.cross_entropy(model(x), t)
loss.backward()
assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
codes, scale = ebkernels.quantize(torch.randn(100), rounding="stochastic")
assert codes.dtype == torch.int8 and scale.dim() == 0
det = ebkernels.EarlyBird(0.5)
assert det.step(model) is False
print("OK")
"""


def test_import_and_train_without_triton():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK")
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("LOG ebkernels")]
    assert len(lines) == 1 and "triton is not installed" in lines[0] and "reference path" in lines[0], out.stderr
