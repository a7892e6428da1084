"""Every kernel whose result depends on who arrives last gives the same bits in any order (issue 20): split-K
fix-ups (Linear, conv forward / input-grad, weight-grad, TMA weight-grad), the last-arriver merges of
``finish_reduction`` (conv + BatchNorm statistics and sums, ``bn_stats``, ``bn_relu_bwd_reduce``), the published
maxima (``quantize``, ``bn_relu_bwd``'s absmax, the conv + BatchNorm epilogue's max |z|) and the fused G
quantization (GQ=1 and the one-tile GQ=2). Each runs with the interpreter's programs in forward, reversed and
two shuffled orders (``_grid_order``), fresh seeds, poisoned outputs; the forward order is also held against
its oracle here where the op's own test file does not already do it with the same arguments."""
import pytest
import torch

import ebkernels
from ebkernels import _rng
from ebkernels.ops._buffers import _POOLS
from ebkernels.ops.fused.bn_relu_bwd import bn_relu_bwd, bn_relu_bwd_reduce, bn_relu_bwd_reduce_reference
from ebkernels.ops.fused.bn_relu_quant import bn_stats
from ebkernels.ops.fused.conv_bn import conv2d_int8_bn_bwd_reduce, conv2d_int8_bn_fwd
from ebkernels.ops.gemm.conv import (conv2d_int8_dgrad, conv2d_int8_dgrad_reference, conv2d_int8_fwd,
                                     conv2d_int8_fwd_reference, conv2d_int8_wgrad_op, conv2d_int8_wgrad_reference)
from ebkernels.ops.gemm.linear import _linear_int8_mm_op, linear_int8_mm_reference
from helpers import CL, bits_equal, codes, fresh_seed, gen, mismatch
from _grid_order import run_in_orders

pytestmark = pytest.mark.usefixtures("one_torch_thread", "poisoned")


def _same(results, msg):
    """Every order's results (a tensor or a tuple of them) bit-identical to the forward order's."""
    first = results[0] if isinstance(results[0], (tuple, list)) else (results[0],)
    for k, r in enumerate(results[1:], 1):
        r = r if isinstance(r, (tuple, list)) else (r,)
        for i, (a, b) in enumerate(zip(first, r)):
            assert bits_equal(a.cpu(), b.cpu()), f"order {k} output {i} {msg}: {mismatch(a.cpu(), b.cpu())}"


def _pools_zero(msg):
    assert all(int(torch.count_nonzero(p)) == 0 for p in _POOLS.values()), f"counter pool left dirty {msg}"


def _seeded(fn, seed, device):
    """``fn`` after ``manual_seed(seed)`` (stochastic rounding draws its ticket from the device state)."""
    def run():
        ebkernels.manual_seed(seed)
        return fn()
    return run


# ---- split-K fix-ups -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fout, fin", [(40, 30), (100, 40)], ids=["one-tile-GQ2", "four-tiles-GQ1"])
def test_linear_split_fixup_and_g_quantization(device, fout, fin):
    s = fresh_seed()
    msg = f"seed={s}"
    g = gen(s)
    B, max_terms = 150, 64  # rows: 3 splits of 64 terms
    qe, qx = codes((B, fout), g, device, channels_last=False), codes((B, fin), g, device, channels_last=False)
    se, sx = torch.tensor(2.0 ** -12, device=device), torch.tensor(2.0 ** 2, device=device)
    raw = run_in_orders(lambda: _linear_int8_mm_op(qe.t(), qx, None, None, None, 8, 8, torch.float32, max_terms, 0,
                                                   "nearest", _rng.device_state(device)))
    _same(raw, msg)
    assert torch.equal(raw[0].cpu(), linear_int8_mm_reference(qe.t().cpu(), qx.cpu(), None, None, None, 8, 8,
                                                              torch.float32)), msg
    gq = run_in_orders(_seeded(lambda: _linear_int8_mm_op(qe.t(), qx, se, sx, None, 8, 8, torch.float32, max_terms,
                                                          8, "stochastic", _rng.device_state(device)), s % 997, device))
    _same(gq, msg)
    _pools_zero(msg)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_forward_and_input_grad_split_fixup(device, stride):
    s = fresh_seed()
    msg = f"seed={s} stride={stride}"
    g = gen(s)
    qx, qw = codes((2, 32, 9, 8), g, device), codes((24, 32, 3, 3), g, device)
    conv = dict(stride=stride, padding=1)
    geo = ([stride] * 2, [1, 1], [1, 1])
    fwd = run_in_orders(lambda: conv2d_int8_fwd(qx, qw, max_terms=64, **conv))  # 288 terms: 5 splits
    _same(fwd, msg)
    assert torch.equal(fwd[0].cpu(), conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), None, None, None, *geo, 1, 8, 8,
                                                                torch.float32, True)), msg
    qe = codes(tuple(fwd[0].shape), g, device)
    dgr = run_in_orders(lambda: conv2d_int8_dgrad(qe, qw, (9, 8), max_terms=64, **conv))
    _same(dgr, msg)
    assert torch.equal(dgr[0].cpu(), conv2d_int8_dgrad_reference(qe.cpu(), qw.cpu(), None, None, [9, 8], *geo, 1, 8,
                                                                  8, torch.float32, True)), msg
    _pools_zero(msg)


# (N, C, H, W, CO, K, pad): a 3×3 weight-grad (9 tiles: GQ=1), a 1×1 one (one tile: GQ=2 in registers)
WG = [(2, 16, 8, 7, 24, 3, 1), (3, 32, 6, 6, 16, 1, 0)]


@pytest.mark.parametrize("case", WG, ids=["3x3-GQ1", "1x1-GQ2"])
@pytest.mark.parametrize("tma", [False, True], ids=["generic", "tma"])
def test_weight_grad_split_fixup_and_g_quantization(device, settings, case, tma):
    N, C, H, W, CO, K, pad = case
    if tma and K == 1:
        pytest.skip("the TMA weight-grad takes two or more taps")
    settings(wgrad_tma=tma)
    s = fresh_seed()
    msg = f"seed={s} case={case} tma={tma}"
    g = gen(s)
    if tma:
        H, W = 6, 16  # rule 8: output rows at least 16 wide
    qx = codes((N, C, H, W), g, device)
    qe = codes((N, CO, H, W), g, device, channels_last=False).permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    se, sx = torch.tensor(2.0 ** -9, device=device), torch.tensor(2.0 ** -2, device=device)
    geo = ([K, K], [1, 1], [pad, pad], [1, 1])
    raw = run_in_orders(lambda: conv2d_int8_wgrad_op(qe, qx, None, None, *geo, 1, 8, 8, torch.float32, 64, 0, "nearest",
                                                     None, _rng.device_state(device)))
    _same(raw, msg)
    assert torch.equal(raw[0].cpu(), conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), None, None, *geo, 1, 8, 8,
                                                                  torch.float32)), msg
    gq = run_in_orders(_seeded(lambda: conv2d_int8_wgrad_op(qe, qx, se, sx, *geo, 1, 8, 8, torch.float32, 64, 8,
                                                            "stochastic", [CO, C], _rng.device_state(device)),
                               s % 991, device))
    _same(gq, msg)
    ebkernels.manual_seed(s % 991)
    with ebkernels.force_backend("reference"):
        want = conv2d_int8_wgrad_op(qe, qx, se, sx, *geo, 1, 8, 8, torch.float32, 64, 8, "stochastic", [CO, C],
                                    _rng.device_state(device))
    assert bits_equal(gq[0].cpu(), want.cpu()), f"fused G vs reference {msg}: {mismatch(gq[0].cpu(), want.cpu())}"
    _pools_zero(msg)


# ---- last-arriver merges and published maxima -----------------------------------------------------------
def test_conv_bn_statistics_sums_and_max(device):
    """37 row tiles of 64 (two groups of the two-level merge), two column blocks; forward (moments, the
    BatchNorm finalisation, running statistics, max |z| published) and the backward sums."""
    s = fresh_seed()
    msg = f"seed={s}"
    g = gen(s)
    N, C, H, W, CO = 3, 16, 28, 28, 32
    qx, qw = codes((N, C, H, W), g, device), codes((CO, C, 3, 3), g, device)
    sx, sw = torch.tensor(2.0 ** -6, device=device), torch.tensor(2.0 ** -7, device=device)
    gamma, beta = torch.randn(CO, generator=g).to(device), torch.randn(CO, generator=g).to(device)
    rm, rv = torch.randn(CO, generator=g).to(device), torch.rand(CO, generator=g).to(device) + 0.5

    def fwd():
        m, v, nbt = rm.clone(), rv.clone(), torch.zeros((), dtype=torch.int64, device=device)
        out = conv2d_int8_bn_fwd(qx, qw, sx, sw, None, (1, 1), (1, 1), (1, 1), 8, 8, gamma, beta, m, v, nbt, 0.1, 1e-5,
                                 batch_stats=True, update=True, act="relu")
        return (*out, m, v)

    outs = run_in_orders(fwd)
    _same(outs, msg)
    y, bnp = outs[0][0], outs[0][2]
    dz = torch.randn(tuple(y.shape), generator=g).to(torch.bfloat16).contiguous(memory_format=CL).to(device)
    sums = run_in_orders(lambda: conv2d_int8_bn_bwd_reduce(qx, qw, sx, sw, None, (1, 1), (1, 1), (1, 1), 8, 8, dz,
                                                           bnp, "relu"))
    _same(sums, msg)
    _pools_zero(msg)


def test_bn_stats_and_bn_backward_reductions(device):
    s = fresh_seed()
    msg = f"seed={s}"
    g = gen(s)
    N, C, H, W = 8, 16, 32, 33  # 8,448 rows: 33 tiles of 256 (bn_relu_bwd_reduce), 66 of 128 (bn_stats)
    x = (torch.randn((N, C, H, W), generator=g) * 3 + 1).contiguous(memory_format=CL).to(device)
    gamma, beta = torch.randn(C, generator=g).to(device), torch.randn(C, generator=g).to(device)

    def stats():
        m, v = torch.zeros(C, device=device), torch.ones(C, device=device)
        return (*bn_stats(x, gamma, beta, m, v, None, 0.1, 1e-5, True, True, "relu"), m, v)

    outs = run_in_orders(stats)
    _same(outs, msg)
    xb, bnp = outs[0][0], outs[0][2]
    dz = torch.randn((N, C, H, W), generator=g).to(torch.bfloat16).contiguous(memory_format=CL).to(device)
    sums = run_in_orders(lambda: bn_relu_bwd_reduce(dz, xb, bnp, None, "relu"))
    _same(sums, msg)
    want = bn_relu_bwd_reduce_reference(dz.cpu(), xb.cpu(), bnp.cpu(), None, "relu")
    torch.testing.assert_close(sums[0].cpu(), want, rtol=1e-5, atol=1e-5)
    for stochastic in (False, True):
        amax = run_in_orders(_seeded(lambda: bn_relu_bwd(dz, xb, bnp, sums[0], None, "relu", "absmax", 8, stochastic),
                                     s % 983, device))
        _same(amax, f"{msg} stochastic={stochastic}")
        ebkernels.manual_seed(s % 983)
        with ebkernels.force_backend("reference"):
            want = bn_relu_bwd(dz, xb, bnp, sums[0], None, "relu", "absmax", 8, stochastic)
        assert torch.equal(amax[0][0].cpu(), want[0].cpu()), msg
    _pools_zero(msg)


def test_quantizer_absmax(device):
    """20,000 floats: ten absmax programs of 2048 publish one max; codes and scale equal in every order and to
    the PyTorch reference."""
    s = fresh_seed()
    msg = f"seed={s}"
    x = (torch.randn((20, 1000), generator=gen(s)) * 7).to(device)
    outs = run_in_orders(_seeded(lambda: ebkernels.quantize(x, rounding="stochastic"), s % 977, device))
    _same(outs, msg)
    ebkernels.manual_seed(s % 977)
    with ebkernels.force_backend("reference"):
        want = ebkernels.quantize(x, rounding="stochastic")
    assert torch.equal(outs[0][0].cpu(), want[0].cpu()) and torch.equal(outs[0][1].cpu(), want[1].cpu()), msg
    _pools_zero(msg)
