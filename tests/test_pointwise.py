"""A 1×1 convolution of 1×1 maps runs as a Linear (``ops.gemm.pointwise``): the conv path's numbers bit for bit,
the Linear's launches, an in-place activation after it, the conv path again on larger maps, and in a fused model
its weight codes from the step's weight batch."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ebkernels
from ebkernels import QConfig, qconv2d
from ebkernels.ops.gemm import linear as linear_mod
from ebkernels.ops.gemm.conv import QConv2dFunction
from ebkernels.ops.gemm.pointwise import is_pointwise_on_pixels
from helpers import LaunchSpy, bits_equal, fresh_seed, gen, mismatch

NEAREST = QConfig(rounding_e="nearest", rounding_g="nearest")


def _operands(cin, cout, bias, channels_last, device, seed, hw=1):
    g = gen(seed)
    x = torch.randn(3, cin, hw, hw, generator=g)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w = torch.randn(cout, cin, 1, 1, generator=g) * 0.3
    b = torch.randn(cout, generator=g) if bias else None
    gy = torch.randn(3, cout, hw, hw, generator=g)
    return [t if t is None else t.to(device) for t in (x, w, b, gy)]


def _run(fn, x, w, b, gy):
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cin,cout", [(5, 3), (40, 24)])
def test_the_conv_paths_numbers(device, poisoned, channels_last, bias, cin, cout):
    """Output, input-grad, weight-grad and bias-grad equal the generic conv path's (``QConv2dFunction``) bit for
    bit: the same codes, scales and exact integer sums (nearest E and G rounding: the noise of the two paths is
    drawn at other offsets)."""
    x, w, b, gy = _operands(cin, cout, bias, channels_last, device, fresh_seed())
    got = _run(lambda x, w, b: qconv2d(x, w, b, qconfig=NEAREST), x, w, b, gy)
    ref = _run(lambda x, w, b: QConv2dFunction.apply(x, w, b, [1, 1], [0, 0], [1, 1], 1, NEAREST, x.dtype),
               x, w, b, gy)
    for name, a, r in zip(("y", "gx", "gw", "gb"), got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert bits_equal(a, r), f"{name}: {mismatch(a, r)}"


def test_the_linear_launches(device):
    """Forward and backward on the Linear's kernels: one small-quantizer launch for A, one for E, the three GEMMs and
    W's codes (two launches outside a fused model's weight batch: both layouts in one pass); no conv kernel."""
    if device.type == "cpu" and not ebkernels._backend.use_triton(torch.empty(0)):
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    x, w, b, gy = _operands(32, 16, True, True, device, fresh_seed())
    with LaunchSpy() as spy:
        _run(lambda x, w, b: qconv2d(x, w, b), x, w, b, gy)
    count = spy.count
    assert count["linear_int8_gemm_kernel"] == 3, count
    assert count["quantize_small_kernel"] == 2, count
    assert not [k for k in count if k.startswith("conv2d_")], count
    assert sum(count.values()) <= 7, count


def test_an_in_place_activation_after_it(device):
    """SE's ``SiLU(inplace=True)`` right after the layer: allowed (the result is no view) and the same gradients
    as out of place."""
    x, w, b, gy = _operands(12, 8, True, False, device, fresh_seed())
    inplace = _run(lambda x, w, b: F.silu(qconv2d(x, w, b, qconfig=NEAREST), inplace=True), x, w, b, gy)
    plain = _run(lambda x, w, b: F.silu(qconv2d(x, w, b, qconfig=NEAREST)), x, w, b, gy)
    for a, r in zip(inplace, plain):
        assert torch.equal(a, r)


def test_larger_maps_take_the_conv_path(device):
    x, w, b, gy = _operands(12, 8, True, True, device, fresh_seed(), hw=2)
    assert not is_pointwise_on_pixels(x, w, (0, 0), 1)
    assert is_pointwise_on_pixels(x[:, :, :1, :1], w, (0, 0), 1)
    assert not is_pointwise_on_pixels(x[:, :, :1, :1], w, (1, 1), 1)
    got = _run(lambda x, w, b: qconv2d(x, w, b, qconfig=NEAREST), x, w, b, gy)
    ref = _run(lambda x, w, b: QConv2dFunction.apply(x, w, b, [1, 1], [0, 0], [1, 1], 1, NEAREST, x.dtype),
               x, w, b, gy)
    assert all(torch.equal(a, r) for a, r in zip(got, ref))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(self.pool(x)))))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_se_convs_take_their_weight_codes_from_the_step_batch(backend, monkeypatch):
    """In a fused model the squeeze-and-excitation convs join the step's weight batch (``fusion.runner``): no
    weight quantized on its own in the step, and the same outputs and gradients bit for bit as each layer
    quantizing its own weight."""
    torch.manual_seed(fresh_seed())
    base = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         _SqueezeExcite(16, 8), nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).train()
    x = torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    own = []
    quantize_alone = linear_mod.quantize_weight_transposed
    monkeypatch.setattr(linear_mod, "quantize_weight_transposed", lambda *a, **k: own.append(1) or quantize_alone(*a, **k))
    results = []
    for batched in (True, False):
        m = ebkernels.quantize_model(copy.deepcopy(base), qconfig=NEAREST)
        plan = m.__dict__["forward"].plan()
        assert sorted(type(lin).__name__ for lin in plan.linears) == ["QConv2d", "QConv2d", "QLinear"]
        if not batched:
            plan.linears = []
        own.clear()
        with ebkernels.force_backend(backend):
            out = m(x)
            out.float().square().sum().backward()
        results.append((out.detach(), torch.cat([p.grad.flatten() for p in m.parameters()]), len(own)))
    (o1, g1, n1), (o0, g0, n0) = results
    assert (n1, n0) == (0, 3)
    assert torch.equal(o1, o0) and torch.equal(g1, g0)
