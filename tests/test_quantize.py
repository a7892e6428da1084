"""The WAGE quantizer: Triton kernels (interpreter on CPU, CUDA where present) against the PyTorch
reference bit for bit, and the reference against the SPEC §2 formula computed in float64."""
import math

import pytest
import torch

import ebkernels
from ebkernels import _rng
from ebkernels.ops._buffers import poison
from ebkernels.ops.quantize import _quantize_op, quantize_reference, quantize_triton
from ebkernels.ops._scale import shift_scale_reference
from helpers import fresh_seed, gen

SHAPES = [(1,), (7,), (33, 5), (3, 5, 7, 9), (2, 3, 4, 5, 6), (1_048_583,)]


def _fresh(shape, device, dtype=torch.float32, scale=None):
    g = gen(fresh_seed())
    scale = scale if scale is not None else 10 ** torch.empty(1).uniform_(-3, 3, generator=g).item()
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def spec_quantize_f64(x: torch.Tensor, bits: int, fixed_scale: bool = False):
    """SPEC §2 written directly in float64: s = 2**round(log2(max|x|)), q = round(clip(x/s)*S)."""
    S = 2.0 ** (bits - 1)
    x = x.double()
    amax = x.abs().max().item()
    s = 1.0 if fixed_scale or amax == 0 else 2.0 ** round(math.log2(amax))
    v = torch.clamp(x / s, -1 + 1 / S, 1 - 1 / S)
    return torch.round(v * S), s


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("mode", ["shift", "wage"])
def test_nearest_bit_exact(shape, bits, mode, device):
    x = _fresh(shape, device, scale=None if mode == "shift" else 0.7)
    fixed = mode == "wage"
    codes_ref, s_ref = quantize_reference(x, bits, mode=mode)
    torch.manual_seed(1)
    codes = poison(torch.empty(x.shape, dtype=torch.int8, device=device))  # -128: never a code
    codes, s = quantize_triton(x, bits, mode=mode, out=codes)
    assert s.device == x.device and s.dtype == torch.float32 and s.dim() == 0
    assert torch.equal(s.cpu(), s_ref.cpu())
    assert torch.equal(codes.cpu(), codes_ref.cpu())
    # the reference itself is the SPEC formula
    q64, s64 = spec_quantize_f64(x.cpu(), bits, fixed)
    assert s_ref.item() == s64
    assert torch.equal(codes_ref.cpu().double(), q64)
    S = 2 ** (bits - 1)
    assert codes.abs().max().item() <= S - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 7, 8])
def test_all_bit_widths_public_api(bits, device):
    x = _fresh((257, 3), device)
    codes, s = ebkernels.quantize(x, bits=bits)
    codes_ref, s_ref = quantize_reference(x, bits)
    assert torch.equal(codes.cpu(), codes_ref.cpu()) and torch.equal(s.cpu(), s_ref.cpu())
    S = 2 ** (bits - 1)
    assert codes.min().item() >= -(S - 1) and codes.max().item() <= S - 1


def test_scale_rounds_at_sqrt2_exactly():
    """Shift(x) switches from 2**e to 2**(e+1) exactly where the mantissa passes sqrt(2)."""
    below = torch.tensor(1.4142135381698608, dtype=torch.float32)  # float32(sqrt 2) < sqrt 2
    above = torch.nextafter(below, torch.tensor(2.0))
    for e in (-20, -1, 0, 3, 40):
        for m, want in ((below, 2.0**e), (above, 2.0 ** (e + 1))):
            amax = torch.ldexp(m, torch.tensor(e))
            assert shift_scale_reference(amax).item() == want
            x = torch.stack([amax, -amax / 3, amax / 7])
            assert quantize_triton(x)[1].item() == want
    # and over random magnitudes, the float64 log2 formula (no ties can occur)
    a = torch.exp(torch.empty(10_000, dtype=torch.float64).uniform_(-80, 80)).float()
    expect = torch.exp2(torch.round(torch.log2(a.double()))).float()
    assert torch.equal(shift_scale_reference(a), expect)


def test_scale_clamped_to_normal_range():
    tiny = torch.tensor([1e-42, -3e-43])  # subnormal absmax
    huge = torch.tensor([3.3e38, 1.0])
    assert quantize_reference(tiny)[1].item() == 2.0**-126
    assert quantize_triton(tiny)[1].item() == 2.0**-126
    for impl in (quantize_reference, quantize_triton):
        codes, s = impl(huge)
        assert s.item() == 2.0**127 and math.isfinite(s.item())
        assert codes[0].item() == 127


def test_all_zero_tensor(device):
    x = torch.zeros(1000, device=device)
    for impl in (quantize_reference, quantize_triton):
        codes, s = impl(x)
        assert s.item() == 1.0
        assert codes.abs().max().item() == 0
    codes, s = ebkernels.quantize(torch.zeros(0, device=device))
    assert codes.numel() == 0 and s.item() == 1.0


@pytest.mark.parametrize("bad, expect_scale", [(float("nan"), "nan"), (float("inf"), "inf"),
                                                (float("-inf"), "inf")])
@pytest.mark.parametrize("mode", ["shift", "wage", "absmax"])
def test_nonfinite_propagates(bad, expect_scale, mode, device):
    x = _fresh((4, 9), device)
    x[2, 3] = bad
    fixed = mode == "wage"
    for impl in (quantize_reference, quantize_triton):
        codes, s = impl(x, mode=mode)
        assert (math.isnan(s.item()) if expect_scale == "nan" else s.item() == math.inf)
        deq = ebkernels.dequantize(codes, s)
        assert not torch.isfinite(deq).any(), "non-finite input must not dequantize to finite numbers"
    if not fixed:  # nan in nan out, mirroring torch.amax
        assert torch.equal(quantize_reference(x, mode=mode)[0].cpu(), quantize_triton(x, mode=mode)[0].cpu())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_statistics(bits, device):
    S = 2 ** (bits - 1)
    x = (torch.rand(200_003) * 2 - 1).to(device)
    x[0] = 1.0  # fixes the scale to 1: codes then equal floor/ceil of x*S
    codes, s = ebkernels.quantize(x, bits=bits, rounding="stochastic", seed=1234)
    assert s.item() == 1.0
    v = torch.clamp(x.double().cpu() * S, -(S - 1), S - 1)
    c = codes.double().cpu()
    assert ((c == torch.floor(v)) | (c == torch.ceil(v))).all(), "only floor/ceil neighbours may appear"
    # unbiased: E[c] = v. Per element Var <= 1/4, so the mean error over n has sd <= 0.5/sqrt(n)
    n = c.numel()
    assert abs((c - v).mean().item()) < 5 * 0.5 / math.sqrt(n)
    # elements with a fractional part near 0.5 round up about half the time
    frac = v - torch.floor(v)
    mid = (frac > 0.4) & (frac < 0.6)
    up = (c[mid] == torch.ceil(v[mid])).double().mean().item()
    assert abs(up - frac[mid].mean().item()) < 0.02
    # reproducible for a seed, different for another
    again, _ = ebkernels.quantize(x, bits=bits, rounding="stochastic", seed=1234)
    other, _ = ebkernels.quantize(x, bits=bits, rounding="stochastic", seed=4321)
    assert torch.equal(codes, again)
    assert not torch.equal(codes, other)


def test_stochastic_reference_statistics():
    x = torch.rand(100_001) * 2 - 1
    x[0] = 1.0
    codes, s = quantize_reference(x, 8, stochastic=True, seed=5)
    v = torch.clamp(x.double() * 128, -127, 127)
    assert ((codes.double() == torch.floor(v)) | (codes.double() == torch.ceil(v))).all()
    assert abs((codes.double() - v).mean().item()) < 5 * 0.5 / math.sqrt(x.numel())
    assert torch.equal(codes, quantize_reference(x, 8, stochastic=True, seed=5)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype, device):
    x = _fresh((5, 33), device, dtype=dtype, scale=2.0)
    ref = quantize_reference(x)
    out = quantize_triton(x)
    assert torch.equal(out[0].cpu(), ref[0].cpu()) and torch.equal(out[1].cpu(), ref[1].cpu())


def test_layouts_give_same_result(device):
    base = _fresh((3, 6, 7, 5), device)
    expect, s_expect = quantize_reference(base.contiguous())
    views = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(1, 3).contiguous().transpose(1, 3),
        "strided": torch.stack([base, -base], dim=-1)[..., 0],  # every other element of a buffer
    }
    for name, v in views.items():
        assert torch.equal(v, base)
        codes, s = ebkernels.quantize(v)
        assert torch.equal(codes.cpu(), expect.cpu()), name
        assert torch.equal(s.cpu(), s_expect.cpu()), name
    # channels-last output: NHWC memory order, same values
    codes, s = ebkernels.quantize(base, channels_last=True)
    assert codes.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(codes.cpu(), expect.cpu())
    # written into a view of a channel-padded NHWC buffer: padding untouched
    buf = torch.full((3, 7, 5, 8), 99, dtype=torch.int8, device=device)
    out_view = buf[..., :6].permute(0, 3, 1, 2)
    quantize_triton(base, out=out_view)
    assert torch.equal(out_view.cpu(), expect.cpu())
    assert (buf[..., 6:] == 99).all()


def test_dequantize(device):
    x = _fresh((40, 3), device)
    for bits in (3, 8):
        codes, s = ebkernels.quantize(x, bits=bits)
        deq = ebkernels.dequantize(codes, s, bits=bits)
        assert deq.dtype == torch.float32
        assert torch.equal(deq.cpu().double(), codes.cpu().double() * s.item() / 2 ** (bits - 1))
        # quantization error is at most half a step, except where clipped
        step = s.item() / 2 ** (bits - 1)
        clipped = x.abs() >= s * (1 - 1 / 2 ** (bits - 1))
        err = (deq - x.float()).abs()[~clipped]
        assert err.max().item() <= step / 2 + 1e-12


def test_fake_impl_and_schema():
    x = torch.randn(2, 3, 4, 5)
    # every argument given: the mutated ones (rng, cm) are never optional (``ops._buffers.absent``)
    rng, no_cm = _rng.device_state(x.device), x.new_empty((0,), dtype=torch.int8)
    torch.library.opcheck(_quantize_op, (x, 8, False, "shift", 0, True, 0, False, rng, no_cm),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_messages():
    x = torch.randn(10)
    with pytest.raises(TypeError, match=r"x has dtype int32; accepted: float32"):
        ebkernels.quantize(torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ebkernels.quantize([1.0, 2.0])
    for bits in (1, 9, 8.0, True):
        with pytest.raises(ValueError, match=rf"bits={bits!r} is not supported; accepted: an int from 2 to 8"):
            ebkernels.quantize(x, bits=bits)
    with pytest.raises(ValueError, match=r"mode='log' is not supported; accepted: 'shift', 'wage', 'absmax'"):
        ebkernels.quantize(x, mode="log")
    with pytest.raises(ValueError, match=r"rounding='up' is not supported; accepted: 'nearest', 'stochastic'"):
        ebkernels.quantize(x, rounding="up")
    with pytest.raises(ValueError, match=r"seed=-1 is not supported"):
        ebkernels.quantize(x, rounding="stochastic", seed=-1)
    with pytest.raises(ValueError, match=r"channels_last=True needs a 4-D tensor, got 1-D"):
        ebkernels.quantize(x, channels_last=True)
    codes, s = ebkernels.quantize(x)
    with pytest.raises(ValueError, match="codes on cpu and scale on meta"):
        ebkernels.dequantize(codes, s.to("meta"))
    with pytest.raises(TypeError, match="codes has dtype float32; accepted: int8"):
        ebkernels.dequantize(x, s)
    with pytest.raises(ValueError, match=r"bits_w=1 is not supported; accepted: an int from 2 to 8 or None"):
        ebkernels.QConfig(bits_w=1)
    with pytest.raises(ValueError, match=r"mode='int' is not supported"):
        ebkernels.QConfig(mode="int")
    assert ebkernels.QConfig(bits_g=None).bits_g is None


def test_ties_round_half_to_even(device):
    halves = torch.arange(-126, 126, dtype=torch.float32) + 0.5  # every tie k + 0.5 in range
    x = (halves / 128).to(device)  # max|x| = 125.5/128 -> scale 1, x*S = the ties themselves
    for impl in (quantize_reference, quantize_triton):
        codes, s = impl(x)
        assert s.item() == 1.0
        assert torch.equal(codes.cpu().float(), torch.round(halves))  # torch.round: half to even


@pytest.mark.parametrize("cl", [False, True], ids=["nchw_in", "nhwc_in"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_pad_channels_codes_exact_and_pad_zero(device, poisoned, cl, rounding):
    """pad_channels_to: (N, Cp, H, W) NHWC codes; the real channels are the unpadded codes bit for bit (same
    scale: the absmax ignores the pad), the pad is written 0 (the buffer starts poisoned)."""
    x = _fresh((2, 3, 4, 5), device)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    codes, s = ebkernels.quantize(x, 8, rounding, channels_last=True, seed=11, pad_channels_to=16)
    ref, s_ref = ebkernels.quantize(x, 8, rounding, channels_last=True, seed=11)
    assert codes.shape == (2, 16, 4, 5) and codes.dtype == torch.int8
    assert codes.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(codes[:, :3].cpu(), ref.cpu()) and torch.equal(s.cpu(), s_ref.cpu())
    assert torch.equal(codes[:, 3:].cpu(), torch.zeros(2, 13, 4, 5, dtype=torch.int8))
    if rounding == "nearest":
        q, s64 = spec_quantize_f64(x.cpu(), 8)
        assert torch.equal(codes[:, :3].cpu().double(), q) and s.item() == s64
    # already a multiple: same shape as unpadded; 24 channels pad to 32
    assert ebkernels.quantize(_fresh((1, 16, 2, 2), device), channels_last=True, pad_channels_to=16)[0].shape[1] == 16
    assert ebkernels.quantize(_fresh((1, 24, 2, 2), device), channels_last=True, pad_channels_to=16)[0].shape[1] == 32
    with pytest.raises(ValueError, match="pad_channels_to needs channels_last=True"):
        ebkernels.quantize(x, pad_channels_to=16)


def test_fake_impl_and_schema_padded():
    x = torch.randn(2, 3, 4, 5)
    rng, no_cm = _rng.device_state(x.device), x.new_empty((0,), dtype=torch.int8)
    torch.library.opcheck(_quantize_op, (x, 8, False, "absmax", 0, True, 16, False, rng, no_cm),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_codes_from_the_max_and_ticket_their_producer_wrote(device, poisoned, backend):
    """``quantize_two_layouts(x, amax=[bits of max |x|, ticket])`` (what ``bn_relu_bwd(mode="float_absmax")``
    writes): no max pass of its own (the codes pass only), the same codes and scale as the quantizer's own pass,
    and, rounding stochastically, the same noise as its own pass with that ticket (the random state not
    advanced again)."""
    from ebkernels.ops.gemm.host import quantize_two_layouts
    from helpers import LaunchSpy

    g = gen(fresh_seed())
    x = (torch.randn(3, 20, 5, 6, generator=g) * 3).to(torch.bfloat16).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    bits = x.float().abs().amax().view(torch.int32).item()
    st = _rng.device_state(device)
    with ebkernels.force_backend(backend):
        for rounding in ("nearest", "stochastic"):
            ticket = st[1].item()
            own = quantize_two_layouts(x, 8, rounding, "shift", 16)
            used = st[1].item() - ticket
            st[1] = ticket + 1  # the producer took this ticket
            amax = torch.tensor([bits, ticket if rounding == "stochastic" else 0], dtype=torch.int32, device=device)
            with LaunchSpy() as spy:
                given = quantize_two_layouts(x, 8, rounding, "shift", 16, amax=amax)
            assert st[1].item() == ticket + 1 and used == (rounding == "stochastic")
            if backend == "auto":
                assert [c["kernel"] for c in spy.calls] == ["quantize_codes_kernel"]
            for a, b in zip(own, given):
                assert torch.equal(a, b) and a.stride() == b.stride(), rounding
