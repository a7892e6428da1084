"""The absmax scale mode (SPEC §2: ``s = max|x|·S/(S-1)``, so max|x| maps to code S-1): the rule itself
(kernel device function against the PyTorch reference, bit for bit, over every exponent, and against the
exact rational value), where max|x| lands after float rounding, ties, zero tensors, the quantizer's kernels
against the reference for fresh inputs, the codes against a float64 formula, and G quantized in absmax
inside the weight-grad GEMMs. Non-finite input: ``test_quantize.test_nonfinite_propagates`` (all modes);
the fused path's scale from per-channel extremes: ``test_bn_relu_quant`` / ``test_bn_relu_bwd`` (absmax
cases); weights in one launch: ``test_weight_codes``."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import ebkernels
from ebkernels import _rng, quantize
from ebkernels.ops._launch import MAX_TERMS
from ebkernels.ops._scale import absmax_scale_reference, scale_from_bits, scale_reference
from ebkernels.ops.gemm.conv import conv2d_int8_wgrad_op, conv2d_int8_wgrad_reference
from ebkernels.ops.gemm.linear import _linear_int8_mm_op, linear_int8_mm_reference
from ebkernels.ops.quantize import quantize_dequantize, quantize_reference, quantize_triton
from helpers import both_paths, bits_equal, codes, fresh_seed, gen, mismatch

# small tensors: no intra-op thread contention; the device random state put back after each test
pytestmark = pytest.mark.usefixtures("one_torch_thread", "rng_state")



@triton.jit
def _scales_kernel(bits_ptr, out_ptr, n, SCALE_MODE: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out_ptr + i, scale_from_bits(tl.load(bits_ptr + i, mask=m, other=0), SCALE_MODE, BITS), mask=m)


def _kernel_scales(amax: torch.Tensor, mode: int, bits: int, device) -> torch.Tensor:
    b = amax.float().view(torch.int32).to(device)
    out = torch.empty(b.shape, dtype=torch.float32, device=device)
    _scales_kernel[(triton.cdiv(b.numel(), 1024),)](b, out, b.numel(), SCALE_MODE=mode, BITS=bits, BLOCK=1024)
    return out.cpu()


def _amax_sweep(g) -> torch.Tensor:
    """Non-negative float32 values over every exponent (subnormals included), and the edges."""
    bits = torch.randint(0, 0x7F800000, (20_000,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, 1.4e-45, 2.0 ** -126, 2.0 ** -126 * 127 / 128, 2.0 ** -126 * 129 / 128, 1.0, 127.0,
                          3.0e38, 3.3e38, 3.4028234663852886e38, float("inf"), float("nan")], dtype=torch.float32)
    return torch.cat([bits.view(torch.float32), edges])


def _f32_nearest(q: Fraction) -> float:
    """The float32 nearest to a positive rational (ties to even), for the normal range."""
    lo = float(np.float32(float(q)))  # within an ulp; then settle against the exact value
    cands = sorted({lo, float(np.nextafter(np.float32(lo), np.float32(0))),
                    float(np.nextafter(np.float32(lo), np.float32(np.inf)))})
    return min(cands, key=lambda c: (abs(Fraction(c) - q), int(np.float32(c).view(np.int32)) & 1))


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_absmax_scale_rule_kernel_equals_reference(device, bits):
    """``scale_from_bits`` (the kernels' rule) and ``absmax_scale_reference`` agree bit for bit on 20,000
    random float32 magnitudes and the edges; the value is the float32 nearest to the exact amax·S/(S-1),
    clamped to [2^-126, FLT_MAX]; 0 -> 1; NaN/inf pass through."""
    s = fresh_seed()
    amax = _amax_sweep(gen(s))
    ref = absmax_scale_reference(amax, bits)
    got = _kernel_scales(amax, 2, bits, device)
    assert bits_equal(got, ref), f"seed={s} bits={bits}: {mismatch(got, ref)}"
    S = 2 ** (bits - 1)
    for a, r in zip(amax.tolist()[::97] + amax.tolist()[-12:], ref.tolist()[::97] + ref.tolist()[-12:]):
        if math.isnan(a):
            assert math.isnan(r)
        elif a == math.inf:
            assert r == math.inf
        elif a == 0:
            assert r == 1.0
        else:
            exact = Fraction(a) * S / (S - 1)
            want = min(max(_f32_nearest(exact) if exact < 2 ** 128 else math.inf, 2.0 ** -126), 3.4028234663852886e38)
            assert r == want, f"seed={s} bits={bits} amax={a!r}: {r!r} != {want!r}"
    # the other modes through the same device function
    for mode, name in ((0, "shift"), (1, "wage")):
        assert bits_equal(_kernel_scales(amax, mode, bits, device), scale_reference(amax, name, bits)), name


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_max_maps_to_the_largest_code(device, bits):
    """After float rounding (s rounded, x/s rounded), ±max|x| still becomes ±(S-1) exactly, at every
    magnitude: ``fl(amax/s)·S`` is within a few ulp of S-1, far from any rounding boundary; the clip
    then never bites (stochastic: floor(S-1 + u) = S-1)."""
    s = fresh_seed()
    g = gen(s)
    S = 2 ** (bits - 1)
    e = torch.empty(400).uniform_(-125, 126, generator=g)
    amax = (torch.exp2(e) * torch.empty(400).uniform_(1, 2, generator=g)).float()
    amax = amax[torch.isfinite(amax) & (amax > 0)]
    sc = absmax_scale_reference(amax, bits)
    v = (amax / sc) * S  # the kernels' float32 operations
    assert ((v - (S - 1)).abs() < 1e-4 * S).all(), f"seed={s}"
    for a in amax[:12]:
        x = torch.stack([a, -a, a * 0.3, -a * 0.77]).to(device)
        for impl in (quantize_reference, quantize_triton):
            for stoch in (False, True):
                q, _ = impl(x, bits, stoch, "absmax", 5)
                assert q[0].item() == S - 1 and q[1].item() == -(S - 1), f"seed={s} amax={a.item()!r} {impl}"


def test_ties_round_half_to_even_and_the_clip(device):
    """max|x| = S-1 gives s = S exactly (so x/s·S = x): every tie k + 0.5 rounds half to even, and the
    codes never pass ±(S-1)."""
    for bits in (4, 8):
        S = 2 ** (bits - 1)
        halves = torch.arange(-(S - 1), S - 1, dtype=torch.float32) + 0.5
        x = torch.cat([halves, torch.tensor([float(S - 1)])]).to(device)
        for impl in (quantize_reference, quantize_triton):
            q, sc = impl(x, bits, False, "absmax")
            assert sc.item() == float(S)
            assert torch.equal(q[:-1].cpu().float(), torch.round(halves)), impl
            assert q[-1].item() == S - 1 and q.abs().max().item() == S - 1


def test_zero_and_empty_tensors(device):
    """An all-zero tensor gets s = 1 (codes 0), as in the other modes; an empty one too."""
    x = torch.zeros(3000, device=device)
    for impl in (quantize_reference, quantize_triton):
        q, sc = impl(x, 8, False, "absmax")
        assert sc.item() == 1.0 and q.abs().max().item() == 0
    q, sc = quantize(torch.zeros(0, device=device), mode="absmax")
    assert q.numel() == 0 and sc.item() == 1.0


def _fresh(shape, g, device):
    scale = 10 ** torch.empty(1).uniform_(-3, 3, generator=g).item()
    return (torch.randn(shape, generator=g) * scale).to(device)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(7,), (33, 5), (3, 5, 7, 9), (2, 3, 4, 5, 6), (70_001,)], ids=str)
def test_kernels_bit_identical_to_reference(device, poisoned, shape, rounding):
    """Both Triton paths (one program, absmax + codes kernels) against the reference, fresh inputs; the
    nearest codes against the SPEC formula in float64 (the scale as given), away from near-ties where the
    float32 division may land either side."""
    s = fresh_seed()
    msg = f"seed={s} {shape} {rounding}"
    x = _fresh(shape, gen(s), device)
    for bits in (3, 8):
        kw = dict(rounding=rounding, seed=s % 1000) if rounding == "stochastic" else {}
        q, sc = quantize(x, bits, mode="absmax", **kw)
        q_r, sc_r = quantize_reference(x.cpu(), bits, rounding == "stochastic", "absmax", s % 1000)
        assert bits_equal(sc.cpu(), sc_r) and torch.equal(q.cpu(), q_r), f"bits={bits} {msg}: {mismatch(q.cpu(), q_r)}"
        S = 2 ** (bits - 1)
        v64 = (x.cpu().double() / sc_r.double() * S).clamp(-(S - 1), S - 1)
        if rounding == "nearest":
            far = ((v64 - torch.floor(v64) - 0.5).abs() > 1e-5)
            assert torch.equal(q_r.double()[far], torch.round(v64)[far]), f"bits={bits} {msg}"
            assert q_r.abs().max().item() == S - 1, msg
        else:
            qd = q_r.double()
            assert ((qd == torch.floor(v64)) | (qd == torch.ceil(v64)) | ((qd - v64).abs() < 1e-4)).all(), msg
        # dequantize(quantize) in one pass: the same values
        ebkernels.manual_seed(3)
        dq = quantize_dequantize(x, bits, mode="absmax", **kw)
        assert bits_equal(dq.cpu(), ebkernels.dequantize(q, sc, bits).cpu()), msg


def test_layouts_and_padding(device, poisoned):
    g = gen(fresh_seed())
    base = _fresh((3, 6, 7, 5), g, device)
    want, s_want = quantize_reference(base.cpu(), 8, False, "absmax")
    codes_cl, s_cl = quantize(base.contiguous(memory_format=torch.channels_last), mode="absmax")
    codes_pad, s_pad = quantize(base, mode="absmax", channels_last=True, pad_channels_to=16)
    assert torch.equal(codes_cl.cpu(), want) and bits_equal(s_cl.cpu(), s_want)
    assert torch.equal(codes_pad[:, :6].cpu(), want) and bits_equal(s_pad.cpu(), s_want)
    assert codes_pad[:, 6:].abs().max().item() == 0


# ---- G quantized in absmax inside the weight-grad GEMMs ---------------------------------------------
def _check_g_absmax(gq, gq_ref, taken, exact, rounding, msg):
    """The fused/GEMM path equals the reference path bit for bit; the values are the absmax codes of the
    exact gradient (floor/ceil when stochastic)."""
    assert bits_equal(gq.cpu(), gq_ref.cpu()), f"Triton vs reference {msg}: {mismatch(gq.cpu(), gq_ref.cpu())}"
    want = int(rounding == "stochastic")
    assert taken == (want, want), f"tickets {taken} {msg}"
    q, sc = quantize_reference(exact.cpu(), 8, False, "absmax")
    v = (exact.cpu() / sc) * 128
    back = gq.cpu() / (sc / 128)
    k = torch.round(back)
    assert (back - k).abs().max().item() < 1e-3, msg
    if rounding == "stochastic":
        assert ((k == torch.floor(v)) | (k == torch.ceil(v))).all(), msg
    else:
        assert torch.equal(gq.cpu(), ebkernels.dequantize(q, sc)), msg


@pytest.mark.parametrize("cin, cout, rounding", [(13, 20, "stochastic"), (13, 20, "nearest"), (93, 90, "stochastic")],
                         ids=["small-stochastic", "small-nearest", "large-stochastic"])
def test_conv_weight_grad_g_absmax(device, cin, cout, rounding):
    """Small gradients too take the GEMM's GQ=1 codes pass in absmax (its in-place GQ=2 path is Shift's)."""
    s = fresh_seed()
    msg = f"seed={s} cin={cin} cout={cout} {rounding}"
    g = gen(s)
    pi, po = -(-cin // 16) * 16, -(-cout // 16) * 16
    qx = codes((2, pi, 7, 6), g, device, pad_from=cin)
    qe = codes((2, po, 7, 6), g, device, channels_last=False, pad_from=cout)
    qe = qe.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    se, sx = torch.tensor(0.0123, device=device), torch.tensor(1.7, device=device)  # absmax scales: any float
    geo = ([3, 3], [1, 1], [1, 1], [1, 1])

    def run():
        return conv2d_int8_wgrad_op(qe, qx, se, sx, *geo, 1, 8, 8, torch.float32, MAX_TERMS, 8, rounding,
                                     [cout, cin], _rng.device_state(device), mode_g="absmax")

    gq, gq_ref, taken = both_paths(run, s % 1000, device)
    exact = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), se.cpu(), sx.cpu(), *geo, 1, 8, 8, torch.float32)
    _check_g_absmax(gq, gq_ref, taken, exact[:cout, :cin].contiguous(), rounding, msg)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_linear_weight_grad_g_absmax(device, rounding):
    s = fresh_seed()
    msg = f"seed={s} {rounding}"
    g = gen(s)
    qe = codes((50, 40), g, device, channels_last=False)
    qx = codes((50, 30), g, device, channels_last=False)
    se, sx = torch.tensor(3.1e-4, device=device), torch.tensor(5.3, device=device)

    def run():
        return _linear_int8_mm_op(qe.t(), qx, se, sx, None, 8, 8, torch.float32, MAX_TERMS, 8, rounding,
                                  _rng.device_state(device), "absmax")

    gq, gq_ref, taken = both_paths(run, s % 1000, device)
    exact = linear_int8_mm_reference(qe.t().cpu(), qx.cpu(), se.cpu(), sx.cpu(), None, 8, 8, torch.float32)
    _check_g_absmax(gq, gq_ref, taken, exact, rounding, msg)
