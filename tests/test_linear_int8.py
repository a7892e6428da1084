"""Int8 Linear: GEMM kernel against the float64 oracle on the same codes, split-K in one launch (the splits
meet in the int64 workspace, left zero), autograd function against autograd through the reference under
the straight-through rule, the int32-overflow guard, bad input."""
import pytest
import torch
import torch.nn.functional as F

import ebkernels
from ebkernels import QConfig, _rng, force_backend, qlinear
from ebkernels.ops.gemm import linear as linear_int8
from ebkernels.ops._buffers import _POOLS
from ebkernels.ops._launch import MAX_TERMS
from ebkernels.ops.gemm.linear import linear_int8_mm, linear_int8_mm_reference
from helpers import AtenSpy, LaunchSpy, QuantizeGrad, fresh_seed, pin_tile, spy_launches, ste_quant


def _codes(shape, gen, device, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8).to(device)


def _operands(M, K, N, layout, gen, device):
    """a [M, K], b [K, N] int8 in the strides of the three uses: fwd (x, Wᵀ view), dgrad (E, W),
    wgrad (Eᵀ view, x)."""
    if layout == "fwd":
        return _codes((M, K), gen, device), _codes((N, K), gen, device).t()
    if layout == "dgrad":
        return _codes((M, K), gen, device), _codes((K, N), gen, device)
    return _codes((K, M), gen, device).t(), _codes((K, N), gen, device)


# ragged edges everywhere; the last one spans more row tiles than one GROUP_M band (interpreter tiles 64×32)
# the last one has every extent a multiple of 16: ALIGN=16 (vector-load hints) in all three layouts
SHAPES = [(1, 3, 1), (3, 17, 64), (8, 64, 17), (37, 100, 33), (300, 33, 40), (48, 64, 32)]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("layout", ["fwd", "dgrad", "wgrad"])
def test_integer_sums_exact(device, poisoned, M, K, N, layout):
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a, b = _operands(M, K, N, layout, gen, device)
    ref = linear_int8_mm_reference(a.cpu(), b.cpu(), None, None, None, 8, 8, torch.float32)
    assert ref.abs().sum() > 0
    # whole reduction in one int32 accumulator, and split into chunks of 32 terms combined in int64
    for max_terms in (MAX_TERMS, 32):
        got = linear_int8_mm(a, b, max_terms=max_terms)
        assert got.dtype == torch.int64
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("M,K,N", SHAPES[1:4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantized_epilogue(device, poisoned, M, K, N, bias, out_dtype):
    gen = torch.Generator().manual_seed(7 * M + N)
    a, b = _operands(M, K, N, "fwd", gen, device)
    sa = torch.tensor(2.0 ** -3, device=device)
    sb = torch.tensor(2.0 ** 5, device=device)
    bvec = torch.randn(N, generator=gen).to(device) if bias else None
    ref = linear_int8_mm_reference(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), None if bvec is None else bvec.cpu(),
                                   8, 6, out_dtype)
    for max_terms in (MAX_TERMS, 32):  # one split, and split-K where K > 64 (the last split applies the epilogue)
        got = linear_int8_mm(a, b, sa, sb, bvec, bits_a=8, bits_b=6, out_dtype=out_dtype, max_terms=max_terms)
        assert got.dtype == out_dtype
        # fp32: identical epilogue, bit for bit; bf16: the interpreter's fp32->bf16 cast truncates where
        # the GPU rounds to nearest, so allow one bf16 ulp
        rtol = 2.0 ** -7 if out_dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(got.cpu(), ref, rtol=rtol, atol=0)
    # and the scaling itself against an independent float64 computation
    exp = (a.cpu().double() @ b.cpu().double()) * (2.0 ** -3 * 2.0 ** 5 / (128 * 32))
    if bias:
        exp = exp + bvec.cpu().double()
    torch.testing.assert_close(got.cpu().double(), exp, rtol=1e-2 if out_dtype == torch.bfloat16 else 1e-6,
                               atol=1e-5)


def pools_are_zero() -> bool:
    """Every counter pool (semaphores, split-K workspaces) is zero again: the next launch needs no memset."""
    return bool(_POOLS) and all(int(torch.count_nonzero(p)) == 0 for p in _POOLS.values())


@pytest.mark.parametrize("layout", ["fwd", "dgrad", "wgrad"])
def test_split_k_in_one_launch(device, poisoned, monkeypatch, layout):
    """A 200-term reduction in chunks of 64 (4 splits, the last one 8 terms) over 2×2 ragged output tiles:
    one launch, no partial buffer, no finalize kernel; exact against the float64 oracle (int64 sums, scaled
    with bias in float32 and bfloat16), every element written, the workspace zero again afterwards."""
    M, K, N, max_terms = 70, 200, 40, 64
    s = fresh_seed()
    gen = torch.Generator().manual_seed(s)
    a, b = _operands(M, K, N, layout, gen, device)
    sa = torch.tensor(2.0 ** -4, device=device)
    sb = torch.tensor(2.0 ** 3, device=device)
    bias = torch.randn(N, generator=gen).to(device)
    ac, bc = a.cpu(), b.cpu()
    calls = spy_launches(monkeypatch, "linear_int8_gemm_kernel")
    for scales, out_dtype in (((None, None, None), torch.float32), ((sa, sb, bias), torch.float32),
                              ((sa, sb, bias), torch.bfloat16)):
        ref = linear_int8_mm_reference(ac, bc, *(t if t is None else t.cpu() for t in scales), 8, 8, out_dtype)
        assert torch.count_nonzero(ref) == ref.numel()
        with LaunchSpy() as launches:
            got = linear_int8_mm(a, b, *scales, out_dtype=out_dtype, max_terms=max_terms)
        msg = f"seed={s} {layout} {got.dtype}"
        assert dict(launches.count) == {"linear_int8_gemm_kernel": 1}, msg
        assert calls[-1]["SPLIT_FIX"] and calls[-1]["grid"][1] == 4, msg
        assert got.dtype == ref.dtype, msg
        # bf16: the same rounding (cast_rne) as torch's, bit for bit
        torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0, msg=msg)
        assert pools_are_zero(), msg


@pytest.fixture
def long_k_tiles(monkeypatch, device):
    """Under the interpreter, long K tiles so a 134,000-term reduction takes few (slow) loop steps."""
    if device.type == "cpu":
        tiles = {"BM": 16, "BN": 16, "BK": 4096, "GROUP_M": 1, "num_warps": 4, "num_stages": 1}
        pin_tile(monkeypatch, linear_int8, "gemm_tiles", tiles)


def test_int32_overflow_guard(device, poisoned, long_k_tiles, monkeypatch):
    """Weight-grad-like reduction of 134,000 maximal products: 127² · 134,000 > 2^31: split, each split's
    int32 sum at most 2^17 terms, the splits added in int64."""
    calls = spy_launches(monkeypatch, "linear_int8_gemm_kernel")
    rows = 134_000
    e = torch.full((rows, 2), 127, dtype=torch.int8)
    x = torch.full((rows, 3), -127, dtype=torch.int8)
    e[::7, 1] = -127  # second column: mixed signs, still far past int32 in the first
    e, x = e.to(device), x.to(device)
    got = linear_int8_mm(e.t(), x)
    ref = linear_int8_mm_reference(e.t().cpu(), x.cpu(), None, None, None, 8, 8, torch.float32)
    assert ref.abs().max() > 2 ** 31
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0)
    se, sx = torch.tensor(1.0, device=device), torch.tensor(0.5, device=device)
    y = linear_int8_mm(e.t(), x, se, sx)
    torch.testing.assert_close(y.cpu(), linear_int8_mm_reference(e.t().cpu(), x.cpu(), se.cpu(), sx.cpu(), None,
                                                                 8, 8, torch.float32), rtol=0, atol=0)
    assert len(calls) == 2 and all(c["SPLIT_FIX"] and c["grid"][1] >= 2 for c in calls)
    assert pools_are_zero()


# --------------------------------------------------------------------------------------------------
# qlinear: forward / backward
# --------------------------------------------------------------------------------------------------
def _reference_qlinear(x, w, b, qc):
    """Autograd through float64 ops on the quantized operands (straight-through rule)."""
    y = F.linear(ste_quant(x.double(), qc.bits_a), ste_quant(w.double(), qc.bits_w),
                 None if b is None else b.double())
    return QuantizeGrad.apply(y, qc.bits_e) if qc.bits_e is not None else y


# E rounded to nearest (the oracle's ``_QuantizeGrad``); the stochastic default: test_stochastic_e.py
QCONFIGS = {
    "int8": QConfig(bits_g=None, rounding_e="nearest"),
    "e_float": QConfig(bits_e=None, bits_g=None),
    "a_float": QConfig(bits_a=None, bits_g=None, rounding_e="nearest"),
    "w_float_4bit_a": QConfig(bits_w=None, bits_a=4, bits_g=None, rounding_e="nearest"),
}


@pytest.mark.parametrize("qname", list(QCONFIGS))
@pytest.mark.parametrize("shape,out_f,bias", [((3, 17), 64, True), ((2, 5, 64), 17, False), ((17,), 3, True)])
def test_qlinear_forward_backward_ste(device, poisoned, qname, shape, out_f, bias):
    qc = QCONFIGS[qname]
    gen = torch.Generator().manual_seed(len(shape) * 100 + out_f)
    x0 = torch.randn(shape, generator=gen).to(device)
    w0 = (0.3 * torch.randn(out_f, shape[-1], generator=gen)).to(device)
    b0 = torch.randn(out_f, generator=gen).to(device) if bias else None
    gy = torch.randn(*shape[:-1], out_f, generator=gen).to(device)

    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if bias else None
    y = qlinear(x, w, b, qc)
    assert y.shape == (*shape[:-1], out_f) and y.dtype == torch.float32
    y.backward(gy)

    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    br = b0.clone().requires_grad_() if bias else None
    yr = _reference_qlinear(xr, wr, br, qc)
    yr.backward(gy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(b.grad, gy.reshape(-1, out_f).sum(0), rtol=1e-6, atol=1e-6)

    # the Triton path and the PyTorch reference path give the same numbers (bit for bit forward)
    with force_backend("reference"):
        y_ref = qlinear(x0, w0, b0, qc)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_qlinear_g_quantization(device):
    """bits_g=8: the weight gradient is the exact one, stochastically rounded to the G grid."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(9, 33, generator=gen).to(device)
    w0 = torch.randn(20, 33, generator=gen).to(device)
    gy = torch.randn(9, 20, generator=gen).to(device)
    grads = {}
    for name, qc in (("exact", QConfig(bits_g=None, rounding_e="nearest")), ("g8", QConfig(rounding_e="nearest"))):
        w = w0.clone().requires_grad_()
        qlinear(x0, w, None, qc).backward(gy)
        grads[name] = w.grad.cpu()
    exact, g8 = grads["exact"], grads["g8"]
    s = float(2.0 ** torch.round(torch.log2(exact.abs().max())))  # Shift(max|G|)
    step = s / 128
    k = g8 / step
    torch.testing.assert_close(k, torch.round(k), rtol=0, atol=1e-4)  # on the grid
    clipped = exact.clamp(-s + step, s - step)  # clip_k: Shift may round max|G| down
    assert ((g8 - clipped).abs() <= step * (1 + 1e-5)).all()  # floor or ceil of the exact value
    assert not torch.equal(g8, exact)


def test_qlinear_saves_int8_codes(device):
    x = torch.randn(6, 40, device=device, requires_grad=True)
    w = torch.randn(24, 40, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qlinear(x, w)
    big = [t for t in saved if t.numel() > 1]
    assert [t.dtype for t in big] == [torch.int8, torch.int8], [t.dtype for t in saved]
    assert sum(t.numel() * t.element_size() for t in big) == (x.numel() + w.numel())  # 1 byte each
    # W's codes are kept in the input-grad's K-major order (written so by the quantizer's one pass): backward
    # copies no weight-sized tensor, and a 2-D result is no view (an in-place ReLU after it needs no copies)
    assert big[1].shape == w.shape and big[1].stride() == (1, w.shape[0])
    assert y._base is None
    with AtenSpy("clone", "copy_", "contiguous", "_to_copy") as copies:
        torch.relu_(y).sum().backward()
    assert not [o for o in copies.calls if o[1] in (tuple(w.shape), (w.shape[1], w.shape[0]))], copies.calls


def test_qlinear_bad_inputs():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(TypeError, match="x has dtype int64"):
        qlinear(torch.ones(4, 8, dtype=torch.long), w)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        qlinear(x, [[1.0]])
    with pytest.raises(ValueError, match="weight must be 2-D"):
        qlinear(x, torch.randn(5, 8, 1))
    with pytest.raises(ValueError, match="in_features = 8"):
        qlinear(torch.randn(4, 7), w)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\); expected \(5,\)"):
        qlinear(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="qconfig must be an ebkernels.QConfig"):
        qlinear(x, w, qconfig={"bits_w": 8})
    with pytest.raises(ValueError, match="one device"):
        qlinear(x, w.to("meta"))
    with pytest.raises(TypeError, match="a has dtype float32"):
        linear_int8_mm(x, w.t())
    with pytest.raises(ValueError, match=r"are not \[M, K\] and \[K, N\]"):
        linear_int8_mm(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(7, 5, dtype=torch.int8))


def test_qlinear_torch_compile(device):
    """torch.compile traces qlinear (forward and backward) through the ebkernels custom ops without
    graph breaks."""
    torch._dynamo.reset()
    x = torch.randn(5, 16, device=device, requires_grad=True)
    w = torch.randn(8, 16, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    qc = QConfig(bits_g=None)  # E rounded stochastically (the default): from the device random state, which
    _rng.device_state(device)  # torch.compile traces a lookup of, not its creation (a host seed)
    compiled = torch.compile(lambda x, w, b: qlinear(x, w, b, qc), backend="aot_eager", fullgraph=True)
    state = _rng.get_state()
    y = compiled(x, w, b)
    # (no eager stochastic op between the compiled forward and its backward: the compiled graph keeps the
    # random state for its backward, and autograd refuses a saved tensor changed in between)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    _rng.set_state(state)  # the same ticket: the same stochastic E codes
    y_eager = qlinear(x, w, b, qc)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    y_eager.sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)
    assert ebkernels.qlinear is qlinear
