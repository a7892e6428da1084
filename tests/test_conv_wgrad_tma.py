"""The TMA weight-grad (``ops._conv_wgrad_tma``, rule 8 of the tile table): its operand copies match
their PyTorch reference element for element (outputs poisoned), the weight-grad is exact against the
float64 oracle on every box shape, rectangular / dilated / padded kernels, ragged channels, one split and
several, raw and scaled, and bit-identical to the generic kernel with the G quantization fused; the table
takes it only where it fits. Under the interpreter it runs with ``config.override(wgrad_tma=True)`` (on a GPU,
sm_90 decides)."""
from typing import NamedTuple

import pytest
import torch

from ebkernels.ops.gemm import conv_wgrad_tma as _conv_wgrad_tma, tiles as _tiles
from ebkernels.ops.gemm import wgrad_tiles as _wgrad_tiles
from ebkernels.ops.gemm.conv import conv2d_int8_wgrad, conv2d_int8_wgrad_reference
from ebkernels.ops._launch import conv2d_output_size
from helpers import spy_launches

class TmaCase(NamedTuple):
    N: int
    Cin: int
    H: int
    W: int
    Cout: int
    kernel: tuple  # (KH, KW)
    padding: tuple
    dilation: tuple

    @property
    def id(self):
        return "N{}C{}H{}W{}O{}".format(*self[:5]) + "K{}x{}".format(*self.kernel)


# the box (BH, BW) follows OW: (4, 16) for OW <= 16, (2, 32) up to 32, (1, 64) above; ragged channels (20, 24,
# 40: Cin/Cout tiles with zero rows)
CASES = [
    # (4, 16), the CIFAR shape
    TmaCase(N=2, Cin=16, H=16, W=16, Cout=16, kernel=(3, 3), padding=(1, 1), dilation=(1, 1)),
    # (2, 32): 20 of 32 columns
    TmaCase(N=1, Cin=24, H=6, W=20, Cout=40, kernel=(3, 3), padding=(1, 1), dilation=(1, 1)),
    # (1, 64): 40 of 64 columns
    TmaCase(N=1, Cin=16, H=3, W=40, Cout=20, kernel=(3, 3), padding=(1, 1), dilation=(1, 1)),
    # rectangular, dilated columns, no column padding
    TmaCase(N=2, Cin=32, H=7, W=30, Cout=16, kernel=(3, 2), padding=(1, 0), dilation=(1, 2)),
    TmaCase(N=1, Cin=16, H=9, W=24, Cout=32, kernel=(5, 5), padding=(4, 4), dilation=(2, 2)),  # 5×5 dilation 2
    # one row of taps: OHs past the padded image
    TmaCase(N=1, Cin=40, H=5, W=16, Cout=24, kernel=(1, 3), padding=(0, 1), dilation=(1, 1)),
]
PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _codes(shape, gen):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


def _case(case, gen, device):
    N, C, H, W, CO, (KH, KW), pad, dil = case
    OH, OW = conv2d_output_size(H, W, KH, KW, (1, 1), pad, dil)
    qx = _codes((N, C, H, W), gen).contiguous(memory_format=torch.channels_last).to(device)
    qe = _codes((N, CO, OH, OW), gen).contiguous(memory_format=torch.channels_last).to(device)
    return qx, qe, OH, OW


@pytest.fixture
def tma_on(settings):
    settings(wgrad_tma=True)


def _spy(monkeypatch):
    return spy_launches(monkeypatch, "conv2d_int8_wgrad_tma_kernel")


@pytest.mark.parametrize("case", PARAMS)
def test_operand_copies_match_reference(device, poisoned, case, one_torch_thread):
    N, C, H, W, CO, (KH, KW), pad, dil = case
    qx, qe, OH, OW = _case(case, torch.Generator().manual_seed(sum(case[:5])), device)
    tile = _wgrad_tiles.wgrad_tile(CO, C, 16, KH * KW)
    rows = _wgrad_tiles.wgrad_tma_rows(N, H, W, OH, OW, KH, KW, (1, 1), pad, C, CO, tile)
    assert rows is not None
    ed, xd = _conv_wgrad_tma.wgrad_tma_operands(qe, qx, rows, KW, pad, dil)
    ed_ref, xd_ref = _conv_wgrad_tma.wgrad_tma_operands_reference(qe, qx, rows, KW, pad, dil)
    assert torch.equal(ed.cpu(), ed_ref) and torch.equal(xd.cpu(), xd_ref)


@pytest.mark.parametrize("case", PARAMS)
def test_tma_wgrad_exact(device, poisoned, monkeypatch, tma_on, case, one_torch_thread):
    N, C, H, W, CO, (KH, KW), pad, dil = case
    qx, qe, OH, OW = _case(case, torch.Generator().manual_seed(sum(case[:5]) + 1), device)
    calls = _spy(monkeypatch)
    se, sx = torch.tensor(2.0 ** -3, device=device), torch.tensor(0.5, device=device)
    args = ([KH, KW], [1, 1], list(pad), list(dil), 1, 8, 8)
    rows = _wgrad_tiles.wgrad_tma_rows(N, H, W, OH, OW, KH, KW, (1, 1), pad, C, CO, _wgrad_tiles.wgrad_tile(CO, C, 16, KH * KW))
    # one split, and splits of 64 rows (one box) each, which the int64 fix-up adds
    for max_terms in (_tiles.MAX_TERMS, 64):
        for scales, dtype in (((None, None), None), ((se, sx), torch.float32)):
            dw = conv2d_int8_wgrad(qe, qx, (KH, KW), *scales, padding=pad, dilation=dil, max_terms=max_terms)
            ref = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), *(s if s is None else s.cpu() for s in scales),
                                              *args, dtype)
            torch.testing.assert_close(dw.cpu(), ref, rtol=0, atol=0)
    assert len(calls) == 4 and all((c["BH"], c["BW"]) == (rows.BH, rows.BW) for c in calls)
    assert [c["SPLIT_FIX"] for c in calls] == [False, False, True, True]


def test_fused_g_quantization_matches_the_generic_kernel(device, monkeypatch, settings, one_torch_thread):
    """The G quantization in the TMA kernel's epilogue gives the generic kernel's codes bit for bit (same
    gradient, same rounding stream), for nearest and stochastic rounding, one split and several (the op of
    the autograd functions' weight-grad, ``conv.weight_grad_op``, with its ``max_terms``)."""
    from ebkernels import QConfig, _rng
    from ebkernels.ops.gemm.conv import conv2d_int8_wgrad_op

    case = CASES[0]
    N, C, H, W, CO, (KH, KW), pad, dil = case
    qx, qe, OH, OW = _case(case, torch.Generator().manual_seed(7), device)
    se, sx = torch.tensor(2.0 ** -9, device=device), torch.tensor(2.0 ** -4, device=device)
    calls = _spy(monkeypatch)
    # max_terms 64: splits of one box each: the fix-up's last split quantizes
    for rounding, max_terms in (("nearest", _tiles.MAX_TERMS), ("stochastic", _tiles.MAX_TERMS), ("stochastic", 64)):
        qc = QConfig(rounding_g=rounding)
        got = {}
        for tma in (False, True):
            settings(wgrad_tma=tma)
            _rng.manual_seed(11)
            rng = _rng.device_state(qe.device)  # as weight_grad_op passes it
            got[tma] = conv2d_int8_wgrad_op(qe, qx, se, sx, [KH, KW], [1, 1], list(pad), list(dil), 1, qc.bits_e,
                                            qc.bits_a, torch.float32, max_terms, qc.bits_g, rounding, [CO, C], rng)
        assert torch.equal(got[False], got[True])
        assert got[True].abs().sum() > 0
    assert [c["SPLIT_FIX"] for c in calls] == [False, False, True]


class Geometry(NamedTuple):
    N: int
    Cin: int
    H: int
    W: int
    Cout: int
    OH: int
    OW: int
    KH: int
    KW: int
    stride: tuple
    padding: tuple


NO_TMA = [  # why the table must not take the TMA weight-grad: the id
    pytest.param(Geometry(N=2, Cin=16, H=16, W=16, Cout=16, OH=16, OW=16, KH=3, KW=3, stride=(2, 2), padding=(1, 1)),
                 id="stride 2"),
    pytest.param(Geometry(N=2, Cin=16, H=16, W=16, Cout=16, OH=16, OW=16, KH=1, KW=1, stride=(1, 1), padding=(0, 0)),
                 id="one tap (the channel-major 1×1 path)"),
    pytest.param(Geometry(N=2, Cin=8, H=16, W=16, Cout=16, OH=16, OW=16, KH=3, KW=3, stride=(1, 1), padding=(1, 1)),
                 id="fewer than 16 input channels (flat columns)"),
    pytest.param(Geometry(N=2, Cin=16, H=8, W=8, Cout=16, OH=8, OW=8, KH=3, KW=3, stride=(1, 1), padding=(1, 1)),
                 id="8-wide rows: half the 16-wide box padding"),
    pytest.param(Geometry(N=2, Cin=16, H=33, W=33, Cout=16, OH=33, OW=33, KH=3, KW=3, stride=(1, 1), padding=(1, 1)),
                 id="33 of 64 columns"),
    pytest.param(Geometry(N=1, Cin=16, H=3, W=18, Cout=16, OH=3, OW=16, KH=1, KW=3, stride=(1, 1), padding=(0, 0)),
                 id="3 input rows: a 4-row box taller than the copies"),
]


@pytest.mark.parametrize("shape", NO_TMA)
def test_table_takes_tma_only_where_it_fits(shape, request):
    why = request.node.callspec.id
    N, C, H, W, CO, OH, OW, KH, KW, stride, pad = shape
    tile = _wgrad_tiles.wgrad_tile(CO, C, 16, KH * KW)
    assert _wgrad_tiles.wgrad_tma_rows(N, H, W, OH, OW, KH, KW, stride, pad, C, CO, tile) is None, why


def test_tma_is_off_by_default_off_sm90(settings):
    from ebkernels.config import kernel_settings

    assert kernel_settings().wgrad_tma is None
    assert not _wgrad_tiles.wgrad_tma_wanted(torch.device("cpu"))
    settings(wgrad_tma=True)
    assert _wgrad_tiles.wgrad_tma_wanted(torch.device("cpu"))


@pytest.mark.parametrize("fuse", [False, True], ids=["per_layer", "fused_chain"])
def test_training_step_gradients_identical_with_tma(fuse, monkeypatch, settings, one_torch_thread):
    """A whole int8 step of conv → BN → ReLU → conv → BN → ReLU (the per-layer path, and the fused chain
    whose E codes come channel-major from ``bn_relu_bwd``) gives the same gradients, bit for bit, with the
    TMA weight-grad as with the generic one."""
    import ebkernels
    from ebkernels import _rng

    calls = _spy(monkeypatch)
    grads = {}
    for tma in (False, True):
        settings(wgrad_tma=tma)
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU())
        ebkernels.quantize_model(model, fuse=fuse)
        x = torch.randn(2, 16, 16, 16).contiguous(memory_format=torch.channels_last)
        _rng.manual_seed(5)
        model(x).square().mean().backward()
        grads[tma] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    assert len(calls) == 2  # both convs' weight-grads ran the TMA kernel (the first layer's too: x needs no grad)


def test_the_launch_plan_is_made_once_per_geometry_and_follows_the_settings(settings):
    """``conv_wgrad.wgrad_launch``: one plan per operand geometry (shape, strides, 16-byte start) and settings, not
    one per call (issue 20: host time); rule 8 on or off and a misaligned start give other plans."""
    from ebkernels.config import kernel_settings
    from ebkernels.ops._launch import geometry
    from ebkernels.ops.gemm.conv_wgrad import wgrad_launch

    gen = torch.Generator().manual_seed(0)
    qx, qe, _, _ = _case(CASES[0], gen, "cpu")
    cpu = torch.device("cpu")

    def plan():
        return wgrad_launch(geometry(qe), geometry(qx), [3, 3], [1, 1], [1, 1], 2 ** 17, cpu, kernel_settings())

    settings(wgrad_tma=False)
    first = plan()
    assert plan() is first and first.rows is None and first.align == 16
    settings(wgrad_tma=True)
    assert plan().rows is not None  # the TMA rows of rule 8 where the shape takes them
    settings(wgrad_tma=False)
    buf = torch.empty(qx.numel() + 1, dtype=torch.int8)[1:]  # the same shape and strides, an odd start
    qx = buf.as_strided(qx.shape, qx.stride()).copy_(qx)
    assert plan() is not first and plan().align == 1
