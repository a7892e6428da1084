"""The graph fuser (``ebkernels.fusion``) on whole models: which chains it finds in the traced graph of
torchvision CNNs and of our families, that a fused model keeps its modules / parameters / state_dict and
computes what the per-layer path computes (within the documented numerics: bfloat16 between chains), in train
and eval mode, NCHW and channels-last, with and without autocast; what falls back, with its log line; the
int8 region's dtypes; a plan that follows the model when a layer is replaced, hooked or switched to eval.

Whole models run on the CPU reference path (the interpreter runs the same blocks in the chain tests of
test_fusion.py / test_fusion_acts.py; here it would take minutes). G is rounded to nearest: the seeded
stochastic rounding's CPU reference costs seconds per step on ResNet-50's weights."""
from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ebkernels
from ebkernels import QConfig, fusion
from ebkernels.models import is_grouped_conv
from ebkernels.ops.fused.block import FusedBlockFunction

QC = QConfig(rounding_g="nearest")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def grads(m):
    return torch.cat([p.grad.flatten().double() for p in m.parameters() if p.grad is not None])


# --------------------------------------------------------------------------------------------------
# torchvision models and our families
# --------------------------------------------------------------------------------------------------
# chains per model (small stem): ResNets 1 per conv (bottleneck conv → BN → ReLU ×2, conv → BN, projection
# conv → BN); MobileNet-V2 the expand conv → BN → ReLU6 and the BN → ReLU6 → project conv → BN around each
# depthwise conv; DenseNet each layer's BN → ReLU → conv1 → BN → ReLU + conv2 on codes, each transition, the
# stem and the final BN → ReLU; EfficientNet conv → BN → SiLU, BN → SiLU before each squeeze-excitation,
# project conv → BN; RegNet conv → BN → ReLU, BN → ReLU → conv → BN around each grouped conv, projections
TV_CHAINS = {"resnet50": 53, "mobilenet_v2": 35, "densenet121": 121, "efficientnet_b0": 49, "regnet_x_400mf": 49,
             "resnet18": 20, "vgg16_bn": 13}
# (autocast, channels-last): each model one corner of the matrix, every corner twice
TV_MODES = {"resnet50": (True, True), "mobilenet_v2": (False, False), "densenet121": (True, False),
            "efficientnet_b0": (False, True), "regnet_x_400mf": (True, True), "resnet18": (False, True),
            "vgg16_bn": (True, False)}


def _tv(name, seed=0):
    torch.manual_seed(seed)
    return ebkernels.build_model(f"torchvision:{name}", num_classes=10, in_channels=3, small_stem=True)


def _step(model, x, t, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    F.cross_entropy(out.float(), t).backward()
    return out


def _matches_the_per_layer_path(base, x, t, autocast, slack=0.03):
    """Train step and eval forward of base (fp32), fused int8 and per-layer int8 copies: the fused one carries
    no much more error than the per-layer one (both carry int8 noise); buffers move alike."""
    fused = ebkernels.quantize_model(copy.deepcopy(base), qconfig=QC, skip=is_grouped_conv)
    plain = ebkernels.quantize_model(copy.deepcopy(base), qconfig=QC, skip=is_grouped_conv, fuse=False)
    calls = []
    with ebkernels.force_backend("reference"):
        ref = _step(base, x, t, False)
        orig = FusedBlockFunction.forward
        FusedBlockFunction.forward = staticmethod(lambda ctx, *a: calls.append(1) or orig(ctx, *a))
        try:
            out_f = _step(fused, x, t, autocast)
        finally:
            FusedBlockFunction.forward = staticmethod(orig)
        out_p = _step(plain, x, t, autocast)
        assert calls, "the fused chains ran"
        assert out_f.dtype == (torch.bfloat16 if autocast else torch.float32) == out_p.dtype
        assert rel(out_f, ref) < 1.5 * rel(out_p, ref) + slack, (rel(out_f, ref), rel(out_p, ref))
        g0, g1, g2 = grads(base), grads(fused), grads(plain)
        assert torch.isfinite(g1).all() and g1.shape == g0.shape
        assert rel(g1, g0) < 1.5 * rel(g2, g0) + 2 * slack, (rel(g1, g0), rel(g2, g0))
        floats = lambda m: torch.cat([b.flatten().double() for b in m.buffers() if b.is_floating_point()])  # noqa
        assert rel(floats(fused), floats(base)) < 1.5 * rel(floats(plain), floats(base)) + slack
        for (n, b1), (_, b0) in zip(fused.named_buffers(), base.named_buffers()):
            if not b1.dtype.is_floating_point:
                assert torch.equal(b1, b0), n  # num_batches_tracked
        for m in (base, fused, plain):
            m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            e0, e1, e2 = base(x), fused(x), plain(x)
        assert rel(e1, e0) < 1.5 * rel(e2, e0) + slack
    return fused


@pytest.mark.torchvision
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", sorted(TV_CHAINS))
def test_torchvision_models_fuse_by_graph_and_match_the_per_layer_path(name):
    base = _tv(name).train()
    if name == "vgg16_bn":  # its 7×7 pool and 120 M-weight classifier would take most of the test's time
        base.avgpool, base.classifier = nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Flatten(), nn.Linear(512, 10))
    types = {n: type(m) for n, m in base.named_modules()}
    keys = list(base.state_dict().keys())
    autocast, cl = TV_MODES[name]
    size = 32 if name == "vgg16_bn" else 16  # VGG's five max-pools
    x = torch.randn(4, 3, size, size)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = _matches_the_per_layer_path(base, x, torch.randint(0, 10, (4,)), autocast)
    assert len(fusion.fused_chains(fused)) == TV_CHAINS[name], fusion.fused_chains(fused)
    assert list(fused.state_dict().keys()) == keys and type(fused) is types[""]
    for n, m in fused.named_modules():  # convs/linears became QConv2d/QLinear, nothing else changed
        assert isinstance(m, types[n]) and (type(m) is types[n] or isinstance(m, (ebkernels.QConv2d,
                                                                                  ebkernels.QLinear))), n
    ebkernels.dequantize_model(fused)
    assert fusion.fused_chains(fused) == [] and "forward" not in fused.__dict__


OURS = {"vgg16": dict(width=0.125), "preresnet20": dict(width=0.25), "resnet18": dict(use_torchvision=False)}
OURS_CHAINS = {"vgg16": 13, "preresnet20": 19, "resnet18": 20}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name,autocast", [("vgg16", True), ("preresnet20", True), ("resnet18", False)])
def test_our_families_go_through_the_same_graph_matcher(name, autocast):
    torch.manual_seed(1)
    base = ebkernels.build_model(name, num_classes=10, in_channels=3, **OURS[name]).train()
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    fused = _matches_the_per_layer_path(base, x, torch.randint(0, 10, (4,)), autocast)
    assert len(fusion.fused_chains(fused)) == OURS_CHAINS[name]


def test_the_fuser_imports_no_model_class():
    import ast
    import pathlib

    for path in pathlib.Path(fusion.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "models" not in (node.module or ""), f"{path.name} imports {node.module}"


# --------------------------------------------------------------------------------------------------
# What falls back, and says why
# --------------------------------------------------------------------------------------------------
def block(c=8, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act())


class Branchy(nn.Module):
    """A container whose forward branches on a traced value: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = block(), block()

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


class WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.odd, self.tail = block(), Branchy(), block()

    def forward(self, x):
        return self.tail(self.odd(self.stem(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = block()

    def forward(self, x):
        return self.a(x) if x.mean() > -100 else x


def test_an_untraceable_container_runs_as_one_layer_and_the_rest_fuses(caplog):
    torch.manual_seed(2)
    m = WithBranchy()
    with caplog.at_level(logging.INFO, logger="ebkernels"):
        ebkernels.quantize_model(m, qconfig=QC)
    lines = fusion.fused_chains(m)
    assert [ln.split(" ")[0] for ln in lines] == ["stem.0", "tail.0"], lines
    assert any("'odd' (Branchy) is not traceable by torch.fx (TraceError" in r.message and
               "runs as one layer on the per-layer path" in r.message for r in caplog.records)
    x = torch.randn(2, 8, 6, 6)
    with ebkernels.force_backend("reference"):
        out = m(x)
        plain = ebkernels.quantize_model(copy.deepcopy(ebkernels.dequantize_model(copy.deepcopy(m))), qconfig=QC,
                                         fuse=False)
        assert out.shape == plain(x).shape


def test_an_untraceable_model_runs_the_per_layer_path_with_one_log_line(caplog):
    m = Untraceable()
    with caplog.at_level(logging.INFO, logger="ebkernels"):
        ebkernels.quantize_model(m, qconfig=QC)
    assert fusion.fused_chains(m) == [] and "forward" not in m.__dict__
    msgs = [r.message for r in caplog.records if "not traceable" in r.message]
    assert len(msgs) == 1 and "'Untraceable' is not traceable by torch.fx" in msgs[0] and "whole model" in msgs[0]


def test_hooks_syncbn_and_other_dtypes_leave_their_chain_on_the_per_layer_path_with_a_log_line(caplog):
    torch.manual_seed(3)
    m = nn.Sequential(block(), block(), block(), block())
    m[1][0].register_forward_hook(lambda *a: None)
    m[2][1] = nn.SyncBatchNorm(8)
    with caplog.at_level(logging.INFO, logger="ebkernels"):
        ebkernels.quantize_model(m, qconfig=QC)
    text = "\n".join(r.message for r in caplog.records)
    assert "'1.0' (QConv2d) does not fuse: it has hooks" in text
    assert "'2.1' (SyncBatchNorm) does not fuse: it is a SyncBatchNorm, not an nn.BatchNorm2d" in text
    starts = [ln.split(" ")[0] for ln in fusion.fused_chains(m)]
    assert starts == ["0.0", "1.1", "3.0"], starts  # the hooked conv's BN → ReLU still fuse
    double = ebkernels.quantize_model(nn.Sequential(block(), block()).double(), qconfig=QC)
    assert fusion.fused_chains(double) == []
    with caplog.at_level(logging.INFO, logger="ebkernels"):
        ebkernels.quantize_model(nn.Sequential(block(), block()).double(), qconfig=QC)
    assert "its weight is float64 (fused chains take float32 layers)" in caplog.text


def test_the_plan_follows_replaced_hooked_and_retrained_layers():
    torch.manual_seed(4)
    m = ebkernels.quantize_model(nn.Sequential(block(), block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                               nn.Linear(8, 3)), qconfig=QC)
    x = torch.randn(2, 8, 5, 5)
    calls = []
    orig = FusedBlockFunction.forward
    FusedBlockFunction.forward = staticmethod(lambda ctx, spec, *a: calls.append(spec.conv) or orig(ctx, spec, *a))
    try:
        with ebkernels.force_backend("reference"):
            m(x)
            assert calls == [m[0][0], m[1][0]]
            new = ebkernels.QConv2d(8, 8, 3, padding=1, bias=False, qconfig=QC)
            m[1][0] = new  # replaced after fusing (e.g. pruned): the new layer runs, fused
            calls.clear()
            m(x)
            assert calls == [m[0][0], new]
            seen = []
            m[0][2].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
            calls.clear()
            m(x)  # the hooked ReLU runs (its conv → BN still fuse); the second chain as before
            assert seen and calls == [m[0][0], new]
            m.eval()
            with torch.no_grad():
                assert m(x).shape == (2, 3)
            m.train()
            assert m(x).dtype == torch.float32
    finally:
        FusedBlockFunction.forward = staticmethod(orig)


def test_deepcopy_pickle_and_empty_batches_of_a_fused_model():
    torch.manual_seed(5)
    m = ebkernels.quantize_model(nn.Sequential(block(), block()), qconfig=QC)
    x = torch.randn(2, 8, 5, 5)
    with ebkernels.force_backend("reference"):
        m.eval()
        want = m(x)
        for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert fusion.fused_chains(other) == fusion.fused_chains(m)
            assert other.forward.module is other
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)
        assert m(torch.randn(0, 8, 5, 5)).shape == (0, 8, 5, 5)  # the model's own forward
        with pytest.raises(RuntimeError, match="should be the same"):
            m(x.double())  # as nn.Conv2d: the layers' dtype, outside autocast


# --------------------------------------------------------------------------------------------------
# The int8 region: bfloat16 between chains, autocast a normal case
# --------------------------------------------------------------------------------------------------
class Residual(nn.Module):
    """A post-activation residual block with a depthwise conv and a float head: every kind of region node."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = block(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU6(), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        s = self.stem(x)
        y = F.relu(self.body(self.dw(s)) + s)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("autocast", [False, True])
def test_the_region_runs_in_bfloat16_and_hands_the_head_its_dtype(autocast):
    torch.manual_seed(6)
    m = ebkernels.quantize_model(Residual(), qconfig=QC, skip=is_grouped_conv)
    lines = fusion.fused_chains(m)
    assert len(lines) == 2 and "body.0 → body.1 → body.2 → body.3 → add() → relu() (BN → act → conv" in lines[1], lines
    seen = {}
    m.dw.register_forward_hook(lambda mod, i, o: seen.update(dw=(i[0].dtype, o.dtype)))
    m.head.register_forward_pre_hook(lambda mod, i: seen.update(head=i[0].dtype))
    x = torch.randn(2, 3 if False else 16, 6, 6)
    with ebkernels.force_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(x)
    assert seen["dw"] == (torch.bfloat16, torch.bfloat16)  # the depthwise conv computes in bfloat16
    assert seen["head"] == (torch.bfloat16 if autocast else torch.float32)  # what the head expects
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in m.parameters())


def test_per_layer_int8_layers_keep_only_codes_and_hand_bfloat16_on_under_autocast():
    """A model with nothing fusable (GroupNorm after every conv) keeps at most what bf16 autocast keeps."""
    def net():
        torch.manual_seed(7)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def saved(model, x, autocast):
        params = {p.data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        return sum(b for b, _ in seen.values()), {d for _, d in seen.values()}, out

    x = torch.randn(8, 3, 16, 16)
    bf16, _, _ = saved(net(), x, True)
    q = ebkernels.quantize_model(net(), qconfig=QC)
    assert fusion.fused_chains(q) == []
    with ebkernels.force_backend("reference"):
        int8, dtypes, out = saved(q, x, True)
    assert int8 <= bf16 and out.dtype == torch.bfloat16, (int8, bf16)
    conv = q[0]
    with ebkernels.force_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16 and y.grad_fn.saved_tensors[0].dtype == torch.int8


# --------------------------------------------------------------------------------------------------
# Pre-activation inputs rebuilt in backward instead of kept
# --------------------------------------------------------------------------------------------------
class Dense(nn.Module):
    """Two DenseNet layers (BN → ReLU → conv1 → BN → ReLU → conv2 on the concatenation) and a transition."""

    def __init__(self, c=8, k=4):
        super().__init__()
        def layer(cin):
            return nn.ModuleDict(dict(n1=nn.BatchNorm2d(cin), c1=nn.Conv2d(cin, 2 * k, 1, bias=False),
                                      n2=nn.BatchNorm2d(2 * k), c2=nn.Conv2d(2 * k, k, 3, padding=1, bias=False)))
        self.stem = block(c)
        self.l1, self.l2 = layer(c), layer(c + k)
        self.trans = nn.Sequential(nn.BatchNorm2d(c + 2 * k), nn.ReLU(), nn.Conv2d(c + 2 * k, c, 1, bias=False))

    def forward(self, x):
        feats = [self.stem(x)]
        for l in (self.l1, self.l2):
            h = l["c1"](F.relu(l["n1"](torch.cat(feats, 1))))
            feats.append(l["c2"](F.relu(l["n2"](h))))
        return self.trans(torch.cat(feats, 1))


def _saved_bytes(model, x):
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(seen.values()), out


@pytest.mark.parametrize("name,backend", [("preresnet20", "reference"), ("dense", "reference"),
                                          ("preresnet20", "auto")])
def test_rebuilt_preactivation_inputs_give_bit_identical_gradients_for_less_memory(name, backend, monkeypatch):
    """A pre-activation chain on a concatenation keeps its pieces (DenseNet), one on ``conv on codes + xprev``
    replays the conv (every other PreResNet block): the same gradients, bit for bit, as keeping the input; the
    replay takes its weight's codes from the step's weight batch (no weight quantized in backward)."""
    from ebkernels.fusion import runner
    from helpers import LaunchSpy

    torch.manual_seed(9)
    base = (ebkernels.build_model("preresnet20", width=0.25, num_classes=10, in_channels=3) if name == "preresnet20"
            else Dense()).train()
    size = 8 if backend == "reference" else 4  # "auto": the kernels (the interpreter on CPU)
    x = torch.randn(4, 3 if name == "preresnet20" else 8, size, size).contiguous(memory_format=torch.channels_last)
    results = []
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(runner, "_bn_sources", lambda *a: {})
        m = ebkernels.quantize_model(copy.deepcopy(base), qconfig=QC)
        ebkernels.manual_seed(5)  # the same stochastic E tickets in both runs
        with ebkernels.force_backend(backend):
            nbytes, out = _saved_bytes(m, x)
            with LaunchSpy("weight_absmax_many_kernel", "weight_codes_many_kernel", "weight_codes_kernel") as spy:
                out.float().square().sum().backward()
        assert not spy.calls, spy.count
        results.append((nbytes, out.detach(), [p.grad for p in m.parameters()],
                        [b.clone() for b in m.buffers()]))
    (b1, o1, g1, s1), (b0, o0, g0, s0) = results
    assert b1 < b0, (b1, b0)  # (tiny models: the codes, scales and per-channel parameters weigh much)
    assert torch.equal(o1, o0) and all(torch.equal(a, b) for a, b in zip(s1, s0))
    assert all(torch.equal(a, b) for a, b in zip(g1, g0))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_the_shortcut_gradient_is_summed_in_the_input_grad_kernel(backend, monkeypatch):
    """A pre-activation block's x feeds its BN chain and, as the residual, its conv3, whose epilogue adds it: the
    shortcut's gradient goes to the BN chain's input-grad kernel (``GradLink``) instead of autograd's separate
    sum. With a float32 x that sum is the same float32 addition either way: the same gradients bit for bit,
    and no ``aten.add`` on x's gradient."""
    from ebkernels.fusion import links, runner
    from ebkernels.models.preresnet import Bottleneck
    from helpers import AtenSpy

    torch.manual_seed(3)
    base = Bottleneck(32, 8, [32, 8, 16], stride=1).train()
    x = (torch.randn(3, 32, 5, 6) * 2).contiguous(memory_format=torch.channels_last)
    results = []
    for linked in (True, False):
        if not linked:
            monkeypatch.setattr(runner, "grad_links", lambda graph, chains: links.Links())
        m = ebkernels.quantize_model(copy.deepcopy(base), qconfig=QC)
        xk = x.clone().requires_grad_(True)
        ebkernels.manual_seed(5)
        with ebkernels.force_backend(backend):
            out = m(xk)
            with AtenSpy("add", keep=lambda args, o: o.numel() == x.numel()) as adds:
                out.float().square().sum().backward()
        results.append((len(adds.calls), out.detach(), xk.grad, [p.grad for p in m.parameters()]))
    (a1, o1, x1, g1), (a0, o0, x0, g0) = results
    assert (a1, a0) == (0, 1)
    assert torch.equal(o1, o0) and torch.equal(x1, x0)
    assert all(torch.equal(a, b) for a, b in zip(g1, g0))


def test_a_preresnet_links_every_block_without_a_downsample():
    """One ``GradLink`` per block whose x feeds only its BN chain and its shortcut (a block with a downsample
    conv reads x a third time: autograd sums there as before)."""
    from ebkernels.fusion import links

    model = ebkernels.build_model("preresnet20", width=0.25, num_classes=10, in_channels=3)
    m = ebkernels.quantize_model(model, qconfig=QC)
    blocks = [b for b in m.modules() if type(b).__name__ == "Bottleneck"]
    identity = sum(b.downsample is None for b in blocks)
    assert identity == 3
    traced = fusion.trace.trace(m, lambda line: None)
    chains = fusion.matcher.match(traced.graph, dict(m.named_modules()), lambda line: None)
    found = links.grad_links(traced.graph, chains)
    assert len(found.takes) == len(found.puts) == identity and not found.cats


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_dense_block_sums_each_piece_gradient_in_the_input_grad_kernels(backend, monkeypatch):
    """Concatenation j hands its gradient to the chain on concatenation j-1 (``ops.fused.dense_cat``), which adds
    its channel prefix in its input-grad kernel: no ``aten.add`` on activations in backward, where autograd sums
    each piece's gradient from each of its readers; the gradients within bfloat16 rounding of autograd's sums
    (bfloat16 values summed in another order and rounded fewer times)."""
    from ebkernels.fusion import links, runner
    from helpers import AtenSpy

    torch.manual_seed(4)
    base = Dense().train()
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    results = []
    for linked in (True, False):
        if not linked:
            monkeypatch.setattr(runner, "grad_links", lambda graph, chains: links.Links())
        m = ebkernels.quantize_model(copy.deepcopy(base), qconfig=QConfig(rounding_g="nearest", rounding_e="nearest"))
        if linked:
            traced = fusion.trace.trace(m, lambda line: None)
            found = links.grad_links(traced.graph, fusion.matcher.match(traced.graph, dict(m.named_modules()),
                                                                         lambda line: None))
            assert len(found.cats) == 2  # cat(stem, l1) -> l1's chain, cat(stem, l1, l2) -> l2's chain
        with ebkernels.force_backend(backend), AtenSpy("add", keep=lambda args, o: o.dim() == 4) as adds:
            out = m(x)
            out.float().square().sum().backward()
        results.append((len(adds.calls), out.detach(), grads(m)))
    (a1, o1, g1), (a0, o0, g0) = results
    assert a1 == 0 and a0 >= 3, (a1, a0)
    assert torch.equal(o1, o0)
    assert rel(g1, g0) < 0.02, rel(g1, g0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_int8_linears_take_their_weight_codes_from_the_step_batch(backend):
    """The ``QLinear``s a fused forward calls join its weight batch (``ops.weight_step``: the codes of every weight
    from one pair of launches), a large one's codes are derived again with the other large weights' in one
    launch in backward instead of being kept: the same outputs and gradients, bit for bit, as each QLinear
    quantizing its own weight, and no int8 copy of the large weight saved for backward."""
    torch.manual_seed(6)
    base = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 80), nn.ReLU(), nn.Linear(80, 10)).train()
    x = torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    big = base[4].weight.numel()
    assert big > ebkernels.ops.weight_batch.KEEP_CODES_NUMEL
    results = []
    for batched in (True, False):
        m = ebkernels.quantize_model(copy.deepcopy(base), qconfig=QConfig(rounding_e="nearest", rounding_g="nearest"))
        plan = m.__dict__["forward"].plan()
        assert len(plan.linears) == 2
        if not batched:
            plan.linears = []
        saved = []
        with ebkernels.force_backend(backend):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                out = m(x)
            out.float().square().sum().backward()
        codes = [t for t in saved if t.dtype == torch.int8 and t.numel() == big]
        results.append((out.detach(), grads(m), len(codes)))
    (o1, g1, c1), (o0, g0, c0) = results
    assert torch.equal(o1, o0) and torch.equal(g1, g0)
    assert (c1, c0) == (0, 1)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_conv_on_codes_takes_its_error_max_from_the_next_bn_chain(backend, monkeypatch):
    """Block k's conv3 output x feeds block k+1's BN chain and shortcut only: x's whole gradient comes out of that
    BN chain's input-grad kernel, which also writes its max (``bn_relu_bwd(mode="float_absmax")``) for conv3's
    E quantization: no absmax pass of its own (one launch fewer per block), the same codes and gradients bit
    for bit (E rounded to nearest: the max is the same number)."""
    from ebkernels.fusion import links, runner
    from ebkernels.models.preresnet import Bottleneck
    from helpers import LaunchSpy

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.b1, self.b2 = Bottleneck(32, 8, [32, 8, 16], 1), Bottleneck(32, 8, [32, 8, 16], 1)

        def forward(self, x):
            return self.b2(self.b1(x))

    torch.manual_seed(8)
    base = Two().train()
    x = (torch.randn(3, 32, 5, 6) * 2).contiguous(memory_format=torch.channels_last)
    real = links.grad_links
    results = []
    for with_max in (True, False):
        if not with_max:
            def no_max(graph, chains):
                found = real(graph, chains)
                found.amax_puts, found.amax_takes = {}, {}
                return found
            monkeypatch.setattr(runner, "grad_links", no_max)
        m = ebkernels.quantize_model(copy.deepcopy(base), qconfig=QConfig(rounding_e="nearest", rounding_g="nearest"))
        xk = x.clone().requires_grad_(True)
        with ebkernels.force_backend(backend):
            out = m(xk)
            with LaunchSpy("quantize_absmax_kernel", "quantize_small_kernel") as spy:
                out.float().square().sum().backward()
        results.append((out.detach(), xk.grad, grads(m), len(spy.calls)))
    (o1, x1, g1, n1), (o0, x0, g0, n0) = results
    assert torch.equal(o1, o0) and torch.equal(x1, x0) and torch.equal(g1, g0)
    if backend == "auto":
        assert n1 == n0 - 1, (n1, n0)  # b1.conv3's E: the codes pass only


def test_conv_bias_zero_gradients_come_from_one_buffer_per_step():
    """A conv bias before a train-mode BatchNorm has exactly zero gradient: every such layer's comes as a slice of
    one zero buffer allocated in backward (``weight_step.StepZeros``), not a zeros kernel per layer; the slices do
    not overlap, a second backward through the graph hands out new zeros, and the next step a new buffer."""
    from helpers import AtenSpy

    torch.manual_seed(3)
    base = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).train()
    m = ebkernels.quantize_model(base, qconfig=QC)
    biases = [m[i].bias for i in (0, 3, 6)]
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out = m(x)
    with AtenSpy("zeros", "zeros_like") as spy:
        out.float().square().sum().backward(retain_graph=True)
    assert [op for op, _ in spy.calls] == ["aten.zeros.default"], spy.calls
    grads = [b.grad for b in biases]
    assert all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in grads)
    base_ptr = grads[0].untyped_storage().data_ptr()
    assert all(g.untyped_storage().data_ptr() == base_ptr for g in grads)
    spans = sorted((g.storage_offset(), g.storage_offset() + g.numel()) for g in grads)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    grads[0].add_(1.0)  # changed in place (as a clipping or an optimizer might)
    out.float().square().sum().backward()  # the second backward: new zeros, added to .grad
    assert torch.equal(biases[0].grad, torch.ones_like(biases[0].grad)), biases[0].grad
    for b in biases:
        b.grad = None
    m(x).float().square().sum().backward()
    assert biases[0].grad.untyped_storage().data_ptr() != base_ptr


def test_preactivation_statistics_come_from_the_previous_blocks_last_conv(monkeypatch):
    """A pre-activation block's BatchNorm statistics of the residual stream are formed by the launch that writes
    the stream (the previous block's last conv with its residual add, ``stages.conv_next_bn_forward``): no
    ``bn_stats`` pass but the stem's and the head's; the same outputs, gradients and running statistics as with
    one (up to the order of the float32 partial sums); in eval mode (the running statistics) bit for bit."""
    from ebkernels.fusion import runner
    from helpers import LaunchSpy, rel

    torch.manual_seed(4)
    base = ebkernels.build_model("preresnet11", width=0.25, num_classes=10, in_channels=3).train()
    x = torch.randn(4, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    results = {}
    linked_pairs = runner._stats_pairs
    for linked in (True, False):
        monkeypatch.setattr(runner, "_stats_pairs", linked_pairs if linked else (lambda *a: {}))
        for train in (True, False):
            m = ebkernels.quantize_model(copy.deepcopy(base).train(train), qconfig=QC)
            ebkernels.manual_seed(5)
            with LaunchSpy("bn_stats_kernel") as spy:
                out = m(x)
            out.float().square().sum().backward()
            results[linked, train] = (spy.count["bn_stats_kernel"], out.detach().float(), grads(m),
                                      torch.cat([b.float().flatten() for b in m.buffers()]))
    (n1, o1, g1, b1), (n0, o0, g0, b0) = results[True, True], results[False, True]
    # with the link: the stem's and the head's passes only; without: also blocks 2 and 3's (from block 1 and 2's conv)
    assert n1 == 2 and n0 == 4, (n1, n0)
    assert rel(o1, o0) < 0.02 and rel(g1, g0) < 0.02, (rel(o1, o0), rel(g1, g0))
    torch.testing.assert_close(b1, b0, rtol=1e-4, atol=1e-5)
    (n1, o1, g1, _), (n0, o0, g0, _) = results[True, False], results[False, False]
    assert n1 < n0 and torch.equal(o1, o0) and torch.equal(g1, g0)
