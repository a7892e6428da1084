"""Shared helpers of the tests of the fused int8 data flow (SPEC §9): fresh seeds, poisoned kernel
outputs, bit-level comparisons.

- ``fresh_seed()``: a new seed per test run (``EBK_TEST_SEED=<int>`` replays one); every assert message of
  these tests carries it.
- ``poisoned`` (a fixture of conftest.py): every buffer a kernel allocates through ``_igemm.empty_output`` starts as NaN (floats),
  -128 (int8: never a code, never a window position) or 0x7F7F7F7F (int32/int64), so an element a
  kernel fails to write shows up.
- ``bits_equal(a, b)``: same shape and the same bits (NaN payloads, -0.0 vs +0.0 included).
- ``spy_kernels(monkeypatch, targets)``: records the grid and constexprs of every launch of the named kernels.
"""
import os

import torch


CL = torch.channels_last


def fresh_seed() -> int:
    env = os.environ.get("EBK_TEST_SEED")
    return int(env) if env else int(torch.randint(0, 2**31 - 1, (1,)).item())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def poison_empty(shape, dtype, device, memory_format=torch.contiguous_format):
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if dtype.is_floating_point:
        return t.fill_(float("nan"))
    if dtype == torch.int8:
        return t.fill_(-128)
    return t.fill_(0x7F7F7F7F)


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


class LaunchSpy:
    """Stands in for a Triton kernel: records every launch's grid and keyword (constexpr) arguments."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.calls.append({**kw, "grid": tuple(grid), "kernel": self.kernel})
            return launch(*args, **kw)
        return run


def spy_kernels(monkeypatch, targets):
    """The launches, in order, of the kernels ``targets``: (module, kernel name) pairs, each replaced there
    by a ``LaunchSpy``."""
    calls = []
    for mod, name in targets:
        monkeypatch.setattr(mod, name, LaunchSpy(getattr(mod, name), calls))
    return calls
