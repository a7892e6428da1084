"""Fused chains with every activation kind (ReLU6, SiLU, Hardswish, none) and with a pre-activation BatchNorm
after a float (depthwise) conv, on the Triton kernels (the interpreter on CPU), against the float64 WAGE
reference of test_fusion.py; a residual model in the int8 region reads nothing back to the host in a step.

The next layer's codes take their scale from the per-channel extremes of BatchNorm's output (SPEC §9), also
for the non-monotone SiLU / Hardswish (their interior minimum bounds |z|: ``ops/fused/bn_math.py``), so the
codes are the per-tensor quantizer's codes of z, as the reference quantizes them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ebkernels
from ebkernels import QConfig, fusion
from ebkernels.models import is_grouped_conv
from helpers import (RefQConv, RoundGradBF16, assert_near_reference, bn_params, chain_grads, fresh_seed,
                     hard_bn_values, leaf, ref_bn, rel, round_bf16, ste_quant_f32)

ACTS = {"relu6": (nn.ReLU6, F.relu6), "hardswish": (nn.Hardswish, F.hardswish), "silu": (nn.SiLU, F.silu),
        "identity": (None, lambda t: t), "relu": (nn.ReLU, F.relu)}
ORDER = ("relu6", "hardswish", "silu", "identity", "relu")


def _net(channels=(3, 12, 16, 20, 12, 10)):
    layers = []
    for k, act in enumerate(ORDER):
        layers += [nn.Conv2d(channels[k], channels[k + 1], 3, padding=1, bias=False), nn.BatchNorm2d(channels[k + 1])]
        if ACTS[act][0] is not None:
            layers.append(ACTS[act][0]())
    return nn.Sequential(*layers)


def _ref_chain(x, convs, bns, p_conv, p_bn):
    a = ste_quant_f32(x)
    for k, act in enumerate(ORDER):
        y = round_bf16(RefQConv.apply(a, p_conv[k], (1, 1), (1, 1)))
        z = ACTS[act][1](ref_bn(y, bns[k], p_bn[k]))
        a = RoundGradBF16.apply(ste_quant_f32(z)) if k + 1 < len(ORDER) else z
    return a


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_activation_kind_hands_codes_and_matches_the_float64_reference(channels_last):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _net().train()
    hard_bn_values(model, gen)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    p_conv, p_bn = [leaf(c.weight) for c in convs], [bn_params(b) for b in bns]
    ebkernels.quantize_model(model, qconfig=QConfig(rounding_g="nearest", rounding_e="nearest"))
    lines = fusion.fused_chains(model)
    assert len(lines) == 5 and all("codes out" in ln for ln in lines[:-1]) and "float out" in lines[-1], lines
    x = torch.randn(3, 3, 7, 6, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(3, 10, 7, 6, generator=gen)
    xk = x.clone().requires_grad_(True)
    out = model(xk)
    (out * r).sum().backward()
    xr = x.double().requires_grad_(True)
    ref = _ref_chain(xr, convs, bns, p_conv, p_bn)
    (ref * r.double()).sum().backward()
    msg = f"seed {seed}"
    assert out.dtype == torch.float32, msg
    assert_near_reference(out, ref, chain_grads(xk, xr, convs, bns, p_conv, p_bn, ORDER), msg)
    for k, b in enumerate(bns):
        torch.testing.assert_close(b.running_var.double(), p_bn[k]["rv"], rtol=0.02, atol=2e-3, msg=msg)


class InvertedResidual(nn.Module):
    """MobileNet-V2's block: expand conv → BN → ReLU6, depthwise conv (float) → BN → ReLU6 → project conv →
    BN, + x."""

    def __init__(self, c=8, e=3):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, c * e, 1, bias=False), nn.BatchNorm2d(c * e), nn.ReLU6())
        self.dw = nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e, bias=False)
        self.project = nn.Sequential(nn.BatchNorm2d(c * e), nn.ReLU6(), nn.Conv2d(c * e, c, 1, bias=False),
                                     nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


def test_a_preactivation_chain_after_a_depthwise_conv_matches_the_float64_reference():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = InvertedResidual().train()
    hard_bn_values(m, gen)
    e_conv, p_conv = leaf(m.expand[0].weight), leaf(m.project[2].weight)
    w_dw = leaf(m.dw.weight)
    p_bn = [bn_params(b) for b in (m.expand[1], m.project[0], m.project[3])]
    ebkernels.quantize_model(m, qconfig=QConfig(rounding_g="nearest", rounding_e="nearest"), skip=is_grouped_conv)
    lines = fusion.fused_chains(m)
    assert lines == ["expand.0 → expand.1 → expand.2 (conv → BN → act; float in, float out)",
                     "project.0 → project.1 → project.2 → project.3 → add() (BN → act → conv; float in, float out)"],\
        lines  # the residual add runs in the BatchNorm pass (ops/fused/bn_add_act.py)
    x = torch.randn(4, 8, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 8, 6, 5, generator=gen)
    xk = x.clone().requires_grad_(True)
    out = m(xk)
    (out * r).sum().backward()

    xr = x.double().requires_grad_(True)
    z = F.relu6(ref_bn(round_bf16(RefQConv.apply(ste_quant_f32(xr), e_conv, (1, 1), (0, 0))), m.expand[1], p_bn[0]))
    d = F.conv2d(round_bf16(z), round_bf16(w_dw), None, 1, 1, 1, w_dw.shape[0])  # the region's bfloat16 conv
    z = F.relu6(ref_bn(round_bf16(d), m.project[0], p_bn[1]))
    y = round_bf16(RefQConv.apply(RoundGradBF16.apply(ste_quant_f32(z)), p_conv, (1, 1), (0, 0)))
    ref = xr + ref_bn(y, m.project[3], p_bn[2])
    (ref * r.double()).sum().backward()
    msg = f"seed {seed}"
    assert rel(out, ref) < 0.02, msg
    assert rel(xk.grad, xr.grad) < 0.12, msg
    assert rel(m.expand[0].weight.grad, e_conv.grad) < 0.12, msg
    assert rel(m.project[2].weight.grad, p_conv.grad) < 0.12, msg
    assert rel(m.dw.weight.grad, w_dw.grad) < 0.12, msg
    for b, p in zip((m.expand[1], m.project[0], m.project[3]), p_bn):
        assert rel(b.weight.grad, p["g"].grad) < 0.12, msg
        torch.testing.assert_close(b.running_var.double(), p["rv"], rtol=0.02, atol=2e-3, msg=msg)


class Basic(nn.Module):
    """A stem chain and a post-activation BasicBlock: relu(bn2(conv2(relu(bn1(conv1(s))))) + s)."""

    def __init__(self, c=12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        s = self.stem(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(s))))) + s)


def test_a_post_activation_residual_block_fuses_its_add_and_relu_and_matches_the_float64_reference():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = Basic().train()
    hard_bn_values(m, gen)
    convs, bns = (m.stem[0], m.conv1, m.conv2), (m.stem[1], m.bn1, m.bn2)
    p_conv, p_bn = [leaf(c.weight) for c in convs], [bn_params(b) for b in bns]
    ebkernels.quantize_model(m, qconfig=QConfig(rounding_g="nearest", rounding_e="nearest"))
    lines = fusion.fused_chains(m)
    assert lines[2] == "conv2 → bn2 → add() → relu() (conv → BN → act; codes in, float out)", lines
    x = torch.randn(4, 3, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 12, 6, 7, generator=gen)
    xk = x.clone().requires_grad_(True)
    out = m(xk)
    (out * r).sum().backward()

    def conv(a, k):
        return round_bf16(RefQConv.apply(a, p_conv[k], (1, 1), (1, 1)))

    xr = x.double().requires_grad_(True)
    s = round_bf16(F.relu(ref_bn(conv(ste_quant_f32(xr), 0), bns[0], p_bn[0])))
    a = RoundGradBF16.apply(ste_quant_f32(F.relu(ref_bn(conv(ste_quant_f32(s), 1), bns[1], p_bn[1]))))
    ref = F.relu(ref_bn(conv(a, 2), bns[2], p_bn[2]) + s)
    (ref * r.double()).sum().backward()
    msg = f"seed {seed}"
    assert out.dtype == torch.float32, msg
    assert_near_reference(out, ref, chain_grads(xk, xr, convs, bns, p_conv, p_bn), msg)


class Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [False, True])
def test_a_residual_int8_region_step_reads_nothing_back_to_the_host(autocast):
    torch.manual_seed(8)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      InvertedResidual(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    ebkernels.quantize_model(m, skip=is_grouped_conv)
    assert len(fusion.fused_chains(m)) == 3
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 4, (4,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(x)
        F.cross_entropy(out.float(), t).backward()

    step()  # warm-up
    with Reads() as reads:
        step()
    assert reads.count == 0
