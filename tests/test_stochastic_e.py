"""E is rounded stochastically by default (QConfig.rounding_e, issue 22), in the per-layer layers and in the
fused blocks, checked statistically end to end: behind a training-mode BatchNorm the exact E sums to zero
per channel; with stochastic rounding the per-channel sums of E's codes are unbiased (their mean over fresh
tickets converges to the sums of the codes' expectations), with rounding to nearest they are not (the bias
that made the BN running means of an int8 search lag).

How E's codes are seen: the conv is 1×1 with the identity weight, so its input gradient is E's codes times
one power of two (Shift scales: ``dX = q_E · 127 · s_E / 2^14``, exact in float32). The op-level checks are
in test_bn_relu_bwd (the fused codes pass) and test_quantize / test_rng (the quantizer)."""
import pytest
import torch
import torch.nn as nn

from ebkernels import QConfig, quantize_model
from ebkernels.fusion import fused_chains
from ebkernels.modules import QConv2d
from ebkernels.ops._scale import shift_scale_reference
from helpers import fresh_seed, gen, rows

# small tensors: no intra-op thread contention; the device random state put back after each test
pytestmark = pytest.mark.usefixtures("one_torch_thread", "rng_state")

N, C, H, W, R, S = 4, 16, 8, 8, 32, 128



def _net(g, qc, fuse, device):
    """1×1 conv with the identity weight -> BatchNorm (training mode, random affine) -> ReLU."""
    net = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(C).view(C, C, 1, 1))
        net[1].weight.copy_(torch.rand(C, generator=g) + 0.5)
        net[1].bias.copy_(torch.randn(C, generator=g) * 0.5)
    return quantize_model(net.to(device), qc, fuse=fuse).train()


def _inputs(g, device):
    x = (torch.randn(N, C, H, W, generator=g) * torch.exp(torch.randn(C, generator=g)).view(1, C, 1, 1)).to(device)
    up = (torch.randn(N, C, H, W, generator=g) ** 3).to(device)  # heavy tails, as training gradients
    return x, up


def _codes(gx, s_e):
    """E's codes from the input gradient of the identity conv: ``gx = q · 127 · s_E / 2^14``."""
    q = gx.detach().cpu().double() * 2 ** 14 / (127 * s_e)
    assert torch.equal(q, torch.round(q)), "the input gradient is not E's codes times one power of two"
    return q


def _z(sums_mean, expect, v):
    """z-scores of the mean per-channel sums over R draws against their expectation (codes' variance
    frac·(1-frac) each)."""
    frac = v - torch.floor(v)
    sd = (frac * (1 - frac)).sum(0).sqrt() / R ** 0.5
    return (sums_mean - expect) / sd.clamp(min=1e-9)


def test_qconfig_defaults():
    qc = QConfig()
    assert qc.rounding_e == "stochastic" and qc.rounding_g == "stochastic" and qc.mode == "shift"
    assert qc.mode_eg == "shift" and QConfig(mode="absmax").mode_eg == "absmax" and QConfig(mode="wage").mode_eg == "shift"


def test_per_layer_e_codes_keep_the_per_channel_sums_unbiased(device):
    """QConv2d (not fused): E's float values are what autograd hands the layer (a hook), so every code's
    expectation ``clip(E/s·S)`` is known exactly, clipping included."""
    seed = fresh_seed()
    msg = f"seed={seed}"
    g = gen(seed)
    x, up = _inputs(g, device)
    sums = {}
    for rounding in ("stochastic", "nearest"):
        net = _net(gen(seed + 1), QConfig(bits_g=None, **({} if rounding == "stochastic" else
                                                           {"rounding_e": "nearest"})), False, device)
        assert isinstance(net[0], QConv2d) and not fused_chains(net), msg
        xg = x.clone().requires_grad_()
        e = []
        y = net[0](xg)
        y.register_hook(lambda t: e.append(t.detach().clone()))
        z = net[2](net[1](y))
        total = torch.zeros(C, dtype=torch.float64)
        for _ in range(R if rounding == "stochastic" else 1):
            xg.grad = None
            z.backward(up, retain_graph=True)
            s_e = shift_scale_reference(e[-1].abs().amax()).item()
            total += rows(_codes(xg.grad, s_e)).sum(0)
        assert all(torch.equal(t, e[0]) for t in e), msg  # the same E each time: only the noise is fresh
        ef = rows(e[0].cpu())
        assert (ef.double().sum(0).abs() <= 1e-4 * ef.double().abs().sum(0) + 1e-30).all(), msg  # sums to 0
        v = (((ef / s_e) * S).clamp(-(S - 1), S - 1)).double()  # each code's expectation, the kernels' ops
        sums[rounding] = (total / (R if rounding == "stochastic" else 1), v)
    mean, v = sums["stochastic"]
    z = _z(mean, v.sum(0), v)
    assert z.abs().max().item() < 5.5, f"stochastic E: per-channel sums biased, z = {z.tolist()} {msg}"
    near, _ = sums["nearest"]
    zn = _z(near, v.sum(0), v)
    assert zn.abs().max().item() > 10, f"nearest E unbiased here? z = {zn.tolist()} {msg}"


def test_fused_block_e_codes_keep_the_per_channel_sums_unbiased(device):
    """The fused conv -> BN -> ReLU block (E's codes from its BatchNorm-backward pass; E itself never leaves
    the block). Its upstream gradient is scaled so that max |E| lands at 0.85 of its Shift scale: no code
    clips (checked), so the expectation of each channel's sum is the exact one, 0."""
    seed = fresh_seed()
    msg = f"seed={seed}"
    x, up = _inputs(gen(seed), device)
    out = {}
    for rounding in ("stochastic", "nearest"):
        qc = QConfig() if rounding == "stochastic" else QConfig(rounding_e="nearest")  # G quantized: fusable
        net = _net(gen(seed + 1), qc, True, device)
        assert len(fused_chains(net)) == 1, msg
        xg = x.clone().requires_grad_()
        z = net(xg)

        def draw(upstream):
            xg.grad = None
            z.backward(upstream, retain_graph=True)
            gx = xg.grad.detach().cpu().double()
            top = gx.abs().max().item()
            k = next(k for k in range(-150, 150) if 63.5 < top * 2 ** 14 / (127 * 2.0 ** k) <= 127)
            return _codes(gx, 2.0 ** k), 2.0 ** k

        q, s_e = draw(up)
        lam = 1.7 * 2.0 ** torch.floor(torch.log2(torch.tensor(q.abs().max().item() * s_e / S))).item() / (
            q.abs().max().item() * s_e / S)
        total, top = torch.zeros(C, dtype=torch.float64), 0.0
        for _ in range(R if rounding == "stochastic" else 1):
            q, _ = draw(up * lam)
            total += rows(q).sum(0)
            top = max(top, q.abs().max().item())
        assert 90 <= top <= 126, f"max code {top}: scaling failed {msg}"
        out[rounding] = total / (R if rounding == "stochastic" else 1)
    # the exact per-channel sums are 0 and nothing clips; var of a code <= 1/4
    sd = (M_ROWS * 0.25 / R) ** 0.5
    z = out["stochastic"] / sd
    assert z.abs().max().item() < 5.5, f"stochastic E (fused): per-channel sums biased, z >= {z.tolist()} {msg}"
    assert (out["nearest"].abs() / sd).max().item() > 10, f"nearest E (fused) unbiased here? {out['nearest']} {msg}"


M_ROWS = N * H * W
