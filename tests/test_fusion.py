"""Fused int8 blocks (SPEC §9): what quantize_model fuses and what it leaves alone, that a fused model
keeps its modules / parameters / state_dict, and that fused chains compute what a float64 WAGE
reference of the same math computes (forward, input grad, weight / gamma / beta grads, running
statistics). Chains of quantizers amplify float32-vs-float64 differences (a code or a power-of-two
scale may flip at a rounding boundary), so the chain bounds are loose; each kernel has its exact
per-op test elsewhere. A wrong formula is off by far more than these bounds."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ebkernels
from ebkernels import QConfig, fusion
from ebkernels.models.preresnet import Bottleneck
from ebkernels.ops.fused import block
from ebkernels.ops.fused.block import BlockOutput, FusedBlockFunction
from helpers import (RefQConv, RoundGradBF16, assert_near_reference, bn_params, chain_grads, fresh_seed,
                     hard_bn_values, leaf, ref_block, ref_bn, rel, round_bf16, ste_quant_f32)


# --------------------------------------------------------------------------------------------------
def chain_model(c=(3, 20, 24, 17)):
    return nn.Sequential(
        nn.Conv2d(c[0], c[1], 3, padding=1, bias=False), nn.BatchNorm2d(c[1]), nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(c[1], c[2], 3, padding=1, bias=False), nn.BatchNorm2d(c[2]), nn.ReLU(),
        nn.Conv2d(c[2], c[3], 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU())


@pytest.mark.parametrize("channels_last,y_policy", [(False, "recompute"), (True, "recompute"), (True, "keep")])
def test_sequential_chain_matches_the_float64_wage_reference(channels_last, y_policy, settings):
    settings(y_policy=y_policy)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = chain_model().train()
    hard_bn_values(model, gen)
    qc = QConfig(rounding_g="nearest", rounding_e="nearest")  # deterministic: stochastic E is test_stochastic_e's
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    p_conv = [leaf(c.weight) for c in convs]
    p_bn = [bn_params(b) for b in bns]
    ebkernels.quantize_model(model, qconfig=qc)
    assert len(fusion.fused_chains(model)) == 3
    x = torch.randn(4, 3, 11, 9, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 17, 3, 3, generator=gen)

    xk = x.clone().requires_grad_(True)
    out = model(xk)
    (out * r).sum().backward()

    xr = x.double().requires_grad_(True)
    a = ref_block(ste_quant_f32(xr), convs[0], bns[0], p_conv[0], p_bn[0], pool=(2, 2, 0, 1, True))
    a = ref_block(a, convs[1], bns[1], p_conv[1], p_bn[1])
    ref = ref_block(a, convs[2], bns[2], p_conv[2], p_bn[2], quant_out=False)
    (ref * r.double()).sum().backward()

    msg = f"seed {seed}"
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_near_reference(out, ref, chain_grads(xk, xr, convs, bns, p_conv, p_bn), msg)
    for k, b in enumerate(bns):
        torch.testing.assert_close(b.running_mean.double(), p_bn[k]["rm"], rtol=0.02, atol=2e-3, msg=msg)
        torch.testing.assert_close(b.running_var.double(), p_bn[k]["rv"], rtol=0.02, atol=2e-3, msg=msg)
        assert int(b.num_batches_tracked) == 1


def test_preactivation_bottleneck_matches_the_float64_reference():
    """bn1 → relu → conv1 → bn2 → relu → conv2 → bn3 → relu → conv3, + x; bn1 reads x rounded to bf16."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = Bottleneck(32, 8, [32, 8, 12], stride=1).train()
    hard_bn_values(block, gen)
    qc = QConfig(rounding_g="nearest")
    names = ("conv1", "conv2", "conv3")
    p_conv = {n: leaf(getattr(block, n).weight) for n in names}
    p_bn = {n: bn_params(getattr(block, n)) for n in ("bn1", "bn2", "bn3")}
    bn1, bn2, bn3 = block.bn1, block.bn2, block.bn3
    ebkernels.quantize_model(block, qconfig=qc)
    assert len(fusion.fused_chains(block)) == 3  # bn1 → select → relu → conv1 → bn2 → relu, conv2 → ..., conv3
    x = torch.randn(3, 32, 6, 7, generator=gen) * 2 + 0.5
    r = torch.randn(3, 32, 6, 7, generator=gen)
    xk = x.clone().requires_grad_(True)
    out = block(xk)
    (out * r).sum().backward()

    xr = x.double().requires_grad_(True)
    z = torch.relu(ref_bn(round_bf16(xr), bn1, p_bn["bn1"]))
    a = RoundGradBF16.apply(ste_quant_f32(z))
    a = ref_block(a, block.conv1, bn2, p_conv["conv1"], p_bn["bn2"])
    a = ref_block(a, block.conv2, bn3, p_conv["conv2"], p_bn["bn3"])
    ref = RefQConv.apply(a, p_conv["conv3"], (1, 1), (0, 0)) + xr
    (ref * r.double()).sum().backward()

    msg = f"seed {seed}"
    assert rel(out, ref) < 0.02, msg
    assert rel(xk.grad, xr.grad) < 0.12, msg
    for n in names:
        assert rel(getattr(block, n).weight.grad, p_conv[n].grad) < 0.12, f"{msg}: {n}"
    for n in ("bn1", "bn2", "bn3"):
        bn = getattr(block, n)
        assert rel(bn.weight.grad, p_bn[n]["g"].grad) < 0.12, f"{msg}: {n} gamma"
        assert rel(bn.bias.grad, p_bn[n]["b"].grad) < 0.12, f"{msg}: {n} beta"
        torch.testing.assert_close(bn.running_var.double(), p_bn[n]["rv"], rtol=0.02, atol=2e-3, msg=msg)


# --------------------------------------------------------------------------------------------------
# What is fused, and what stays the same
# --------------------------------------------------------------------------------------------------
MODELS = {
    "vgg11": lambda: ebkernels.build_model("vgg11", width=0.125, num_classes=10, in_channels=3),
    "preresnet20": lambda: ebkernels.build_model("preresnet20", width=0.25, num_classes=10, in_channels=3),
    "resnet18": lambda: ebkernels.build_model("resnet18", num_classes=10, in_channels=3, use_torchvision=False),
}
# VGG-11: 8 conv chains; PreResNet-20: 3 per bottleneck (bn1 → select → relu → conv1 → bn2 → relu, conv2 → bn3
# → relu, conv3 on codes) + the final bn → select → relu; ResNet-18: the stem, 2 per BasicBlock, 3 projection
# shortcuts (conv → BN: no activation, float out)
EXPECTED = {"vgg11": 8, "preresnet20": 19, "resnet18": 20}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantize_model_fuses_and_keeps_modules_parameters_and_state_dict(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    types = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict().keys())
    ebkernels.quantize_model(model)
    lines = fusion.fused_chains(model)
    assert len(lines) == EXPECTED[name], lines
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    for n, m in model.named_modules():  # convs/linears became QConv2d/QLinear, nothing else changed
        if not isinstance(m, (ebkernels.QConv2d, ebkernels.QLinear)):
            assert type(m) is types[n], n
        assert isinstance(m, types[n]), n
    unfused = ebkernels.quantize_model(copy.deepcopy(MODELS[name]()), fuse=False)
    assert fusion.fused_chains(unfused) == []
    # a round trip restores plain float modules with plain forwards
    ebkernels.dequantize_model(model)
    assert fusion.fused_chains(model) == [] and not any(
        isinstance(m, (ebkernels.QConv2d, ebkernels.QLinear)) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_models_train_eval_and_no_grad_as_well_as_the_per_layer_path(name):
    """Whole models on the CPU reference path (the interpreter runs the same blocks in the chain tests
    above; here it would take minutes): fused and per-layer int8 are each compared with fp32 — both
    carry int8 noise, the fused one must not carry much more."""
    torch.manual_seed(1)
    base = MODELS[name]().train()
    fused = ebkernels.quantize_model(copy.deepcopy(base))
    plain = ebkernels.quantize_model(copy.deepcopy(base), fuse=False)
    size = 32 if name == "resnet18" else 16
    x = torch.randn(8, 3, size, size).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (8,))
    outs = {}
    with ebkernels.force_backend("reference"):
        for tag, m in (("fp32", base), ("fused", fused), ("plain", plain)):
            out = m(x)
            F.cross_entropy(out, t).backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()), tag
            outs[tag] = out.detach()
        err_fused, err_plain = rel(outs["fused"], outs["fp32"]), rel(outs["plain"], outs["fp32"])
        assert err_fused < 1.5 * err_plain + 0.02, (err_fused, err_plain)
        for (n, b1), (_, b2) in zip(fused.named_buffers(), base.named_buffers()):
            if b1.dtype.is_floating_point:
                torch.testing.assert_close(b1, b2, rtol=0.1, atol=0.05, msg=n)
            else:
                assert torch.equal(b1, b2), n
        for m in (base, fused, plain):
            m.eval()
        with torch.no_grad():
            e0, e1, e2 = base(x), fused(x), plain(x)
        assert rel(e1, e0) < 1.5 * rel(e2, e0) + 0.02
        before = [b.clone() for b in fused.buffers()]
        with torch.no_grad():
            fused(x)
        assert all(torch.equal(a, b) for a, b in zip(before, fused.buffers()))  # eval: statistics untouched


def test_hooks_syncbn_and_unsupported_layers_stay_on_the_per_layer_path():
    torch.manual_seed(2)
    m = ebkernels.quantize_model(chain_model())
    assert len(fusion.fused_chains(m)) == 3
    seen = []
    m[4].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 8, 8)
    m(x)
    assert seen, "a hook added after fusing runs: that chain fell back to its own forward"
    # fusing afresh leaves the hooked chain out
    m2 = chain_model()
    m2[0].register_forward_pre_hook(lambda mod, i: None)
    ebkernels.quantize_model(m2)
    lines = fusion.fused_chains(m2)  # the hooked conv runs as it is; its BatchNorm → ReLU still fuse
    assert len(lines) == 3 and lines[0].startswith("1 → 2 (BN → act"), lines
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.warns(UserWarning, match="groups > 1"):
        ebkernels.quantize_model(grouped)(torch.randn(2, 4, 5, 5))
    assert fusion.fused_chains(grouped) == ["1 → 2 (BN → act; float in, float out)"]  # the conv runs as it is
    floaty = ebkernels.quantize_model(chain_model(), qconfig=QConfig(bits_e=None))
    assert all("(BN → act;" in line for line in fusion.fused_chains(floaty))


@pytest.mark.parametrize("spread", [True, False])
def test_a_fused_model_is_pruned_quantized_again_and_runs(spread):
    """Prune a fused model's float copy, quantize the ticket again: gathered channels take the index
    path. ``spread=False``: every gamma equal, so the mask rescues one channel per layer (1-wide layers)."""
    torch.manual_seed(3)
    model = ebkernels.build_model("preresnet11", width=0.25, num_classes=10, in_channels=3)
    if spread:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.1, 1.0)
    ebkernels.quantize_model(model)
    x = torch.randn(4, 3, 8, 8)
    F.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
    dense = ebkernels.dequantize_model(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the equal-gamma mask warns that it rescues channels
        pruned, _ = ebkernels.prune(dense, ebkernels.channel_mask(dense, 0.5))
    fused = ebkernels.quantize_model(copy.deepcopy(pruned))
    plain = ebkernels.quantize_model(copy.deepcopy(pruned), fuse=False)
    assert len(fusion.fused_chains(fused)) == 10  # 3 blocks × 3 chains + the final bn → select → relu
    assert any(b.select.num_kept < b.bn1.num_features for b in fused.blocks())
    o0, o1, o2 = pruned(x), fused(x), plain(x)
    assert rel(o1, o0) < 1.5 * rel(o2, o0) + 0.05
    o1.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


def test_non_finite_input_propagates_and_one_value_per_channel_is_refused():
    m = ebkernels.quantize_model(chain_model())
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(m(x)).all()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 3, 2, 2))


def test_a_training_step_reads_nothing_back_to_the_host():
    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_local_scalar_dense":
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(4)
    model = nn.Sequential(chain_model(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(17, 10))
    ebkernels.quantize_model(model)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), t).backward()  # warm-up (lazy state, compilation)
    with Reads():
        F.cross_entropy(model(x), t).backward()
    assert Reads.count == 0


def test_the_y_policy_keeps_y_exactly_where_the_layer_is_compute_bound():
    # VGG16-CIFAR at 32x32: the 3x3 layers from 256 channels at 8x8 on are compute-bound on an H100
    assert not block.keeps_y(64, 64, 3, 3, 32 * 32, 32 * 32, "auto")
    assert not block.keeps_y(128, 256, 3, 3, 8 * 8, 8 * 8, "auto")
    assert block.keeps_y(256, 256, 3, 3, 8 * 8, 8 * 8, "auto")
    assert block.keeps_y(512, 512, 3, 3, 2 * 2, 2 * 2, "auto")
    assert not block.keeps_y(64, 256, 1, 1, 8 * 8, 8 * 8, "auto")  # 1x1 layers: memory-bound
    assert block.keeps_y(3, 3, 1, 1, 1, 1, "keep") and not block.keeps_y(512, 512, 3, 3, 4, 4, "recompute")


def test_the_counter_pool_is_zero_again_after_a_training_step():
    """The kernels' semaphores share one pool per device and stream and need no memset: every launch must
    leave its counters as it found them (zero), or the next launch would count wrong."""
    from ebkernels.ops._buffers import _POOLS

    torch.manual_seed(5)
    model = nn.Sequential(chain_model(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(17, 10))
    ebkernels.quantize_model(model, qconfig=QConfig(rounding_e="stochastic"))
    x = torch.randn(4, 3, 8, 8)
    F.cross_entropy(model(x), torch.randint(0, 10, (4,))).backward()
    assert _POOLS and all(int(p.abs().sum()) == 0 for p in _POOLS.values())


def test_the_block_function_is_what_runs():
    """The fused path really is taken: the block function runs once per chain and call."""
    calls = []
    orig = FusedBlockFunction.forward

    def spy(ctx, spec, *args):
        calls.append(spec.output)
        return orig(ctx, spec, *args)

    m = ebkernels.quantize_model(chain_model())
    FusedBlockFunction.forward = staticmethod(spy)
    try:
        m(torch.randn(2, 3, 8, 8))
    finally:
        FusedBlockFunction.forward = staticmethod(orig)
    assert calls == [BlockOutput.CODES, BlockOutput.CODES, BlockOutput.FLOAT]


def test_a_blocks_saved_record_round_trips_in_field_order():
    """``Saved.save`` / ``load`` pass the record positionally (no per-field loop: host time per block): the fields are
    ``TENSORS``, then ``source``, then ``FLAGS``, and a record comes back as it went in."""
    import dataclasses

    from ebkernels.ops.fused.saved import Saved
    from ebkernels.ops.fused.spec import BlockInput

    names = tuple(f.name for f in dataclasses.fields(Saved))
    assert names == (*Saved.TENSORS, "source", *Saved.FLAGS)

    class Ctx:
        def save_for_backward(self, *t):
            self.saved_tensors = t

    class Spec:
        input = BlockInput.CODES

    g = torch.Generator().manual_seed(0)
    values = {k: torch.randn(2, generator=g) for k in Saved.TENSORS}
    flags = dict(batch_in=True, batch_stats=True, pre_pool_hw=(4, 4), source_kind="replay", codes_again=("c", 1),
                 source_again=None, zero_bias=("z",))
    rec = Saved(**values, source=(torch.ones(1),), **flags)
    ctx = Ctx()
    rec.save(ctx, Spec())
    back = Saved.load(ctx)
    assert all(getattr(back, k) is values[k] for k in Saved.TENSORS) and back.source == rec.source
    assert all(getattr(back, k) == v for k, v in flags.items())
