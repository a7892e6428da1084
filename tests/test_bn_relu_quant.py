"""BatchNorm statistics of a float tensor (``bn_stats``) and BatchNorm-apply + ReLU + quantize in one
pass (``bn_relu_quant``), SPEC §9.

Exact where the math is exact: the bfloat16 copy, per-channel max/min, ``bnp`` from the kernel's own
statistics (the same float32 operations), the bits of max |z| — which must equal the max over every
element of z, computed elementwise (the per-channel-extreme trick is exact, gamma < 0 / gamma == 0 /
all-negative channels included) — and the codes, which must equal the quantizer's codes of z itself.
Mean and variance against float64 within float tolerance; running statistics against ``nn.BatchNorm2d``
on the bfloat16-rounded input."""
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn

from ebkernels import force_backend
from ebkernels.ops.fused.bn_math import act_absmax_reference, bn_act_reference, bn_params_reference
from ebkernels.ops.fused.bn_relu_quant import _bn_relu_quant_op, _bn_stats_op, bn_relu_quant, bn_relu_quant_reference, bn_stats, bn_stats_reference
from ebkernels.ops._launch import elementwise_tiles
from ebkernels.ops.quantize import quantize_reference
from ebkernels.ops._scale import shift_scale_reference
from helpers import CL, bits_equal, block_max, bnp_exact, each_block_max, fresh_seed, gen, mismatch, rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: no intra-op thread contention

EPS = 1e-5


def _input(shape, g, layout, device):
    """Per-channel offset and spread (so mean and variance mean something), in the given memory layout."""
    N, C, H, W = shape
    off = torch.randn(C, generator=g).view(1, C, 1, 1) * 3
    spread = torch.exp(torch.randn(C, generator=g)).view(1, C, 1, 1)
    if layout == "strided":  # a non-dense view: every other column of a wider tensor
        x = (torch.randn((N, C, H, 2 * W), generator=g) * spread + off)[..., ::2]
    else:
        x = torch.randn(shape, generator=g) * spread + off
        if layout == "cl":
            x = x.contiguous(memory_format=CL)
    return x.to(device)


def _affine(C, g, device):
    gamma = torch.randn(C, generator=g)
    gamma[0] = -gamma[0].abs() - 0.5  # one negative gamma at least
    return gamma.to(device), torch.randn(C, generator=g).to(device)


def _check_moments(chan, xb, msg):
    r = rows(xb.cpu()).double()
    assert torch.equal(chan[2].cpu(), r.amax(0).float()), f"max {msg}"
    assert torch.equal(chan[3].cpu(), r.amin(0).float()), f"min {msg}"
    mean, var = r.mean(0), r.var(0, unbiased=False)
    torch.testing.assert_close(chan[0].cpu().double(), mean, rtol=1e-6, atol=1e-6 * r.abs().max().item(),
                               msg=lambda m: f"mean {msg}: {m}")
    torch.testing.assert_close(chan[1].cpu().double(), var, rtol=1e-5, atol=0, msg=lambda m: f"var {msg}: {m}")


# (N, C, H, W, layout): C picks the tile (elementwise_tiles), N·H·W the number of row tiles
STATS_CASES = [
    (3, 20, 9, 11, "nchw"),    # 297 rows, 128 a tile: 3 tiles, the last one partial
    (3, 5, 6, 11, "cl"),       # one tile
    (2, 130, 3, 5, "strided"),  # two channel blocks, a non-dense input
    (1, 20, 70, 70, "cl"),     # 4900 rows: 39 row tiles > 32: both merge levels, a partial second group
]


@pytest.mark.parametrize("case", STATS_CASES, ids=lambda c: "N{}C{}H{}W{}-{}".format(*c))
def test_bn_stats_matches_float64_and_reference(device, poisoned, case):
    *shape, layout = case
    C = shape[1]
    seed = fresh_seed()
    msg = f"seed={seed} case={case}"
    g = gen(seed)
    x = _input(shape, g, layout, device)
    gamma, beta = _affine(C, g, device)
    tiles = -(-shape[0] * shape[2] * shape[3] // elementwise_tiles(C, 2048)[0])  # bn_stats: 2K-element tiles
    assert tiles > 32 or shape[2] != 70, "the large case must exercise the two-level merge"
    xb, chan, bnp, zmax = bn_stats(x, gamma, beta)
    assert xb.dtype == torch.bfloat16 and xb.is_contiguous(memory_format=CL), msg
    assert bits_equal(xb.cpu(), x.cpu().to(torch.bfloat16)), f"bf16 copy {msg}: {mismatch(xb, x.to(torch.bfloat16))}"
    _check_moments(chan, xb, msg)
    # bnp: exactly the (correctly rounded) float32 formula on the kernel's statistics, close to the float64 one
    bnp_ref = bnp_exact(chan[0], chan[1], gamma, beta, EPS)
    assert bits_equal(bnp.cpu(), bnp_ref), f"bnp {msg}: {mismatch(bnp.cpu(), bnp_ref)}"
    r = rows(xb.cpu()).double()
    rstd64 = 1 / torch.sqrt(r.var(0, unbiased=False) + EPS)
    a64 = gamma.cpu().double() * rstd64
    torch.testing.assert_close(bnp[0].cpu().double(), a64, rtol=2e-5, atol=0)
    torch.testing.assert_close(bnp[3].cpu().double(), rstd64, rtol=2e-5, atol=0)
    # zmax: the bits of max z over every element, z computed elementwise with these bnp
    z = bn_act_reference(xb.cpu(), bnp.cpu(), "relu")
    assert zmax.dtype == torch.int32 and zmax.shape == (-(-x.shape[1] // 16),)
    assert bits_equal(block_max(zmax), z.abs().amax()), f"zmax {msg}"
    assert each_block_max(zmax, z, elementwise_tiles(x.shape[1], 2048)[1]), f"zmax per channel block {msg}"
    # the op's reference path computes the same statistics
    with force_backend("reference"):
        xb_r, chan_r, bnp_r, zmax_r = bn_stats(x, gamma, beta)
    assert bits_equal(xb_r.cpu(), xb.cpu()) and torch.equal(chan_r[2:].cpu(), chan[2:].cpu()), msg
    torch.testing.assert_close(chan_r.cpu(), chan.cpu(), rtol=1e-5, atol=1e-6 * r.abs().max().item())


def _extreme_channels(C, g, device):
    """gamma/beta with the cases that matter for the per-channel-extreme trick: several gamma < 0 (the
    max of z at the channel's *min*), gamma == 0 (z == beta), a channel whose z is all negative (ReLU:
    0), and the largest |gamma| negative so the global max comes from a min."""
    gamma = torch.randn(C, generator=g).abs() + 0.1
    beta = torch.randn(C, generator=g)
    gamma[1::3] *= -1          # gamma < 0
    gamma[2] = 0.0             # z == beta everywhere
    gamma[5], beta[5] = 0.0, 0.0  # z == +-0 everywhere
    gamma[3], beta[3] = 1e-3, -2.0  # z < 0 everywhere: ReLU -> 0
    gamma[4] = -8.0            # the largest scale, negative
    return gamma.to(device), beta.to(device)


@pytest.mark.parametrize("act", ["relu", "identity", "relu6", "silu", "hardswish"])
@pytest.mark.parametrize("stats", ["batch", "running"])
def test_zmax_from_channel_extremes_is_exact(device, poisoned, act, stats):
    """The scale derived from the zmax bits equals Shift(max over all elements of z), z computed elementwise;
    the codes are the quantizer's codes of z. SiLU: the kernel's exp and torch's may differ by one float32
    rounding, so there max |z| agrees to an ulp and a code may differ by one."""
    seed = fresh_seed()
    msg = f"seed={seed} act={act} stats={stats}"
    relu = act in ("relu", "relu6")
    exact = act != "silu"
    g = gen(seed)
    N, C, H, W = 2, 24, 7, 9
    # skewed channels (a long negative tail): max and min sit at very different distances from the mean
    x = (-torch.exp(torch.randn((N, C, H, W), generator=g) * 1.5) + torch.randn(C, generator=g).view(1, C, 1, 1))
    x = x.contiguous(memory_format=CL).to(device)
    gamma, beta = _extreme_channels(C, g, device)
    rm = rv = None
    if stats == "running":  # eval: the running statistics; all-negative x then really gives z < 0
        rm = torch.randn(C, generator=g).to(device)
        rv = (torch.rand(C, generator=g) + 0.5).to(device)
    xb, chan, bnp, zmax = bn_stats(x, gamma, beta, rm, rv, batch_stats=stats == "batch", act=act)
    z = bn_act_reference(xb.cpu(), bnp.cpu(), act)
    zabs = z.abs()
    if exact:
        assert bits_equal(block_max(zmax), zabs.amax()), \
            f"zmax {block_max(zmax).item()} != max|z| {zabs.amax().item()} {msg}"
    else:
        torch.testing.assert_close(block_max(zmax), zabs.amax(), rtol=3e-7, atol=0, msg=msg)
    # the global max really comes from a gamma < 0 channel's minimum (else the test proves less)
    if act == "relu":
        top = rows(zabs).amax(0).argmax().item()
        assert gamma[top].item() < 0, msg
        assert z[:, 3].abs().max().item() == 0.0, msg
    # extremes-based reference agrees too
    ref = act_absmax_reference(chan[2].cpu(), chan[3].cpu(), bnp.cpu(), act)
    if exact:
        assert bits_equal(block_max(zmax), ref), msg
    else:
        torch.testing.assert_close(block_max(zmax), ref, rtol=3e-7, atol=0, msg=msg)
    # the fused apply: scale == Shift(max |z|), codes == quantize(z) bit for bit
    q, s = bn_relu_quant(xb, bnp, zmax, act=act, pad_to=1)
    q_ref, s_ref = quantize_reference(z, 8)
    assert bits_equal(s.cpu(), shift_scale_reference(zabs.amax())) and bits_equal(s.cpu(), s_ref), msg
    if exact:
        assert torch.equal(q.cpu(), q_ref), f"codes {msg}: {mismatch(q.cpu(), q_ref)}"
    else:
        diff = (q.cpu().int() - q_ref.int()).abs()
        assert diff.max().item() <= 1 and diff.sum().item() <= 3, f"codes {msg}: {mismatch(q.cpu(), q_ref)}"
    if relu:
        assert q.min().item() >= 0, msg


def test_all_channels_dead_gives_scale_one(device, poisoned):
    """ReLU kills every channel: max z = 0, scale 1 (never 0 or NaN), codes 0."""
    seed = fresh_seed()
    g = gen(seed)
    x = torch.randn((2, 9, 5, 6), generator=g).to(device)
    gamma = torch.randn(9, generator=g).to(device)
    beta = torch.full((9,), -50.0, device=device)
    xb, _, bnp, zmax = bn_stats(x, gamma, beta)
    assert block_max(zmax).item() == 0, f"seed={seed}"
    q, s = bn_relu_quant(xb, bnp, zmax)
    assert s.item() == 1.0 and q.shape == (2, 16, 5, 6) and q.abs().max().item() == 0, f"seed={seed}"


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_running_stats_like_batchnorm2d(device, poisoned, momentum, backend):
    """Three training steps (bn_stats with update, bn_relu_quant counting the batch), then eval: the running
    statistics, num_batches_tracked and the normalised output follow nn.BatchNorm2d on the bf16 input."""
    seed = fresh_seed()
    msg = f"seed={seed} momentum={momentum} backend={backend}"
    g = gen(seed)
    C = 11
    bn = nn.BatchNorm2d(C, momentum=momentum, eps=EPS).to(device).requires_grad_(False)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C, generator=g))
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(3)
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    with force_backend(backend):
        for step in range(3):
            x = _input((2 + step, C, 5, 7), g, "cl" if step % 2 else "nchw", device)
            xb, chan, bnp, zmax = bn_stats(x, bn.weight, bn.bias, rm, rv, nbt, momentum, EPS, batch_stats=True,
                                           update=True)
            assert nbt.item() == bn.num_batches_tracked.item(), "bn_stats must leave the counter to the apply"
            z, one = bn_relu_quant(xb, bnp, zmax, nbt, out_dtype=torch.float32)
            bn.train()
            with torch.no_grad():
                want = torch.relu(bn(xb.float()))
            assert nbt.item() == bn.num_batches_tracked.item(), f"num_batches_tracked step {step} {msg}"
            torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6, msg=lambda m: f"rm {msg}: {m}")
            torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6, msg=lambda m: f"rv {msg}: {m}")
            torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"z {msg}: {m}")
        # eval: the running statistics normalise, nothing moves
        bn.eval()
        x = _input((2, C, 4, 3), g, "cl", device)
        before = (rm.clone(), rv.clone(), nbt.clone())
        xb, chan, bnp, zmax = bn_stats(x, bn.weight, bn.bias, rm, rv, nbt, momentum, EPS, batch_stats=False,
                                       update=False)
        z, _ = bn_relu_quant(xb, bnp, zmax, None, out_dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(before, (rm, rv, nbt))), f"eval moved the buffers {msg}"
    params = (rm, rv, bn.weight, bn.bias, EPS)  # the reference on the tensors' own device (its sqrt)
    want_bnp = bn_params_reference(*params).cpu() if backend == "reference" else bnp_exact(*params)
    assert bits_equal(bnp.cpu(), want_bnp), f"eval bnp {msg}: {mismatch(bnp.cpu(), want_bnp)}"
    with torch.no_grad():
        want = torch.relu(bn(xb.float()))
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"eval z {msg}: {m}")


class ApplyCase(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    act: str  # signed codes unless relu / relu6
    index: object  # None, or a gather of kept channels: "perm" (any order) / "sorted"
    pad_to: int
    bits: int
    scale_mode: str  # shift, wage (fixed scale) or absmax
    y: str  # y's kind: "bn_stats" (bn_stats' bf16 copy), "f32", "bf16_nchw"

    @property
    def id(self):
        return "C{}-{}-{}-pad{}-b{}-{}-{}".format(self.C, self.act, self.index, self.pad_to,
                                                  self.bits, self.scale_mode, self.y)


APPLY_CASES = [
    # Kp = 32
    ApplyCase(N=2, C=20, H=5, W=7, act="relu", index=None, pad_to=16, bits=8, scale_mode="shift", y="bn_stats"),
    # signed codes
    ApplyCase(N=2, C=20, H=5, W=7, act="identity", index=None, pad_to=16, bits=8, scale_mode="shift", y="bn_stats"),
    # clipped at 6; signed and non-monotone
    ApplyCase(N=2, C=20, H=5, W=7, act="relu6", index=None, pad_to=16, bits=8, scale_mode="shift", y="bn_stats"),
    ApplyCase(N=2, C=20, H=5, W=7, act="hardswish", index=None, pad_to=16, bits=8, scale_mode="shift", y="bn_stats"),
    # a gather of 21 channels, Kp = 32
    ApplyCase(N=3, C=37, H=4, W=5, act="relu", index="perm", pad_to=16, bits=6, scale_mode="shift", y="bn_stats"),
    # 13 kept, 324 rows: 2 row tiles
    ApplyCase(N=4, C=20, H=9, W=9, act="relu", index="sorted", pad_to=16, bits=8, scale_mode="shift", y="bn_stats"),
    # any float y (contiguous fp32), no padding needed
    ApplyCase(N=1, C=16, H=6, W=6, act="relu", index=None, pad_to=16, bits=8, scale_mode="shift", y="f32"),
    # no padding, WAGE's fixed scale, 4 bits
    ApplyCase(N=2, C=7, H=5, W=3, act="identity", index=None, pad_to=1, bits=4, scale_mode="wage", y="bf16_nchw"),
    # 130 kept of 140 -> Kp = 144: two channel blocks
    ApplyCase(N=1, C=140, H=3, W=4, act="relu", index="sorted", pad_to=16, bits=8, scale_mode="shift", y="bn_stats"),
    # absmax (SPEC §2): the scale max|z|·S/(S-1) from the per-channel extremes (act_extreme) is quantize(z)'s
    ApplyCase(N=2, C=20, H=5, W=7, act="relu", index=None, pad_to=16, bits=8, scale_mode="absmax", y="bn_stats"),
    # signed, gathered, 6 bits
    ApplyCase(N=3, C=37, H=4, W=5, act="identity", index="perm", pad_to=16, bits=6, scale_mode="absmax", y="bn_stats"),
    ApplyCase(N=2, C=7, H=5, W=3, act="relu", index=None, pad_to=1, bits=4, scale_mode="absmax", y="bf16_nchw"),
]


def _index(kind, C, g, device):
    if kind is None:
        return None, None
    K = {37: 21, 20: 13, 140: 130}[C]
    perm = torch.randperm(C, generator=g)[:K]
    idx = perm if kind == "perm" else perm.sort().values
    keep = torch.full((C,), -1, dtype=torch.int32)
    keep[idx] = torch.arange(K, dtype=torch.int32)
    return idx.to(device), keep.to(device)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in APPLY_CASES])
def test_bn_relu_quant_codes_bit_identical(device, poisoned, case):
    N, C, H, W, act, index_kind, pad_to, nbits, mode, y_kind = case
    seed = fresh_seed()
    msg = f"seed={seed} case={case}"
    g = gen(seed)
    x = _input((N, C, H, W), g, "nchw", device)
    gamma, beta = _affine(C, g, device)
    index, keep = _index(index_kind, C, g, device)
    xb, _, bnp, zmax = bn_stats(x, gamma, beta, act=act, keep=keep)
    y = {"bn_stats": xb, "f32": xb.float().contiguous(), "bf16_nchw": xb.contiguous()}[y_kind]
    nbt = torch.tensor(7, device=device)
    q, s = bn_relu_quant(y, bnp, zmax, nbt, index, nbits, mode, act, pad_to)
    assert nbt.item() == 8, msg
    K = C if index is None else index.numel()
    Kp = -(-K // pad_to) * pad_to if pad_to > 1 else K
    assert q.dtype == torch.int8 and q.shape == (N, Kp, H, W) and q.is_contiguous(memory_format=CL), msg
    assert q[:, K:].numel() == 0 or q[:, K:].abs().max().item() == 0, f"padded channels {msg}"
    q_ref, s_ref = bn_relu_quant_reference(y.cpu(), bnp.cpu(), zmax.cpu(), None, None if index is None
                                           else index.cpu(), nbits, mode, act, pad_to, None)
    assert bits_equal(s.cpu(), s_ref), msg
    assert torch.equal(q.cpu(), q_ref), f"codes {msg}: {mismatch(q.cpu(), q_ref)}"
    # and the quantizer's codes of the gathered z itself (zmax over the kept channels only)
    z = bn_act_reference(y.cpu(), bnp.cpu(), act)
    if index is not None:
        z = z.index_select(1, index.cpu())
    q_z, s_z = quantize_reference(z, nbits, mode=mode)
    assert bits_equal(s.cpu(), s_z), f"scale {s.item()} != quantize(z) scale {s_z.item()} {msg}"
    assert torch.equal(q[:, :K].cpu(), q_z), f"codes vs quantize(z) {msg}: {mismatch(q[:, :K].cpu(), q_z)}"
    if act in ("relu", "relu6"):
        assert q.min().item() >= 0, msg


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index_kind", [None, "perm"])
def test_bn_relu_quant_float_output(device, poisoned, out_dtype, index_kind):
    seed = fresh_seed()
    msg = f"seed={seed} {out_dtype} {index_kind}"
    g = gen(seed)
    C = 37
    x = _input((2, C, 6, 5), g, "cl", device)
    gamma, beta = _affine(C, g, device)
    index, keep = _index(index_kind, C, g, device)
    xb, _, bnp, zmax = bn_stats(x, gamma, beta, keep=keep)
    nbt = torch.tensor(0, device=device)
    z, one = bn_relu_quant(xb, bnp, zmax, nbt, index, out_dtype=out_dtype)
    assert nbt.item() == 1 and one.item() == 1.0, msg
    K = C if index is None else index.numel()
    assert z.dtype == out_dtype and z.shape == (2, K, 6, 5) and z.is_contiguous(memory_format=CL), msg
    z_ref, _ = bn_relu_quant_reference(xb.cpu(), bnp.cpu(), zmax.cpu(), None, None if index is None else index.cpu(),
                                       8, "shift", "relu", 0, out_dtype)
    assert bits_equal(z.cpu(), z_ref), f"{msg}: {mismatch(z.cpu(), z_ref)}"
    want = bn_act_reference(xb.cpu(), bnp.cpu(), "relu")
    want = want if index is None else want.index_select(1, index.cpu())
    assert bits_equal(z.cpu(), want.to(out_dtype)), msg


def test_bn_params_reference_is_bit_identical_to_the_kernel():
    """Eval mode: bnp straight from the running statistics, so kernel and reference see the same var (the
    kernel on the GPU where there is one, else under the interpreter; the reference on CPU)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = gen(3)
    C = 256
    rv = torch.rand(C, generator=g) * 10 + 0.01
    rv[0] = 3.4438347816467285
    rm, w, b = (torch.randn(C, generator=g) for _ in range(3))
    x = torch.randn((1, C, 2, 2), generator=g)
    _, _, bnp, _ = bn_stats(*(t.to(dev) for t in (x, w, b, rm, rv)), batch_stats=False)
    bnp = bnp.cpu()
    assert bits_equal(bnp, bnp_exact(rm, rv, w, b, EPS))  # the kernel is correctly rounded
    ref = bn_params_reference(rm, rv, w, b, EPS)
    assert bits_equal(bnp, ref), mismatch(bnp, ref)



def test_keep_restricts_only_zmax(device, poisoned):
    """A channel gather after the BatchNorm (ChannelSelection): ``keep`` changes max |z| only."""
    seed = fresh_seed()
    msg = f"seed={seed}"
    g = gen(seed)
    C = 12
    x = _input((2, C, 5, 4), g, "cl", device)
    gamma, beta = _affine(C, g, device)
    idx = torch.tensor([1, 2, 5, 8, 11])
    keep = torch.full((C,), -1, dtype=torch.int32)
    keep[idx] = torch.arange(idx.numel(), dtype=torch.int32)
    keep = keep.to(device)
    bufs = [(torch.randn(C, generator=g).to(device), (torch.rand(C, generator=g) + 0.5).to(device)) for _ in range(2)]
    bufs[1] = (bufs[0][0].clone(), bufs[0][1].clone())
    nbt = torch.tensor(2, device=device)
    _, _, bnp_all, zmax_all = bn_stats(x, gamma, beta, *bufs[0], nbt, 0.1, EPS, update=True)
    xb, _, bnp, zmax = bn_stats(x, gamma, beta, *bufs[1], nbt, 0.1, EPS, update=True, keep=keep)
    z = bn_act_reference(xb.cpu(), bnp_all.cpu(), "relu")
    assert bits_equal(block_max(zmax), z[:, idx].abs().amax()), f"zmax over the kept channels {msg}"
    assert bits_equal(bnp.cpu(), bnp_all.cpu()), f"bnp {msg}: {mismatch(bnp.cpu(), bnp_all.cpu())}"
    assert torch.equal(bufs[1][0], bufs[0][0]) and torch.equal(bufs[1][1], bufs[0][1]), f"running stats {msg}"


def test_opcheck():
    g = gen(0)
    x = torch.randn((2, 5, 3, 4), generator=g)
    w, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    rm, rv, nbt = torch.zeros(5), torch.ones(5), torch.tensor(0)
    torch.library.opcheck(_bn_stats_op, (x, w, b, rm, rv, nbt, 0.1, EPS, True, True, "relu", None))
    xr = x.to(torch.bfloat16).contiguous(memory_format=CL)  # its own xb: the op returns an empty one
    torch.library.opcheck(_bn_stats_op, (xr, w, b, rm, rv, nbt, 0.1, EPS, True, True, "relu", None, True))
    xb, _, bnp, zmax = bn_stats(x, w, b)
    none = x.new_empty((0,))  # an absent mutable argument (ops._buffers.absent)
    torch.library.opcheck(_bn_relu_quant_op, (xb, bnp, zmax, nbt, None, 8, "absmax", "relu", 16, None, none))
    torch.library.opcheck(_bn_relu_quant_op, (xb, bnp, zmax, none, torch.tensor([4, 0, 2]), 8, "shift", "silu", 0,
                                              torch.float32, none))
    ref = bn_stats_reference(x, w, b, None, None, None, 0.1, EPS, True, False, "relu")
    assert bits_equal(ref[0], xb)


@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_a_bf16_nhwc_input_is_its_own_xb(device, poisoned, layout):
    """``reuse_x``: a bfloat16 NHWC x (the fused residual stream) is returned as xb itself, not copied (the kernel
    skips the store); statistics, bnp and zmax bit-identical to the copying call. Any other x still gets a copy."""
    seed = fresh_seed()
    g = gen(seed)
    x = (torch.randn((3, 20, 7, 9), generator=g) * 2 + 1).to(torch.bfloat16).to(device)
    x = x.contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)
    gamma, beta = _affine(20, g, device)
    copied = bn_stats(x, gamma, beta)
    reused = bn_stats(x, gamma, beta, reuse_x=True)
    assert (reused[0] is x) == (layout == "cl"), f"seed={seed}"
    assert copied[0] is not x and bits_equal(copied[0].cpu(), x.cpu()), f"seed={seed}"
    assert all(bits_equal(a.cpu(), b.cpu()) for a, b in zip(copied[1:], reused[1:])), f"seed={seed}"
