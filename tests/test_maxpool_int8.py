"""Max-pool over int8 codes and its backward (SPEC §9): the pooled codes and the *first* maximum's window
position against a brute-force first-maximum scan, the PyTorch reference and ``F.max_pool2d`` on the
codes as floats; the backward against the reference and against autograd of ``F.max_pool2d`` (PyTorch's
first-maximum rule) — exactly, with gradients whose sums are exact. Ceil mode on odd sizes, overlapping
windows with padding, many ties, channel padding, two channel blocks."""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from ebkernels.ops.fused.maxpool import _bwd_op, _fwd_op, maxpool2d_int8, maxpool2d_int8_backward, maxpool2d_int8_backward_reference, maxpool2d_int8_reference, pool_output_size
from helpers import CL, bits_equal, fresh_seed, gen, mismatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: no intra-op thread contention

class PoolCase(NamedTuple):
    N: int
    Cp: int  # code channels: C real ones, the rest zero (the fused flow's channel padding)
    C: int
    H: int
    W: int
    k: object  # an int or (kh, kw)
    s: object
    p: object
    ceil: bool
    code_range: tuple  # (lo, hi)
    channels_last: bool  # the codes' layout

    @property
    def id(self):
        k, s, p = ("x".join(map(str, _pair(v))) for v in (self.k, self.s, self.p))
        return "N{}Cp{}C{}H{}W{}-k{}s{}p{}{}-codes{}..{}{}".format(*self[:5], k, s, p, "-ceil" if self.ceil else "",
                                                                 *self.code_range,
                                                                 "-cl" if self.channels_last else "-nchw")


CASES = [
    # ceil mode on odd sizes: 4 x 5 windows, ragged edge
    PoolCase(N=2, Cp=16, C=13, H=7, W=9, k=2, s=2, p=0, ceil=True, code_range=(-127, 127), channels_last=True),
    # ties everywhere (post-ReLU codes)
    PoolCase(N=2, Cp=32, C=32, H=8, W=6, k=2, s=2, p=0, ceil=False, code_range=(0, 3), channels_last=True),
    # overlapping windows, padding, ties
    PoolCase(N=1, Cp=16, C=10, H=9, W=7, k=3, s=2, p=1, ceil=False, code_range=(-2, 2), channels_last=True),
    # overlapping + ceil mode, NCHW codes
    PoolCase(N=2, Cp=16, C=16, H=10, W=8, k=3, s=2, p=1, ceil=True, code_range=(0, 127), channels_last=False),
    # stride 1 (3 x 3 windows per input), two channel blocks
    PoolCase(N=1, Cp=144, C=130, H=5, W=6, k=3, s=1, p=1, ceil=False, code_range=(-1, 1), channels_last=True),
    # k = s = 3, ceil: partial windows at both edges
    PoolCase(N=2, Cp=16, C=5, H=7, W=8, k=3, s=3, p=0, ceil=True, code_range=(-5, 5), channels_last=True),
    PoolCase(N=2, Cp=16, C=9, H=7, W=6, k=(3, 2), s=(2, 1), p=(1, 0), ceil=True, code_range=(-3, 3),
             channels_last=True),  # rectangular kernel, stride and padding
]


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _geometry(case):
    """(k, s, p) pairs, (OH, OW)."""
    H, W = case.H, case.W
    k, s, p = (_pair(v) for v in (case.k, case.s, case.p))
    ceil = case.ceil
    return k, s, p, (pool_output_size(H, k[0], s[0], p[0], ceil), pool_output_size(W, k[1], s[1], p[1], ceil))


def _codes(case, g, device):
    N, Cp, C, H, W = case[:5]
    lo, hi = case.code_range
    q = torch.randint(lo, hi + 1, (N, Cp, H, W), generator=g, dtype=torch.int8)
    q[:, C:] = 0  # the channel padding of the fused flow
    q = q.contiguous(memory_format=CL) if case.channels_last else q
    return q.to(device)


def _first_max(q, k, s, p, OH, OW):
    """Brute force: each window's max and the row-major position of its first maximum (padding never wins)."""
    N, C, H, W = q.shape
    pad = torch.full((N, C, H + 2 * p[0] + k[0] + s[0], W + 2 * p[1] + k[1] + s[1]), -129, dtype=torch.int32)
    pad[:, :, p[0]:p[0] + H, p[1]:p[1] + W] = q.cpu().int()
    best = torch.full((N, C, OH, OW), -130, dtype=torch.int32)
    pos = torch.zeros((N, C, OH, OW), dtype=torch.int32)
    for kh in range(k[0]):
        for kw in range(k[1]):
            v = pad[:, :, kh:kh + s[0] * OH:s[0], kw:kw + s[1] * OW:s[1]][:, :, :OH, :OW]
            better = v > best
            best = torch.where(better, v, best)
            pos = torch.where(better, torch.full_like(pos, kh * k[1] + kw), pos)
    assert best.min() >= -127
    return best.to(torch.int8), pos.to(torch.int8)


def test_output_size_matches_pytorch():
    for size in range(1, 12):
        for k in (1, 2, 3, 4):
            for s in (1, 2, 3):
                for p in range(0, k // 2 + 1):
                    if size + 2 * p < k:
                        continue
                    for ceil in (False, True):
                        want = F.max_pool2d(torch.zeros(1, 1, size, size), k, s, p, 1, ceil).shape[-1]
                        assert pool_output_size(size, k, s, p, ceil) == want, (size, k, s, p, ceil)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_forward_codes_and_first_max(device, poisoned, case):
    N, Cp, C, H, W = case[:5]
    ceil = case.ceil
    k, s, p, (OH, OW) = _geometry(case)
    seed = fresh_seed()
    msg = f"seed={seed} case={case.id}"
    g = gen(seed)
    q = _codes(case, g, device)
    out, pos = maxpool2d_int8(q, k, s, p, ceil)
    assert out.shape == pos.shape == (N, Cp, OH, OW) and out.dtype == pos.dtype == torch.int8, msg
    assert out.is_contiguous(memory_format=CL) and pos.is_contiguous(memory_format=CL), msg
    best, first = _first_max(q, k, s, p, OH, OW)
    assert torch.equal(out.cpu(), best), f"pooled codes {msg}: {mismatch(out.cpu(), best)}"
    assert torch.equal(pos.cpu(), first), f"first-max positions {msg}: {mismatch(pos.cpu(), first)}"
    out_r, pos_r = maxpool2d_int8_reference(q.cpu(), list(k), list(s), list(p), ceil)
    assert torch.equal(out.cpu(), out_r) and torch.equal(pos.cpu(), pos_r), msg
    # F.max_pool2d on the codes as floats (contiguous: its first-maximum indices)
    ref, idx = F.max_pool2d(q.cpu().float().contiguous(), k, s, p, 1, ceil, return_indices=True)
    assert torch.equal(out.cpu().float(), ref), msg
    oh = torch.arange(OH).view(1, 1, -1, 1)
    ow = torch.arange(OW).view(1, 1, 1, -1)
    want = (idx // W - (oh * s[0] - p[0])) * k[1] + (idx % W - (ow * s[1] - p[1]))
    assert torch.equal(pos.cpu().long(), want), f"vs F.max_pool2d indices {msg}"
    if case.code_range[1] - case.code_range[0] <= 6:  # the tie cases really have ties
        assert (pos.cpu() != 0).any() and (best == q.cpu().amax()).sum() > best.numel() // 4, msg


def _exact_grad(shape, g, dtype, layout):
    """Multiples of 1/16 in [-4, 4]: every sum of a few of them is exact in bfloat16 and float32."""
    t = (torch.randint(-64, 65, shape, generator=g).float() / 16).to(dtype)
    return t.contiguous(memory_format=CL) if layout == "cl" else t.contiguous()


@pytest.mark.parametrize("dtype, layout", [(torch.bfloat16, "cl"), (torch.float32, "nchw")],
                         ids=["bf16-cl", "f32-nchw"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_backward_first_max_rule(device, poisoned, case, dtype, layout):
    N, Cp, C, H, W = case[:5]
    ceil = case.ceil
    k, s, p, (OH, OW) = _geometry(case)
    seed = fresh_seed()
    msg = f"seed={seed} case={case.id} {dtype} {layout}"
    g = gen(seed)
    q = _codes(case, g, device)
    out, pos = maxpool2d_int8(q, k, s, p, ceil)
    dp = _exact_grad((N, C, OH, OW), g, dtype, layout).to(device)
    dx = maxpool2d_int8_backward(dp, pos, (H, W), C, k, s, p, ceil)
    assert dx.shape == (N, C, H, W) and dx.dtype == dtype and dx.is_contiguous(memory_format=CL), msg
    dx_r = maxpool2d_int8_backward_reference(dp.cpu(), pos.cpu(), [H, W], C, list(k), list(s), list(p), ceil)
    assert bits_equal(dx.cpu(), dx_r), f"vs reference {msg}: {mismatch(dx.cpu(), dx_r)}"
    # autograd of F.max_pool2d on the codes as floats: the gradient goes to each window's first maximum
    x = q[:, :C].cpu().double().contiguous().requires_grad_()
    F.max_pool2d(x, k, s, p, 1, ceil).backward(dp.cpu().double())
    assert bits_equal(dx.cpu(), x.grad.to(dtype)), f"vs autograd {msg}: {mismatch(dx.cpu(), x.grad.to(dtype))}"
    assert dx.abs().sum().item() > 0, msg


def test_backward_random_float_gradient(device, poisoned):
    """Arbitrary float32 gradients, overlapping windows: sums within float32 rounding of autograd's."""
    seed = fresh_seed()
    g = gen(seed)
    case = CASES[2]
    q = _codes(case, g, device)
    out, pos = maxpool2d_int8(q, (3, 3), (2, 2), (1, 1), False)
    dp = torch.randn((1, 10, *out.shape[2:]), generator=g).to(device)
    dx = maxpool2d_int8_backward(dp, pos, (9, 7), 10, (3, 3), (2, 2), (1, 1), False)
    x = q[:, :10].cpu().double().contiguous().requires_grad_()
    F.max_pool2d(x, 3, 2, 1).backward(dp.cpu().double())
    torch.testing.assert_close(dx.cpu().double(), x.grad, rtol=1e-6, atol=1e-6, msg=lambda m: f"seed={seed}: {m}")


def test_backward_positions_in_any_layout(device, poisoned):
    seed = fresh_seed()
    g = gen(seed)
    q = _codes(CASES[0], g, device)
    out, pos = maxpool2d_int8(q, (2, 2), (2, 2), (0, 0), True)
    dp = _exact_grad((2, 13, *out.shape[2:]), g, torch.float32, "cl").to(device)
    want = maxpool2d_int8_backward(dp, pos, (7, 9), 13, (2, 2), (2, 2), (0, 0), True)
    got = maxpool2d_int8_backward(dp, pos.contiguous(), (7, 9), 13, (2, 2), (2, 2), (0, 0), True)
    assert bits_equal(got.cpu(), want.cpu()), f"seed={seed}: {mismatch(got.cpu(), want.cpu())}"


def test_monotone_quantization_commutes_with_pooling(device):
    """SPEC §9: with one per-tensor scale, maxpool(q(z)) == q(maxpool(z))."""
    from ebkernels.ops.quantize import quantize_reference
    seed = fresh_seed()
    g = gen(seed)
    z = torch.relu(torch.randn((2, 16, 9, 8), generator=g)).contiguous(memory_format=CL)
    qz, sz = quantize_reference(z)
    pooled, _ = maxpool2d_int8(qz.to(device), (2, 2), (2, 2), (0, 0), True)
    zp = F.max_pool2d(z, 2, 2, 0, 1, True)
    S = 128.0
    want = torch.round((zp / sz * S).clamp(-(S - 1), S - 1)).to(torch.int8)  # q(maxpool(z)) with z's scale
    assert torch.equal(pooled.cpu(), want), f"seed={seed}"


def test_opcheck():
    g = gen(4)
    case = CASES[2]
    q = _codes(case, g, "cpu")
    torch.library.opcheck(_fwd_op, (q, [3, 3], [2, 2], [1, 1], False))
    out, pos = maxpool2d_int8(q, (3, 3), (2, 2), (1, 1), False)
    dp = _exact_grad((1, 10, *out.shape[2:]), g, torch.bfloat16, "cl")
    torch.library.opcheck(_bwd_op, (dp, pos, [9, 7], 10, [3, 3], [2, 2], [1, 1], False))
