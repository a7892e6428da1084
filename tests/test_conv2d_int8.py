"""Int8 implicit-GEMM Conv2d: forward / input-grad / weight-grad integer sums against the float64 oracle on
the same codes, the int64 chunk combination, the autograd function against autograd through the
reference (straight-through rule), the int32-overflow guard, groups fallback, bad input."""
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from ebkernels import QConfig, _rng, force_backend, qconv2d
from ebkernels.ops._launch import MAX_TERMS, code_channels
from ebkernels.ops.gemm import conv as conv2d_int8
from ebkernels.ops.gemm import tiles as _tiles, wgrad_tiles as _wgrad_tiles
from ebkernels.ops.gemm.host import inv_code_scales
from ebkernels.ops.gemm.conv import conv2d_int8_dgrad, conv2d_int8_dgrad_reference, conv2d_int8_fwd, conv2d_int8_fwd_reference, conv2d_int8_wgrad, conv2d_int8_wgrad_reference
from helpers import CONV_KERNELS, QuantizeGrad, fresh_seed, gen as seeded, pin_tile, spy_launches, ste_quant


def _codes(shape, gen, device, channels_last):
    t = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
    t = t.contiguous(memory_format=torch.channels_last) if channels_last else t
    return t.to(device)


def _fmt(cl):
    return torch.channels_last if cl else torch.contiguous_format


class ConvCase(NamedTuple):
    N: int
    Cin: int
    H: int
    W: int
    Cout: int
    K: int
    stride: object
    padding: object
    dilation: object
    channels_last: bool

    @property
    def id(self):
        layout = "cl" if self.channels_last else "nchw"
        return "N{}C{}H{}W{}O{}K{}s{}p{}d{}{}".format(*self[:9], layout).replace(" ", "")


CASES = [
    ConvCase(N=1, Cin=3, H=5, W=5, Cout=17, K=3, stride=1, padding=1, dilation=1, channels_last=True),
    ConvCase(N=3, Cin=17, H=7, W=7, Cout=3, K=3, stride=2, padding=1, dilation=1, channels_last=False),
    ConvCase(N=1, Cin=3, H=13, W=13, Cout=8, K=5, stride=2, padding=0, dilation=2, channels_last=True),
    ConvCase(N=2, Cin=4, H=7, W=5, Cout=17, K=7, stride=1, padding=3, dilation=1, channels_last=False),
    ConvCase(N=8, Cin=17, H=5, W=5, Cout=3, K=1, stride=2, padding=1, dilation=1, channels_last=True),
    ConvCase(N=3, Cin=64, H=5, W=7, Cout=17, K=3, stride=1, padding=1, dilation=2, channels_last=False),
    ConvCase(N=1, Cin=17, H=13, W=13, Cout=64, K=3, stride=2, padding=3, dilation=1, channels_last=True),
    ConvCase(N=2, Cin=3, H=5, W=7, Cout=3, K=5, stride=(1, 2), padding=(0, 1), dilation=(1, 2), channels_last=True),
    # channel counts that are multiples of 16 in NHWC: the launchers pass ALIGN=16 (vector-load hints)
    ConvCase(N=2, Cin=32, H=6, W=5, Cout=16, K=3, stride=1, padding=1, dilation=1, channels_last=True),
    ConvCase(N=2, Cin=16, H=7, W=7, Cout=32, K=3, stride=2, padding=1, dilation=1, channels_last=True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_integer_sums_exact(device, poisoned, case):
    N, C, H, W, CO, K, stride, padding, dilation, cl = case
    gen = seeded(fresh_seed())
    s2, p2, d2 = (conv2d_int8._pair(n, v, 0) for n, v in (("s", stride), ("p", padding), ("d", dilation)))
    qx = _codes((N, C, H, W), gen, device, cl)
    qw = _codes((CO, C, K, K), gen, device, False)
    y = conv2d_int8_fwd(qx, qw, stride=stride, padding=padding, dilation=dilation)
    y_ref = conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), None, None, None, s2, p2, d2, 1, 8, 8, None, cl)
    assert y.dtype == torch.int64 and y.is_contiguous(memory_format=_fmt(cl))  # the input's format
    assert y_ref.abs().sum() > 0
    torch.testing.assert_close(y.cpu(), y_ref, rtol=0, atol=0)

    qe = _codes(tuple(y.shape), gen, device, cl)
    dx = conv2d_int8_dgrad(qe, qw, (H, W), stride=stride, padding=padding, dilation=dilation)
    dx_ref = conv2d_int8_dgrad_reference(qe.cpu(), qw.cpu(), None, None, [H, W], s2, p2, d2, 1, 8, 8, None, cl)
    torch.testing.assert_close(dx.cpu(), dx_ref, rtol=0, atol=0)

    dw = conv2d_int8_wgrad(qe, qx, (K, K), stride=stride, padding=padding, dilation=dilation)
    dw_ref = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), None, None, [K, K], s2, p2, d2, 1, 8, 8, None)
    torch.testing.assert_close(dw.cpu(), dw_ref, rtol=0, atol=0)


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("max_terms", [MAX_TERMS, 16], ids=["direct", "split"])
def test_residual_added_in_the_epilogue(device, poisoned, cl, max_terms):
    """A residual (the pre-activation ResNet's shortcut) added to the scaled result in fp32 and rounded once:
    equal to the oracle bit for bit, in the epilogue (the result's layout) and after it (another layout), split-K
    or not; bfloat16 and float32 results."""
    gen = seeded(fresh_seed())
    N, C, H, W, CO = 2, 32, 5, 7, 24
    qx = _codes((N, C, H, W), gen, device, cl)
    qw = _codes((CO, C, 3, 3), gen, device, False)
    sx, sw = (torch.rand((), generator=gen) + 0.5 for _ in range(2))
    bias = torch.randn(CO, generator=gen)
    args = ([1, 1], [1, 1], [1, 1], 1, 8, 8)
    for out_dtype in (torch.bfloat16, torch.float32):
        res = (torch.randn(N, CO, H, W, generator=gen) * 40).to(out_dtype)
        for fmt in (_fmt(cl), _fmt(not cl)):  # the result's layout: fused; the other: added after the GEMM
            r = res.contiguous(memory_format=fmt)
            y = conv2d_int8_fwd(qx, qw, sx.to(device), sw.to(device), bias.to(device), padding=1,
                                out_dtype=out_dtype, max_terms=max_terms, residual=r.to(device))
            y_ref = conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), sx, sw, bias, *args, out_dtype, cl, residual=r)
            assert y.dtype == out_dtype and y.is_contiguous(memory_format=_fmt(cl))
            torch.testing.assert_close(y.cpu(), y_ref, rtol=0, atol=0)
            # within one rounding of the float64 truth (the conv's result is not rounded before the add)
            truth = F.conv2d(qx.cpu().double(), qw.cpu().double(), padding=1) * (
                sx.double() * sw.double() * inv_code_scales(8, 8)) + bias.double().view(1, -1, 1, 1) + r.double()
            ulp = 2.0 ** -7 if out_dtype == torch.bfloat16 else 2.0 ** -22
            assert ((y.cpu().double() - truth).abs() <= truth.abs() * ulp + 1e-6).all()
    with pytest.raises(ValueError, match="residual"):
        conv2d_int8_fwd(qx, qw, sx.to(device), sw.to(device), padding=1, residual=torch.zeros(N, CO, H, W - 1))
    with pytest.raises(ValueError, match="residual"):
        conv2d_int8_fwd(qx, qw, padding=1, residual=torch.zeros(N, CO, H, W))


@pytest.mark.parametrize("cl", [False, True])
def test_chunked_reductions_and_epilogue(device, poisoned, cl):
    """Tap-split forward / input-grad and row-chunked weight-grad (int32 chunks added in the int64 workspace,
    the last split writing NCHW / NHWC / OIHW order), raw and scaled with bias."""
    gen = torch.Generator().manual_seed(11 + cl)
    N, C, H, W, CO, K = 2, 5, 7, 6, 6, 3
    qx = _codes((N, C, H, W), gen, device, cl)
    qw = _codes((CO, C, K, K), gen, device, False)
    qe = _codes((N, CO, 4, 3), gen, device, cl)
    conv = dict(stride=2, padding=1, dilation=1)
    sx, sw, se = (torch.tensor(v, device=device) for v in (2.0 ** -2, 2.0 ** 3, 2.0 ** -9))
    bias = torch.randn(CO, generator=gen).to(device)
    args = ([2, 2], [1, 1], [1, 1], 1)
    for max_terms in (2 * C, 2 * CO, 64):  # forward: 5 tap chunks, input-grad: 5, weight-grad: 24 rows -> 1
        y = conv2d_int8_fwd(qx, qw, **conv, max_terms=max_terms)
        torch.testing.assert_close(y.cpu(), conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), None, None, None, *args,
                                                                      8, 8, None, cl), rtol=0, atol=0)
        y = conv2d_int8_fwd(qx, qw, sx, sw, bias, **conv, bits_a=7, max_terms=max_terms)
        y_ref = conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), sx.cpu(), sw.cpu(), bias.cpu(), *args, 7, 8,
                                          torch.float32, cl)
        assert y.is_contiguous(memory_format=_fmt(cl))
        torch.testing.assert_close(y.cpu(), y_ref, rtol=0, atol=0)
        dx = conv2d_int8_dgrad(qe, qw, (H, W), se, sw, **conv, max_terms=max_terms)
        torch.testing.assert_close(dx.cpu(), conv2d_int8_dgrad_reference(qe.cpu(), qw.cpu(), se.cpu(), sw.cpu(),
                                                                         [H, W], *args, 8, 8, torch.float32, cl),
                                   rtol=0, atol=0)
    for max_terms in (8, 16):  # 24 rows in chunks of 8 (3 partials) / 16 (2)
        for scales in ((None, None), (se, sx)):
            dw = conv2d_int8_wgrad(qe, qx, (K, K), *scales, **conv, max_terms=max_terms)
            dw_ref = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), *(s if s is None else s.cpu() for s in scales),
                                                 [K, K], *args, 8, 8, torch.float32)
            torch.testing.assert_close(dw.cpu(), dw_ref, rtol=0, atol=0)


def test_wgrad_int32_overflow_guard(device, poisoned, monkeypatch):
    """Weight-grad reduction over N·OH·OW = 134,689 rows of maximal codes: 127² · 134,689 > 2^31."""
    if device.type == "cpu":  # long row chunks: few (slow) interpreter loop steps
        pin_tile(monkeypatch, _wgrad_tiles, "wgrad_tile", _tiles.Tile(16, 16, 16384, True, 4, 1, 1))
    H = W = 367
    qx = torch.full((1, 1, H, W), 127, dtype=torch.int8)
    qx[..., 0, :5] = -7  # a few other values so the taps differ
    qx = qx.contiguous(memory_format=torch.channels_last).to(device)
    qe = torch.full((1, 2, H, W), -127, dtype=torch.int8)
    qe[:, 1, ::7] = 127  # mixed signs in the second output channel
    qe = qe.contiguous(memory_format=torch.channels_last).to(device)
    dw = conv2d_int8_wgrad(qe, qx, (3, 3), stride=1, padding=1)
    ref = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), None, None, [3, 3], [1, 1], [1, 1], [1, 1], 1, 8, 8,
                                      None)
    assert ref.abs().max() > 2 ** 31
    torch.testing.assert_close(dw.cpu(), ref, rtol=0, atol=0)
    se, sx = torch.tensor(2.0 ** -10, device=device), torch.tensor(1.0, device=device)
    dwf = conv2d_int8_wgrad(qe, qx, (3, 3), se, sx, stride=1, padding=1)
    torch.testing.assert_close(dwf.cpu(), (ref.double() * (2.0 ** -10 / 128 ** 2)).float(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# qconv2d: forward / backward
# --------------------------------------------------------------------------------------------------
def _reference_qconv(x, w, b, stride, padding, dilation, groups, qc):
    y = F.conv2d(ste_quant(x.double(), qc.bits_a), ste_quant(w.double(), qc.bits_w),
                 None if b is None else b.double(), stride, padding, dilation, groups)
    return QuantizeGrad.apply(y, qc.bits_e) if qc.bits_e is not None else y


def _check_qconv(device, shape, CO, K, stride, padding, dilation, groups, cl, bias, qc, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=gen)
    x0 = (x0.contiguous(memory_format=torch.channels_last) if cl else x0).to(device)
    w0 = (0.2 * torch.randn(CO, shape[1] // groups, K, K, generator=gen)).to(device)
    b0 = torch.randn(CO, generator=gen).to(device) if bias else None

    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if bias else None
    y = qconv2d(x, w, b, stride, padding, dilation, groups, qc)
    assert y.is_contiguous(memory_format=_fmt(cl)) and y.dtype == torch.float32
    gy = torch.randn(y.shape, generator=gen).to(device)
    y.backward(gy)
    assert x.grad.is_contiguous(memory_format=_fmt(cl))

    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    br = b0.clone().requires_grad_() if bias else None
    yr = _reference_qconv(xr, wr, br, stride, padding, dilation, groups, qc)
    yr.backward(gy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(b.grad, gy.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    with force_backend("reference"):  # the CPU path computes the same forward, bit for bit
        torch.testing.assert_close(qconv2d(x0, w0, b0, stride, padding, dilation, groups, qc), y, rtol=0, atol=0)


# E rounded to nearest, G unquantized: what the float64 oracle computes (the stochastic default of E:
# test_stochastic_e.py)
EXACT_QC = QConfig(bits_g=None, rounding_e="nearest")


class QConvCase(NamedTuple):
    shape: tuple
    Cout: int
    K: int
    stride: int
    padding: int
    dilation: int
    channels_last: bool
    bias: bool

    @property
    def id(self):
        return f"{self.shape}-O{self.Cout}K{self.K}s{self.stride}p{self.padding}d{self.dilation}"


STE_CASES = [
    QConvCase(shape=(1, 3, 5, 5), Cout=17, K=3, stride=1, padding=1, dilation=1, channels_last=True, bias=True),
    QConvCase(shape=(3, 17, 7, 7), Cout=3, K=3, stride=2, padding=1, dilation=1, channels_last=False, bias=False),
    QConvCase(shape=(2, 4, 7, 5), Cout=8, K=5, stride=2, padding=3, dilation=2, channels_last=True, bias=True),
    QConvCase(shape=(8, 3, 5, 5), Cout=3, K=1, stride=2, padding=0, dilation=1, channels_last=False, bias=True),
    QConvCase(shape=(1, 3, 7, 7), Cout=5, K=7, stride=1, padding=3, dilation=1, channels_last=True, bias=False),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in STE_CASES])
def test_qconv2d_forward_backward_ste(device, poisoned, case):
    shape, CO, K, stride, padding, dilation, cl, bias = case
    _check_qconv(device, shape, CO, K, stride, padding, dilation, 1, cl, bias, EXACT_QC,
                 seed=sum(shape) * 31 + K)


@pytest.mark.parametrize("qc", [QConfig(bits_e=None, bits_g=None), QConfig(bits_a=None, bits_g=None, rounding_e="nearest"),
                                QConfig(bits_w=None, bits_a=6, bits_g=None, rounding_e="nearest")],
                         ids=["e_float", "a_float", "w_float"])
def test_qconv2d_float_operands(device, qc):
    _check_qconv(device, (2, 5, 6, 5), 4, 3, 1, 1, 1, 1, True, True, qc, seed=5)


def test_qconv2d_groups_fallback_warns(device, monkeypatch):
    monkeypatch.setattr(conv2d_int8, "_warned_groups", False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _check_qconv(device, (2, 4, 5, 5), 6, 3, 1, 1, 1, 2, False, True, EXACT_QC, seed=9)
        _check_qconv(device, (1, 4, 5, 5), 4, 3, 1, 1, 1, 4, True, False, EXACT_QC, seed=10)
    msgs = [str(r.message) for r in rec if "groups > 1" in str(r.message)]
    assert len(msgs) == (1 if conv2d_int8.use_triton(torch.empty(1, device=device)) else 0)  # once


def test_qconv2d_g_quantized_and_saved_codes(device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 5, generator=gen).to(device).requires_grad_()
    w = torch.randn(4, 3, 3, 3, generator=gen).to(device).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qconv2d(x, w, padding=1)
    big = [t for t in saved if t.numel() > 1]
    assert [t.dtype for t in big] == [torch.int8, torch.int8]  # codes of A and W, not the float tensors
    y.sum().backward()
    g = w.grad.cpu()
    s = 2.0 ** torch.round(torch.log2(g.abs().max()))
    k = g * 128 / s
    torch.testing.assert_close(k, torch.round(k), rtol=0, atol=1e-4)  # on the G grid


def test_qconv2d_bad_inputs():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="x has dtype int8"):
        qconv2d(x.to(torch.int8), w)
    with pytest.raises(ValueError, match="x must be 4-D"):
        qconv2d(x[0], w)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        qconv2d(x, w[0])
    with pytest.raises(ValueError, match="x has 3 channels"):
        qconv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="stride=0 is not supported"):
        qconv2d(x, w, stride=0)
    with pytest.raises(ValueError, match=r"padding=\(1, -1\) is not supported"):
        qconv2d(x, w, padding=(1, -1))
    with pytest.raises(ValueError, match="padding='full' is not supported"):
        qconv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="does not fit the padded input: output size would be -1x-1"):
        qconv2d(x, torch.randn(4, 3, 7, 7))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
        qconv2d(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="groups=0 is not supported"):
        qconv2d(x, w, groups=0)
    with pytest.raises(ValueError, match="one device"):
        qconv2d(x, w.to("meta"))
    with pytest.raises(TypeError, match="qconfig must be an ebkernels.QConfig"):
        qconv2d(x, w, qconfig=8)
    with pytest.raises(TypeError, match="qx has dtype float32"):
        conv2d_int8_fwd(x, w.to(torch.int8))


def test_qconv2d_torch_compile(device):
    torch._dynamo.reset()
    x = torch.randn(1, 3, 4, 4, device=device, requires_grad=True)
    w = torch.randn(5, 3, 1, 1, device=device, requires_grad=True)
    qc = QConfig(bits_g=None)  # E rounded stochastically (the default): from the device random state, which
    _rng.device_state(device)  # torch.compile traces a lookup of, not its creation (a host seed)
    f = torch.compile(lambda x, w: qconv2d(x, w, None, 1, 0, 1, 1, qc), backend="aot_eager", fullgraph=True)
    y = f(x, w)
    # (the eager reference after backward: the compiled graph keeps the random state for its backward, which
    # an eager stochastic op in between would advance: autograd then refuses the changed saved tensor)
    y.sum().backward()
    assert w.grad is not None and x.grad.shape == x.shape
    torch.testing.assert_close(y, qconv2d(x, w, qconfig=qc), rtol=0, atol=0)


# Channel counts of 16 or more that are not multiples of 16 (Cout = 17, Cin = 20): the quantizer pads the A and
# W codes' Cin (and the E codes' Cout) with zeros, so every int8 kernel runs its aligned path (ALIGN=16);
# fewer than 16 (first layer Cin = 3, Cin = 5) stay unpadded: the flat (tap, channel) layouts, ALIGN=1.
PAD_CASES = [
    QConvCase(shape=(2, 3, 6, 6), Cout=17, K=3, stride=1, padding=1, dilation=1, channels_last=True, bias=True),
    # M = 64: the weight-grad is aligned too
    QConvCase(shape=(4, 3, 4, 4), Cout=20, K=3, stride=1, padding=1, dilation=1, channels_last=False, bias=True),
    QConvCase(shape=(2, 5, 7, 7), Cout=16, K=3, stride=2, padding=1, dilation=1, channels_last=False, bias=False),
    QConvCase(shape=(1, 20, 5, 5), Cout=24, K=1, stride=1, padding=0, dilation=1, channels_last=True, bias=True),
    # 1×1: weight-grad on channel-major E and X codes, M = 32
    QConvCase(shape=(2, 5, 4, 4), Cout=32, K=1, stride=1, padding=0, dilation=1, channels_last=True, bias=False),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PAD_CASES])
def test_qconv2d_unaligned_channels_are_padded_onto_the_aligned_path(device, poisoned, monkeypatch, case):
    shape, CO, K, stride, padding, dilation, cl, bias = case
    calls = spy_launches(monkeypatch, *CONV_KERNELS)
    _check_qconv(device, shape, CO, K, stride, padding, dilation, 1, cl, bias, EXACT_QC, seed=CO + K)
    if conv2d_int8.use_triton(torch.empty(1, device=device)):
        # forward, input-grad, weight-grad: all on 16-byte aligned operands (the weight-grad's channel-major E
        # rows are N·OH·OW long: aligned when that is a multiple of 16, e.g. any batch that is)
        OH, OW = conv2d_int8.conv2d_output_size(*shape[2:], K, K, (stride,) * 2, (padding,) * 2, (dilation,) * 2)
        # (fewer than 16 channels stay unpadded: the flat K / column layouts, ALIGN=1)
        cin, cout = (code_channels(c) % 16 == 0 for c in (shape[1], CO))
        assert [c["ALIGN"] for c in calls] == [16 if cin else 1, 16 if cout else 1,
                                               16 if cin and shape[0] * OH * OW % 16 == 0 else 1]


def _saved_codes(x, w):
    """The tensors (more than one element) qconv2d saves for backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        qconv2d(x, w, padding=1)
    return [t for t in saved if t.numel() > 1]


def test_qconv2d_saved_codes_are_channel_padded(device):
    """Channel counts of 16 or more are zero-padded to a multiple of 16; fewer stay as they are."""
    x = torch.randn(2, 3, 5, 5).to(device).requires_grad_()
    w = torch.randn(4, 3, 3, 3).to(device).requires_grad_()
    big = _saved_codes(x, w)
    # fewer than 16 channels stay unpadded (the kernels pack taps × channels), 17 is padded to 32
    assert [tuple(t.shape) for t in big] == [(2, 3, 5, 5), (4, 3, 3, 3)]
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in big)
    x = torch.randn(2, 17, 5, 5).to(device).requires_grad_()
    w = torch.randn(4, 17, 3, 3).to(device).requires_grad_()
    big = _saved_codes(x, w)
    cin = 32 if conv2d_int8.use_triton(x) else 17  # the reference path keeps the unpadded codes
    assert [tuple(t.shape) for t in big] == [(2, cin, 5, 5), (4, cin, 3, 3)]
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in big)
    assert all(torch.count_nonzero(t[:, 17:]) == 0 for t in big)


class EcmCase(NamedTuple):
    """E codes channel-major ([Cout, N·OH·OW], rows contiguous), as QConv2dFunction hands them to the
    weight-grad (its K-major MMA operand, E_CM); ``x_cm``: for a 1×1 / stride-1 / unpadded kernel the input
    codes channel-major too (X_CM: both operands K-major)."""
    N: int
    Cin: int
    H: int
    W: int
    Cout: int
    K: int
    stride: int
    padding: int
    dilation: int
    x_cm: bool

    @property
    def id(self):
        return "N{}C{}H{}W{}O{}K{}s{}p{}d{}xcm{}".format(*self)


ECM_CASES = [
    EcmCase(N=2, Cin=16, H=8, W=8, Cout=32, K=3, stride=1, padding=1, dilation=1, x_cm=False),  # M = 128: ALIGN=16
    EcmCase(N=3, Cin=17, H=7, W=7, Cout=5, K=3, stride=2, padding=1, dilation=1, x_cm=False),
    EcmCase(N=2, Cin=16, H=5, W=5, Cout=16, K=1, stride=1, padding=0, dilation=1, x_cm=False),
    EcmCase(N=1, Cin=3, H=9, W=9, Cout=8, K=3, stride=1, padding=2, dilation=2, x_cm=False),
    EcmCase(N=2, Cin=16, H=8, W=8, Cout=32, K=1, stride=1, padding=0, dilation=1, x_cm=True),  # X_CM, ALIGN=16
    EcmCase(N=3, Cin=5, H=5, W=3, Cout=17, K=1, stride=1, padding=0, dilation=1, x_cm=True),  # X_CM, ALIGN=1
    # stride 2: not X_CM (the strided input pixels), still exact
    EcmCase(N=2, Cin=16, H=8, W=8, Cout=16, K=1, stride=2, padding=0, dilation=1, x_cm=True),
]


@pytest.mark.parametrize("max_terms", [MAX_TERMS, 64], ids=["direct", "split"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in ECM_CASES])
def test_wgrad_channel_major_e_exact(device, poisoned, monkeypatch, case, max_terms):
    N, C, H, W, CO, K, stride, padding, dilation, x_cm = case
    calls = spy_launches(monkeypatch, *CONV_KERNELS)
    gen = torch.Generator().manual_seed(sum(case) + max_terms)
    OH, OW = conv2d_int8.conv2d_output_size(H, W, K, K, (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    qx = _codes((C, N, H, W), gen, device, False).permute(1, 0, 2, 3) if x_cm else _codes((N, C, H, W), gen, device,
                                                                                            True)
    qe = _codes((CO, N, OH, OW), gen, device, False).permute(1, 0, 2, 3)
    assert qe.stride() == (OH * OW, N * OH * OW, OW, 1)
    args = ([K, K], [stride] * 2, [padding] * 2, [dilation] * 2, 1, 8, 8)
    dw = conv2d_int8_wgrad(qe, qx, (K, K), stride=stride, padding=padding, dilation=dilation, max_terms=max_terms)
    ref = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), None, None, *args, None)
    torch.testing.assert_close(dw.cpu(), ref, rtol=0, atol=0)
    se, sx = torch.tensor(2.0 ** -3, device=device), torch.tensor(0.5, device=device)
    dwf = conv2d_int8_wgrad(qe, qx, (K, K), se, sx, stride=stride, padding=padding, dilation=dilation,
                            max_terms=max_terms)
    torch.testing.assert_close(dwf.cpu(), conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), se.cpu(), sx.cpu(), *args,
                                                                      torch.float32), rtol=0, atol=0)
    if conv2d_int8.use_triton(qx) and case in (ECM_CASES[0], ECM_CASES[4]):
        assert calls[0]["ALIGN"] == 16  # the aligned E_CM / E_CM+X_CM variants ran


def test_the_forward_and_input_grad_launch_plans_are_made_once_per_geometry():
    """``conv_fwd_dgrad.conv_like_launch``: one plan per operand geometry and settings, not one per call (issue 20:
    host time); a result or residual that does not start on 16 bytes gets the unaligned epilogue."""
    from ebkernels.config import kernel_settings
    from ebkernels.ops._launch import geometry
    from ebkernels.ops.gemm.conv_fwd_dgrad import conv_like_launch

    qx = torch.randint(-127, 128, (2, 32, 8, 8), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    qw = torch.randint(-127, 128, (48, 32, 3, 3), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    out = torch.empty(2, 48, 8, 8).contiguous(memory_format=torch.channels_last)
    cpu, s = torch.device("cpu"), kernel_settings()

    def plan(o=out, res=None):
        return conv_like_launch(False, geometry(qx), geometry(qw), geometry(o), res, 8, 8, 32, 8, 8, 48, 3, 3,
                                (1, 1), (1, 1), (1, 1), MAX_TERMS, cpu, s)

    first = plan()
    assert plan() is first and first.out_align == 16 and first.src_strides == (32 * 64, 8 * 32, 32, 1)
    assert plan(res=True) is not first and plan(res=True).out_align == 16
    assert plan(res=False).out_align == 1  # a misaligned residual
    odd = torch.empty(out.numel() + 1)[1:].as_strided(out.shape, out.stride())
    assert plan(odd).out_align == 1 and plan(odd).align == first.align
