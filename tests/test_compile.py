"""torch.compile(fullgraph=True) of quantized models (issue 24 part 1) and the eager direct path of the custom ops
(issue 20 item 5): zero graph breaks, compiled forward and backward equal to eager, the device random state
advanced identically; the direct path and the registered op give the same results.

Small models keep the file fast on CPU: a conv-BN-ReLU chain with an int8 head (fused: inductor, the default
backend; per-layer: aot_eager; cold and warm) and a pre-activation residual network (fused, aot_eager, cold). The full models (VGG,
PreResNet, torchvision ResNet, fused and per-layer, inductor) run in ``benchmarks/compile_matrix.py``."""
import contextlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import ebkernels
from ebkernels import _rng, force_backend
from ebkernels.fusion import fused_chains
from ebkernels.models import build_model
from ebkernels.ops import _dispatch
from ebkernels.ops.quantize import _quantize_op
from helpers import fresh_seed, gen


def _chain():
    """conv-BN-ReLU, conv-BN-ReLU-max-pool, int8 linear head: two fused chains handing each other codes."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


class _SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s), inplace=True)))


def _se_net():
    """conv-BN-SiLU, squeeze-and-excitation (its 1×1 convs on 1×1 maps run as int8 Linears: ``ops.gemm.pointwise``),
    conv-BN, int8 linear head."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(), _SqueezeExcite(8),
                         nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def _preresnet():
    return build_model("preresnet11", num_classes=10, in_channels=1, width=0.125)


def _model(build, fuse: bool, seed: int):
    torch.manual_seed(seed)
    return ebkernels.quantize_model(build(), fuse=fuse)


def _step(f, model, x):
    out = f(x)
    out.float().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return out.detach(), grads


def _same(a, b, what):
    (oa, ga), (ob, gb) = a, b
    assert torch.equal(oa, ob), f"{what}: outputs differ"
    assert len(ga) == len(gb) and all(torch.equal(u, v) for u, v in zip(ga, gb)), f"{what}: gradients differ"


def _compiled_cold(a, b, x, s, counted):
    """a compiled before it ever ran, two steps; b eager: the same outputs, gradients, buffers, random state."""
    ca = torch.compile(a, fullgraph=True, backend=counted)
    ebkernels.manual_seed(s % 1000)
    got = [_step(ca, a, x), _step(ca, a, x)]
    rng_c = _rng.get_state()
    ebkernels.manual_seed(s % 1000)
    want = [_step(b, b, x), _step(b, b, x)]
    assert rng_c == _rng.get_state(), "the compiled steps advanced the random state differently"
    for i in range(2):
        _same(got[i], want[i], f"seed={s} cold step {i}")
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def _compiled_warm(a, b, x, s, counted):
    """b (after its eager steps) compiled; a, in the same state, eager."""
    cb = torch.compile(b, fullgraph=True, backend=counted)
    ebkernels.manual_seed(s % 1000 + 1)
    got = _step(cb, b, x)
    ebkernels.manual_seed(s % 1000 + 1)
    _same(got, _step(a, a, x), f"seed={s} warm")


# The conv chain: fused on inductor (the default backend) and per-layer on aot_eager (inductor re-derives
# nn.BatchNorm2d's float math, so only the same ops give the same bits: benchmarks/compile_matrix.py runs it with
# inductor: close, not bit-identical), cold and warm, the int8 kernels under the Triton interpreter. The pre-activation
# residual network: fused, cold, on aot_eager and the PyTorch reference path (the interpreter costs ~6 s a step).
@pytest.mark.parametrize("build,fuse,backend,warm", [(_chain, True, "inductor", True),
                                                     (_chain, False, "aot_eager", True),
                                                     (_preresnet, True, "aot_eager", False),
                                                     (_se_net, True, "aot_eager", True)],
                         ids=["chain-fused-inductor", "chain-per-layer-aot_eager", "preresnet-fused-aot_eager",
                              "squeeze-excite-fused-aot_eager"])
def test_compiled_quantized_model_matches_eager(build, fuse, backend, warm):
    s = fresh_seed()
    x = torch.randn((2, 1, 8, 8), generator=gen(s))
    a, b = _model(build, fuse, s), _model(build, fuse, s)
    if fuse:
        assert fused_chains(a), "nothing fused: the test would not compile the fused blocks"
    torch._dynamo.reset()
    counters.clear()
    counted = CompileCounterWithBackend(backend)
    with contextlib.nullcontext() if warm else force_backend("reference"):
        _compiled_cold(a, b, x, s, counted)
        if warm:
            _compiled_warm(a, b, x, s, counted)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one graph for each model at most (the per-layer models share their forward's code: one), no recompilation
    assert 1 <= counted.frame_count <= 2, counted.frame_count


def test_int8_work_between_a_compiled_forward_and_its_backward_is_refused_not_silently_wrong():
    """The compiled forward saves the device random state for its backward. Another int8 forward + backward in
    between advances the state; the compiled backward must not then draw from (and write back) the state as it
    was, reusing the other backward's noise: autograd refuses it (README, torch.compile: limitation)."""
    s = fresh_seed()
    x = torch.randn((2, 1, 8, 8), generator=gen(s))
    torch._dynamo.reset()
    with force_backend("reference"):
        a, b = _model(_chain, False, s), _model(_chain, False, s + 1)
        out = torch.compile(a, fullgraph=True, backend="aot_eager")(x)
        b(x).sum().backward()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.float().sum().backward()


def test_direct_path_and_registered_op_agree_and_compile_uses_the_op(monkeypatch):
    """The eager direct path (``ops._dispatch``) gives the registered op's results and bumps the version of a
    mutated argument as the op does; under a dispatch mode or torch.compile the registered op runs."""
    s = fresh_seed()
    x = torch.randn((2, 3, 4, 5), generator=gen(s))
    st = _rng.device_state("cpu")
    none = x.new_empty((0,))
    args = (x, 8, True, "shift", -1, False, 0, False, st, none)
    ebkernels.manual_seed(s % 1000)
    v0 = st._version
    direct = _quantize_op(*args)
    assert st._version > v0
    ebkernels.manual_seed(s % 1000)
    registered = torch.ops.ebkernels.quantize(*args)
    assert all(torch.equal(u, v) for u, v in zip(direct, registered))
    calls = []
    real = _quantize_op._direct_fn
    monkeypatch.setattr(_quantize_op, "_direct_fn", lambda *a, **k: calls.append(1) or real(*a, **k))
    _quantize_op(*args)
    assert calls == [1]
    assert not _dispatch.direct_path_allowed((x.requires_grad_(),), {})  # autograd would record the op
    x.requires_grad_(False)
    compiled = torch.compile(lambda t: _quantize_op(t, 8, False, "shift", 0, False, 0, False, st, none)[0],
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), _quantize_op(x, 8, False, "shift", 0, False, 0, False, st, none)[0])
    assert len(calls) == 2  # the eager call above only: the compiled graph called the registered op


def test_direct_path_refuses_functorch_wrappers_and_subclasses():
    """The direct path's checks: a functorch transform's wrapped tensor (vmap, grad) and a tensor subclass take the
    registered op, with grad mode on or off; plain tensors under no-grad and no transform take the direct path
    (its cheapest case: type tests only)."""
    x = torch.randn((3, 4), generator=gen(fresh_seed()))
    seen = []

    def probe(t):
        seen.append(_dispatch.direct_path_allowed((t, 8, None), {}))
        return t * 2

    torch.func.vmap(probe)(x)
    with torch.no_grad():
        torch.func.vmap(probe)(x)
    torch.func.grad(lambda t: probe(t).sum())(x)
    assert seen == [False, False, False]

    class Sub(torch.Tensor):
        pass

    with torch.no_grad():
        assert _dispatch.direct_path_allowed((x, 8, [x, x]), {"scale": x})
        assert not _dispatch.direct_path_allowed((x, [x, x.as_subclass(Sub)]), {})
        assert not _dispatch.direct_path_allowed((x,), {"scale": x.as_subclass(Sub)})
