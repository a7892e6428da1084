"""The int8 kernels' buffers (``ops._buffers``: ``scratch``, ``empty_channel_major``) and ``ops._launch``'s
``leading``, ``cached_plan`` and ``BoundLaunch``, the host-side pieces that save aten ops and Python per launch
(issue 20 item 5): what each returns, and that a training step gives the same bits whether its reductions'
partials come from the shared scratch or from fresh poisoned buffers."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ebkernels
from ebkernels.config import override
from ebkernels.ops._buffers import counter_slice, empty_channel_major, empty_output, kept_workspaces, scratch
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


def test_kept_workspaces_are_made_once_per_key_until_a_pool_is_replaced():
    """``kept_workspaces``: one ``make()`` per key while no pool or scratch buffer is replaced; after one is (a larger
    launch), views of the new buffer; fresh and poisoned under ``poison_outputs``."""
    made = []

    def make(n=(3, 4)):
        made.append(n)
        return scratch(n, torch.float32, "cpu", "kept-test"), counter_slice("cpu", 0, 6)

    first = kept_workspaces("cpu", ("test", 1), make)
    assert kept_workspaces("cpu", ("test", 1), make) is first and len(made) == 1
    assert kept_workspaces("cpu", ("test", 2), make) is not first and len(made) == 2  # another key
    scratch((1 << 21,), torch.float32, "cpu", "kept-test")  # the buffer replaced: the kept views are stale
    again = kept_workspaces("cpu", ("test", 1), make)
    assert len(made) == 3 and again[0] is not first[0]
    assert _storage(again[0]) == _storage(scratch((1 << 21,), torch.float32, "cpu", "kept-test"))
    with override(poison_outputs=True):
        p1 = kept_workspaces("cpu", ("test", 1), make)
        p2 = kept_workspaces("cpu", ("test", 1), make)
    assert p1[0] is not p2[0] and torch.isnan(p1[0]).all() and len(made) == 5


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
        arg_names = ["x", "t", "f", "BM"]  # the constexpr last, as the package's kernels declare them

        def run(self, *args, grid, warmup, **consts):
            calls.append(("first", args, grid, warmup, consts))

    calls = []
    k = Kernel()
    launch = BoundLaunch(k, [4, 2], BM=64, num_warps=8)
    launch(1, "t", 2.5)  # the constexpr by position after the run-time arguments, the compile option by keyword
    assert calls == [("first", (1, "t", 2.5, 64), (4, 2), False, {"num_warps": 8})]
    launch(1, "t")  # another count of run-time arguments: every constexpr by keyword
    assert calls[-1] == ("first", (1, "t"), (4, 2), False, {"BM": 64, "num_warps": 8})
    Kernel.run = lambda self, *args, grid, warmup, **consts: calls.append(("patched", args))  # as the recorder does
    launch(3, "u", 0.5)
    assert calls[-1] == ("patched", (3, "u", 0.5, 64))


def test_bound_launch_keeps_keywords_where_the_constexprs_are_not_the_tail():
    class Kernel:
        arg_names = ["x", "BM", "y"]

        def run(self, *args, grid, warmup, **consts):
            calls.append((args, consts))

    calls = []
    BoundLaunch(Kernel(), (1,), BM=32, num_warps=4)(1, 2)
    assert calls == [((1, 2), {"BM": 32, "num_warps": 4})]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="launches under the interpreter")
def test_bound_launch_by_position_computes_as_by_keyword():
    """A real kernel bound both ways (its constexprs by position, then a kernel whose signature makes them go by
    keyword) writes the same values; the launch spy names the positional constexprs."""
    from helpers import LaunchSpy
    from ebkernels._triton import constexpr_names, triton, tl

    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr, TWICE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n) * factor
        if TWICE:
            v = v * 2.0
        tl.store(y_ptr + offs, v, mask=offs < n)

    assert constexpr_names(_scale_kernel) == {"BLOCK", "TWICE"}
    x = torch.randn(37)
    y1, y2 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    launch = BoundLaunch(_scale_kernel, (3,), BLOCK=16, TWICE=True, num_warps=1)
    assert launch.tail == (16, True) and launch.options == {"num_warps": 1}
    with LaunchSpy("_scale_kernel") as spy:
        launch(x, y1, 37, 1.5)
    _scale_kernel[(3,)](x, y2, 37, 1.5, BLOCK=16, TWICE=True, num_warps=1)
    assert torch.equal(y1, x * 1.5 * 2.0) and torch.equal(y1, y2)
    assert spy.calls == [{"BLOCK": 16, "TWICE": True, "num_warps": 1, "grid": (3,), "kernel": "_scale_kernel"}]


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (4, 16, 1, 9), (3, 0, 2, 2), (0, 5, 3, 3), (2, 8, 0, 4)])
def test_empty_output_channels_last_has_torchs_strides(shape):
    """``empty_output``'s channels-last buffer (made with ``empty_strided``) has the sizes, strides and format flag
    that ``torch.empty(memory_format=torch.channels_last)`` gives, degenerate sizes included."""
    want = torch.empty(shape, dtype=torch.bfloat16, memory_format=torch.channels_last)
    for given in (shape, torch.Size(shape), list(shape), shape):  # (the tuple twice: made, then kept)
        got = empty_output(given, torch.bfloat16, torch.device("cpu"), torch.channels_last)
        assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(), (5,), (0,), (3, 4), (2, 0, 3), (2, 3, 4, 5), (1, 1, 7)])
def test_empty_output_contiguous_has_torchs_strides(shape):
    want = torch.empty(shape, dtype=torch.float32)
    for given in (shape, torch.Size(shape), list(shape), shape):
        got = empty_output(given, torch.float32, torch.device("cpu"))
        assert got.shape == want.shape and got.stride() == want.stride() and got.is_contiguous()
    with override(poison_outputs=True):
        assert torch.isnan(empty_output(shape, torch.float32, torch.device("cpu"))).all()
