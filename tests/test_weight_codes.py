"""Convolution weight codes in both layouts (forward OHWI with Cin zero-padded, input-grad with Cout contiguous and
zero-padded): ``weight_codes`` from a given scale and ``weight_batch`` (many weights, their scales too),
bit-identical to the quantizer's codes of the weight with its scale, the padding written as zeros in poisoned
buffers, ragged Cin/Cout, any weight layout, other bit widths and a scale smaller than Shift(max|w|)
(saturation)."""
import pytest
import torch

import ebkernels
from ebkernels.ops.quantize import quantize_reference
from ebkernels.ops._scale import shift_scale_reference
from ebkernels.ops.weight_codes import _op, weight_codes, weight_codes_reference
from helpers import CL, fresh_seed, gen, mismatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: no intra-op thread contention

# (Cout, Cin, KH, KW, pad, weight layout)
CASES = [
    (20, 13, 3, 3, 16, "oihw"),
    (40, 16, 1, 1, 16, "oihw"),     # Cin already a multiple of 16, Cout not
    (7, 3, 5, 5, 16, "ohwi"),       # a first layer: Cin = 3
    (33, 70, 3, 3, 16, "strided"),  # 20,790 codes: many programs; a non-dense weight view
    (5, 6, 3, 3, 0, "oihw"),        # no padding
    (17, 19, 1, 3, 16, "ohwi"),     # KH = 1
    (18, 9, 3, 1, 16, "oihw"),      # KW = 1
    (24, 48, 2, 2, 16, "hwio"),     # exact multiples of 16 for Cin; weight stored [kh][kw][ci][co]
]


def _id(c):
    return "Co{}Ci{}K{}x{}-pad{}-{}".format(*c)


def _weight(case, g, device):
    CO, CI, KH, KW, _, layout = case
    w = torch.randn((CO, CI, KH, KW), generator=g) * 10 ** torch.empty(1).uniform_(-3, 1, generator=g).item()
    if layout == "ohwi":
        w = w.contiguous(memory_format=CL)
    elif layout == "hwio":
        w = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    elif layout == "strided":
        w = torch.cat([w, torch.randn_like(w)], 1)[:, ::2]  # every other input channel of a wider tensor
    return w.to(device)


def _check_layouts(fwd, dgrad, q, pad, msg):
    CO, CI, KH, KW = q.shape
    COp = -(-CO // pad) * pad if pad > 1 else CO
    CIp = -(-CI // pad) * pad if pad > 1 else CI
    assert fwd.dtype == dgrad.dtype == torch.int8, msg
    assert fwd.shape == (CO, CIp, KH, KW) and fwd.is_contiguous(memory_format=CL), msg
    assert dgrad.shape == (COp, CI, KH, KW), msg
    assert dgrad.permute(2, 3, 1, 0).is_contiguous(), f"dgrad codes must be [kh][kw][ci][co] in memory {msg}"
    assert torch.equal(fwd[:, :CI].cpu(), q), f"forward codes {msg}: {mismatch(fwd[:, :CI].cpu(), q)}"
    assert torch.equal(dgrad[:CO].cpu(), q), f"input-grad codes {msg}: {mismatch(dgrad[:CO].cpu(), q)}"
    if CIp > CI:
        assert fwd[:, CI:].abs().max().item() == 0, f"Cin padding {msg}"
    if COp > CO:
        assert dgrad[CO:].abs().max().item() == 0, f"Cout padding {msg}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_codes_equal_the_quantizers(device, poisoned, case):
    seed = fresh_seed()
    msg = f"seed={seed} case={_id(case)}"
    g = gen(seed)
    w = _weight(case, g, device)
    _, scale = ebkernels.quantize(w)  # the forward's weight scale: Shift(max |w|)
    assert torch.equal(scale.cpu(), shift_scale_reference(w.cpu().abs().amax())), msg
    fwd, dgrad = weight_codes(w, scale, 8, case[4])
    q, s = quantize_reference(w.cpu(), 8)
    assert q.abs().max().item() >= 90, msg  # max|w| / Shift(max|w|) is in [1/sqrt 2, sqrt 2]
    _check_layouts(fwd, dgrad, q, case[4], msg)
    ref = weight_codes_reference(w.cpu(), scale.cpu(), 8, case[4])
    assert torch.equal(fwd.cpu(), ref[0]) and torch.equal(dgrad.cpu(), ref[1]), msg


@pytest.mark.parametrize("bits", [4, 6])
def test_other_bit_widths_and_saturating_scale(device, poisoned, bits):
    """Codes of any given power-of-two scale, here 1/8 of Shift(max|w|): many weights saturate at ±(S-1)."""
    seed = fresh_seed()
    msg = f"seed={seed} bits={bits}"
    g = gen(seed)
    case = (20, 13, 3, 3, 16, "oihw")
    w = _weight(case, g, device)
    scale = shift_scale_reference(w.abs().amax()) / 8
    fwd, dgrad = weight_codes(w, scale, bits, 16)
    S = 2.0 ** (bits - 1)
    q = torch.round((w.cpu() / scale.cpu() * S).clamp(-(S - 1), S - 1)).to(torch.int8)
    assert (q.abs() == S - 1).sum() > 10, msg
    _check_layouts(fwd, dgrad, q, 16, msg)
    # the quantizer with the same bits agrees where its own scale is the same
    _, s_own = ebkernels.quantize(w, bits=bits)
    fwd2, dgrad2 = weight_codes(w, s_own, bits, 16)
    _check_layouts(fwd2, dgrad2, quantize_reference(w.cpu(), bits)[0], 16, msg)


def test_ties_round_half_to_even(device, poisoned):
    """w / s * S exactly halfway between codes rounds to even, as torch.round."""
    w = (torch.arange(-40, 40, dtype=torch.float32) + 0.5).view(8, 10, 1, 1) / 128  # k + 1/2 codes at s = 1
    w[0, 0] = 0.99  # max |w| -> Shift = 1
    fwd, dgrad = weight_codes(w.to(device), torch.tensor(1.0, device=device), 8, 16)
    q = torch.round((w * 128).clamp(-127, 127)).to(torch.int8)
    assert (q.flatten()[1:] % 2 == 0).all()  # every tie went to the even neighbour
    _check_layouts(fwd, dgrad, q, 16, "ties")
    assert torch.equal(fwd[:, :10].cpu(), quantize_reference(w)[0])


def test_opcheck():
    g = gen(5)
    w = torch.randn((5, 3, 3, 3), generator=g)
    torch.library.opcheck(_op, (w, ebkernels.quantize(w)[1], 8, 16))


@pytest.mark.parametrize("mode", ["shift", "wage", "absmax"])
def test_a_batch_of_weights_in_two_multi_program_launches(device, poisoned, mode):
    """``weight_batch.weight_codes_many``: every case's weight (mixed layouts, paddings, a strided view) in one
    batch: two launches of many programs each (no program over 2048 weights), each scale the
    quantizer's (Shift(max|w|), WAGE's 1, or max|w|·S/(S-1)), both layouts its codes, padding zero (poisoned buffers); the
    same from a batch of one (``weight_quant``), from the reference path, and with the programs run in
    reversed and shuffled order (the per-tensor maxima have a last arriver each)."""
    from ebkernels.ops.weight_batch import BLOCK, WeightItem, weight_codes_many, weight_quant
    from _grid_order import run_in_orders

    seed = fresh_seed()
    msg = f"seed={seed} mode={mode}"
    g = gen(seed)
    ws = [_weight(c, g, device) for c in CASES]
    if mode == "wage":
        ws = [w / w.abs().max() * 0.9 for w in ws]  # WAGE's fixed scale 1 expects |w| < 1
    items = [WeightItem(w, 8, mode, c[4], c[4]) for w, c in zip(ws, CASES)]
    ref = [quantize_reference(w.cpu(), 8, mode=mode) for w in ws]

    def check(got, how):
        for (fwd, dgrad, scale), (codes, s), c in zip(got, ref, CASES):
            m = f"{msg} {how} case={_id(c)}"
            assert scale.shape == () and scale.item() == s.item(), m
            _check_layouts(fwd, dgrad, codes, c[4], m)

    launches = []
    runs = run_in_orders(lambda: weight_codes_many(items), launches=launches)
    for order in launches:  # one batch for every padding (16, none): two launches, many programs
        assert [r.kernel for r in order] == ["weight_absmax_many_kernel", "weight_codes_many_kernel"], msg
        assert max(len(r.order) for r in order) > 8, msg
    for got, order in zip(runs, ("forward", "reversed", "shuffled 1", "shuffled 2")):
        check(got, order)
    check([weight_quant(it) for it in items], "one at a time")
    with ebkernels.force_backend("reference"):
        check(weight_codes_many(items), "reference")
    assert max(w.numel() for w in ws) > 4 * BLOCK, msg  # the big case spans several programs


def test_large_weights_codes_again_in_one_launch_in_backward(device, poisoned):
    """``weight_step.BackwardCodes``: the large weights of a step's batch (over ``KEEP_CODES_NUMEL``: their
    codes are not kept) get both layouts again in ONE launch for all of them (from the forward's scales), bit for
    bit the forward's codes, on the kernels and the reference path; a weight changed since the forward gets
    None (its block derives its own)."""
    from ebkernels.ops.weight_batch import KEEP_CODES_NUMEL, WeightItem
    from ebkernels.ops.weight_step import prepare_weight_batch
    from helpers import LaunchSpy

    g = gen(fresh_seed())
    shapes = [(96, 80, 3, 3), (130, 70, 3, 3), (8, 16, 3, 3)]  # two large (one Cout not a multiple of 16), one small
    ws = [torch.randn(s, generator=g).to(device) for s in shapes]
    items = [WeightItem(w, 8, "shift", 16, 16) for w in ws]
    assert [w.numel() > KEEP_CODES_NUMEL for w in ws] == [True, True, False]
    for backend in ("auto", "reference"):
        with ebkernels.force_backend(backend):
            batch = prepare_weight_batch(items)
            fwd = [tuple(t.clone() for t in batch.get(it)) for it in items]
            again = [batch.backward(it) for it in items]
            assert again[2] is None and again[0][0] is again[1][0]  # one holder for the large group
            with LaunchSpy() as spy:
                got = [again[i][0].codes(again[i][1]) for i in (0, 1)]
            if backend == "auto":
                assert [c["kernel"] for c in spy.calls] == ["weight_codes_many_kernel"]
            for (f, d), (f0, d0, _) in zip(got, fwd):
                assert torch.equal(f, f0) and torch.equal(d, d0)
                assert f.stride() == f0.stride() and d.stride() == d0.stride()
            with torch.no_grad():
                ws[1].mul_(2)  # changed after the forward (its version): its block must not take these codes
            assert again[1][0].codes(again[1][1]) is None
            with torch.no_grad():
                ws[1].div_(2)


def test_a_few_small_weights_still_spread_over_the_card(device, poisoned):
    """A batch of small weights whose launches move 256 KiB or more takes smaller blocks / tiles so that each
    launch has at least ``MIN_PROGRAMS`` programs (issue 20: no launch of that size on a few SMs), with the
    quantizer's codes."""
    from ebkernels.ops._launch import MIN_PROGRAMS
    from ebkernels.ops.weight_batch import WeightItem, weight_codes_many
    from helpers import LaunchSpy

    g = gen(fresh_seed())
    ws = [torch.randn(s, generator=g).to(device) for s in ((64, 64, 3, 3), (48, 40, 3, 3), (10, 512, 1, 1))]
    items = [WeightItem(w, 8, "shift", 16, 0) for w in ws]
    assert sum(w.numel() for w in ws) * 6 >= 256 * 1024  # fp32 read, two int8 layouts written
    with LaunchSpy() as spy:
        got = weight_codes_many(items)
    assert [c["kernel"] for c in spy.calls] == ["weight_absmax_many_kernel", "weight_codes_many_kernel"]
    assert all(c["grid"][0] >= MIN_PROGRAMS for c in spy.calls), [c["grid"] for c in spy.calls]
    for (fwd, dgrad, scale), w in zip(got, ws):
        codes, s = quantize_reference(w.cpu(), 8)
        assert scale.item() == s.item()
        assert torch.equal(fwd[:, :w.shape[1]].cpu(), codes) and torch.equal(dgrad[:w.shape[0]].cpu(), codes)
