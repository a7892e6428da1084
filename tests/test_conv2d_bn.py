"""Int8 implicit-GEMM convolution with the BatchNorm epilogue (``conv2d_int8_bn_fwd``) and the backward
GEMM that recomputes y to form the BatchNorm-backward sums (``conv2d_int8_bn_bwd_reduce``), SPEC §9.

y (bfloat16, NHWC) must be bit-identical to the float32 epilogue of the exact integer convolution rounded
to bfloat16, in forward and recomputed in backward; the per-channel max/min exact, mean/var close to
float64, ``bnp`` the correctly rounded float32 formula on the kernel's statistics, the zmax bits the bits
of max |z| over every element of y; the sums [Σ g, Σ g·xhat] close to float64. Ragged shapes on which the
per-layer forward's tile table chooses each of its tiles (asked of the table): K flat across taps (the
unpadded Cin = 3, 16 and 48 channels) or one tap per K step, BN 16 to 128, BM 64 / 128, Cin padded to 16
in the codes, Cout not a multiple of 16, strides, 1×1 and 3×3, bias, several column blocks, > 32 row
tiles."""
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

from ebkernels import force_backend
from ebkernels._backend import use_triton
from ebkernels.ops import _reduce as _channel_stats
from ebkernels.ops.gemm import tiles as _tiles
from ebkernels.ops.fused import conv_bn as conv2d_bn
from ebkernels.ops.fused.bn_math import act_grad_reference, bn_act_reference
from ebkernels.ops.fused.conv_bn import _bwd_op, _fwd_op, conv2d_int8_bn_bwd_reduce, conv2d_int8_bn_bwd_reduce_reference, conv2d_int8_bn_fwd
from ebkernels.ops.gemm.conv import conv2d_int8_fwd_reference
from ebkernels.ops._launch import conv2d_output_size
from helpers import CL, LaunchSpy, bits_equal, block_max, bnp_exact, codes, each_block_max, fresh_seed, gen, mismatch, rows, spy_launches

EPS = 1e-5
SMS = _tiles.INTERPRETER_SMS


class BnCase(NamedTuple):
    N: int
    Cin: int
    Cin_p: int  # the codes' channels (Cin padded)
    H: int
    W: int
    Cout: int
    K: int
    stride: int
    pad: int
    bias: bool
    qx_cl: bool  # input codes channels-last
    qw_layout: str  # weight codes "ohwi" (channels-last) or "oihw"
    act: str
    affine: bool
    stats: str  # "train": batch statistics, "eval": the running ones
    dz_layout: str  # "like_y" (NHWC) or "nchw"
    dz_dtype: torch.dtype
    momentum: object

    @property
    def id(self):
        return "N{}Ci{}p{}H{}W{}Co{}K{}s{}p{}{}{}-{}-{}-{}-{}-dz{}-{}-m{}".format(
            *self[:9], "-bias" if self.bias else "", "-cl" if self.qx_cl else "-nchw", self.qw_layout,
            self.act, "affine" if self.affine else "plain", self.stats, self.dz_layout,
            str(self.dz_dtype)[6:], self.momentum)


# the table (on INTERPRETER_SMS SMs) chooses each of its tiles once (asserted below):
# flat K (Cin_p 3 unpadded / 16 / 48) then one tap per K step (Cin_p 64, 128), each BN class (Cout 16, 20-32,
# 40-50, 100-136), BM 64 (<= 384 rows) / 128 / 256 (the 64-channel 24×24 and 23×23 layers: 3 row tiles of 256);
# Cout 136: two column blocks; 4232 rows: 34 row tiles of 128
# (> 32: both merge levels); the 1×64×6×7 3×3 layer: the per-layer forward would split K (rule 7), this
# kernel runs the plan's tile unsplit
BF16, F32 = torch.bfloat16, torch.float32
CASES = [
    BnCase(N=2, Cin=3, Cin_p=3, H=9, W=8, Cout=16, K=3, stride=1, pad=1, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=13, Cin_p=16, H=9, W=8, Cout=20, K=3, stride=1, pad=1, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=16, Cin_p=16, H=11, W=10, Cout=40, K=3, stride=2, pad=1, bias=True, qx_cl=False, qw_layout="ohwi",
           act="identity", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=None),
    BnCase(N=1, Cin=3, Cin_p=3, H=15, W=15, Cout=100, K=3, stride=1, pad=1, bias=False, qx_cl=True, qw_layout="oihw",
           act="relu", affine=True, stats="train", dz_layout="nchw", dz_dtype=F32, momentum=0.1),
    BnCase(N=3, Cin=3, Cin_p=3, H=12, W=12, Cout=16, K=3, stride=1, pad=1, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=False, stats="eval", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=16, Cin_p=16, H=46, W=46, Cout=20, K=1, stride=1, pad=0, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu6", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=40, Cin_p=48, H=15, W=14, Cout=50, K=3, stride=1, pad=1, bias=False, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=5, Cin_p=16, H=10, W=10, Cout=136, K=3, stride=1, pad=1, bias=True, qx_cl=True, qw_layout="oihw",
           act="relu", affine=False, stats="eval", dz_layout="nchw", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=64, Cin_p=64, H=9, W=8, Cout=16, K=1, stride=1, pad=0, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=3, Cin=50, Cin_p=64, H=7, W=9, Cout=32, K=1, stride=2, pad=0, bias=False, qx_cl=True, qw_layout="oihw",
           act="hardswish", affine=True, stats="train", dz_layout="nchw", dz_dtype=F32, momentum=0.1),
    BnCase(N=1, Cin=64, Cin_p=64, H=6, W=7, Cout=50, K=3, stride=1, pad=1, bias=True, qx_cl=True, qw_layout="ohwi",
           act="identity", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=None),
    BnCase(N=1, Cin=128, Cin_p=128, H=15, W=14, Cout=100, K=1, stride=1, pad=0, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=3, Cin=64, Cin_p=64, H=12, W=12, Cout=16, K=1, stride=1, pad=0, bias=True, qx_cl=False, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=64, Cin_p=64, H=16, W=15, Cout=24, K=1, stride=1, pad=0, bias=True, qx_cl=True, qw_layout="oihw",
           act="relu", affine=False, stats="eval", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=64, Cin_p=64, H=30, W=28, Cout=40, K=1, stride=2, pad=0, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="nchw", dz_dtype=BF16, momentum=0.1),
    BnCase(N=2, Cin=100, Cin_p=128, H=14, W=15, Cout=100, K=1, stride=1, pad=0, bias=False, qx_cl=True,
           qw_layout="ohwi", act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=1, Cin=64, Cin_p=64, H=11, W=12, Cout=136, K=3, stride=1, pad=1, bias=True, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=1, Cin=64, Cin_p=64, H=24, W=24, Cout=64, K=3, stride=1, pad=1, bias=False, qx_cl=True, qw_layout="ohwi",
           act="relu", affine=True, stats="train", dz_layout="like_y", dz_dtype=BF16, momentum=0.1),
    BnCase(N=1, Cin=64, Cin_p=64, H=23, W=23, Cout=50, K=3, stride=1, pad=1, bias=True, qx_cl=True, qw_layout="oihw",
           act="relu", affine=True, stats="train", dz_layout="nchw", dz_dtype=BF16, momentum=0.1),
]


def _plan(case):
    """The table's plan for the case, as ``conv2d_bn._launch`` asks it (the codes' Cin_p channels)."""
    N, C, Cp, H, W, CO, K, stride, pad = case[:9]
    return _tiles.conv_fwd_plan(N, Cp, H, W, CO, K, K, (stride, stride), (pad, pad), (1, 1), sms=SMS)


def test_the_cases_make_the_table_choose_every_tile():
    """Every tile the table can choose (and the AOT list declares) is launched by some case, in both modes."""
    plans = [_plan(c) for c in CASES]
    assert {p.tile for p in plans} == set(_tiles.declared_tiles("igemm"))
    declared = {(c["BM"], c["BN"], c["BK"], c["FLAT"], c["num_warps"], c["MODE"]) for c in conv2d_bn._AOT}
    assert {(t.BM, t.BN, t.BK, t.flat, t.num_warps, m) for t in _tiles.IGEMM_TILES for m in (0, 1)} <= declared
    assert any(p.splits > 1 for p in plans)  # where the per-layer forward splits K, this kernel does not
    assert any(p.programs > -(-p.mode["M"] // p.tile.BM) for p in plans)  # several column blocks
    assert any(-(-p.mode["M"] // p.tile.BM) > _channel_stats.GROUP for p in plans)  # both merge levels


def _setup(case, device, g):
    N, C, Cp, H, W, CO, K, stride, pad, has_bias, qx_cl, qw_layout, relu, affine, stats = case[:15]
    qx = codes((N, Cp, H, W), g, device, channels_last=qx_cl, pad_from=C)
    qw = codes((CO, Cp, K, K), g, device, channels_last=qw_layout == "ohwi", pad_from=C)
    sx = torch.tensor(2.0 ** int(torch.randint(-6, 3, (1,), generator=g)), device=device)
    sw = torch.tensor(2.0 ** int(torch.randint(-9, -3, (1,), generator=g)), device=device)
    bias = (torch.randn(CO, generator=g) * 2).to(device) if has_bias else None
    gamma = torch.randn(CO, generator=g)
    gamma[::4] *= -1
    beta = torch.randn(CO, generator=g)
    rm = torch.randn(CO, generator=g) * 3
    rv = torch.rand(CO, generator=g) * 4 + 0.2
    nbt = torch.tensor(5)
    gamma, beta, rm, rv, nbt = (t.to(device) for t in (gamma, beta, rm, rv, nbt))
    if not affine:
        gamma = beta = None
    conv = ((stride, stride), (pad, pad), (1, 1))
    return qx, qw, sx, sw, bias, gamma, beta, rm, rv, nbt, conv


def _y_reference(qx, qw, sx, sw, bias, conv):
    stride, pad, dil = (list(v) for v in conv)
    y = conv2d_int8_fwd_reference(qx.cpu(), qw.cpu(), sx.cpu(), sw.cpu(), None if bias is None else bias.cpu(), stride,
                                  pad, dil, 1, 8, 8, torch.float32, True)
    return y.to(torch.bfloat16)


def _sums64(dz, y, bnp, act):
    """[Σ g, Σ g·xhat] in float64 from the float32 g and xhat of the kernels (same activation derivative), and the
    sums of the magnitudes (the scale of the rounding error)."""
    a, b, mean, rstd = (bnp[i].cpu().view(1, -1, 1, 1) for i in range(4))
    yf, dzf = y.cpu().float(), dz.cpu().float()
    g = act_grad_reference(yf * a + b, dzf, act)
    xhat = (yf - mean) * rstd
    t0, t1 = rows(g).double(), rows(g * xhat).double()
    return torch.stack([t0.sum(0), t1.sum(0)]), torch.stack([t0.abs().sum(0), t1.abs().sum(0)])


def _assert_sums(sums, want, mag, msg):
    err = (sums.cpu().double() - want).abs()
    bound = 1e-5 * mag + 1e-6 * want.abs() + 1e-30
    assert (err <= bound).all(), f"sums {msg}: worst err/bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_forward_statistics_and_backward_recompute(device, poisoned, monkeypatch, case, one_torch_thread):
    seed = fresh_seed()
    msg = f"seed={seed} case={case.id}"
    g = gen(seed)
    N, C, Cp, H, W, CO, K = case[:7]
    act, stats, dz_layout, dz_dtype, momentum = case.act, case.stats, case.dz_layout, case.dz_dtype, case.momentum
    qx, qw, sx, sw, bias, gamma, beta, rm, rv, nbt, conv = _setup(case, device, g)
    OH, OW = conv2d_output_size(H, W, K, K, *conv)
    calls = spy_launches(monkeypatch, "conv2d_int8_bn_kernel")
    train = stats == "train"
    rm0, rv0 = rm.clone(), rv.clone()
    y, chan, bnp, zmax = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, *conv, 8, 8, gamma, beta, rm, rv, nbt, momentum,
                                            EPS, batch_stats=train, update=train, act=act)
    # y: the exact integer conv's float32 epilogue, rounded to bfloat16, NHWC
    y_ref = _y_reference(qx, qw, sx, sw, bias, conv)
    assert y.dtype == torch.bfloat16 and y.shape == (N, CO, OH, OW) and y.is_contiguous(memory_format=CL), msg
    assert bits_equal(y.cpu(), y_ref), f"y {msg}: {mismatch(y.cpu(), y_ref)}"
    assert y_ref.float().abs().max().item() > 0, msg
    # per-channel statistics of y
    r = rows(y_ref).double()
    assert torch.equal(chan[2].cpu(), r.amax(0).float()) and torch.equal(chan[3].cpu(), r.amin(0).float()), msg
    torch.testing.assert_close(chan[0].cpu().double(), r.mean(0), rtol=1e-6, atol=1e-6 * r.abs().max().item(),
                               msg=lambda m: f"mean {msg}: {m}")
    # float32 moments merged across row tiles (Chan): the tile means' rounding (eps·|mean|) enters the
    # between-tile term, so the relative error grows with mean²/var; a near-constant bf16 channel (seed
    # 1465658436: mean -0.71, var 3.6e-8, mean²/var 1.4e7) came out 1.25e-5 off in var: 1e-4 relative
    torch.testing.assert_close(chan[1].cpu().double(), r.var(0, unbiased=False), rtol=1e-4, atol=0,
                               msg=lambda m: f"var {msg}: {m}")
    # bnp from the batch statistics (train) or the running ones (eval), no affine: gamma 1, beta 0
    ones, zeros = torch.ones(CO), torch.zeros(CO)
    gm = ones if gamma is None else gamma
    bt = zeros if beta is None else beta
    want_bnp = bnp_exact(chan[0], chan[1], gm, bt, EPS) if train else bnp_exact(rm0, rv0, gm, bt, EPS)
    assert bits_equal(bnp.cpu(), want_bnp), f"bnp {msg}: {mismatch(bnp.cpu(), want_bnp)}"
    # zmax: the bits of max |z| over every element of y
    z = bn_act_reference(y_ref, bnp.cpu(), act)
    assert bits_equal(block_max(zmax), z.abs().amax()), f"zmax {block_max(zmax).item()} vs {z.abs().amax().item()} {msg}"
    assert each_block_max(zmax, z, conv2d_bn._tile(qx, qw, *conv).BN), f"zmax per column block {msg}"
    # running statistics as nn.BatchNorm2d on y (the counter is left to bn_relu_quant)
    bn = nn.BatchNorm2d(CO, eps=EPS, momentum=momentum, affine=False).to(device)
    bn.running_mean.copy_(rm0)
    bn.running_var.copy_(rv0)
    bn.num_batches_tracked.fill_(5)  # momentum None: the cumulative average over 5 + 1 batches
    bn.train(train)
    with torch.no_grad():
        bn(y_ref.float().to(device))
    assert nbt.item() == 5, msg  # left to bn_relu_quant
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6, msg=lambda m: f"rm {msg}: {m}")
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6, msg=lambda m: f"rv {msg}: {m}")

    # ---- backward: y recomputed bit for bit, the sums --------------------------------------------------
    dz = torch.randn((N, CO, OH, OW), generator=g).to(dz_dtype)
    dz = (dz.contiguous(memory_format=CL) if dz_layout == "like_y" else dz.contiguous()).to(device)
    y2, sums = conv2d_int8_bn_bwd_reduce(qx, qw, sx, sw, bias, *conv, 8, 8, dz, bnp, act)
    assert bits_equal(y2.cpu(), y.cpu()), f"recomputed y {msg}: {mismatch(y2.cpu(), y.cpu())}"
    assert sums.shape == (2, CO) and sums.dtype == torch.float32, msg
    want, mag = _sums64(dz, y_ref, bnp, act)
    _assert_sums(sums, want, mag, msg)
    stride, pad, dil = (list(v) for v in conv)
    y3, sums_ref = conv2d_int8_bn_bwd_reduce_reference(qx.cpu(), qw.cpu(), sx.cpu(), sw.cpu(),
                                                       None if bias is None else bias.cpu(), stride, pad, dil, 8, 8,
                                                       dz.cpu(), bnp.cpu(), act)
    assert bits_equal(y3, y_ref), msg
    _assert_sums(sums_ref, want, mag, msg + " (reference)")
    if device.type == "cpu":  # both modes launched the table's tile, one split
        t = _plan(case).tile
        assert [(c["MODE"], c["BM"], c["BN"], c["BK"], c["FLAT"], c["num_warps"], c["grid"]) for c in calls] == [
            (m, t.BM, t.BN, t.BK, t.flat, t.num_warps, (-(-N * OH * OW // t.BM) * -(-CO // t.BN),)) for m in (0, 1)]


def test_reference_path_agrees(device):
    """The ops' PyTorch path (force_backend("reference")) gives the same y and statistics."""
    seed = fresh_seed()
    msg = f"seed={seed}"
    g = gen(seed)
    case = CASES[0]
    qx, qw, sx, sw, bias, gamma, beta, rm, rv, nbt, conv = _setup(case, device, g)
    out = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, *conv, 8, 8, gamma, beta)
    with force_backend("reference"):
        ref = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, *conv, 8, 8, gamma, beta)
        dz = torch.randn(out[0].shape, generator=g).to(device=device, dtype=torch.bfloat16)
        y_r, sums_r = conv2d_int8_bn_bwd_reduce(qx, qw, sx, sw, bias, *conv, 8, 8, dz, out[2])
    assert bits_equal(out[0].cpu(), ref[0].cpu()) and bits_equal(y_r.cpu(), out[0].cpu()), msg
    assert torch.equal(out[1][2:].cpu(), ref[1][2:].cpu()), msg
    torch.testing.assert_close(out[1].cpu(), ref[1].cpu(), rtol=1e-5, atol=1e-6)
    y, sums = conv2d_int8_bn_bwd_reduce(qx, qw, sx, sw, bias, *conv, 8, 8, dz, out[2])
    want, mag = _sums64(dz, out[0], out[2], "relu")
    _assert_sums(sums_r, want, mag, msg)
    _assert_sums(sums, want, mag, msg)


def test_opcheck():
    g = gen(1)
    qx = codes((1, 16, 4, 5), g, "cpu", pad_from=3)
    qw = codes((5, 16, 3, 3), g, "cpu", pad_from=3)
    sx, sw = torch.tensor(0.5), torch.tensor(2.0 ** -6)
    gamma, beta, bias = torch.randn(5, generator=g), torch.randn(5, generator=g), torch.randn(5, generator=g)
    rm, rv, nbt = torch.zeros(5), torch.ones(5), torch.tensor(0)
    geo = ([1, 1], [1, 1], [1, 1])
    torch.library.opcheck(_fwd_op, (qx, qw, sx, sw, bias, *geo, 8, 8, gamma, beta, rm, rv, nbt, 0.1, EPS, True, True,
                                    "relu"))
    y, _, bnp, _ = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, *geo, 8, 8, gamma, beta)
    dz = torch.randn(y.shape, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)
    torch.library.opcheck(_bwd_op, (qx, qw, sx, sw, bias, *geo, 8, 8, dz, bnp, "silu"))


@pytest.mark.parametrize("case", [CASES[1], CASES[7]], ids=lambda c: f"Cout{c.Cout}-K{c.K}")
def test_residual_added_before_the_statistics(device, poisoned, case):
    """``residual``: y = conv + residual with one rounding, bit-identical to ``conv2d_int8_fwd(residual=)``'s
    bfloat16 result (what backward replays), and the statistics, bnp and zmax those of that y."""
    from ebkernels.ops.gemm.conv import conv2d_int8_fwd

    seed = fresh_seed()
    g = gen(seed)
    qx, qw, sx, sw, bias, gamma, beta, rm, rv, nbt, conv = _setup(case, device, g)
    N, CO = case.N, case.Cout
    OH, OW = conv2d_output_size(case.H, case.W, case.K, case.K, *conv)
    res = (torch.randn(N, CO, OH, OW, generator=g) * 4).to(torch.bfloat16).to(device).contiguous(memory_format=CL)
    y, chan, bnp, zmax = conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, *conv, 8, 8, gamma, beta, rm.clone(), rv.clone(),
                                            None, 0.1, EPS, batch_stats=True, update=True, act="relu", residual=res)
    replay = conv2d_int8_fwd(qx, qw, sx, sw, bias, *conv, out_dtype=torch.bfloat16, channels_last=True, residual=res)
    assert bits_equal(y.cpu(), replay.cpu()), f"seed={seed}: {mismatch(y.cpu(), replay.cpu())}"
    with force_backend("reference"):
        ref = conv2d_int8_bn_fwd(qx.cpu(), qw.cpu(), sx.cpu(), sw.cpu(), None if bias is None else bias.cpu(), *conv,
                                 8, 8, None if gamma is None else gamma.cpu(), None if beta is None else beta.cpu(),
                                 rm.cpu(), rv.cpu(), None, 0.1, EPS, batch_stats=True, update=True, act="relu",
                                 residual=res.cpu())
    assert bits_equal(ref[0], y.cpu()), f"seed={seed}"
    torch.testing.assert_close(chan.cpu(), ref[1], rtol=1e-4, atol=1e-6)
    z = bn_act_reference(y.cpu(), bnp.cpu(), "relu")
    assert bits_equal(block_max(zmax), z.abs().amax()), f"seed={seed}"
    with pytest.raises(ValueError, match="residual"):
        conv2d_int8_bn_fwd(qx, qw, sx, sw, bias, *conv, residual=res.float())


# (codes' shape, Cout, the table's tile on INTERPRETER_SMS SMs, the residual launch's tile)
RESIDUAL_TILES = [((1, 64, 12, 12), 136, (128, 128), (64, 128)), ((1, 64, 24, 24), 64, (256, 64), (128, 64))]


@pytest.mark.parametrize("shape,cout,table,runs", RESIDUAL_TILES,
                         ids=[f"{t[0]}x{t[1]}" for _, _, t, _ in RESIDUAL_TILES])
def test_a_residual_launch_takes_a_smaller_tile_than_128x128(shape, cout, table, runs):
    """With the residual (its tile on top of the statistics epilogue), a layer the table gives 128×128 or more runs
    64×128 (128×64 at 64 columns): at 128×128 that build spills 452-720 bytes (AOT, sm_80 and sm_90)."""
    g = gen(fresh_seed())
    qx, qw = codes(shape, g, "cpu"), codes((cout, 64, 3, 3), g, "cpu")
    if not use_triton(qx):
        pytest.skip("the Triton launchers run on CPU tensors under TRITON_INTERPRET=1 only")
    conv = ((1, 1), (1, 1), (1, 1))
    if (conv2d_bn._tile(qx, qw, *conv).BM, conv2d_bn._tile(qx, qw, *conv).BN) != table:
        pytest.skip("the tile table plans this layer otherwise on this card")
    res = torch.randn(shape[0], cout, *shape[2:], generator=g).to(torch.bfloat16).contiguous(memory_format=CL)
    calls = []
    with LaunchSpy("conv2d_int8_bn_kernel", run=False) as spy:
        conv2d_int8_bn_fwd(qx, qw, torch.tensor(0.5), torch.tensor(0.01), None, *conv, residual=res)
        calls = spy.calls
    assert [(c["BM"], c["BN"], c["HAS_RES"]) for c in calls] == [(*runs, True)]


def test_the_launch_plan_is_made_once_per_geometry():
    """``conv_bn.conv_bn_launch``: one plan per operand geometry (shapes, strides, 16-byte starts, settings), not
    one per call (issue 20: host time); a dz in y's layout is read as such, another layout by its own strides."""
    from ebkernels.config import kernel_settings
    from ebkernels.ops._launch import geometry
    from ebkernels.ops.fused.conv_bn import conv_bn_launch

    qx = torch.randint(-127, 128, (2, 16, 9, 9), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    qw = torch.randint(-127, 128, (24, 16, 3, 3), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    cpu, s = torch.device("cpu"), kernel_settings()

    def plan(dz=None):
        return conv_bn_launch(geometry(qx), geometry(qw), None if dz is None else geometry(dz), (1, 1), (1, 1),
                              (1, 1), False, cpu, s)

    assert plan() is plan() and (plan().OH, plan().OW, plan().M) == (9, 9, 162)
    dz_nhwc = torch.randn(2, 24, 9, 9).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dz_nchw = torch.randn(2, 24, 9, 9).to(torch.bfloat16)
    assert plan(dz_nhwc).dz_like_y and not plan(dz_nchw).dz_like_y
    assert plan(dz_nchw).dz_strides == (24 * 81, 9, 1, 81)  # (n, h, w, c) of a contiguous NCHW tensor
