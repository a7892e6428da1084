"""What the tests share (a plain module: ``from helpers import ...``; the fixtures are in conftest.py, the
pruning oracle — the masked network — in _masking.py). One place per helper:

- seeds: ``fresh_seed()`` is the seed of the running test: ``DEFAULT_SEED`` (fixed: the suite is
  deterministic), ``EBKERNELS_TEST_SEED=<int>`` replays that seed, ``EBKERNELS_TEST_SEED=random`` draws a
  fresh one per test. A failing test that asked for a seed prints it in its report ("test seed" section,
  with the command line's variable); the kernel tests put it in their assert messages too. ``gen(seed)``:
  a ``torch.Generator`` seeded with it.
- bits: ``bits_equal`` / ``mismatch`` (same shape, dtype and bits: NaN payloads, -0.0 vs +0.0), ``bits``,
  ``f32_of_bits``, ``rows``, ``codes`` (random int8 codes), ``bnp_exact``. Poisoned kernel outputs are the
  ``poisoned`` fixture (conftest.py, the product's one fill ``ebkernels.ops._buffers.poison``).
- launches: ``LaunchSpy`` / ``spy_launches(monkeypatch, *kernels)``: every Triton launch (kernel name,
  grid, keyword arguments: constexprs, num_warps ...), optionally without running it.
- ``pin_tile``: the one way a test replaces a tile-table lookup (no API takes a tile).
- the straight-through reference of the quantized layers (``ste_quant``, ``QuantizeGrad``); early-bird
  gamma sets and the SPEC §3 masks in numpy; the trainer run in a subprocess.
- ``REQUIREMENTS``: what a machine may lack (torchvision, torch-pruning, matplotlib), why, and the
  ``EBKERNELS_REQUIRE_<NAME>=1`` that makes it a failure (conftest.py).
"""
from __future__ import annotations

import collections
import glob
import importlib
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CL = torch.channels_last


# ---- requirements a machine may lack (conftest.py skips or fails their tests) ------------------------
def _import_torchvision():
    """None when ``import torchvision`` works (through the product's own import, which declares the detection
    ops a CUDA-built wheel cannot load next to the CPU torch), else why it does not."""
    from ebkernels.models.torchvision_models import import_torchvision

    try:
        import_torchvision()
        return None
    except ImportError as exc:
        return f"{exc}; `pip install -r requirements.txt` installs torchvision 0.28.0, the release for torch 2.13"


def _import(module: str, requirement: str):
    """None when ``module`` imports, else why it does not."""
    try:
        importlib.import_module(module)
        return None
    except ImportError as exc:
        return f"{exc}; `pip install -r requirements.txt` installs {requirement}"


# marker: (why it is missing or None, the variable that makes a missing one a failure)
REQUIREMENTS = {
    "torchvision": (_import_torchvision(), "EBKERNELS_REQUIRE_TORCHVISION"),
    "torch_pruning": (_import("torch_pruning", "torch-pruning 1.6.1"), "EBKERNELS_REQUIRE_TORCH_PRUNING"),
    "matplotlib": (_import("matplotlib", "matplotlib"), "EBKERNELS_REQUIRE_MATPLOTLIB"),
}


def required(marker: str) -> bool:
    return os.environ.get(REQUIREMENTS[marker][1]) == "1"


# ---- seeds -------------------------------------------------------------------------------------------
SEED_VARIABLE = "EBKERNELS_TEST_SEED"
DEFAULT_SEED = 1_234_567
_SEEDS: dict[str, int] = {}  # test id -> the seed it was given (conftest reports it when the test fails)


def current_test() -> str:
    """The running test's id (``tests/test_x.py::test_y[case]``), "" outside a test."""
    return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]


def fresh_seed() -> int:
    """The seed of the running test (the same on every call within it): ``DEFAULT_SEED``, or what
    ``EBKERNELS_TEST_SEED`` says: an integer in [0, 2^31 - 1) replays that seed, ``random`` draws a new
    one for each test."""
    value = os.environ.get(SEED_VARIABLE, "").strip()
    test = current_test()
    if value.lower() == "random":
        seed = _SEEDS.get(test)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little") % (2**31 - 1)
    elif value:
        try:
            seed = int(value)
        except ValueError:
            seed = -1
        if not 0 <= seed < 2**31 - 1:
            raise ValueError(f"{SEED_VARIABLE}={value!r}; accepted: an integer in [0, 2^31 - 1) (replay) or "
                             "'random' (a fresh seed per test)")
    else:
        seed = DEFAULT_SEED
    _SEEDS[test] = seed
    return seed


def seed_of(test: str):
    """The seed ``fresh_seed`` gave the test ``test`` (None if it asked for none); forgets it."""
    return _SEEDS.pop(test, None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- bits --------------------------------------------------------------------------------------------
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    """A short description of where two tensors differ (for assert messages)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    diff = (bits(a) != bits(b)).nonzero()
    if diff.numel() == 0:
        return "equal"
    i = tuple(diff[0].tolist())
    return f"{diff.shape[0]} of {a.numel()} differ, first at {i}: {a.cpu()[i].item()} vs {b.cpu()[i].item()}"


def f32_of_bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 values of int32 bit patterns."""
    return t.detach().cpu().view(torch.float32)


def block_max(zbits: torch.Tensor) -> torch.Tensor:
    """max |z| (0-dim float32) of a producer's float32 bits per channel block (int32 [B]: ``conv2d_int8_bn_fwd``,
    ``bn_stats``): their integer max, as ``bn_relu_quant`` takes it."""
    return f32_of_bits(zbits.detach().cpu().max().reshape(1)).reshape(())


def each_block_max(zbits: torch.Tensor, z: torch.Tensor, width: int) -> bool:
    """Whether ``zbits`` holds one entry per 16 channels of ``z`` (N, C, H, W), each max |z| over the channel block
    of ``width`` channels (the producing launch's) that contains those 16 channels."""
    per = [blk.amax() for blk in rows(z.detach().cpu().abs()).amax(0).split(width)]
    slots = -(-z.shape[1] // 16)
    return zbits.shape == (slots,) and all(bits_equal(f32_of_bits(zbits[s:s + 1]).reshape(()), per[s * 16 // width])
                                           for s in range(slots))


def rows(t: torch.Tensor) -> torch.Tensor:
    """(N·H·W, C) of a 4-D (N, C, H, W) tensor, pixels in NHWC order."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def codes(shape, g, device, lo=-127, hi=127, channels_last=True, pad_from=None):
    """Random int8 codes in [lo, hi]; channels ``>= pad_from`` zero (the quantizer's channel padding)."""
    t = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)
    if pad_from is not None:
        t[:, pad_from:] = 0
    t = t.contiguous(memory_format=CL) if channels_last else t
    return t.to(device)


def bnp_exact(mean, var, gamma, beta, eps: float) -> torch.Tensor:
    """``bnp`` = [a, b, mean, rstd] in float32 with every operation correctly rounded (IEEE, as the kernels'
    ``sqrt_rn``): the square root taken in float64 and rounded once (exact for float32 inputs), since
    ``torch.sqrt`` on CPU float32 is not always correctly rounded (see test_bn_relu_quant)."""
    f32 = torch.float32
    mean, var, gamma, beta = (t.detach().cpu().to(f32) for t in (mean, var, gamma, beta))
    v = var + torch.tensor(eps, dtype=f32)
    rstd = 1.0 / torch.sqrt(v.double()).to(f32)
    a = gamma * rstd
    b = beta - mean * a
    return torch.stack([a, b, mean, rstd])


# ---- Triton launches ---------------------------------------------------------------------------------
CONV_KERNELS = ("conv2d_int8_fwd_dgrad_kernel", "conv2d_int8_wgrad_kernel")  # the per-layer conv GEMMs


class LaunchSpy:
    """Records the Triton launches of the kernels named in ``kernels`` (every kernel when none is named):
    ``calls`` holds one dict per launch, in order: its constexprs (by keyword or by position), compile options
    (``num_warps`` ...) and other keyword arguments,
    ``"kernel"`` (the kernel's name) and ``"grid"`` (a tuple); ``count`` counts them by kernel.
    ``run=False`` records without running the kernels (their outputs stay as allocated).

    It wraps the launch every ``kernel[grid](...)`` passes through (``run`` of the interpreter's and of the
    JIT's kernel classes), for the ``with`` block or, through ``spy_launches``, until the test ends."""

    def __init__(self, *kernels: str, run: bool = True):
        self.kernels, self.execute, self.calls = set(kernels), run, []

    @property
    def count(self) -> collections.Counter:
        return collections.Counter(c["kernel"] for c in self.calls)

    def _wrappers(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        from ebkernels._triton import launch_constexprs

        for cls in (InterpretedFunction, JITFunction):
            orig = cls.run

            def run(kernel, *args, grid, warmup, _orig=orig, **kwargs):
                name = getattr(kernel.fn, "__name__", "?")
                if not warmup and (not self.kernels or name in self.kernels):
                    named = launch_constexprs(kernel, args, kwargs)  # (constexprs may come by position)
                    self.calls.append({**kwargs, **named, "grid": grid if callable(grid) else tuple(grid),
                                       "kernel": name})
                    if not self.execute:
                        return None
                return _orig(kernel, *args, grid=grid, warmup=warmup, **kwargs)

            yield cls, orig, run

    def install(self, monkeypatch) -> "LaunchSpy":
        """On until the test ends."""
        for cls, _, run in list(self._wrappers()):
            monkeypatch.setattr(cls, "run", run)
        return self

    def __enter__(self) -> "LaunchSpy":
        self._undo = []
        for cls, orig, run in list(self._wrappers()):
            self._undo.append((cls, orig))
            cls.run = run
        return self

    def __exit__(self, *exc):
        for cls, orig in reversed(self._undo):
            cls.run = orig


class AtenSpy(TorchDispatchMode):
    """Records the aten ops that run inside the ``with`` block whose name (``aten.add.Tensor`` → "add") is in
    ``names`` and that ``keep(args, out)`` accepts: ``calls`` holds ``(op, shape of the first argument)``. Under a
    dispatch mode the custom ops take the ``torch.library`` path (``ops._dispatch``), which runs the same
    implementation."""

    def __init__(self, *names: str, keep=lambda args, out: True):
        super().__init__()
        self.names, self.keep, self.calls = set(names), keep, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.names and self.keep(args, out):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.calls.append((str(func), tuple(first.shape) if first is not None else ()))
        return out


def spy_launches(monkeypatch, *kernels: str, run: bool = True) -> list:
    """The launches (``LaunchSpy.calls``) of the named kernels (all when none is named) until the test ends."""
    return LaunchSpy(*kernels, run=run).install(monkeypatch).calls


def pin_tile(monkeypatch, module, lookup: str, tile) -> None:
    """Until the test ends, ``module.<lookup>`` (a tile-table function, e.g. ``wgrad_tiles.wgrad_tile`` or
    ``linear.gemm_tiles``) returns ``tile`` for every shape. The one patch of product code that acts as a
    setting (no API takes a tile): under the interpreter, long K tiles let a 2^17-term reduction run in a few
    (slow) loop steps."""
    monkeypatch.setattr(module, lookup, lambda *args, **kwargs: tile)


# ---- quantized layers: the straight-through reference -----------------------------------------------
def ste_quant(t, bits, mode="shift"):
    """Quantize-dequantize with the straight-through gradient (``bits=None``: ``t`` as it is)."""
    from ebkernels import dequantize, quantize

    if bits is None:
        return t
    q, s = quantize(t.detach(), bits, mode=mode)
    return t + (dequantize(q, s, bits).to(t.dtype) - t).detach()


class QuantizeGrad(torch.autograd.Function):
    """Identity forward; E quantization (nearest) on the way back."""

    @staticmethod
    def forward(ctx, y, bits):
        ctx.bits = bits
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        from ebkernels import dequantize, quantize

        q, s = quantize(g, ctx.bits)
        return dequantize(q, s, ctx.bits).to(g.dtype), None


# ---- early-bird masks: gamma sets and the SPEC §3 formula --------------------------------------------
RATIOS = (0.3, 0.5, 0.7)
VGG16_BN = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def preresnet_bn_widths(depth: int = 101) -> list[int]:
    """BatchNorm2d widths of the CIFAR pre-activation bottleneck ResNet (network-slimming layout):
    per block bn1 over the block input, bn2/bn3 over the inner width; a final BN over the stream."""
    n = (depth - 2) // 9  # 11 blocks per stage for depth 101
    widths, inplanes = [], 16
    for planes in (16, 32, 64):
        for _ in range(n):
            widths += [inplanes, planes, planes]
            inplanes = planes * 4  # expansion 4
    return widths + [inplanes]


PRERESNET101_BN = preresnet_bn_widths(101)
TOTALS = [1, 31, 32, 33, sum(VGG16_BN), sum(PRERESNET101_BN)]
KINDS = ["randn", "ties", "all_equal", "zeros", "negatives", "mixed"]


def fresh_gammas(total: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(total, generator=g) * 10 ** torch.empty(1).uniform_(-3, 1, generator=g).item()
    if kind == "ties":  # few distinct magnitudes, both signs: long runs of equal |gamma|
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0])
        vals = levels[torch.randint(0, 5, (total,), generator=g)]
        return vals * (torch.randint(0, 2, (total,), generator=g) * 2 - 1)
    if kind == "all_equal":
        return torch.full((total,), float(torch.rand(1, generator=g).item() + 0.1))
    if kind == "zeros":
        return torch.zeros(total)
    if kind == "negatives":
        return -torch.rand(total, generator=g) - 1e-3
    if kind == "mixed":  # zeros, signed ties, tiny (subnormal) and huge magnitudes
        x = torch.randn(total, generator=g)
        pick = torch.randint(0, 5, (total,), generator=g)
        x = torch.where(pick == 0, torch.zeros_like(x), x)
        x = torch.where(pick == 1, torch.sign(x) * 0.5, x)
        x = torch.where(pick == 2, x * 1e-40, x)
        x = torch.where(pick == 3, x * 1e30, x)
        return x
    raise AssertionError(kind)


def spec_masks_numpy(gammas: torch.Tensor, ratios) -> np.ndarray:
    """SPEC §3 in numpy: thr = sort(|g|)[floor(total * p)], keep = |g| > thr; bool [R, total]."""
    a = np.abs(gammas.cpu().numpy().astype(np.float32))
    s = np.sort(a)
    return np.stack([a > s[int(math.floor(a.size * p))] for p in ratios])


# ---- the trainer in a subprocess ---------------------------------------------------------------------
def env() -> dict:
    """This environment with the repository on PYTHONPATH."""
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def only_run_dir(out):
    dirs = [d for d in glob.glob(os.path.join(str(out), "*")) if os.path.isdir(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def start_run(args, out):
    """``python -m ebkernels ARGS --out OUT`` in the background."""
    return subprocess.Popen([sys.executable, "-m", "ebkernels", *args, "--out", str(out)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc, path_glob, timeout=120):
    """kill -9 ``proc`` as soon as a file matches ``path_glob``."""
    t0 = time.time()
    while not glob.glob(path_glob):
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stdout.read()}"
        assert time.time() - t0 < timeout, "nothing written in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def both_paths(fn, seed, device):
    """The Triton path and the reference path of ``fn()``, each after ``ebkernels.manual_seed(seed)`` (so their
    random tickets match): (Triton result, reference result, (tickets the Triton path took, tickets both took))."""
    import ebkernels
    from ebkernels import _rng, force_backend

    st = _rng.device_state(device)
    ebkernels.manual_seed(seed)
    k = fn()
    taken = st[1].item()
    ebkernels.manual_seed(seed)
    with force_backend("reference"):
        r = fn()
    return k, r, (taken, st[1].item())


# --------------------------------------------------------------------------------------------------
# float64 WAGE reference of the fused math (test_fusion, test_fusion_acts)
# --------------------------------------------------------------------------------------------------
def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ste_quant_f32(t, bits=8):
    """Per-tensor Shift quantize-dequantize of ``t`` in float32 (as the kernels see it), straight-through
    gradient."""
    from ebkernels import dequantize, quantize

    codes, s = quantize(t.detach().float(), bits)
    return t + (dequantize(codes, s, bits).to(t.dtype) - t).detach()


class RoundGradBF16(torch.autograd.Function):
    """Identity forward; the gradient rounded to bfloat16 (the fused blocks pass dz in bfloat16)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.to(torch.bfloat16).to(g.dtype)


def round_bf16(t):
    """bfloat16 rounding forward (y is held in bfloat16), straight-through backward."""
    return t + (t.detach().to(torch.bfloat16).to(t.dtype) - t.detach())


class RefQConv(torch.autograd.Function):
    """WAGE conv in float64: x already quantized; W quantized here; E quantized (nearest) on the way
    back; G quantized (nearest, the test's qconfig) before the optimizer sees it."""

    @staticmethod
    def forward(ctx, xq, w, stride, padding):
        wq = ste_quant_f32(w.detach().float()).double()
        ctx.save_for_backward(xq, wq)
        ctx.geom = (stride, padding, w.shape)
        return F.conv2d(xq, wq, None, stride, padding)

    @staticmethod
    def backward(ctx, g):
        from ebkernels import dequantize, quantize

        xq, wq = ctx.saved_tensors
        stride, padding, w_shape = ctx.geom
        codes, s = quantize(g.float(), 8)
        e = dequantize(codes, s, 8).double()
        gx = torch.nn.grad.conv2d_input(xq.shape, wq, e, stride, padding)
        gw = torch.nn.grad.conv2d_weight(xq, w_shape, e, stride, padding)
        codes, s = quantize(gw.float(), 8)
        return gx, dequantize(codes, s, 8).double(), None, None


def ref_bn(y, bn, p):
    """Training-mode BatchNorm in float64 with the module's (copied) parameters ``p``; updates p's
    running statistics like nn.BatchNorm2d."""
    mean = y.mean((0, 2, 3))
    var = y.var((0, 2, 3), unbiased=False)
    n = y.numel() // y.shape[1]
    with torch.no_grad():
        m = bn.momentum
        p["rm"].mul_(1 - m).add_(m * mean.detach())
        p["rv"].mul_(1 - m).add_(m * var.detach() * n / (n - 1))
    xhat = (y - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    return xhat * p["g"].view(1, -1, 1, 1) + p["b"].view(1, -1, 1, 1)


def ref_block(x_in, conv, bn, p_conv, p_bn, relu=True, pool=None, quant_out=True):
    """One conv → BN → ReLU (→ pool) block of the fused math, x_in already quantized (float64)."""
    y = RefQConv.apply(x_in, p_conv, conv.stride, conv.padding)
    y = round_bf16(y)
    z = ref_bn(y, bn, p_bn)
    if relu:
        z = torch.relu(z)
    if not quant_out:
        return z
    z = ste_quant_f32(z)
    if pool is not None:
        z = F.max_pool2d(z, *pool)
    return RoundGradBF16.apply(z)


def chain_grads(xk, xr, convs, bns, p_conv, p_bn, names=None) -> list:
    """(label, got, want) for the input and every conv weight, BN gamma and beta of a fused conv-BN chain against
    its float64 reference (``names[k]``: how conv k is called in the messages, default its index)."""
    out = [("input grad", xk.grad, xr.grad)]
    for k, (c, b) in enumerate(zip(convs, bns)):
        name = f"{k} ({names[k]})" if names else str(k)
        out += [(f"conv {name} weight grad", c.weight.grad, p_conv[k].grad),
                (f"bn {name} gamma grad", b.weight.grad, p_bn[k]["g"].grad),
                (f"bn {name} beta grad", b.bias.grad, p_bn[k]["b"].grad)]
    return out


def assert_near_reference(out, ref, grads, msg: str) -> None:
    """A fused chain against the float64 reference of the same math: the output within 2 %, every (label, got,
    want) gradient within 12 % (chains of quantizers amplify float32-vs-float64 rounding: test_fusion's
    docstring)."""
    assert rel(out, ref) < 0.02, msg
    for label, got, want in grads:
        assert rel(got, want) < 0.12, f"{msg}: {label}"


def leaf(t):
    return t.detach().double().clone().requires_grad_(True)


def bn_params(bn):
    return {"g": leaf(bn.weight), "b": leaf(bn.bias), "rm": bn.running_mean.detach().double().clone(),
            "rv": bn.running_var.detach().double().clone()}


def hard_bn_values(model, gen):
    """gamma < 0 in some channels, gamma ~ 0 in one, a channel pushed all-negative by beta."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            g = torch.rand(m.num_features, generator=gen) + 0.5
            g[::3] *= -1
            g[1] = 1e-6
            b = torch.randn(m.num_features, generator=gen) * 0.2
            b[2] = -50.0  # relu(bn) == 0 everywhere in that channel
            m.weight.data.copy_(g)
            m.bias.data.copy_(b)
