"""Drop-in modules (issue 3, part 3): QConv2d / QLinear, quantize_model / dequantize_model.

Most tests pin the PyTorch reference path (``force_backend("reference")``): the module layer is what is
tested here, and the reference computes the same numbers as the kernels (the op tests check that). The
Triton path (the interpreter on CPU, the kernels on CUDA) is exercised by a short training run that must
match the reference-path run.
"""
from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ebkernels
from ebkernels import QConfig
from ebkernels._backend import force_backend
from ebkernels.convert import dequantize_model, quantize_model
from ebkernels.modules import QConv2d, QLinear, first_and_last_layers
from ebkernels.ops.gemm.conv import qconv2d
from ebkernels.ops.gemm.linear import qlinear
from helpers import fresh_seed


@pytest.fixture
def reference():
    with force_backend("reference"):
        yield


def fake_quant(t: torch.Tensor) -> torch.Tensor:
    """The values the int8 codes of ``t`` stand for (default QConfig: 8 bit, Shift scale, nearest)."""
    codes, scale = ebkernels.quantize(t.detach())
    return ebkernels.dequantize(codes, scale)


# --------------------------------------------------------------------------------------------------
# Construction, isinstance, state_dict, repr
# --------------------------------------------------------------------------------------------------
CONV_KWARGS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=2, padding=(1, 0), bias=False),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, dilation=2, padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
]


@pytest.mark.parametrize("kwargs", CONV_KWARGS)
def test_qconv2d_is_a_conv2d_with_the_same_state_dict(kwargs):
    torch.manual_seed(0)
    float_layer = nn.Conv2d(**kwargs)
    q = QConv2d(**kwargs)
    assert isinstance(q, nn.Conv2d)
    assert q.qconfig == QConfig()
    assert list(q.state_dict()) == list(float_layer.state_dict())
    for k, v in float_layer.state_dict().items():
        assert q.state_dict()[k].shape == v.shape
    # checkpoints move both ways, strictly
    q.load_state_dict(float_layer.state_dict(), strict=True)
    assert torch.equal(q.weight, float_layer.weight)
    back = nn.Conv2d(**kwargs)
    back.load_state_dict(q.state_dict(), strict=True)
    assert torch.equal(back.weight, q.weight)
    assert "qconfig=QConfig(bits_w=8" in repr(q)
    assert repr(float_layer)[len("Conv2d"):-1] in repr(q)  # the float layer's arguments, unchanged


def test_qlinear_is_a_linear_with_the_same_state_dict():
    cfg = QConfig(bits_g=None)
    q = QLinear(7, 3, bias=False, qconfig=cfg)
    f = nn.Linear(7, 3, bias=False)
    assert isinstance(q, nn.Linear)
    assert q.qconfig is cfg
    assert list(q.state_dict()) == list(f.state_dict()) == ["weight"]
    q.load_state_dict(f.state_dict(), strict=True)
    f.load_state_dict(q.state_dict(), strict=True)
    assert "in_features=7, out_features=3, bias=False, qconfig=QConfig(bits_w=8" in repr(q)
    assert "bits_g=None" in repr(q)


def test_bad_qconfig_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"qconfig must be an ebkernels.QConfig.*dict"):
        QConv2d(2, 2, 3, qconfig={"bits_w": 8})
    with pytest.raises(TypeError, match="qconfig"):
        QLinear(2, 2, qconfig=8)
    with pytest.raises(TypeError, match="qconfig"):
        quantize_model(nn.Linear(2, 2), qconfig="int8")
    with pytest.raises(TypeError, match="layer must be an nn.Conv2d, got Linear"):
        QConv2d.from_float(nn.Linear(2, 2))
    normed = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="parametrizations"):
        QLinear.from_float(normed)
    model = nn.Sequential(normed, nn.Linear(3, 3))
    quantize_model(model)  # a parametrized layer is a subclass, hence not eligible: left as it is
    assert model[0] is normed and type(model[1]) is QLinear


def test_qconfig_survives_pickle_deepcopy_and_device_dtype_moves(reference):
    cfg = QConfig(bits_e=6, rounding_e="stochastic")
    q = QConv2d(3, 4, 3, qconfig=cfg)
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert clone.qconfig == cfg and torch.equal(clone.weight, q.weight)
    q64 = q.to(torch.float64)
    assert q64 is q and q.weight.dtype == torch.float64 and q.qconfig == cfg
    q.to("cpu", torch.float32).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = q(x)
    assert y.shape == (2, 4, 4, 4) and y.dtype == torch.float32
    lin = QLinear(5, 2).double()
    assert lin.weight.dtype == torch.float64
    assert lin(torch.randn(3, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.gpu
def test_cuda_move_keeps_qconfig_and_runs():
    cfg = QConfig(bits_g=None)
    q = QConv2d(3, 4, 3, qconfig=cfg).cuda()
    assert q.weight.is_cuda and q.qconfig == cfg
    y = q(torch.randn(2, 3, 8, 8, device="cuda"))
    y.sum().backward()
    assert q.weight.grad.is_cuda
    back = q.cpu()
    assert not back.weight.is_cuda


# --------------------------------------------------------------------------------------------------
# Forward/backward equal to calling the op directly
# --------------------------------------------------------------------------------------------------
def _grads(out, tensors, gy):
    return torch.autograd.grad(out, tensors, gy)


@pytest.mark.parametrize("case", [
    dict(kwargs=dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), hw=(7, 6)),
    dict(kwargs=dict(in_channels=4, out_channels=3, kernel_size=3, stride=2, dilation=2, bias=False), hw=(9, 9)),
    dict(kwargs=dict(in_channels=3, out_channels=2, kernel_size=1), hw=(5, 5)),
    dict(kwargs=dict(in_channels=3, out_channels=4, kernel_size=(3, 2), padding=(2, 1)), hw=(5, 6)),
])
def test_qconv2d_forward_and_grads_equal_the_op(reference, case):
    seed = fresh_seed()
    torch.manual_seed(seed)
    q = QConv2d(**case["kwargs"], qconfig=QConfig())
    x = torch.randn(3, q.in_channels, *case["hw"], requires_grad=True)
    params = [q.weight] + ([q.bias] if q.bias is not None else [])
    torch.manual_seed(seed + 1)  # same stochastic-rounding seed for both backward passes
    y_mod = q(x)
    gy = torch.randn_like(y_mod)
    ebkernels.manual_seed(seed + 2)  # the stochastic G rounding draws from the device random state
    g_mod = _grads(y_mod, [x] + params, gy)
    torch.manual_seed(seed + 1)
    y_op = qconv2d(x, q.weight, q.bias, stride=q.stride, padding=q.padding, dilation=q.dilation,
                   groups=q.groups, qconfig=q.qconfig)
    ebkernels.manual_seed(seed + 2)
    g_op = _grads(y_op, [x] + params, gy)
    assert torch.equal(y_mod, y_op), f"seed {seed}"
    for a, b in zip(g_mod, g_op):
        assert torch.equal(a, b), f"seed {seed}"
    # and it is the float convolution of the dequantized operands (same geometry as nn.Conv2d)
    y_float = F.conv2d(fake_quant(x), fake_quant(q.weight), q.bias, q.stride, q.padding, q.dilation)
    torch.testing.assert_close(y_mod, y_float, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_qconv2d_padding_modes_pad_first_then_convolve(reference, padding_mode):
    seed = fresh_seed()
    torch.manual_seed(seed)
    q = QConv2d(3, 4, 3, padding=(1, 2), padding_mode=padding_mode)
    x = torch.randn(2, 3, 6, 7)
    xp = F.pad(x, (2, 2, 1, 1), mode=padding_mode)
    expected = qconv2d(xp, q.weight, q.bias, stride=1, padding=0, qconfig=q.qconfig)
    y = q(x)
    assert torch.equal(y, expected), f"seed {seed}"
    assert y.shape == nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=padding_mode)(x).shape


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), (2, 3), ((4, 3), (1, 2))])
def test_qconv2d_string_padding_matches_nn_conv2d(reference, kernel, dilation):
    """padding="same" (asymmetric for even effective kernels) and "valid" as nn.Conv2d does them."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    for padding in ("same", "valid"):
        q = QConv2d(2, 3, kernel, padding=padding, dilation=dilation)
        x = torch.randn(2, 2, 9, 8)
        y = q(x)
        expected = F.conv2d(fake_quant(x), fake_quant(q.weight), q.bias, padding=padding, dilation=dilation)
        assert y.shape == expected.shape, f"padding={padding}"
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"seed {seed} padding={padding}: {m}")


def test_qlinear_forward_and_grads_equal_the_op(reference):
    seed = fresh_seed()
    torch.manual_seed(seed)
    q = QLinear(6, 4)
    x = torch.randn(2, 5, 6, requires_grad=True)
    torch.manual_seed(seed + 1)
    y_mod = q(x)
    gy = torch.randn_like(y_mod)
    ebkernels.manual_seed(seed + 2)  # the stochastic G rounding draws from the device random state
    g_mod = _grads(y_mod, [x, q.weight, q.bias], gy)
    y_op = qlinear(x, q.weight, q.bias, qconfig=q.qconfig)
    ebkernels.manual_seed(seed + 2)
    g_op = _grads(y_op, [x, q.weight, q.bias], gy)
    assert y_mod.shape == (2, 5, 4)
    assert torch.equal(y_mod, y_op), f"seed {seed}"
    for a, b in zip(g_mod, g_op):
        assert torch.equal(a, b), f"seed {seed}"


# --------------------------------------------------------------------------------------------------
# quantize_model / dequantize_model
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class MyConv(nn.Conv2d):
    """A user subclass: may override forward, so quantize_model must leave it alone."""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.shared = nn.Conv2d(8, 8, 1)
        self.custom = MyConv(8, 8, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        x = self.custom(self.shared(self.shared(x)))  # one layer used twice
        return self.head(F.adaptive_avg_pool2d(x, 4))


def _layer_types(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_quantize_model_swaps_eligible_layers_keeping_the_parameters(reference):
    torch.manual_seed(fresh_seed())
    model = Net()
    model.shortcut = model.shared  # the same layer registered under a second name
    params_before = dict(model.named_parameters(remove_duplicate=False))
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook_calls = []
    model.stem.register_forward_hook(lambda m, i, o: hook_calls.append(type(m).__name__))
    model.eval()

    cfg = QConfig(bits_g=None)
    out = quantize_model(model, cfg)
    assert out is model
    types = _layer_types(model)
    assert types == {"stem": QConv2d, "blocks.0.conv": QConv2d, "blocks.1.conv": QConv2d, "shared": QConv2d,
                     "custom": MyConv, "head.1": QLinear, "head.3": QLinear}
    assert model.shortcut is model.shared  # sharing survives the swap
    assert all(m.qconfig is cfg for m in model.modules() if isinstance(m, (QConv2d, QLinear)))
    assert not model.training and not model.stem.training  # train/eval flag kept
    # the very same Parameter objects: the optimizer built before the swap still drives the model
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p is params_before[name], name
    assert list(model.state_dict()) == list(state_before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_before.items())
    model(torch.randn(2, 3, 8, 8))
    assert hook_calls == ["QConv2d"]  # hooks moved along
    model.train()
    loss = model(torch.randn(4, 3, 8, 8)).square().mean()
    loss.backward()
    w0 = model.stem.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.stem.weight, w0)
    assert opt.state[model.stem.weight]["momentum_buffer"].shape == w0.shape

    # ... and back: exact float types, same Parameters, same state
    back = dequantize_model(model)
    assert back is model
    assert _layer_types(model) == {n: (MyConv if n == "custom" else nn.Conv2d if "head" not in n
                                       else nn.Linear) for n in types}
    assert all(type(m) in (nn.Conv2d, nn.Linear, MyConv) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert model.shortcut is model.shared
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p is params_before[name], name


def test_round_trip_restores_the_float_model_outputs(reference):
    torch.manual_seed(fresh_seed())
    model = Net().eval()
    x = torch.randn(3, 3, 8, 8)
    y_float = model(x)
    y_int8 = quantize_model(model)(x)
    assert not torch.equal(y_int8, y_float)  # it really runs quantized ...
    # ... and approximates the float net (loosely: Shift scales may clip up to a factor sqrt(2))
    assert (y_int8 - y_float).norm() / y_float.norm() < 0.5
    assert torch.equal(dequantize_model(model)(x), y_float)


def test_quantize_model_not_inplace_copies(reference):
    model = Net()
    new = quantize_model(model, inplace=False)
    assert new is not model
    assert type(model.stem) is nn.Conv2d and type(new.stem) is QConv2d
    assert new.stem.weight is not model.stem.weight and torch.equal(new.stem.weight, model.stem.weight)
    float_copy = dequantize_model(new, inplace=False)
    assert type(new.stem) is QConv2d and type(float_copy.stem) is nn.Conv2d


def test_quantize_model_on_a_bare_layer_and_on_quantized_layers():
    layer = nn.Conv2d(2, 3, 3)
    q = quantize_model(layer)
    assert type(q) is QConv2d and q.weight is layer.weight
    already = QLinear(3, 3, qconfig=QConfig(bits_e=4))
    model = nn.Sequential(already, nn.Linear(3, 3))
    quantize_model(model, QConfig())
    assert model[0] is already and already.qconfig.bits_e == 4  # left as it was
    assert type(model[1]) is QLinear and model[1].qconfig == QConfig()
    assert type(dequantize_model(q)) is nn.Conv2d


def test_skip_by_name_glob_container_and_predicate():
    def swapped(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear)))

    assert first_and_last_layers(Net()) == ("stem", "head.3")
    m = quantize_model(Net(), skip=first_and_last_layers(Net()))
    assert swapped(m) == ["blocks.0.conv", "blocks.1.conv", "head.1", "shared"]
    m = quantize_model(Net(), skip="blocks.*.conv")
    assert swapped(m) == ["head.1", "head.3", "shared", "stem"]
    m = quantize_model(Net(), skip=["head", "stem"])  # a container skips its whole subtree
    assert swapped(m) == ["blocks.0.conv", "blocks.1.conv", "shared"]
    m = quantize_model(Net(), skip=lambda name, mod: isinstance(mod, nn.Conv2d) and mod.in_channels == 3)
    assert swapped(m) == ["blocks.0.conv", "blocks.1.conv", "head.1", "head.3", "shared"]
    m = quantize_model(Net(), skip=("head.*", lambda name, mod: name == "shared"))
    assert swapped(m) == ["blocks.0.conv", "blocks.1.conv", "stem"]
    with pytest.warns(UserWarning, match=r"skip pattern 'steem' matches no module"):
        quantize_model(Net(), skip="steem")
    with pytest.raises(TypeError, match=r"skip entry 3 \(int\) is not supported"):
        quantize_model(Net(), skip=["stem", 3])
    with pytest.raises(TypeError, match="skip must be"):
        quantize_model(Net(), skip=3.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_model("model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(Net(), skip=None)


# --------------------------------------------------------------------------------------------------
# Saved-activation footprint
# --------------------------------------------------------------------------------------------------
def _saved_bytes(fn, exclude):
    """Bytes of the storages autograd saves for backward (parameters, saved by reference, excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_activation_footprint(reference):
    torch.manual_seed(fresh_seed())
    n, c, hw = 16, 16, 16
    layers = {"int8": QConv2d(c, c, 3, padding=1), "fp32": nn.Conv2d(c, c, 3, padding=1),
              "bf16": nn.Conv2d(c, c, 3, padding=1).to(torch.bfloat16)}
    saved = {}
    for name, layer in layers.items():
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        x = torch.randn(n, c, hw, hw, dtype=dtype, requires_grad=True)
        saved[name] = _saved_bytes(lambda: layer(x), list(layer.parameters()))
    w_codes = layers["int8"].weight.numel()  # QConv2d keeps its int8 weight codes for dgrad (1 B each)
    scales = 64  # two 0-dim float32 scales, with room for alignment
    x_elems = n * c * hw * hw
    assert saved["fp32"] == 4 * x_elems and saved["bf16"] == 2 * x_elems
    assert saved["int8"] >= x_elems  # it does keep the int8 activation codes
    assert saved["int8"] <= 0.25 * saved["fp32"] + w_codes + scales, saved
    assert saved["int8"] <= 0.5 * saved["bf16"] + w_codes + scales, saved
    print(f"\nsaved bytes per forward: {saved}; int8/fp32 = {saved['int8'] / saved['fp32']:.4f}, "
          f"int8/bf16 = {saved['int8'] / saved['bf16']:.4f} (weight codes {w_codes} B included)")

    lin = QLinear(256, 64)
    x = torch.randn(128, 256, requires_grad=True)
    lin_saved = _saved_bytes(lambda: lin(x), list(lin.parameters()))
    assert lin_saved <= 0.25 * x.numel() * 4 + lin.weight.numel() + scales


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv-BN-ReLU ×3 (8, 16, 16 channels), global pool, linear classifier."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def make_task(seed, classes=4, hw=10, noise=2.5):
    """A sampler of (images, labels): each class is a fixed random 3×3 texture (zero mean, so the mean
    colour tells nothing) tiled over the image at a random shift, under heavy Gaussian noise. Fresh
    samples every step: the loss measures learning, not memorisation."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, 3, 3, generator=g)
    patterns -= patterns.mean((1, 2, 3), keepdim=True)

    def sample(n, gen):
        y = torch.randint(0, classes, (n,), generator=gen)
        tiles = patterns[y].repeat(1, 1, hw // 3 + 2, hw // 3 + 2)
        dy, dx = torch.randint(0, 3, (2, n), generator=gen)
        x = torch.stack([tiles[i, :, dy[i]:dy[i] + hw, dx[i]:dx[i] + hw] for i in range(n)])
        return x + noise * torch.randn(x.shape, generator=gen), y

    return sample


def train(model, sample, steps, seed, batch=32, lr=0.05):
    """SGD with momentum, lr ÷10 for the last third (a quiet end point to compare)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2 * steps // 3], 0.1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # stochastic-rounding seeds are drawn from the global generator
    for _ in range(steps):
        x, y = sample(batch, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def held_out(model, sample, seed, n=1024):
    x, y = sample(n, torch.Generator().manual_seed(seed + 1))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


# Convergence margin: after 300 steps the int8 network's held-out loss is at most 0.08 nats above the
# fp32 network's (observed on CPU over 29 seeds: int8 - fp32 between -0.03 and +0.031; fp32 losses
# 0.06-0.29; one later seed, 1061524770, gave fp32 0.470 and int8 +0.025 above it: some random tasks are
# harder), and both have learnt the task (loss below half of chance, ln 4 = 1.386: about 80 % accuracy).
CONVERGENCE_MARGIN = 0.08


def test_small_cnn_trains_in_int8_close_to_fp32(reference):
    seed = fresh_seed()
    sample = make_task(seed)
    torch.manual_seed(seed)
    fp32 = SmallCNN()
    int8 = quantize_model(copy.deepcopy(fp32))  # same initial weights
    assert sum(isinstance(m, QConv2d) for m in int8.modules()) == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    try:
        train(fp32, sample, 300, seed)
        train(int8, sample, 300, seed)
    finally:
        torch.set_num_threads(threads)
    loss_fp32, acc_fp32 = held_out(fp32, sample, seed)
    loss_int8, acc_int8 = held_out(int8, sample, seed)
    print(f"\nseed {seed}: held-out loss fp32 {loss_fp32:.4f} (acc {acc_fp32:.3f}), "
          f"int8 {loss_int8:.4f} (acc {acc_int8:.3f}); int8 - fp32 = {loss_int8 - loss_fp32:+.4f}")
    chance = math.log(4)
    assert loss_fp32 < 0.5 * chance, f"seed {seed}: fp32 did not learn the task ({loss_fp32:.3f})"
    assert loss_int8 < 0.5 * chance, f"seed {seed}: int8 did not learn the task ({loss_int8:.3f})"
    assert loss_int8 - loss_fp32 < CONVERGENCE_MARGIN, (
        f"seed {seed}: int8 held-out loss {loss_int8:.4f} vs fp32 {loss_fp32:.4f}")


def test_triton_path_training_matches_the_reference_path(device):
    """A few SGD steps of a tiny conv net on the Triton path (the interpreter on CPU) and on the
    reference path give the same parameters, with the default QConfig: E and G rounded stochastically,
    both paths drawing the same Philox numbers from the same device-side tickets (``ebkernels._rng``)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    cfg = QConfig()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    x = torch.randn(2, 3, 5, 5, device=device)
    y = torch.randint(0, 3, (2,), device=device)
    nets = {}
    state = ebkernels._rng.get_state()
    for backend in ("auto", "reference"):
        model = quantize_model(copy.deepcopy(net).to(device), cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ebkernels.manual_seed(seed % 1000)
        with force_backend(backend):
            for _ in range(3):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        nets[backend] = model
    ebkernels._rng.set_state(state)
    for (name, p_triton), p_ref in zip(nets["auto"].named_parameters(), nets["reference"].parameters()):
        assert torch.equal(p_triton, p_ref), (
            f"seed {seed}: {name} differs by up to {(p_triton - p_ref).abs().max().item():.3g}")


def test_public_names():
    for module, names in (("ebkernels.modules", ("QConv2d", "QLinear")),
                          ("ebkernels.convert", ("quantize_model", "dequantize_model"))):
        for name in names:
            assert getattr(ebkernels, name) is getattr(__import__(module, fromlist=[name]), name)


# --------------------------------------------------------------------------------------------------
# Edge cases: empty layers and inputs, double backward
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [
    (lambda: (QLinear(0, 4), nn.Linear(0, 4)), (3, 0)),
    (lambda: (QConv2d(0, 4, 3), nn.Conv2d(0, 4, 3)), (2, 0, 5, 5)),
    (lambda: (QLinear(5, 0), nn.Linear(5, 0)), (3, 5)),
    (lambda: (QLinear(5, 4), nn.Linear(5, 4)), (0, 5)),
    (lambda: (QConv2d(3, 4, 3), nn.Conv2d(3, 4, 3)), (0, 3, 5, 5)),
], ids=["linear-0-in", "conv-0-in", "linear-0-out", "linear-0-rows", "conv-0-batch"])
def test_empty_layers_and_inputs_behave_like_the_float_layers(make, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        q, f = make()
    f.load_state_dict(q.state_dict())
    x = torch.randn(shape, requires_grad=True)
    xf = x.detach().clone().requires_grad_(True)
    y, yf = q(x), f(xf)
    assert y.shape == yf.shape and torch.equal(y, yf)
    y.sum().backward()
    yf.sum().backward()
    assert torch.equal(x.grad, xf.grad)
    for p, pf in zip(q.parameters(), f.parameters()):
        assert (p.grad is None) == (pf.grad is None) and (p.grad is None or torch.equal(p.grad, pf.grad))


@pytest.mark.parametrize("kind", ["linear", "conv", "fused"])
def test_double_backward_is_a_clear_error(kind):
    torch.manual_seed(0)
    if kind == "linear":
        m, x = QLinear(3, 2), torch.randn(4, 3)
    elif kind == "conv":
        m, x = QConv2d(3, 2, 3), torch.randn(2, 3, 5, 5)
    else:
        m = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
        x = torch.randn(2, 3, 5, 5)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward is not supported by int8 layers"):
        torch.autograd.grad(m(x).sum(), x, create_graph=True)
    g, = torch.autograd.grad(m(x).sum(), x)  # a plain backward still works
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("make, shape", [
    (lambda: (QConv2d(3, 4, 3), nn.Conv2d(3, 4, 3)), (2, 3, 5, 5)),
    (lambda: (QLinear(5, 4), nn.Linear(5, 4)), (3, 5)),
], ids=["conv", "linear"])
@pytest.mark.parametrize("weights, inputs", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_an_input_of_another_dtype_is_refused_as_the_float_layers_refuse_it(reference, make, shape, weights, inputs):
    # a bf16 QConv2d given fp32 input returned fp32 (issue 24.3); nn.Conv2d raises, and so does it now
    q, f = (m.to(weights) for m in make())
    x = torch.randn(shape, dtype=inputs)
    with pytest.raises(RuntimeError):
        f(x)
    name = type(q).__name__
    with pytest.raises(RuntimeError, match=f"{name}: input dtype {str(inputs)[6:]} and weight dtype "
                                           f"{str(weights)[6:]} should be the same.*accepted: an input of dtype"):
        q(x)
    assert q(x.to(weights)).dtype == weights  # the matching dtype runs
    if inputs == torch.float32:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtypes: no error, as for nn.Conv2d
            q(x)
            f(x)
