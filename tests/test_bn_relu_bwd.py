"""Backward of BatchNorm + ReLU without a float y kept (``bn_relu_bwd_reduce``, ``bn_relu_bwd``), SPEC §9.

The sums [Σ g, Σ g·xhat] against float64 (with and without the channel map ``inv`` of a gather); the
per-element passes bit-identical to the PyTorch reference given the same sums: "absmax" (the bits of max
|dy| and the random ticket), "codes" in both layouts (NHWC and channel-major, channels padded to 16 with
zeros), for nearest and for stochastic rounding (both draw the same Philox numbers from
``ebkernels._rng``), "float"; eval mode (no sums); dy against the float64 BatchNorm backward."""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import ebkernels
from ebkernels import _rng
from ebkernels.ops.fused.bn_math import act_grad_reference, bn_grad_in_reference
from ebkernels.ops.fused.bn_relu_bwd import _bwd_op, _reduce_op, bn_relu_bwd, bn_relu_bwd_reduce, bn_relu_bwd_reduce_reference, bn_relu_bwd_reference
from ebkernels.ops.fused.bn_relu_quant import bn_stats
from ebkernels.ops._scale import scale_reference
from helpers import CL, bits_equal, f32_of_bits, fresh_seed, gen, mismatch, rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: no intra-op thread contention

EPS = 1e-5



def _setup(N, C, H, W, inv_kind, dz_dtype, dz_layout, y_kind, device, g):
    """y (the bfloat16 copy of a float tensor, as bn_stats writes it), its batch bnp, dz and the channel map."""
    x = torch.randn((N, C, H, W), generator=g) * torch.exp(torch.randn(C, generator=g)).view(1, C, 1, 1)
    x = (x + torch.randn(C, generator=g).view(1, C, 1, 1)).to(device)
    gamma = torch.randn(C, generator=g)
    gamma[::3] *= -1
    gamma, beta = gamma.to(device), torch.randn(C, generator=g).to(device)
    y, _, bnp, _ = bn_stats(x, gamma, beta)
    if y_kind == "f32":  # any float tensor y, any layout
        y = y.float().contiguous()
    inv = None
    K = C
    if inv_kind is not None:  # channel c of y reads channel inv[c] of dz (-1: not gathered, g = 0)
        K = C * 2 // 3
        idx = torch.randperm(C, generator=g)[:K]
        inv = torch.full((C,), -1, dtype=torch.int32)
        inv[idx] = torch.arange(K, dtype=torch.int32)
        inv = inv.to(device)
    dz = torch.randn((N, K, H, W), generator=g).to(dz_dtype)
    dz = (dz.contiguous(memory_format=CL) if dz_layout == "cl" else dz.contiguous()).to(device)
    return y, bnp, dz, inv, gamma, beta


def _gathered64(dz, inv, C):
    d = dz.cpu().double()
    if inv is None:
        return d
    i = inv.cpu().long()
    out = d.index_select(1, i.clamp(min=0))
    return torch.where((i >= 0).view(1, -1, 1, 1), out, torch.zeros_like(out))


def _g64(d, yf, bnp, act):
    """dz·act'(t) in float64, with the float32 pre-activation t and (SiLU, Hardswish) derivative the kernels use."""
    t = yf * bnp[0].cpu().view(1, -1, 1, 1) + bnp[1].cpu().view(1, -1, 1, 1)
    if act in ("silu", "hardswish"):
        return d * act_grad_reference(t, torch.ones_like(t), act).double()
    return act_grad_reference(t, d, act)


def _sums64(dz, y, bnp, inv, act):
    """float64 sums over the kernels' float32 mask and xhat, and the sums of magnitudes."""
    a, b, mean, rstd = (bnp[i].cpu().view(1, -1, 1, 1) for i in range(4))
    yf = y.cpu().float()
    d = _gathered64(dz, inv, y.shape[1])
    g = _g64(d, yf, bnp, act)
    xhat = ((yf - mean) * rstd).double()
    t0, t1 = rows(g), rows(g * xhat)
    return torch.stack([t0.sum(0), t1.sum(0)]), torch.stack([t0.abs().sum(0), t1.abs().sum(0)])


def _assert_sums(sums, want, mag, msg):
    err = (sums.cpu().double() - want).abs()
    bound = 1e-5 * mag + 1e-6 * want.abs() + 1e-30
    assert (err <= bound).all(), f"sums {msg}: worst err/bound {(err / bound).max().item():.3g}"


class ReduceCase(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    inv: object  # None, or "inv": a channel map of a gather
    act: str
    dz_dtype: torch.dtype
    dz_layout: str
    y: str  # how y is made: "bn_stats" or "f32"

    @property
    def id(self):
        return "N{}C{}H{}W{}-{}-{}-{}-{}-y{}".format(*self[:4], self.inv, self.act,
                                                   str(self.dz_dtype)[6:], self.dz_layout, self.y)


REDUCE_CASES = [
    ReduceCase(N=2, C=20, H=6, W=7, inv=None, act="relu", dz_dtype=torch.bfloat16, dz_layout="cl", y="bn_stats"),
    ReduceCase(N=3, C=37, H=5, W=4, inv="inv", act="relu", dz_dtype=torch.bfloat16, dz_layout="cl", y="bn_stats"),
    ReduceCase(N=2, C=20, H=6, W=7, inv=None, act="identity", dz_dtype=torch.float32, dz_layout="nchw", y="f32"),
    ReduceCase(N=2, C=20, H=6, W=7, inv=None, act="relu6", dz_dtype=torch.bfloat16, dz_layout="cl", y="bn_stats"),
    ReduceCase(N=2, C=20, H=6, W=7, inv=None, act="silu", dz_dtype=torch.bfloat16, dz_layout="cl", y="bn_stats"),
    ReduceCase(N=2, C=20, H=6, W=7, inv=None, act="hardswish", dz_dtype=torch.bfloat16, dz_layout="cl",
               y="bn_stats"),
    # 4900 rows, 128 a tile: 39 row tiles
    ReduceCase(N=1, C=20, H=70, W=70, inv=None, act="relu", dz_dtype=torch.bfloat16, dz_layout="cl", y="bn_stats"),
    # two channel blocks
    ReduceCase(N=2, C=140, H=3, W=4, inv="inv", act="relu", dz_dtype=torch.float32, dz_layout="nchw", y="bn_stats"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in REDUCE_CASES])
def test_reduce_sums(device, poisoned, case):
    N, C, H, W, inv_kind, act, dz_dtype, dz_layout, y_kind = case
    seed = fresh_seed()
    msg = f"seed={seed} case={case.id}"
    g = gen(seed)
    y, bnp, dz, inv, _, _ = _setup(N, C, H, W, inv_kind, dz_dtype, dz_layout, y_kind, device, g)
    sums = bn_relu_bwd_reduce(dz, y, bnp, inv, act)
    assert sums.shape == (2, C) and sums.dtype == torch.float32, msg
    want, mag = _sums64(dz, y, bnp, inv, act)
    _assert_sums(sums, want, mag, msg)
    ref = bn_relu_bwd_reduce_reference(dz.cpu(), y.cpu(), bnp.cpu(), None if inv is None else inv.cpu(), act)
    _assert_sums(ref, want, mag, msg + " (reference)")
    if inv is not None:  # channels nobody reads get exactly nothing
        dead = (inv.cpu() < 0)
        assert dead.any() and sums[:, dead].abs().max().item() == 0, msg


class BwdCase(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    inv: object  # None, or "inv": a channel map of a gather
    act: str
    stats: str  # "train" or "eval" (no sums)
    dz_dtype: torch.dtype
    dz_layout: str
    y: str  # how y is made: "bn_stats" or "f32"
    pad_to: int
    bits: int

    @property
    def id(self):
        return "N{}C{}H{}W{}-{}-{}-{}-{}-{}-y{}-pad{}-b{}".format(*self[:4], self.inv, self.act,
                                                                self.stats, str(self.dz_dtype)[6:], *self[8:])


CASES = [
    BwdCase(N=2, C=20, H=6, W=7, inv=None, act="relu", stats="train", dz_dtype=torch.bfloat16, dz_layout="cl",
            y="bn_stats", pad_to=16, bits=8),  # Cp = 32
    BwdCase(N=3, C=37, H=5, W=4, inv="inv", act="relu", stats="train", dz_dtype=torch.bfloat16, dz_layout="cl",
            y="bn_stats", pad_to=16, bits=8),  # Cp = 48
    BwdCase(N=2, C=16, H=5, W=5, inv=None, act="identity", stats="train", dz_dtype=torch.float32, dz_layout="nchw", y="f32",
            pad_to=16, bits=6),  # no padding, 6 bits
    BwdCase(N=2, C=20, H=6, W=7, inv=None, act="relu", stats="eval", dz_dtype=torch.bfloat16, dz_layout="nchw",
            y="bn_stats", pad_to=16, bits=8),  # no sums
    BwdCase(N=1, C=9, H=30, W=40, inv=None, act="relu", stats="train", dz_dtype=torch.bfloat16, dz_layout="cl",
            y="bn_stats", pad_to=16, bits=8),  # 1200 rows: 5 row tiles
    BwdCase(N=2, C=140, H=3, W=4, inv="inv", act="relu", stats="train", dz_dtype=torch.bfloat16, dz_layout="cl",
            y="bn_stats", pad_to=16, bits=8),  # Cp = 144: 2 channel blocks
    BwdCase(N=2, C=7, H=4, W=5, inv=None, act="relu", stats="train", dz_dtype=torch.bfloat16, dz_layout="cl",
            y="bn_stats", pad_to=1, bits=8),  # pad_to 1: Cp = C
    BwdCase(N=2, C=20, H=6, W=7, inv=None, act="relu6", stats="train", dz_dtype=torch.bfloat16, dz_layout="cl",
            y="bn_stats", pad_to=16, bits=8),
    BwdCase(N=2, C=20, H=6, W=7, inv=None, act="hardswish", stats="train", dz_dtype=torch.bfloat16, dz_layout="cl",
            y="bn_stats", pad_to=16, bits=8),
]


def _run_both(fn_kernel, fn_ref, seed):
    """The kernel and the reference, each after ``manual_seed(seed)`` so their tickets match."""
    ebkernels.manual_seed(seed)
    k = fn_kernel()
    ebkernels.manual_seed(seed)
    r = fn_ref()
    return k, r


# every case with the shift scale, a few with absmax (SPEC §2: max|dy|·S/(S-1))
BIT_CASES = ([(c, r, "shift") for c in CASES for r in ("nearest", "stochastic")]
             + [(CASES[0], "nearest", "absmax"), (CASES[1], "stochastic", "absmax"), (CASES[2], "stochastic", "absmax"),
                (CASES[3], "nearest", "absmax")])


@pytest.mark.parametrize("case, rounding, scale_mode", [pytest.param(c, r, m, id=f"{c.id}-{r}-{m}") for c, r, m in BIT_CASES])
def test_absmax_and_codes_bit_identical(device, poisoned, rng_state, case, rounding, scale_mode):
    N, C, H, W, inv_kind, act, stats, dz_dtype, dz_layout, y_kind, pad_to, nbits = case
    seed = fresh_seed()
    msg = f"seed={seed} case={case.id} {rounding} {scale_mode}"
    g = gen(seed)
    y, bnp, dz, inv, _, _ = _setup(N, C, H, W, inv_kind, dz_dtype, dz_layout, y_kind, device, g)
    sums = bn_relu_bwd_reduce(dz, y, bnp, inv, act) if stats == "train" else None
    stoch = rounding == "stochastic"
    cpu = [None if t is None else t.cpu() for t in (dz, y, bnp, sums, inv)]
    state = _rng.device_state(device)

    def kernel():
        before = state[1].item()
        amax, = bn_relu_bwd(dz, y, bnp, sums, inv, act, "absmax", nbits, stoch)
        assert state[1].item() == before + stoch, f"one ticket per stochastic absmax pass {msg}"
        return amax, bn_relu_bwd(dz, y, bnp, sums, inv, act, "codes", nbits, stoch, pad_to, amax,
                                 scale_mode=scale_mode)

    def reference():
        amax, = bn_relu_bwd_reference(*cpu, act, "absmax", nbits, stoch, pad_to, None, None, True)
        return amax, bn_relu_bwd_reference(*cpu, act, "codes", nbits, stoch, pad_to, amax, None, True, scale_mode)

    (amax, (qe, qe_cm, se)), (amax_r, (qe_r, qe_cm_r, se_r)) = _run_both(kernel, reference, seed % 1000)
    # absmax: the bits of max |dy| and the ticket (the counter before; 0 for nearest rounding)
    assert amax.dtype == torch.int32 and amax.shape == (2,), msg
    assert torch.equal(amax.cpu(), amax_r), f"absmax {amax.tolist()} vs {amax_r.tolist()} {msg}"
    assert amax[1].item() == 0, msg  # first ticket after manual_seed
    dy, _, _ = bn_grad_in_reference(_gathered64(dz, inv, C).to(dz_dtype).to(torch.float32), cpu[1], cpu[2], cpu[3],
                                    N * H * W, act)
    assert bits_equal(f32_of_bits(amax[:1]), dy.abs().amax().reshape(1)), msg
    # codes: both layouts, padding zero, the scale of max |dy| (Shift, or absmax)
    Cp = -(-C // pad_to) * pad_to if pad_to > 1 else C
    assert qe.shape == qe_cm.shape == (N, Cp, H, W) and qe.dtype == qe_cm.dtype == torch.int8, msg
    assert qe.is_contiguous(memory_format=CL) and qe_cm.permute(1, 0, 2, 3).is_contiguous(), msg
    assert bits_equal(se.cpu(), se_r), msg
    assert bits_equal(se.cpu(), scale_reference(dy.abs().amax(), scale_mode, nbits)), msg
    assert torch.equal(qe.cpu(), qe_r), f"NHWC codes {msg}: {mismatch(qe.cpu(), qe_r)}"
    assert torch.equal(qe_cm.cpu(), qe_cm_r), f"channel-major codes {msg}: {mismatch(qe_cm.cpu(), qe_cm_r)}"
    assert torch.equal(qe_cm.cpu(), qe.cpu()), msg
    if Cp > C:
        assert qe[:, C:].abs().max().item() == 0 and qe_cm[:, C:].abs().max().item() == 0, f"padding {msg}"
    # what the codes stand for: nearest = round, stochastic = floor or ceil of the scaled dy
    S = 2 ** (nbits - 1)
    v = ((dy / se.cpu()) * S).clamp(-(S - 1), S - 1)
    q = qe[:, :C].cpu().float()
    if stoch:
        assert ((q == torch.floor(v)) | (q == torch.ceil(v))).all(), msg
        assert (q != torch.round(v)).any(), f"stochastic codes equal the nearest ones {msg}"
    else:
        assert torch.equal(q, torch.round(v)), msg
    if scale_mode == "absmax":  # max |dy| maps to code S-1 (nearest), S-1 or S-2 (stochastic)
        assert q.abs().max().item() == S - 1, msg


def test_stochastic_codes_keep_the_per_channel_sums_unbiased(device, rng_state):
    """QConfig's default E rounding (stochastic) in the fused path's codes pass: behind a training-mode
    BatchNorm the exact E sums to zero per channel; the codes' per-channel sums must equal, on average over
    fresh tickets, the sums of their exact expectation ``clip(dy/s·S)`` (clipping included), while
    rounding to nearest moves them (issue 22: the bias that made the BN running means lag)."""
    assert ebkernels.QConfig().rounding_e == "stochastic"
    seed = fresh_seed()
    msg = f"seed={seed}"
    g = gen(seed)
    N, C, H, W, R = 4, 16, 8, 8, 96
    y, bnp, dz, _, _, _ = _setup(N, C, H, W, None, torch.float32, "cl", "bn_stats", device, g)
    dz = (dz.float() ** 3).to(device)  # heavy tails: most entries far below the largest, as in training
    sums = bn_relu_bwd_reduce(dz, y, bnp, None, "relu")
    dy, = bn_relu_bwd(dz, y, bnp, sums, None, "relu", "float")
    assert (rows(dy.cpu()).double().sum(0).abs() <= 1e-3 * rows(dy.cpu()).double().abs().sum(0)).all(), msg
    S = 128
    total = torch.zeros(C, dtype=torch.float64)
    for _ in range(R):
        amax, = bn_relu_bwd(dz, y, bnp, sums, None, "relu", "absmax", 8, True)
        qe, _, se = bn_relu_bwd(dz, y, bnp, sums, None, "relu", "codes", 8, True, 16, amax)
        total += rows(qe[:, :C].cpu()).double().sum(0)
    v = rows(((dy.cpu() / se.cpu()) * S).clamp(-(S - 1), S - 1)).double()  # each code's expectation
    frac = v - torch.floor(v)
    sd = (frac * (1 - frac)).sum(0).sqrt() / R ** 0.5  # sd of the mean per-channel sum over R draws
    z = (total / R - v.sum(0)) / sd.clamp(min=1e-9)
    assert z.abs().max().item() < 5.5, f"per-channel sums biased, z = {z.tolist()} {msg}"
    # the nearest codes' per-channel sums: off by many standard deviations of the stochastic mean
    amax, = bn_relu_bwd(dz, y, bnp, sums, None, "relu", "absmax", 8, False)
    qn, _, _ = bn_relu_bwd(dz, y, bnp, sums, None, "relu", "codes", 8, False, 16, amax)
    zn = (rows(qn[:, :C].cpu()).double().sum(0) - v.sum(0)) / sd.clamp(min=1e-9)
    assert zn.abs().max().item() > 10, f"nearest rounding unbiased here? z = {zn.tolist()} {msg}"


@pytest.mark.parametrize("case", [pytest.param(CASES[i], id=CASES[i].id) for i in (0, 1, 2, 3, 5, 7, 8)])
def test_float_mode(device, poisoned, case):
    N, C, H, W, inv_kind, act, stats, dz_dtype, dz_layout, y_kind = case[:10]
    seed = fresh_seed()
    msg = f"seed={seed} case={case.id}"
    g = gen(seed)
    y, bnp, dz, inv, gamma, beta = _setup(N, C, H, W, inv_kind, dz_dtype, dz_layout, y_kind, device, g)
    sums = bn_relu_bwd_reduce(dz, y, bnp, inv, act) if stats == "train" else None
    cpu = [None if t is None else t.cpu() for t in (dz, y, bnp, sums, inv)]
    for out_dtype, cl_out in ((torch.float32, dz_layout == "cl"), (torch.bfloat16, dz_layout != "cl")):
        dy, = bn_relu_bwd(dz, y, bnp, sums, inv, act, "float", out_dtype=out_dtype, channels_last_out=cl_out)
        assert dy.dtype == out_dtype and dy.shape == (N, C, H, W), msg
        assert dy.is_contiguous(memory_format=CL if cl_out else torch.contiguous_format), msg
        dy_r, = bn_relu_bwd_reference(*cpu, act, "float", 8, False, 0, None, out_dtype, cl_out)
        assert bits_equal(dy.cpu(), dy_r), f"dy {out_dtype} {msg}: {mismatch(dy.cpu(), dy_r)}"
        # with another gradient of the same tensor added in the kernel, rounded once
        addend = torch.randn(N, C + 5, H, W, generator=g).to(out_dtype)
        for fmt in (CL, torch.contiguous_format):
            ad = addend.contiguous(memory_format=fmt)[:, :C]  # a channel prefix of a wider gradient, any layout
            ds, = bn_relu_bwd(dz, y, bnp, sums, inv, act, "float", out_dtype=out_dtype, channels_last_out=cl_out,
                              addend=ad.to(device))
            ds_r, = bn_relu_bwd_reference(*cpu, act, "float", 8, False, 0, None, out_dtype, cl_out, addend=ad)
            assert bits_equal(ds.cpu(), ds_r), f"dy + addend {out_dtype} {msg}: {mismatch(ds.cpu(), ds_r)}"
            assert ds.is_contiguous(memory_format=CL if cl_out else torch.contiguous_format), msg
            d32, = bn_relu_bwd(dz, y, bnp, sums, inv, act, "float", out_dtype=torch.float32)
            want = (d32.cpu() + ad.float()).to(out_dtype)
            assert bits_equal(ds.cpu().contiguous(), want.contiguous()), f"one rounding {msg}"
            assert ds.data_ptr() != ad.data_ptr()
        # and its max for the quantizer that reads it next: the bits of max |stored value|, a ticket if stochastic
        for stoch in (False, True):
            before = _rng.device_state(device)[1].item()
            dm, amax = bn_relu_bwd(dz, y, bnp, sums, inv, act, "float_absmax", stochastic=stoch, out_dtype=out_dtype,
                                   channels_last_out=cl_out, addend=addend[:, :C].to(device))
            assert bits_equal(dm.cpu(), ds_r), msg  # the same values as mode "float"
            want_bits = dm.float().abs().amax().cpu().view(torch.int32).item()
            assert amax.dtype == torch.int32 and amax.shape == (2,) and amax[0].item() == want_bits, msg
            after = _rng.device_state(device)[1].item()
            assert after == before + stoch and (amax[1].item() == before if stoch else amax[1].item() == 0), msg
    with pytest.raises(ValueError, match="addend"):
        bn_relu_bwd(dz, y, bnp, sums, inv, act, "float", addend=torch.zeros(N, C, H, W + 1))
    # semantics: the float64 BatchNorm(+ReLU) backward, same mask and statistics (within float32 rounding)
    a, b, mean, rstd = (bnp[i].cpu().double().view(1, -1, 1, 1) for i in range(4))
    yf = y.cpu().float()
    d = _gathered64(dz, inv, C)
    g64 = _g64(d, yf, bnp, act)
    xhat = (yf.double() - mean) * rstd
    if sums is None:
        want = a * g64
    else:
        want = a * (g64 - g64.mean((0, 2, 3), keepdim=True) - xhat * (g64 * xhat).mean((0, 2, 3), keepdim=True))
    dy, = bn_relu_bwd(dz, y, bnp, sums, inv, act, "float")
    torch.testing.assert_close(dy.cpu().double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                               msg=lambda m: f"dy vs float64 {msg}: {m}")
    if act == "identity" and inv is None and stats == "train":  # and autograd's own BatchNorm backward
        x64 = y.cpu().double().requires_grad_()
        F.batch_norm(x64, None, None, gamma.cpu().double(), beta.cpu().double(), True, 0.0, EPS).backward(d)
        torch.testing.assert_close(dy.cpu().double(), x64.grad, rtol=1e-3, atol=1e-3 * x64.grad.abs().max().item())


def test_gather_backward_after_bn_stats_with_keep(device, poisoned):
    seed = fresh_seed()
    msg = f"seed={seed}"
    g = gen(seed)
    C, K = 10, 6
    x = torch.randn((2, C, 4, 5), generator=g).to(device)
    gamma, beta = torch.randn(C, generator=g).to(device), torch.randn(C, generator=g).to(device)
    idx = torch.randperm(C, generator=g)[:K]
    inv = torch.full((C,), -1, dtype=torch.int32)
    inv[idx] = torch.arange(K, dtype=torch.int32)
    inv = inv.to(device)
    xb, _, bnp, _ = bn_stats(x, gamma, beta, keep=inv)  # as FusedBlockFunction.forward (input "bn" + select)
    dz = torch.randn((2, K, 4, 5), generator=g).to(torch.bfloat16).contiguous(memory_format=CL).to(device)
    sums = bn_relu_bwd_reduce(dz, xb, bnp, inv)
    dx, = bn_relu_bwd(dz, xb, bnp, sums, inv, "relu", "float")
    dropped = (inv < 0).cpu()
    assert torch.isfinite(sums).all() and sums.cpu()[:, dropped].abs().max() == 0, f"sums {sums} {msg}"
    assert torch.isfinite(dx).all() and dx.cpu()[:, dropped].abs().max() == 0, f"dx of dropped channels {msg}"


def test_opcheck(rng_state):
    g = gen(2)
    y, bnp, dz, inv, _, _ = _setup(2, 6, 3, 4, "inv", torch.bfloat16, "cl", "bn_stats", torch.device("cpu"), g)
    torch.library.opcheck(_reduce_op, (dz, y, bnp, inv, "relu"))
    sums = bn_relu_bwd_reduce(dz, y, bnp, inv)
    # the op declares the device random state it may advance (a mutated input): opcheck's AOT-dispatch check
    # reruns the op on the advanced state, so schema, fake tensors and autograd registration
    st = _rng.device_state("cpu")
    torch.library.opcheck(_bwd_op, (dz, y, bnp, sums, inv, "relu", "absmax", 8, False, 16, None, None, True, "shift",
                                    None, st),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    amax, = bn_relu_bwd(dz, y, bnp, sums, inv, "relu", "absmax")
    torch.library.opcheck(_bwd_op, (dz, y, bnp, sums, inv, "relu", "codes", 8, False, 16, amax, None, True, "shift",
                                    None, st),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(_bwd_op, (dz, y, bnp, None, inv, "silu", "float", 8, False, 16, None, torch.float32, False,
                                    "shift", None, st),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(_bwd_op, (dz, y, bnp, sums, inv, "relu", "float", 8, False, 16, None, torch.bfloat16, True,
                                    "shift", torch.randn(y.shape, generator=g).to(torch.bfloat16), st),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_the_default_activation_is_relu(device):
    """``bn_relu_bwd`` without ``act`` is the ReLU backward its name says (the default was once ``True``, which no
    activation accepts), bit for bit the same as ``act="relu"``; an unknown activation names the accepted ones."""
    g = gen(fresh_seed())
    y, bnp, dz, inv, _, _ = _setup(2, 6, 3, 4, None, torch.bfloat16, "cl", "bn_stats", device, g)
    sums = bn_relu_bwd_reduce(dz, y, bnp)
    default, = bn_relu_bwd(dz, y, bnp, sums, mode="float")
    relu, = bn_relu_bwd(dz, y, bnp, sums, act="relu", mode="float")
    assert bits_equal(default.cpu(), relu.cpu())
    with pytest.raises(ValueError, match="accepted: identity, relu"):
        bn_relu_bwd(dz, y, bnp, sums, act="gelu", mode="float")


def test_direct_path_returns_what_the_registered_op_returns(rng_state):
    """The op's direct path (``_bwd_direct``: no empty tensors padding its results to three) gives the registered
    op's results, bit for bit, in every mode, and advances the random state the same (stochastic absmax)."""
    g = gen(fresh_seed())
    y, bnp, dz, inv, _, _ = _setup(2, 6, 3, 5, "inv", torch.bfloat16, "cl", "bn_stats", torch.device("cpu"), g)
    sums = bn_relu_bwd_reduce(dz, y, bnp, inv)
    st = _rng.device_state("cpu")
    seed = fresh_seed() % 1000
    for mode, stochastic in (("absmax", True), ("codes", False), ("float", False), ("float_absmax", False)):
        amax = None
        if mode == "codes":
            amax, = bn_relu_bwd(dz, y, bnp, sums, inv, "relu", "absmax")
        args = (dz, y, bnp, sums, inv, "relu", mode, 8, stochastic, 16, amax, torch.float32, True, "shift", None, st)
        ebkernels.manual_seed(seed)
        direct = _bwd_op(*args)
        state = st.clone()
        ebkernels.manual_seed(seed)
        registered = torch.ops.ebkernels.bn_relu_bwd(*args)
        assert torch.equal(state, st), mode
        assert len(direct) == {"codes": 3, "float_absmax": 2}.get(mode, 1) and len(registered) == 3, mode
        for a, b in zip(direct, registered):
            assert a.dtype == b.dtype and a.shape == b.shape and bits_equal(a, b), mode
