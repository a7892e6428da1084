"""The CPU reference path's float32 integer sums (``fast=True``) equal the float64 oracle exactly: at
the float32 bound (1040 products of ±127 codes, all the same sign: 16,774,160 < 2^24), just above it
(chunked, chunks added in float64) and far past it (float64), for the linear and the three convolution
reductions."""
import pytest
import torch
import torch.nn.functional as F

from ebkernels.ops.gemm import linear as linear_int8
from ebkernels.ops.gemm.conv import conv2d_int8_dgrad_reference, conv2d_int8_fwd_reference, conv2d_int8_wgrad_reference
from ebkernels.ops.gemm.host import F32_EXACT_SUM, MAX_F32_CHUNKS, exact_int_sums, f32_chunks, f32_exact_terms
from ebkernels.ops.gemm.linear import linear_int8_mm_reference


def _full(shape, v):
    return torch.full(shape, v, dtype=torch.int8)


def test_bound():
    a, b = _full((2, 3), 127), _full((3, 2), -127)
    assert f32_exact_terms(a, b) == 1040 and 1040 * 127 * 127 <= F32_EXACT_SUM < 1041 * 127 * 127
    assert f32_exact_terms(_full((1,), -128), _full((1,), 127)) == F32_EXACT_SUM // (128 * 127)
    assert f32_chunks(1040, 1, 1040) == 1040 and f32_chunks(1041, 1, 1040) == 1040
    assert f32_chunks(100, 2000, 1040) is None  # one unit alone is past the bound
    assert f32_chunks(1040 * MAX_F32_CHUNKS + 1, 1, 1040) is None  # too many chunks: float64


def test_paths_taken():
    calls = []

    def f32(u0, u1):
        calls.append((u0, u1))
        return torch.zeros(1)

    exact_int_sums(1040, 1040, f32, lambda: calls.append("f64"))
    assert calls == [(0, 1040)]
    calls.clear()
    out = exact_int_sums(1041, 1040, f32, lambda: calls.append("f64"))
    assert calls == [(0, 1040), (1040, 1041)] and out.dtype == torch.float64
    calls.clear()
    exact_int_sums(1041, None, f32, lambda: calls.append("f64"))
    assert calls == ["f64"]


@pytest.mark.parametrize("K", [1040, 1041, 3000, 1040 * MAX_F32_CHUNKS + 7])
@pytest.mark.parametrize("sign", [1, -1])
def test_linear_worst_case(K, sign):
    a, b = _full((3, K), 127), _full((K, 2), 127 * sign)
    exact = linear_int8_mm_reference(a, b, None, None, None, 8, 8, torch.float32)
    fast = linear_int8_mm_reference(a, b, None, None, None, 8, 8, torch.float32, fast=True)
    assert fast.dtype == exact.dtype == torch.int64
    assert torch.equal(fast, exact) and int(exact[0, 0]) == sign * 127 * 127 * K


def test_linear_random_scaled():
    g = torch.Generator().manual_seed(0)
    for K in (7, 1040, 1041, 5000):
        a = torch.randint(-128, 128, (5, K), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (K, 4), generator=g, dtype=torch.int8)
        sa, sb, bias = torch.tensor(0.5), torch.tensor(2.0), torch.randn(4, generator=g)
        for s in ((None, None, None), (sa, sb, bias)):
            exact = linear_int8_mm_reference(a, b, *s, 8, 8, torch.float32)
            assert torch.equal(linear_int8_mm_reference(a, b, *s, 8, 8, torch.float32, fast=True), exact)


# (Cin, KH·KW) reductions: 115·9 = 1035 <= 1040 (one float32 conv); 116·9 = 1044 (chunked); 16 = 1040/65
@pytest.mark.parametrize("cin,k", [(115, 3), (116, 3), (300, 3), (1040, 1), (1041, 1), (2, 33)])
def test_conv_fwd_dgrad_worst_case(cin, k):
    H = k + 2
    qx = _full((2, cin, H, H), 127)
    qw = _full((3, cin, k, k), -127)
    args = ([1, 1], [1, 1], [1, 1], 1, 8, 8, torch.float32, False)
    exact = conv2d_int8_fwd_reference(qx, qw, None, None, None, *args)
    assert torch.equal(conv2d_int8_fwd_reference(qx, qw, None, None, None, *args, fast=True), exact)
    assert int(exact.abs().max()) == 127 * 127 * cin * k * k
    qe = _full((2, cin, *exact.shape[2:]), 127)  # dgrad of a layer with Cout = cin
    qw_t = _full((cin, 3, k, k), 127)
    exact = conv2d_int8_dgrad_reference(qe, qw_t, None, None, [H, H], *args)
    assert torch.equal(conv2d_int8_dgrad_reference(qe, qw_t, None, None, [H, H], *args, fast=True), exact)
    assert 0 < int(exact.abs().max()) <= 127 * 127 * cin * k * k


@pytest.mark.parametrize("n,hw", [(65, 4), (66, 4), (3, 33), (200, 4)])  # N·OH·OW = 1040, 1056, 3267, 3200
def test_conv_wgrad_worst_case(n, hw):
    qx = _full((n, 2, hw, hw), -127)
    qe = _full((n, 3, hw, hw), 127)
    args = ([1, 1], [0, 0], [1, 1], 1, 8, 8, torch.float32)
    exact = conv2d_int8_wgrad_reference(qe, qx, None, None, [1, 1], *args)
    assert torch.equal(conv2d_int8_wgrad_reference(qe, qx, None, None, [1, 1], *args, fast=True), exact)
    assert int(exact.min()) == -127 * 127 * n * hw * hw


def test_conv_random_groups_scaled():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randint(-127, 128, s, generator=g, dtype=torch.int8)  # noqa: E731
    sx, sw, bias = torch.tensor(0.25), torch.tensor(4.0), torch.randn(8, generator=g)
    for groups, cin in ((1, 130), (2, 16), (2, 240)):
        qx, qw = r(4, cin, 9, 9).contiguous(memory_format=torch.channels_last), r(8, cin // groups, 3, 3)
        for s in ((None, None, None), (sx, sw, bias)):
            a = ([2, 1], [1, 0], [1, 2], groups, 8, 8, torch.float32, True)
            exact = conv2d_int8_fwd_reference(qx, qw, *s, *a)
            assert torch.equal(conv2d_int8_fwd_reference(qx, qw, *s, *a, fast=True), exact)
        y = F.conv2d(qx.float(), qw.float(), None, [2, 1], [1, 0], [1, 2], groups)
        qe = r(*y.shape)
        a = ([2, 1], [1, 0], [1, 2], groups, 8, 8, torch.float32)
        exact = conv2d_int8_dgrad_reference(qe, qw, None, None, [9, 9], *a, False)
        assert torch.equal(conv2d_int8_dgrad_reference(qe, qw, None, None, [9, 9], *a, False, fast=True), exact)
        exact = conv2d_int8_wgrad_reference(qe, qx, None, None, [3, 3], *a)
        assert torch.equal(conv2d_int8_wgrad_reference(qe, qx, None, None, [3, 3], *a, fast=True), exact)


def test_oracle_stays_float64(monkeypatch):
    """Without ``fast`` the references never take the float32 path (they are the tests' oracle)."""
    monkeypatch.setattr(linear_int8, "f32_exact_terms", lambda *a: pytest.fail("float32 path taken"))
    a, b = _full((2, 4), 3), _full((4, 2), 5)
    assert int(linear_int8_mm_reference(a, b, None, None, None, 8, 8, torch.float32)[0, 0]) == 60
