"""The int8 kernels' buffers (``ops._buffers``: ``scratch``, ``empty_channel_major``) and ``ops._launch``'s
``leading``, ``cached_plan`` and ``BoundLaunch``, the host-side pieces that save aten ops and Python per launch
(issue 20 item 5): what each returns, and that a training step gives the same bits whether its reductions'
partials come from the shared scratch or from fresh poisoned buffers."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ebkernels
from ebkernels.config import override
from ebkernels.ops._buffers import empty_channel_major, scratch
from ebkernels.ops._launch import BoundLaunch, cached_plan, leading
from helpers import bits_equal, fresh_seed, gen


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_scratch_keeps_one_view_per_shape_and_one_storage_per_role():
    a = scratch((2, 5, 3), torch.float32, "cpu", "partials")
    assert scratch((2, 5, 3), torch.float32, "cpu", "partials") is a  # no op at all the second time
    assert a.shape == (2, 5, 3) and a.is_contiguous() and a.dtype == torch.float32
    b = scratch((7,), torch.float32, "cpu", "merges")
    assert _storage(b) != _storage(a)  # two workspaces of one launch never share a storage
    c = scratch((4, 4), torch.float32, "cpu", "partials")
    assert _storage(c) == _storage(a)  # another shape, the same buffer
    big = scratch((1 << 20,), torch.float32, "cpu", "partials")  # more than the buffer holds: a larger one
    again = scratch((2, 5, 3), torch.float32, "cpu", "partials")
    assert again is not a and _storage(again) == _storage(big) and again.shape == (2, 5, 3)
    assert scratch((2, 5, 3), torch.int32, "cpu", "partials").dtype == torch.int32  # a buffer per dtype


def test_scratch_is_fresh_and_poisoned_under_poison_outputs():
    with override(poison_outputs=True):
        a = scratch((3, 4), torch.float32, "cpu", "partials")
        b = scratch((3, 4), torch.float32, "cpu", "partials")
    assert a is not b and torch.isnan(a).all() and torch.isnan(b).all()


@pytest.mark.parametrize("shape", [(2, 32, 5, 7), (1, 16, 1, 1), (3, 48, 4, 1), (0, 16, 2, 2)])
def test_empty_channel_major_is_the_permuted_buffer_in_one_op(shape):
    N, C, H, W = shape
    t = empty_channel_major(shape, torch.int8, "cpu")
    want = torch.empty((C, N, H, W), dtype=torch.int8).permute(1, 0, 2, 3)
    assert t.shape == want.shape and t.permute(1, 0, 2, 3).is_contiguous()
    assert t.numel() == 0 or t.stride() == want.stride()  # (an empty tensor's strides are no layout)
    with override(poison_outputs=True):
        assert (empty_channel_major(shape, torch.int8, "cpu") == -128).all()


def test_leading_slices_only_a_padded_buffer():
    t = torch.randn((32, 16, 3, 3), generator=gen(fresh_seed()))
    assert leading(t, 32, 16) is t
    for rows, cols in ((30, 16), (32, 9), (17, 5)):
        s = leading(t, rows, cols)
        assert s.shape == (rows, cols, 3, 3) and s.data_ptr() == t.data_ptr() and torch.equal(s, t[:rows, :cols])


def _model():
    return nn.Sequential(nn.Conv2d(3, 20, 3, padding=1, bias=False), nn.BatchNorm2d(20), nn.ReLU(),
                         nn.Conv2d(20, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


def test_a_training_step_is_the_same_with_shared_scratch_and_with_fresh_poisoned_buffers():
    """The BatchNorm reductions' partials (``ReductionSpace``) come from one shared scratch buffer, which holds a
    former launch's values: the kernels must write every partial before reading it. Three steps on the scratch
    against the same steps with every workspace fresh and poisoned (NaN): the same gradients, bit for bit."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    base = _model()
    ebkernels.quantize_model(base)
    g = gen(seed)
    batches = [(torch.randn((4, 3, 9, 7), generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    runs = []
    for poison in (False, True):
        model = copy.deepcopy(base)
        ebkernels.manual_seed(seed % 1000)  # the same stochastic rounding noise in both runs
        grads = []
        with override(poison_outputs=poison):
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
        runs.append(grads)
    for step, (a, b) in enumerate(zip(*runs)):
        for i, (u, v) in enumerate(zip(a, b)):
            assert bits_equal(u, v), f"step {step}, parameter {i} (seed {seed})"


def test_cached_plan_keys_lists_as_tuples_and_computes_once():
    made = []

    @cached_plan
    def plan(shape, stride, flag, *, extra=0):
        made.append((shape, stride, flag, extra))
        return object()

    p = plan((2, 3), (1, 1), True)
    assert plan([2, 3], [1, 1], True) is p and plan((2, 3), [1, 1], True) is p  # lists: the tuples' plan
    assert plan((2, 3), (1, 1), False) is not p and len(made) == 2
    assert plan((2, 3), [1, 1], True, extra=[4]) is plan((2, 3), (1, 1), True, extra=(4,)) and len(made) == 3
    assert isinstance(made[0][1], tuple) and isinstance(made[2][1], list)  # a miss gets the arguments as passed


def test_bound_launch_passes_run_time_arguments_to_run_looked_up_at_call_time():
    class Kernel:
        def run(self, *args, grid, warmup, **consts):
            calls.append(("first", args, grid, warmup, consts))

    calls = []
    k = Kernel()
    launch = BoundLaunch(k, [4, 2], BM=64, num_warps=8)
    launch(1, "t", 2.5)
    assert calls == [("first", (1, "t", 2.5), (4, 2), False, {"BM": 64, "num_warps": 8})]
    Kernel.run = lambda self, *args, grid, warmup, **consts: calls.append(("patched", args))  # as the recorder does
    launch(3)
    assert calls[-1] == ("patched", (3,))
