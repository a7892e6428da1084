"""The per-shape tile table (``ebkernels.ops.gemm.tiles``): its choices cover every declared tile on small ragged
shapes (asked of the table itself), each of those launches is exact against the float64 oracle with
poisoned outputs, the phase split of a strided input-grad matches brute force, the plan printer."""
import io
import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from ebkernels._triton import launch_arguments
from ebkernels.aot import print_plan
from ebkernels.ops.gemm import tiles as _tiles, conv as conv2d_int8
from ebkernels.ops.gemm import wgrad_tiles as _wgrad_tiles
from ebkernels.ops._buffers import counter_pool
from ebkernels.ops.gemm.conv import conv2d_int8_dgrad, conv2d_int8_dgrad_reference, conv2d_int8_fwd, conv2d_int8_fwd_reference, conv2d_int8_wgrad, conv2d_int8_wgrad_reference
from ebkernels.ops.gemm.conv_fwd_dgrad import _CONV_AOT
from helpers import CONV_KERNELS, spy_launches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMS = _tiles.INTERPRETER_SMS

# (N, Cin, H, W, Cout): 3×3, stride 1, padding 1; ragged channel counts (13, 27, 50, 100: each BN class) and
# 64 / 128 (one tap per K step), 48 (flat, aligned); N·H·W = 225 rows (BM = 64 on INTERPRETER_SMS SMs) or 392 (BM = 128)
PAIRS = [(64, 13), (128, 27), (64, 50), (64, 100), (13, 27), (48, 100)]
IGEMM_CASES = ([(n, c, h, h, co) for c, co in PAIRS for n, h in ((1, 15), (2, 14))]
               + [(1, 64, 24, 24, 64), (1, 64, 23, 23, 50)])  # 576 / 529 rows: BM = 256 (3 row tiles)
# weight-grad (N, Cin, H, W, Cout, K), stride 1, padding K // 2: every (Cout, Cin) class with 1×1 kernels:
# ragged channels and 30 rows (unaligned operands: BK = 32), multiples of 16 and 64 rows (aligned: BK = 64);
# fewer than 16 input channels (columns flat over (tap, channel)): 13, 27, 54, 117 columns (BN 16 to 128)
WGRAD_CASES = ([(1, c, 6, 5, co, 1) for co in (13, 27, 50, 100) for c in (16, 27, 50, 100)]
               + [(1, c, 8, 8, co, 1) for co in (16, 32, 64, 128) for c in (16, 32, 64, 128)]
               + [(1, c, 6, 5, co, k) for co in (13, 27, 50, 100) for c, k in ((13, 1), (3, 3), (6, 3), (13, 3))])


def _wgrad_align(case):
    N, C, H, W, CO, K = case
    return 16 if C % 16 == 0 and N * H * W % 16 == 0 else 1


def _plans(case):
    N, C, H, W, CO = case
    s, p, d = (1, 1), (1, 1), (1, 1)
    return (_tiles.conv_fwd_plan(N, C, H, W, CO, 3, 3, s, p, d, sms=SMS),
            _tiles.conv_dgrad_plan(N, CO, H, W, C, H, W, 3, 3, s, p, d, sms=SMS))


def test_the_cases_make_the_table_choose_every_declared_tile():
    chosen = {p.tile for case in IGEMM_CASES for p in _plans(case)}
    assert chosen == set(_tiles.declared_tiles("igemm"))
    wg = {_wgrad_tiles.wgrad_tile(case[4], case[1], _wgrad_align(case), case[5] ** 2) for case in WGRAD_CASES}
    assert wg == set(_tiles.declared_tiles("wgrad"))


def test_a_256_row_tile_runs_unsplit():
    """Rule 3: a reduction long enough to split (``max_terms``) takes the 128-row tile, forward and input-grad (the
    256-row split build spills, AOT; none is declared), with the same split rule."""
    s, p, d = (1, 1), (1, 1), (1, 1)
    plans = (lambda **kw: _tiles.conv_fwd_plan(1, 64, 24, 24, 64, 3, 3, s, p, d, sms=SMS, **kw),
             lambda **kw: _tiles.conv_dgrad_plan(1, 64, 24, 24, 64, 24, 24, 3, 3, s, p, d, sms=SMS, **kw))
    for plan in plans:
        assert (plan().tile.BM, plan().splits) == (256, 1)
        split = plan(max_terms=64 * 4)
        assert (split.tile.BM, split.tile.BN, split.splits, split.per_split) == (128, 64, 3, 3)
    declared = {(c["BM"], c["SPLIT_FIX"]) for c in _CONV_AOT}
    assert (256, False) in declared and (256, True) not in declared


def _codes(shape, gen):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("case", IGEMM_CASES, ids=["N{}C{}H{}W{}O{}".format(*c) for c in IGEMM_CASES])
def test_every_igemm_tile_exact(device, poisoned, monkeypatch, case, one_torch_thread):
    N, C, H, W, CO = case
    gen = torch.Generator().manual_seed(sum(case))
    qx = _codes((N, C, H, W), gen).contiguous(memory_format=torch.channels_last).to(device)
    qw = _codes((CO, C, 3, 3), gen).to(device)
    qe = _codes((N, CO, H, W), gen).contiguous(memory_format=torch.channels_last).to(device)
    conv, args = dict(stride=1, padding=1), ([1, 1], [1, 1], [1, 1], 1, 8, 8, None)
    calls = spy_launches(monkeypatch, *CONV_KERNELS)
    y = conv2d_int8_fwd(qx, qw, **conv)
    torch.testing.assert_close(y.cpu(), conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), None, None, None, *args, True),
                               rtol=0, atol=0)
    dx = conv2d_int8_dgrad(qe, qw, (H, W), **conv)
    torch.testing.assert_close(dx.cpu(), conv2d_int8_dgrad_reference(qe.cpu(), qw.cpu(), None, None, [H, W], *args,
                                                                     True), rtol=0, atol=0)
    dw = conv2d_int8_wgrad(qe, qx, (3, 3), **conv)
    torch.testing.assert_close(dw.cpu(), conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), None, None, [3, 3], *args),
                               rtol=0, atol=0)
    if device.type == "cpu":  # the launches are the plans the table printed
        for call, plan in zip(calls, _plans(case)):
            t = plan.tile
            assert (call["BM"], call["BN"], call["BK"], call["FLAT"], call["num_warps"]) == (
                t.BM, t.BN, t.BK, t.flat, t.num_warps)
            assert call["grid"] == (plan.programs, plan.splits)


@pytest.mark.parametrize("case", WGRAD_CASES, ids=["C{1}H{2}O{4}K{5}".format(*c) for c in WGRAD_CASES])
def test_every_wgrad_tile_exact(device, poisoned, monkeypatch, case, one_torch_thread):
    N, C, H, W, CO, K = case
    gen = torch.Generator().manual_seed(sum(case) + 1)
    qx = _codes((N, C, H, W), gen).contiguous(memory_format=torch.channels_last).to(device)
    qe = _codes((CO, N, H, W), gen).to(device).permute(1, 0, 2, 3)  # channel-major E, as QConv2dFunction
    calls = spy_launches(monkeypatch, *CONV_KERNELS)
    se, sx = torch.tensor(2.0 ** -3, device=device), torch.tensor(0.5, device=device)
    args = ([K, K], [1, 1], [K // 2] * 2, [1, 1], 1, 8, 8)
    for scales, dtype in (((None, None), None), ((se, sx), torch.float32)):
        dw = conv2d_int8_wgrad(qe, qx, (K, K), *scales, padding=K // 2)
        ref = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), *(s if s is None else s.cpu() for s in scales), *args,
                                          dtype)
        torch.testing.assert_close(dw.cpu(), ref, rtol=0, atol=0)
    if device.type == "cpu":
        t = _wgrad_tiles.wgrad_tile(CO, C, _wgrad_align(case), K * K)
        x_cm = False  # NHWC input codes here: FLAT_N whenever the table says flat
        assert all((c["BM"], c["BN"], c["BK"], c["num_warps"], c["ALIGN"], c["FLAT_N"]) == (
            t.BM, t.BN, t.BK, t.num_warps, _wgrad_align(case), t.flat and not x_cm) for c in calls)


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("dil", [1, 2, 3])
@pytest.mark.parametrize("pad", [0, 1, 2, 5])
def test_dgrad_phase_taps_match_brute_force(stride, dil, pad):
    """Phase ph of a transposed convolution: exactly the taps k with (ph + pad - k·dil) ≡ 0 (mod stride),
    reading output a + c0 - j·dil/gcd."""
    for K in (1, 2, 3, 5, 7):
        for ph, (k0, count, c0) in enumerate(_tiles.dgrad_phase_taps(K, stride, pad, dil)):
            want = [k for k in range(K) if (ph + pad - k * dil) % stride == 0]
            step = stride // __import__("math").gcd(stride, dil)
            assert [k0 + j * step for j in range(count)] == want
            for j, k in enumerate(want):
                for a in range(4):  # input ph + stride·a reads output (i + pad - k·dil) / stride
                    assert (ph + stride * a + pad - k * dil) // stride == a + c0 - j * (dil * step // stride)


class PhaseCase(NamedTuple):
    N: int
    Cin: int
    H: int
    W: int
    Cout: int
    KH: int
    KW: int
    stride: tuple
    padding: tuple
    dilation: tuple

    @property
    def id(self):
        return "N{}C{}H{}W{}O{}K{}x{}s{}p{}d{}".format(*self).replace(" ", "")


# strided input-grads (each phase its own taps): strides 2 and 3, rectangular, padding, dilation, a 1×1
# (phases without taps write zeros), channels ragged and flat / one-tap K
PHASE_CASES = [
    PhaseCase(N=2, Cin=5, H=9, W=8, Cout=7, KH=3, KW=3, stride=(2, 2), padding=(1, 1), dilation=(1, 1)),
    PhaseCase(N=1, Cin=13, H=11, W=10, Cout=64, KH=3, KW=2, stride=(3, 2), padding=(2, 0), dilation=(1, 2)),
    PhaseCase(N=2, Cin=64, H=7, W=9, Cout=16, KH=1, KW=1, stride=(2, 3), padding=(0, 0), dilation=(1, 1)),
    PhaseCase(N=1, Cin=6, H=13, W=12, Cout=5, KH=5, KW=3, stride=(3, 3), padding=(2, 1), dilation=(2, 3)),
    PhaseCase(N=1, Cin=16, H=10, W=10, Cout=32, KH=4, KW=4, stride=(2, 2), padding=(3, 1), dilation=(2, 1)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PHASE_CASES])
def test_phase_decomposed_dgrad_exact(device, poisoned, case, one_torch_thread):
    N, C, H, W, CO, KH, KW, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(sum(case[:7]))
    OH, OW = conv2d_int8.conv2d_output_size(H, W, KH, KW, stride, padding, dilation)
    qw = _codes((CO, C, KH, KW), gen).to(device)
    qe = _codes((N, CO, OH, OW), gen).contiguous(memory_format=torch.channels_last).to(device)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    dx = conv2d_int8_dgrad(qe, qw, (H, W), **conv)
    ref = conv2d_int8_dgrad_reference(qe.cpu(), qw.cpu(), None, None, [H, W], list(stride), list(padding),
                                      list(dilation), 1, 8, 8, None, True)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(dx.cpu(), ref, rtol=0, atol=0)
    se, sw = torch.tensor(2.0 ** -5, device=device), torch.tensor(4.0, device=device)
    dxf = conv2d_int8_dgrad(qe, qw, (H, W), se, sw, **conv, max_terms=2 * CO)  # split over K steps
    reff = conv2d_int8_dgrad_reference(qe.cpu(), qw.cpu(), se.cpu(), sw.cpu(), [H, W], list(stride), list(padding),
                                       list(dilation), 1, 8, 8, torch.float32, True)
    torch.testing.assert_close(dxf.cpu(), reff, rtol=0, atol=0)


def test_plan_printer_summary():
    out = io.StringIO()
    worst = print_plan(["vgg16", "preresnet101"], 256, 132, "table", out)
    text = out.getvalue()
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"min useful MMA fraction: \d+\.\d%", last), last
    assert abs(float(last.split(": ")[1][:-1]) - 100 * worst) < 0.051
    rows = [r for r in text.splitlines() if r.startswith("| ") and "/s" in r]
    assert len(rows) == 3 * (9 + 17)  # three GEMMs per distinct layer of both networks
    assert worst >= 0.5  # the target: every GEMM that runs in training at least half useful
    assert sum(" TMA " in r for r in rows) == 5  # the stride-1 3×3 weight-grads at 16² and 32² but the first (rule 8)
    legacy = io.StringIO()
    assert print_plan(["vgg16", "preresnet101"], 256, 132, "legacy", legacy) < 0.01


def test_plan_cli():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ebkernels.aot", "--plan", "vgg16", "--batch", "64"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("min useful MMA fraction: ")


def test_split_k_where_the_grid_underfills(device, poisoned, monkeypatch, one_torch_thread):
    """One output tile, 9 K steps: the table splits the reduction (rule 7) for forward and input-grad; the
    splits meet in the int64 workspace and the last one stores: exact, every element written."""
    case = (1, 64, 5, 5, 64)
    fwd, dgr = _plans(case)
    assert fwd.programs == dgr.programs == 1 and fwd.splits > 1 and dgr.splits > 1
    N, C, H, W, CO = case
    gen = torch.Generator().manual_seed(5)
    qx = _codes((N, C, H, W), gen).contiguous(memory_format=torch.channels_last).to(device)
    qw = _codes((CO, C, 3, 3), gen).to(device)
    qe = _codes((N, CO, H, W), gen).contiguous(memory_format=torch.channels_last).to(device)
    sx, sw = torch.tensor(2.0 ** -4, device=device), torch.tensor(8.0, device=device)
    bias = torch.randn(CO, generator=gen).to(device)
    args = ([1, 1], [1, 1], [1, 1], 1)
    calls = spy_launches(monkeypatch, *CONV_KERNELS)
    y = conv2d_int8_fwd(qx, qw, sx, sw, bias, stride=1, padding=1)
    torch.testing.assert_close(y.cpu(), conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), sx.cpu(), sw.cpu(), bias.cpu(),
                                                                  *args, 8, 8, torch.float32, True), rtol=0, atol=0)
    dx = conv2d_int8_dgrad(qe, qw, (H, W), stride=1, padding=1)
    torch.testing.assert_close(dx.cpu(), conv2d_int8_dgrad_reference(qe.cpu(), qw.cpu(), None, None, [H, W], *args,
                                                                     8, 8, None, True), rtol=0, atol=0)
    if device.type == "cpu":
        assert [c["grid"] for c in calls] == [(1, fwd.splits), (1, dgr.splits)]
        assert all(c["SPLIT_FIX"] for c in calls)
    # the last split of each tile left the shared workspace zero again (the next launch needs no memset)
    assert int(torch.count_nonzero(counter_pool(device, 1, torch.int64))) == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter")
def test_plan_sms_plans_the_launches_as_the_aot_plan(monkeypatch, settings):
    """``EBKERNELS_PLAN_SMS=132`` (``KernelSettings.plan_sms``' default, read at import: the cost model prices the launches the
    interpreter records as the GPU's): for every distinct conv layer of VGG16 and PreResNet-101 at batch 256
    the launchers choose the tile and grid ``python -m ebkernels.aot --plan`` prints (``plans.layer_plans``:
    forward, input-grad, weight-grad with rule 8's TMA kernel), with every launch recorded and not run."""
    import triton.runtime.interpreter as ti

    from benchmarks.shapes import CONV_SHAPES
    from ebkernels.config import QConfig
    from ebkernels.ops._launch import code_channels
    from ebkernels.ops.gemm.conv import weight_grad_op
    from ebkernels.ops.gemm.plans import layer_plans

    env = {k: v for k, v in os.environ.items()}
    env["EBKERNELS_PLAN_SMS"] = "132"
    proc = subprocess.run([sys.executable, "-c", "from ebkernels.config import kernel_settings; print(kernel_settings().plan_sms)"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.stdout.strip() == "132", proc.stderr[-2000:]
    settings(plan_sms=132, wgrad_tma=None)
    launches = []
    monkeypatch.setattr(ti.InterpretedFunction, "run",
                        lambda self, *a, grid, warmup, **kw: launches.append((self.fn.__name__, tuple(grid),
                                                                             launch_arguments(self, a, kw))))
    N, one = 256, torch.tensor(1.0)
    shapes = {(s.cin, s.cout, s.h, s.k, s.stride, s.pad): s for net in ("vgg16", "preresnet101") for s in CONV_SHAPES[net]}
    tma = 0
    for c in shapes.values():
        C, CO = code_channels(c.cin), code_channels(c.cout)
        OH = (c.h + 2 * c.pad - c.k) // c.stride + 1
        fwd, dgr, wgr = layer_plans(N, c.cin, c.cout, c.h, c.w, c.k, c.stride, c.pad, 132, code_channels)
        qx = torch.zeros(N, C, c.h, c.w, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        qe = torch.zeros(N, CO, OH, OH, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        geo = dict(stride=c.stride, padding=c.pad)
        conv2d_int8_fwd(qx, torch.zeros(c.cout, C, c.k, c.k, dtype=torch.int8), one, one, **geo)
        conv2d_int8_dgrad(qe, torch.zeros(CO, c.cin, c.k, c.k, dtype=torch.int8), (c.h, c.w), one, one, **geo)
        qe_cm = qe.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
        weight_grad_op(qe_cm, qx, one, one, [c.k] * 2, [c.stride] * 2, [c.pad] * 2, [1, 1], 1, QConfig(),
                       [c.cout, c.cin])
        gemms = [x for x in launches if x[0] != "wgrad_tma_operands_kernel" and "quantize" not in x[0]
                 and x[0] != "gquant_codes_kernel"][-3:]
        launches.clear()
        assert len(gemms) == 3, (c.label(), gemms)
        tma += gemms[2][0].endswith("tma_kernel")
        for (name, grid, kw), plan in zip(gemms, (fwd, dgr, wgr)):
            assert name.endswith("tma_kernel") == bool(plan.mode.get("tma")), (c.label(), name)
            got = (grid[0], grid[1], kw["BM"], kw["BN"], kw["BK"], bool(kw.get("FLAT", kw.get("FLAT_N", False))))
            want = (plan.programs, plan.splits, plan.tile.BM, plan.tile.BN, plan.tile.BK, plan.tile.flat)
            assert got == want, (c.label(), plan.kind, got, want)
    assert tma == 5  # rule 8's layers (as the plan printer counts them)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter")
def test_the_fused_first_layer_launches_what_the_plan_prints(monkeypatch, settings):
    """Issue 20 item 4: the fused path packs the first layer's Cin = 3 as the per-layer path does (no padding to
    16): its conv + BatchNorm forward and its weight-grad launch the tile, grid and K layout that ``--plan``
    prints for a 3→16 layer at batch 256 (the 84 % useful MMA of the plan is what runs), reading 3-channel codes."""
    import triton.runtime.interpreter as ti
    import torch.nn as nn

    import ebkernels
    from ebkernels.fusion import fused_chains
    from ebkernels.ops._launch import code_channels
    from ebkernels.ops.gemm.plans import layer_plans

    settings(plan_sms=132, wgrad_tma=None)
    launches = []
    monkeypatch.setattr(ti.InterpretedFunction, "run",
                        lambda self, *a, grid, warmup, **kw: launches.append((self.fn.__name__, tuple(grid), a,
                                                                             launch_arguments(self, a, kw))))
    N, H = 256, 32
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU())
    ebkernels.quantize_model(model)
    assert fused_chains(model)
    model(torch.randn(N, 3, H, H).contiguous(memory_format=torch.channels_last)).sum().backward()
    fwd, _, wgr = layer_plans(N, 3, 16, H, H, 3, 1, 1, 132, code_channels)
    conv_bn = [x for x in launches if x[0] == "conv2d_int8_bn_kernel" and x[3]["MODE"] == 0][0]
    assert conv_bn[2][0].shape[1] == 3  # the codes it reads: 3 channels, not 16
    assert (conv_bn[1][0], conv_bn[3]["BM"], conv_bn[3]["BN"], conv_bn[3]["BK"], conv_bn[3]["FLAT"]) == (
        fwd.programs, fwd.tile.BM, fwd.tile.BN, fwd.tile.BK, fwd.tile.flat)
    assert fwd.fraction > 0.8  # 27 of every 32 K lanes
    wg = [x for x in launches if x[0] == "conv2d_int8_wgrad_kernel" and x[2][1].shape[1] == 3]
    assert len(wg) == 1 and wg[0][3]["FLAT_N"] and (wg[0][1][:2], wg[0][3]["BM"], wg[0][3]["BN"]) == (
        (wgr.programs, wgr.splits), wgr.tile.BM, wgr.tile.BN)
