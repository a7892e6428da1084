"""Device-side random state (``ebkernels._rng``) and the stochastic quantizer built on it.

``philox_uniform_reference`` must draw the very numbers of the Triton ``uniform``; stochastic rounding is
then checked bit for bit: ``quantize(rounding="stochastic", seed=int)`` against ``quantize_reference``
on both Triton paths (one program below 65,536 elements, absmax + codes kernels above) and any layout;
``seed=None`` takes one ticket of the device state per call (``manual_seed`` replays a sequence, the
reference path draws the same sequence); ``quantize_dequantize`` is ``dequantize(quantize(...))``; the G
quantization fused into the weight-grad GEMMs equals the reference path's separate quantization (fused in
the last program for small gradients, the GQ=1 codes pass for large ones)."""
from typing import NamedTuple

import pytest
import torch
import triton
import triton.language as tl

import ebkernels
from ebkernels import _rng, dequantize, force_backend, quantize
from ebkernels.ops._launch import MAX_TERMS
from ebkernels.ops.gemm.conv import conv2d_int8_wgrad_op, conv2d_int8_wgrad_reference
from ebkernels.ops._buffers import _POOLS
from ebkernels.ops.gemm.linear import _linear_int8_mm_op, linear_int8_mm_reference
from ebkernels.ops._launch import SMALL_NUMEL
from ebkernels.ops.quantize import _quantize_op, quantize_dequantize, quantize_reference
from helpers import CL, LaunchSpy, bits_equal, both_paths, codes, fresh_seed, gen, mismatch, spy_launches

# small tensors: no intra-op thread contention; the device random state put back after each test
pytestmark = pytest.mark.usefixtures("one_torch_thread", "rng_state")



@triton.jit
def _uniform_kernel(seed_ptr, ticket_ptr, offs_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    offs = tl.load(offs_ptr + i, mask=m, other=0)
    u = _rng.uniform(tl.load(seed_ptr), tl.load(ticket_ptr).to(tl.int32), offs)
    tl.store(out_ptr + i, u, mask=m)


def _offsets(g):
    """Element offsets as the kernels see them: small ones, and ones with a non-zero high word."""
    return torch.cat([torch.arange(0, 3000), torch.randint(0, 2**62, (500,), generator=g), 2**32 + torch.arange(-5, 5),
                      torch.tensor([2**40 + 7, 2**62 + 3, 2**63 - 1])])


@pytest.mark.parametrize("seed, ticket", [(0, 0), (1, 1), (2**32 + 5, 12345), (2**63 - 1, 2**31 - 1), (None, None)],
                         ids=["s0t0", "s1t1", "hi-seed", "max", "random"])
def test_philox_reference_is_the_triton_uniform(device, seed, ticket):
    s = fresh_seed()
    g = gen(s)
    if seed is None:
        seed, ticket = int(torch.randint(0, 2**63 - 1, (1,), generator=g)), int(torch.randint(0, 2**31 - 1, (1,),
                                                                                          generator=g))
    msg = f"seed={s} philox seed={seed} ticket={ticket}"
    offs = _offsets(g).to(device)
    out = torch.full(offs.shape, float("nan"), device=device)
    st = torch.tensor([seed], dtype=torch.int64, device=device)
    tk = torch.tensor([ticket], dtype=torch.int32, device=device)
    _uniform_kernel[(triton.cdiv(offs.numel(), 1024),)](st, tk, offs, out, offs.numel(), BLOCK=1024)
    ref = _rng.philox_uniform_reference(seed, ticket, offs.cpu())
    assert ref.dtype == torch.float32 and bits_equal(out.cpu(), ref), f"{msg}: {mismatch(out.cpu(), ref)}"
    assert ref.min() >= 0 and ref.max() < 1 and abs(ref[:3000].mean().item() - 0.5) < 0.03, msg
    # as 0-dim tensors too (the kernels' device state)
    ref_t = _rng.philox_uniform_reference(torch.tensor(seed), torch.tensor(ticket), offs.cpu())
    assert bits_equal(ref_t, ref), msg
    other = _rng.philox_uniform_reference(seed, ticket + 1, offs.cpu())
    assert (other != ref).float().mean() > 0.99, f"the ticket must change the numbers {msg}"
    # more offsets than one chunk of the reference (its cache-sized passes), in a 2-D shape
    big = torch.cat([offs.cpu(), torch.randint(0, 2**62, (2 * _rng._CHUNK + 77 - offs.numel() % 2,), generator=g)])
    big = big[: big.numel() // 2 * 2].view(2, -1)
    out = torch.full(big.shape, float("nan"), device=device)
    _uniform_kernel[(triton.cdiv(big.numel(), 1024),)](st, tk, big.to(device), out, big.numel(), BLOCK=1024)
    ref = _rng.philox_uniform_reference(torch.tensor(seed), torch.tensor(ticket), big)
    assert ref.shape == big.shape and bits_equal(out.cpu(), ref), f"chunked {msg}: {mismatch(out.cpu(), ref)}"


def _x(shape, layout, g, device):
    x = torch.randn(shape, generator=g) * 10 ** torch.empty(1).uniform_(-2, 2, generator=g).item()
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":
        x = torch.cat([x, x], -1)[..., ::2]
        assert not x.is_contiguous()
    elif layout == "permuted":
        x = x.transpose(0, 1)
    return x.to(device)


# (shape, layout, bits); 3,465 elements take the one-program kernel, 70,000 the absmax + codes kernels (the
# PyTorch Philox reference costs ~1 s per 70,000 elements on 2 cores: few large cases)
QCASES = [((5, 7, 9, 11), "contig", 8), ((5, 7, 9, 11), "cl", 4), ((5, 7, 9, 11), "strided", 8),
          ((33, 5), "permuted", 8), ((4, 25, 25, 28), "contig", 8), ((4, 25, 25, 28), "cl", 4),
          ((4, 25, 25, 28), "strided", 8)]


def _qid(c):
    return "x".join(map(str, c[0])) + "-" + c[1] + (f"-b{c[2]}" if len(c) > 2 else "")


def _large(x):
    return x.numel() > SMALL_NUMEL


@pytest.mark.parametrize("case", QCASES, ids=[_qid(c) for c in QCASES])
def test_stochastic_int_seed_bit_exact(device, case):
    shape, layout, bits = case
    s = fresh_seed()
    msg = f"seed={s} case={_qid(case)}"
    g = gen(s)
    x = _x(shape, layout, g, device)
    assert _large(x) == (shape[0] == 4), "both Triton paths are tested"
    seed = s % 10_000
    state = _rng.device_state(device).clone()
    q, sc = quantize(x, bits, rounding="stochastic", seed=seed)
    q_ref, s_ref = quantize_reference(x.cpu(), bits, stochastic=True, seed=seed)
    assert torch.equal(_rng.device_state(device), state), f"an explicit seed takes no ticket {msg}"
    assert bits_equal(sc.cpu(), s_ref), msg
    assert torch.equal(q.cpu(), q_ref), f"codes {msg}: {mismatch(q.cpu(), q_ref)}"
    S = 2 ** (bits - 1)
    v = (x.cpu().float() / s_ref * S).clamp(-(S - 1), S - 1)
    assert ((q_ref == torch.floor(v)) | (q_ref == torch.ceil(v))).all() and (q_ref != torch.round(v)).any(), msg
    if layout != "contig":  # the noise sits at the logical index: the layout does not change the codes
        q_c, _ = quantize(x.contiguous(), bits, rounding="stochastic", seed=seed)
        assert torch.equal(q_c.cpu(), q_ref), msg
    if x.dim() == 4 and layout != "strided":  # NHWC output, and NHWC with padded channels
        q_cl, _ = quantize(x, bits, rounding="stochastic", seed=seed, channels_last=True)
        assert q_cl.is_contiguous(memory_format=CL) and torch.equal(q_cl.cpu(), q_ref), msg
        C = x.shape[1]
        q_p, _ = quantize(x, bits, rounding="stochastic", seed=seed, channels_last=True, pad_channels_to=16)
        assert q_p.shape[1] == -(-C // 16) * 16 and torch.equal(q_p[:, :C].cpu(), q_ref), msg
        assert q_p[:, C:].abs().max() == 0, msg


@pytest.mark.parametrize("case", [QCASES[1], QCASES[3], QCASES[4]], ids=[_qid(QCASES[i][:2]) for i in (1, 3, 4)])
def test_device_seed_sequence(device, case):
    """seed=None: one ticket per call, fresh noise each call, replayed by manual_seed, the same on the
    reference path; call i draws philox(seed, element index, ticket i)."""
    shape, layout = case[:2]
    s = fresh_seed()
    msg = f"seed={s} case={_qid(case[:2])}"
    g = gen(s)
    x = _x(shape, layout, g, device)
    seed = s % 100_000
    calls = 2 if _large(x) else 3

    def sequence(backend):
        ebkernels.manual_seed(seed)
        st = _rng.device_state(device)
        out = []
        with force_backend(backend):
            for i in range(calls):
                assert st.tolist() == [seed, i], f"{backend} call {i} {msg}"
                out.append(quantize(x, rounding="stochastic")[0].cpu())
        assert st.tolist() == [seed, calls], msg
        return out

    a, b, r = sequence("auto"), sequence("auto"), sequence("reference")
    assert all(torch.equal(u, v) for u, v in zip(a, b)), f"manual_seed must replay the sequence {msg}"
    assert all(torch.equal(u, v) for u, v in zip(a, r)), f"Triton and reference sequences differ {msg}"
    assert all(not torch.equal(u, v) for u, v in zip(a, a[1:])), f"each call must draw fresh noise {msg}"
    if not _large(x):  # call 1 is the quantizer with the explicit (seed, ticket 1) noise
        xf = x.cpu().float()
        _, sc = quantize_reference(xf)
        u = _rng.philox_uniform_reference(seed, 1, torch.arange(x.numel())).view(x.shape)
        want = torch.floor((xf / sc * 128).clamp(-127, 127) + u).to(torch.int8)
        assert torch.equal(a[1], want), f"{msg}: {mismatch(a[1], want)}"


_DQ = {"small-cl": ((5, 7, 9, 11), "cl", torch.float32), "small-bf16": ((33, 5), "permuted", torch.bfloat16),
       "large-strided": ((4, 25, 25, 28), "strided", torch.float32)}


@pytest.mark.parametrize("name, rounding", [(n, r) for n in ("small-cl", "small-bf16")
                                            for r in ("nearest", "stochastic-int", "stochastic-device")]
                         + [("large-strided", "nearest"), ("large-strided", "stochastic-device")])
def test_quantize_dequantize_is_dequantize_of_quantize(device, name, rounding):
    case = _DQ[name]
    shape, layout, dtype = case
    s = fresh_seed()
    msg = f"seed={s} {rounding} {shape} {layout} {dtype}"
    g = gen(s)
    x = _x(shape, layout, g, device).to(dtype)
    kw = {"nearest": {}, "stochastic-int": dict(rounding="stochastic", seed=s % 1000),
          "stochastic-device": dict(rounding="stochastic")}[rounding]
    for bits in ((8,) if _large(x) else (8, 5)):
        ebkernels.manual_seed(7)
        dq = quantize_dequantize(x, bits, **kw)
        ebkernels.manual_seed(7)
        q, sc = quantize(x, bits, **kw)
        want = dequantize(q, sc, bits).to(dtype)
        assert dq.dtype == dtype and dq.shape == x.shape, msg
        assert bits_equal(dq.cpu(), want.cpu()), f"bits={bits} {msg}: {mismatch(dq.cpu(), want.cpu())}"
        if rounding == "stochastic-device":  # and it took its one ticket
            assert _rng.device_state(device)[1].item() == 1, msg
        if not _large(x):
            with force_backend("reference"):
                ebkernels.manual_seed(7)
                dq_r = quantize_dequantize(x, bits, **kw)
            assert bits_equal(dq_r.cpu(), dq.cpu()), f"reference path bits={bits} {msg}"


# ---- G quantization fused into the weight-grad GEMMs -------------------------------------------------
def _check_gq(gq, gq_ref, taken, exact, rounding, msg):
    assert gq.dtype == torch.float32 and gq.shape == exact.shape and gq.is_contiguous(), msg
    assert bits_equal(gq.cpu(), gq_ref.cpu()), f"fused vs reference {msg}: {mismatch(gq.cpu(), gq_ref.cpu())}"
    want = int(rounding == "stochastic")
    assert taken == (want, want), f"tickets taken (Triton, reference) {taken} {msg}"
    _, sc = quantize_reference(exact.cpu(), 8)
    # what the values are: codes of the exact gradient on its own Shift scale, floor/ceil (stochastic)
    step = sc.item() / 128
    codes_k = gq.cpu() / step
    assert torch.equal(codes_k, torch.round(codes_k)) and codes_k.abs().max() <= 127, msg
    v = (exact.cpu() / sc * 128).clamp(-127, 127)
    if rounding == "stochastic":
        assert ((codes_k == torch.floor(v)) | (codes_k == torch.ceil(v))).all(), msg
        assert (codes_k != torch.round(v)).any(), msg
    else:
        assert torch.equal(codes_k, torch.round(v)), msg


class WCase(NamedTuple):
    """A weight-grad: ``cin`` / ``cout`` real channels of ``Cin_p`` / ``Cout_p`` code channels."""
    N: int
    cin: int
    Cin_p: int
    cout: int
    Cout_p: int
    H: int
    W: int
    K: int
    stride: int
    pad: int

    @property
    def id(self):
        return "N{}ci{}p{}co{}p{}H{}W{}K{}s{}p{}".format(*self)


# 20·13·9 = 2,340 gradient elements and 90·93·9 = 75,330 > 65,536 (the GQ=1 codes pass over the real part of
# a 96 x 96 buffer); the last: a 1×1 layer without channel padding, its 32 x 16 gradient one output tile (G
# quantized in registers, GQ=2)
WCASES = [
    WCase(N=2, cin=13, Cin_p=16, cout=20, Cout_p=32, H=7, W=6, K=3, stride=1, pad=1),
    WCase(N=1, cin=93, Cin_p=96, cout=90, Cout_p=96, H=8, W=8, K=3, stride=1, pad=1),
    WCase(N=2, cin=16, Cin_p=16, cout=40, Cout_p=48, H=9, W=8, K=1, stride=2, pad=0),
    WCase(N=2, cin=16, Cin_p=16, cout=32, Cout_p=32, H=7, W=6, K=1, stride=1, pad=0),
]


@pytest.mark.parametrize("case, rounding", [pytest.param(c, r, id=f"{c.id}-{r}") for c, r in (
    (WCASES[0], "stochastic"), (WCASES[0], "nearest"), (WCASES[1], "stochastic"), (WCASES[2], "stochastic"),
    (WCASES[3], "stochastic"), (WCASES[3], "nearest"))])
def test_conv_wgrad_fused_g_quantization(device, monkeypatch, case, rounding):
    N, cin, Cin_p, cout, Cout_p, H, W, K, stride, pad = case
    s = fresh_seed()
    msg = f"seed={s} case={case.id} {rounding}"
    g = gen(s)
    OH, OW = (H + 2 * pad - K) // stride + 1, (W + 2 * pad - K) // stride + 1
    qx = codes((N, Cin_p, H, W), g, device, pad_from=cin)
    qe = codes((N, Cout_p, OH, OW), g, device, channels_last=False, pad_from=cout)
    qe = qe.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # channel-major, as the fused block passes it
    se, sx = torch.tensor(2.0 ** -10, device=device), torch.tensor(2.0 ** -3, device=device)
    geo = ([K, K], [stride] * 2, [pad] * 2, [1, 1])
    n = cout * cin * K * K
    assert (n <= SMALL_NUMEL) == (cin != 93), "both fused G-quantization modes are tested"

    calls = spy_launches(monkeypatch, "conv2d_int8_wgrad_kernel")

    def run():
        return conv2d_int8_wgrad_op(qe, qx, se, sx, *geo, 1, 8, 8, torch.float32, MAX_TERMS, 8, rounding,
                                     [cout, cin], _rng.device_state(device))

    gq, gq_ref, taken = both_paths(run, s % 1000, device)
    exact = conv2d_int8_wgrad_reference(qe.cpu(), qx.cpu(), se.cpu(), sx.cpu(), *geo, 1, 8, 8, torch.float32)
    _check_gq(gq, gq_ref, taken, exact[:cout, :cin].contiguous(), rounding, msg)
    # GQ=2 (in registers) exactly where the launch has one output tile and G is its whole buffer
    one_tile = calls[0]["grid"][0] == 1 and (cout, cin) == (Cout_p, Cin_p)
    assert calls[0]["GQ"] == (2 if one_tile else 1), msg
    assert one_tile == (case == WCASES[3]), msg


LCASES = [(50, 30, 40), (64, 250, 300)]  # (batch, in, out): 1,200 and 75,000 gradient elements
# the same with 150 rows in chunks of 64 (``max_terms``): 3 splits, the last split of each tile G-quantizes
LSPLIT = [(150, 30, 40), (150, 250, 300)]


@pytest.mark.parametrize("case, rounding, max_terms",
                         [(LCASES[0], "stochastic", MAX_TERMS), (LCASES[0], "nearest", MAX_TERMS),
                          (LCASES[1], "stochastic", MAX_TERMS), (LSPLIT[0], "stochastic", 64),
                          (LSPLIT[0], "nearest", 64), (LSPLIT[1], "stochastic", 64)],
                         ids=["small-stochastic", "small-nearest", "large-stochastic", "split-small-stochastic",
                              "split-small-nearest", "split-large-stochastic"])
def test_linear_wgrad_fused_g_quantization(device, monkeypatch, case, rounding, max_terms):
    B, fin, fout = case
    s = fresh_seed()
    msg = f"seed={s} case={case} {rounding} max_terms={max_terms}"
    g = gen(s)
    qe = codes((B, fout), g, device, channels_last=False)
    qx = codes((B, fin), g, device, channels_last=False)
    se, sx = torch.tensor(2.0 ** -12, device=device), torch.tensor(2.0 ** 2, device=device)
    calls = spy_launches(monkeypatch, "linear_int8_gemm_kernel")
    counts = []

    def run():
        with LaunchSpy() as launches:
            out = _linear_int8_mm_op(qe.t(), qx, se, sx, None, 8, 8, torch.float32, max_terms, 8, rounding,
                                     _rng.device_state(device))
        counts.append(dict(launches.count))
        return out

    gq, gq_ref, taken = both_paths(run, s % 1000, device)
    exact = linear_int8_mm_reference(qe.t().cpu(), qx.cpu(), se.cpu(), sx.cpu(), None, 8, 8, torch.float32)
    _check_gq(gq, gq_ref, taken, exact, rounding, msg)
    # the Triton path quantized in the GEMM launch (GQ=2: the launch's one output tile, in registers; GQ=1,
    # several tiles, adds its codes pass), one split or several
    many = calls[0]["grid"][0] > 1
    assert many == (exact.numel() > SMALL_NUMEL), msg
    assert [(c["GQ"], c["SPLIT_FIX"]) for c in calls] == [(1 if many else 2, B > max_terms)], msg
    assert counts[0] == {"linear_int8_gemm_kernel": 1, **({"gquant_codes_kernel": 1} if many else {})}, msg
    if B > max_terms:
        assert calls[0]["grid"][1] == 3, msg
    assert all(int(torch.count_nonzero(p)) == 0 for p in _POOLS.values()), msg


def test_opcheck_schema():
    """The ops that advance the random state declare it (``rng`` mutated) and nothing else. (opcheck's AOT
    test cannot pass for them: it reruns the op on the advanced state and compares the outputs.)"""
    g = gen(6)
    st = _rng.device_state("cpu")
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    x = torch.randn((2, 3, 4, 5), generator=g)
    none = x.new_empty((0,))  # an absent mutable argument (ops._buffers.absent)
    torch.library.opcheck(_quantize_op, (x, 8, True, "shift", -1, False, 0, False, st, none), test_utils=utils)
    torch.library.opcheck(_quantize_op, (x, 8, True, "shift", 11, True, 16, False, st, none), test_utils=utils)
    qx = codes((1, 16, 5, 5), g, "cpu", pad_from=3)
    qe = codes((1, 16, 5, 5), g, "cpu", pad_from=6)
    se, sx = torch.tensor(2.0 ** -9), torch.tensor(0.5)
    torch.library.opcheck(conv2d_int8_wgrad_op, (qe, qx, se, sx, [3, 3], [1, 1], [1, 1], [1, 1], 1, 8, 8,
                                                  torch.float32, MAX_TERMS, 8, "stochastic", [6, 3], st),
                          test_utils=utils)
    a, b = codes((7, 9), g, "cpu", channels_last=False), codes((9, 5), g, "cpu", channels_last=False)
    torch.library.opcheck(_linear_int8_mm_op, (a, b, se, sx, None, 8, 8, torch.float32, MAX_TERMS, 8, "stochastic",
                                               st), test_utils=utils)
