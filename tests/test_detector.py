"""The early-bird detector API (SPEC §3, §6): channel_mask, mask_distance, EarlyBird.

Verdicts are checked on scripted gamma histories whose masks are known sets: with ``total`` channels
and ratio p, exactly the ``total - 1 - floor(total * p)`` channels holding the large |gamma| survive,
so each epoch's mask is a set the test chooses, and every distance is ``|S_a ^ S_b| / total``.
"""
import io
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import ebkernels
from ebkernels import EarlyBird, channel_mask, mask_distance
from ebkernels import _native

TOTAL = 100
P = 0.5
N_KEEP = TOTAL - 1 - math.floor(TOTAL * P)  # 49


def gammas_for(keep: set, seed: int, total: int = TOTAL) -> torch.Tensor:
    """Gammas (random signs and values) whose mask at ratio P is exactly ``keep``."""
    assert len(keep) == total - 1 - math.floor(total * P)
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(total, generator=g) * 0.5 + 0.01
    large = torch.rand(total, generator=g) + 2.0
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    vals = small.clone()
    vals[idx] = large[idx]
    return vals * (torch.randint(0, 2, (total,), generator=g) * 2 - 1)


def swap(keep: set, n: int, rng: random.Random, total: int = TOTAL) -> set:
    """``keep`` with n kept channels replaced by n pruned ones: distance 2n / total."""
    out = sorted(keep)
    ins = sorted(set(range(total)) - keep)
    drop, add = rng.sample(out, n), rng.sample(ins, n)
    return (keep - set(drop)) | set(add)


def history_from_swaps(swaps, rng) -> list:
    keep = set(rng.sample(range(TOTAL), N_KEEP))
    sets = [keep]
    for n in swaps:
        sets.append(swap(sets[-1], n, rng))
    return sets


def oracle(sets, eps, window, mode):
    """Expected step() results straight from SPEC §3, on Python sets."""
    d = lambda a, b: len(a ^ b) / TOTAL  # noqa: E731
    found, out = None, []
    for t in range(len(sets)):
        if mode == "consecutive":
            fifo = [d(sets[s], sets[s - 1]) for s in range(max(1, t - window + 1), t + 1)]
            hit = t >= window and max(fifo) < eps
        else:
            hit = t + 1 >= window and all(d(sets[t], sets[t - j]) <= eps for j in range(1, window))
        if hit and found is None:
            found = t
        out.append(found is not None)
    return out, found


def run(detector, sets, seed):
    return [detector.step(gammas_for(s, seed + t)) for t, s in enumerate(sets)]


# --------------------------------------------------------------------------------------------------
# verdicts on scripted histories
# --------------------------------------------------------------------------------------------------
def test_consecutive_found_exactly_when_fifo_first_full():
    rng = random.Random()
    seed = rng.randrange(2**31)
    sets = history_from_swaps([1] * 9, rng)  # every distance 0.02 < 0.1
    eb = EarlyBird(P, eps=0.1, window=5, backend="reference")
    got = run(eb, sets, seed)
    # distances exist from epoch 1, so the FIFO of 5 is first full at epoch 5: never earlier
    assert got == [False] * 5 + [True] * 5, seed
    assert eb.found_epoch == 5
    assert eb.distances == [0.02] * 9
    assert eb.last_distances == [0.02] * 5


def test_window_found_exactly_when_window_first_full():
    rng = random.Random()
    seed = rng.randrange(2**31)
    sets = history_from_swaps([0] * 7, rng)  # identical masks
    eb = EarlyBird(P, eps=0.1, window=5, mode="window", backend="reference")
    assert run(eb, sets, seed) == [False] * 4 + [True] * 4
    assert eb.found_epoch == 4 and eb.last_distances == [0.0] * 4


def test_strict_versus_inclusive_eps():
    """A distance of exactly eps (5 swaps = 10/100 = 0.1) stops `window` but not `consecutive`."""
    rng = random.Random()
    seed = rng.randrange(2**31)
    sets = history_from_swaps([5, 0, 0], rng)  # d(1,0) = 0.1 exactly, then identical masks
    assert 10 / TOTAL == 0.1
    cons = EarlyBird(P, eps=0.1, window=2, backend="reference")
    assert run(cons, sets, seed) == [False, False, False, True]  # FIFO [0.1, 0] at epoch 2: max == eps
    assert cons.found_epoch == 3
    win = EarlyBird(P, eps=0.1, window=3, mode="window", backend="reference")
    assert run(win, sets, seed) == [False, False, True, True]  # newest vs older: [0.1, 0.0] <= eps
    assert win.found_epoch == 2
    assert win.last_distances == [0.0, 0.0] and cons.distances == [0.1, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["consecutive", "window"])
def test_random_histories_match_oracle(mode):
    rng = random.Random()
    seed = rng.randrange(2**31)
    for trial in range(6):
        window = rng.randint(2, 5)
        eps = rng.choice([0.06, 0.1, 0.14])
        swaps = [rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 12]) for _ in range(rng.randint(4, 14))]
        sets = history_from_swaps(swaps, rng)
        eb = EarlyBird(P, eps=eps, window=window, mode=mode, backend="reference")
        expect, found = oracle(sets, eps, window, mode)
        assert run(eb, sets, seed + 100 * trial) == expect, (seed, trial, swaps, window, eps)
        assert eb.found_epoch == found
        assert eb.distances == [len(a ^ b) / TOTAL for a, b in zip(sets[1:], sets)]


def test_several_ratios_one_detector():
    """One launch for three ratios: each ratio keeps its own verdict; step() is True once all found."""
    rng = random.Random()
    seed = rng.randrange(2**31)
    # the masks at 0.3/0.7 follow the same scripted sets at 0.5 as long as the small/large split holds:
    # check them against separate single-ratio detectors instead of an oracle
    sets = history_from_swaps([6, 6, 1, 1, 1, 0, 0, 2, 0, 0, 0, 0], rng)
    multi = EarlyBird((0.3, 0.5, 0.7), eps=0.05, window=3, backend="reference")
    singles = {p: EarlyBird(p, eps=0.05, window=3, backend="reference") for p in (0.3, 0.5, 0.7)}
    steps = []
    for t, s in enumerate(sets):
        g = gammas_for(s, seed + t)
        steps.append(multi.step(g))
        for single in singles.values():
            single.step(g)
    assert set(multi.found_epoch) == {0.3, 0.5, 0.7}
    for p, single in singles.items():
        assert multi.found_epoch[p] == single.found_epoch
        assert multi.distances[p] == single.distances
        assert torch.equal(multi.masks[p], single.masks)
    last = max(f for f in multi.found_epoch.values() if f is not None) if all(
        f is not None for f in multi.found_epoch.values()) else None
    assert steps == [last is not None and t >= last for t in range(len(sets))]
    assert multi.found == (last is not None)


# --------------------------------------------------------------------------------------------------
# the three implementations agree
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["consecutive", "window"])
def test_backends_agree(mode, device):
    rng = random.Random()
    seed = rng.randrange(2**31)
    backends = ["triton", "reference"] + (["native"] if _native.available(device) else [])
    total = 4224 + rng.randrange(64)
    gen = torch.Generator().manual_seed(seed)
    gammas = [torch.randn(total, generator=gen)]
    for _ in range(5):  # drifting gammas with ties: masks change a little each epoch
        g = gammas[-1].clone()
        idx = torch.randint(0, total, (total // 20,), generator=gen)
        g[idx] = torch.randn(idx.numel(), generator=gen)
        g[::17] = 0.25
        gammas.append(g)
    results = {}
    for b in backends:
        eb = EarlyBird((0.3, 0.5, 0.7), eps=0.2, window=3, mode=mode, backend=b)
        verdicts = [eb.step(g.to(device)) for g in gammas]
        results[b] = (verdicts, eb.found_epoch, eb.distances, eb.last_distances,
                      {p: m.cpu() for p, m in eb.masks.items()})
    ref = results["reference"]
    for b, res in results.items():
        assert res[:4] == ref[:4], (b, seed)
        assert all(torch.equal(res[4][p], ref[4][p]) for p in ref[4]), (b, seed)


# --------------------------------------------------------------------------------------------------
# checkpoint round trip
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["consecutive", "window"])
def test_state_dict_resumes_identically(mode):
    rng = random.Random()
    seed = rng.randrange(2**31)
    sets = history_from_swaps([rng.choice([0, 1, 2, 4, 8]) for _ in range(11)], rng)
    kwargs = dict(ratio=(0.3, 0.5), eps=0.1, window=4, mode=mode, backend="reference")
    straight = EarlyBird(**kwargs)
    expect = run(straight, sets, seed)

    first = EarlyBird(**kwargs)
    cut = rng.randint(1, len(sets) - 2)
    got = [first.step(gammas_for(s, seed + t)) for t, s in enumerate(sets[:cut])]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # what the trainer's checkpoint does
    buf.seek(0)
    resumed = EarlyBird(**kwargs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.epoch == cut and resumed.found_epoch == first.found_epoch
    got += [resumed.step(gammas_for(s, seed + t)) for t, s in enumerate(sets) if t >= cut]
    assert got == expect, (seed, cut)
    assert resumed.found_epoch == straight.found_epoch
    assert resumed.distances == straight.distances
    assert resumed.last_distances == straight.last_distances
    assert all(torch.equal(resumed.masks[p], straight.masks[p]) for p in (0.3, 0.5))


def test_load_state_dict_rejects_other_settings():
    eb = EarlyBird(0.5, window=3, backend="reference")
    eb.step(torch.randn(40))
    state = eb.state_dict()
    with pytest.raises(ValueError, match=r"state: window=3 but this EarlyBird has window=4"):
        EarlyBird(0.5, window=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state: ratios=\[0.5\] but this EarlyBird has ratios=\[0.3\]"):
        EarlyBird(0.3, window=3).load_state_dict(state)
    with pytest.raises(ValueError, match="not an EarlyBird state_dict"):
        EarlyBird(0.5).load_state_dict({"masks": []})


# --------------------------------------------------------------------------------------------------
# channel_mask / mask_distance / history
# --------------------------------------------------------------------------------------------------
def _bn_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 37, 3), nn.BatchNorm2d(37)),
                          nn.BatchNorm1d(5), nn.Conv2d(37, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.normal_()
    return model


def test_channel_mask_module_order_and_inputs(device):
    model = _bn_model().to(device)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]  # BatchNorm1d is not a channel set
    flat = torch.cat([bn.weight.detach() for bn in bns])
    assert flat.numel() == 8 + 37 + 4
    mask = channel_mask(model, 0.4)
    assert mask.dtype == torch.bool and mask.shape == (49,) and mask.device == flat.device
    a = flat.abs().cpu()
    assert torch.equal(mask.cpu(), a > torch.sort(a).values[math.floor(49 * 0.4)])
    assert torch.equal(channel_mask([bn.weight for bn in bns], 0.4), mask)
    assert torch.equal(channel_mask(flat, 0.4), mask)
    assert channel_mask(model, (0.2, 0.4)).shape == (2, 49)


def test_mask_distance_exact():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    for total in (1, 7, 33, 4224):
        m1 = torch.rand(total, generator=gen) < 0.5
        m2 = torch.rand(total, generator=gen) < 0.5
        d = mask_distance(m1, m2)
        assert isinstance(d, float)
        assert d == int(np.count_nonzero(m1.numpy() != m2.numpy())) / total
        assert mask_distance(m1, m1) == 0.0 and mask_distance(m1, ~m1) == 1.0
        assert mask_distance(m1.float(), m2.int()) == d  # 0/1 numbers are accepted too


def test_history_and_pairwise_distances():
    rng = random.Random()
    seed = rng.randrange(2**31)
    sets = history_from_swaps([3, 0, 7, 2, 1], rng)
    eb = EarlyBird(P, window=3, mode="window", backend="reference")
    run(eb, sets, seed)
    masks = eb.masks
    assert masks.dtype == torch.int32 and masks.shape == (6, math.ceil(TOTAL / 32))
    for t, s in enumerate(sets):
        assert set(torch.nonzero(eb.mask(t)).flatten().tolist()) == s
    pw = eb.pairwise_distances()
    assert pw.shape == (6, 6) and pw.dtype == torch.float64
    expect = torch.tensor([[len(a ^ b) / TOTAL for b in sets] for a in sets], dtype=torch.float64)
    assert torch.equal(pw, expect)
    assert [pw[t, t - 1].item() for t in range(1, 6)] == eb.distances
    with pytest.raises(ValueError, match=r"epoch=6 is out of range; accepted: an int in \[0, 6\)"):
        eb.mask(6)


# --------------------------------------------------------------------------------------------------
# bad input: each a clear error naming what was wrong and what is accepted
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, -0.2, 1.5, float("nan"), True])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio=.* is out of range; accepted: a float with 0 < ratio < 1"):
        EarlyBird(ratio)
    with pytest.raises(ValueError, match="ratio="):
        channel_mask(torch.randn(10), ratio)
    with pytest.raises(ValueError, match="ratio="):
        EarlyBird((0.5, ratio))


@pytest.mark.parametrize("ratio", ["0.5", None, torch.tensor(0.5), [0.5, "0.3"]])
def test_a_ratio_of_the_wrong_type_says_so(ratio):
    # a str was "out of range" (issue 24.3): the problem is its type, and the message says which
    with pytest.raises(TypeError, match=r"ratio=.* is a (str|NoneType|Tensor); accepted: a float with 0 < ratio < 1"):
        channel_mask(torch.randn(10), ratio)
    with pytest.raises(TypeError, match="accepted: a float with 0 < ratio < 1"):
        EarlyBird(ratio)
    assert channel_mask(torch.arange(1.0, 11.0), np.float32(0.5)).sum() == 4  # a NumPy number is a number (keep > 6)


def test_bad_settings():
    with pytest.raises(ValueError, match="ratio=.* repeats a value; accepted: distinct ratios"):
        EarlyBird((0.5, 0.5))
    with pytest.raises(ValueError, match="eps=0 is not supported; accepted: a finite float > 0"):
        EarlyBird(0.5, eps=0)
    with pytest.raises(ValueError, match="window=1 is not supported for mode='window'; accepted: an int >= 2"):
        EarlyBird(0.5, window=1, mode="window")
    with pytest.raises(ValueError, match="mode='fifo' is not supported; accepted: 'consecutive', 'window'"):
        EarlyBird(0.5, mode="fifo")


def test_model_without_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match=r"model \(Sequential\) has no nn.BatchNorm2d layers; accepted: a model "
                                         "with BatchNorm2d layers"):
        EarlyBird(0.5).step(model)
    with pytest.raises(ValueError, match="has no nn.BatchNorm2d layers"):
        channel_mask(model, 0.5)
    with pytest.raises(ValueError, match="affine=False"):
        channel_mask(nn.Sequential(nn.BatchNorm2d(4, affine=False)), 0.5)
    with pytest.raises(TypeError, match="accepted: an nn.Module with BatchNorm2d layers"):
        channel_mask("resnet", 0.5)


def test_masks_of_different_lengths():
    with pytest.raises(ValueError, match="m1 has 10 channels and m2 has 12; accepted: masks over the same channels"):
        mask_distance(torch.ones(10, dtype=torch.bool), torch.ones(12, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"m2 has shape \(2, 5\); accepted: a 1-D mask"):
        mask_distance(torch.ones(10, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="m1 is a list"):
        mask_distance([1, 0], torch.ones(2))


def test_layout_changed_between_steps():
    model = _bn_model()
    eb = EarlyBird(0.5, backend="reference")
    eb.step(model)
    eb.step(nn.Sequential(model))  # a wrapper renames the modules (as DDP / torch.compile do): same layout
    model[3][1] = nn.BatchNorm2d(36)  # a pruned layer: 36 instead of 37 channels
    with pytest.raises(ValueError, match=r"BatchNorm layout changed between steps: recorded 3 tensors, 49 channels "
                                         r"\(1:8, 3.1:37, 6:4\), now 3 tensors, 48 channels"):
        eb.step(model)
    assert eb.epoch == 2  # the failed step recorded nothing
    eb2 = EarlyBird(0.5, backend="reference")
    eb2.step([torch.randn(5), torch.randn(6)])
    with pytest.raises(ValueError, match="layout changed"):
        eb2.step([torch.randn(6), torch.randn(5)])  # same total, different split


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_finite_gammas_are_an_error_naming_the_layer(bad, backend, device):
    from ebkernels.detector import NonFiniteImportanceError

    healthy = _bn_model().to(device)
    diverged = _bn_model().to(device)
    with torch.no_grad():
        diverged[3][1].weight[[4, 9]] = bad
    counts = "2 NaN, 0 inf" if math.isnan(bad) else "0 NaN, 2 inf"
    layer = rf"'3.1' \({counts} of 37 channels\)"
    with pytest.raises(NonFiniteImportanceError, match=rf"gammas_or_model: non-finite BatchNorm gammas in {layer}"):
        channel_mask(diverged, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"non-finite BatchNorm gammas in '\[1\]'"):
        channel_mask([torch.ones(3), torch.tensor([1.0, bad])], (0.3, 0.5))
    # the detector: an error before any verdict, and the failed step leaves it as it was
    for steps_before in (0, 2):
        eb, same = (EarlyBird((0.3, 0.5), eps=0.5, window=2, backend=backend) for _ in range(2))
        for d in (eb, same):
            for _ in range(steps_before):
                d.step(healthy)
        with pytest.raises(NonFiniteImportanceError, match=rf"model: non-finite BatchNorm gammas in {layer}"):
            eb.step(diverged)
        assert eb.epoch == steps_before and eb.found_epoch == same.found_epoch
        for d in (eb, same):
            d.step(healthy)
        assert eb.distances == same.distances and eb.found_epoch == same.found_epoch
        assert all(torch.equal(eb.masks[p], same.masks[p]) for p in eb.ratios)


def test_public_names():
    for name in ("EarlyBird", "channel_mask", "mask_distance"):
        assert name in ebkernels.__all__ and hasattr(ebkernels, name)
