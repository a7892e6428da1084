"""The fused early-bird mask update (SPEC §3): the Triton kernel (interpreter on CPU, CUDA where present)
and the sort-based PyTorch reference, bit for bit, against the SPEC formula written with numpy.

Random gamma sets from the test's seed (``helpers.fresh_seed``, in every failure message). The 2·10⁶-channel
case runs on the interpreter too (one call, a few seconds); the C++ op is checked at that size in test_native.py.
"""
import math

import numpy as np
import pytest
import torch

import ebkernels
from ebkernels.detector.early_bird_mask import early_bird_update, early_bird_update_reference, early_bird_update_triton, n_words, pack_masks, popcount_words, ratio_keep, ratio_ks, unpack_masks
from helpers import KINDS, PRERESNET101_BN, RATIOS, TOTALS, fresh_gammas, fresh_seed, spec_masks_numpy


def spec_distances_numpy(new_masks: np.ndarray, ring_words: torch.Tensor, total: int, slot: int):
    """popcount(new XOR old) / total per ratio and history slot, from unpacked bools."""
    old = unpack_masks(ring_words.cpu(), total).numpy()  # [R, H, total]
    d = [[0.0 if h == slot else int(np.count_nonzero(new_masks[r] != old[r, h])) / total
          for h in range(old.shape[1])] for r in range(old.shape[0])]
    return torch.tensor(d, dtype=torch.float64)


def _run(impl, gammas, ratios, ring, slot=0):
    ks = torch.tensor(ratio_ks(gammas.numel(), ratios), dtype=torch.int32, device=gammas.device)
    return impl(gammas, ks, ring, slot)


def _random_ring(R, H, total, seed, device):
    g = torch.Generator().manual_seed(seed + 1)
    ring = torch.randint(-2**31, 2**31, (R, H, n_words(total)), generator=g, dtype=torch.int64).to(torch.int32)
    if total % 32:  # padding bits of a real mask are 0: keep them 0 here too
        ring[..., -1] &= (1 << (total % 32)) - 1
    return ring.to(device)


def _check_update(gammas, ratios, device, seed, H=5):
    total = gammas.numel()
    ring0 = _random_ring(len(ratios), H, total, seed, "cpu")
    ring_ref, ring_tri = ring0.clone(), ring0.clone().to(device)
    slot = seed % H
    packed_ref, dist_ref, thr_ref = _run(early_bird_update_reference, gammas, ratios, ring_ref, slot)
    packed, dist, thr = _run(early_bird_update_triton, gammas.to(device), ratios, ring_tri, slot)
    msg = f"total={total} seed={seed} slot={slot}"
    expect = spec_masks_numpy(gammas, ratios)
    # the reference is the SPEC formula ...
    assert np.array_equal(unpack_masks(packed_ref, total).numpy(), expect), msg
    assert torch.equal(dist_ref, spec_distances_numpy(expect, ring0, total, slot)), msg
    # ... and the kernel is the reference, bit for bit
    assert torch.equal(packed.cpu(), packed_ref), msg
    assert torch.equal(thr.cpu().view(torch.int32), thr_ref.view(torch.int32)), msg
    assert torch.equal(dist.cpu(), dist_ref), msg
    assert torch.equal(ring_tri.cpu(), ring_ref), msg
    # only the slot row changed, and it holds the new masks; padding bits stay 0
    keep_rows = [h for h in range(H) if h != slot]
    assert torch.equal(ring_ref[:, keep_rows], ring0[:, keep_rows]), msg
    assert torch.equal(ring_ref[:, slot], packed_ref), msg
    assert torch.equal(pack_masks(unpack_masks(packed, total).cpu()), packed.cpu()), msg


@pytest.mark.parametrize("total", TOTALS)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_sort_reference(total, kind, device):
    seed = fresh_seed()
    _check_update(fresh_gammas(total, kind, seed), RATIOS, device, seed)


def test_two_million_channels(device):
    seed = fresh_seed()
    g = fresh_gammas(2_000_000, "mixed", seed)
    _check_update(g, RATIOS, device, seed, H=2)


@pytest.mark.parametrize("total", [(1 << 18) + 33])  # two interpreter blocks, a partial word
def test_multi_block_totals(total, device):
    seed = fresh_seed()
    _check_update(fresh_gammas(total, "ties", seed), (0.1, 0.9), device, seed, H=3)


def test_many_ratios_and_extremes(device):
    """Ratios next to 0 and 1 (k = 0 and k = total - 1), repeated ratios, one launch."""
    seed = fresh_seed()
    total = 1000
    ratios = (1e-9, 0.001, 0.5, 0.5, 0.999, 1 - 1e-9)
    assert ratio_ks(total, ratios) == [0, 1, 500, 500, 999, 999]
    _check_update(fresh_gammas(total, "mixed", seed), ratios, device, seed, H=1)


def test_sign_is_ignored(device):
    seed = fresh_seed()
    g = fresh_gammas(4224, "randn", seed)
    m_pos = ebkernels.channel_mask(g.abs().to(device), RATIOS)
    m_neg = ebkernels.channel_mask((-g.abs()).to(device), RATIOS)
    m_mix = ebkernels.channel_mask(g.to(device), RATIOS)
    assert torch.equal(m_pos, m_neg) and torch.equal(m_pos, m_mix), f"seed={seed}"


def test_nan_sorts_last_and_is_never_kept(device):
    g = torch.tensor([0.5, float("nan"), 2.0, -1.0, float("-nan"), 0.1, 3.0, float("inf")])
    for p in (0.2, 0.5, 0.8):  # thresholds below, at and inside the NaN tail
        ring_r = torch.zeros((1, 1, 1), dtype=torch.int32)
        ring_t = ring_r.clone().to(device)
        ref = _run(early_bird_update_reference, g, (p,), ring_r)
        tri = _run(early_bird_update_triton, g.to(device), (p,), ring_t)
        assert torch.equal(ref[0], tri[0].cpu()), p
        assert torch.equal(ref[2].view(torch.int32), tri[2].cpu().view(torch.int32)), p  # NaN thr too
        kept = unpack_masks(ref[0], g.numel())[0]
        assert not kept[1] and not kept[4]
        sorted_abs = torch.sort(g.abs()).values
        thr = sorted_abs[int(g.numel() * p)]
        assert torch.equal(kept, g.abs() > thr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_gammas_widen_exactly(dtype, device):
    seed = fresh_seed()
    g = fresh_gammas(999, "randn", seed).to(dtype)
    mask = ebkernels.channel_mask(g.to(device), 0.5)
    expect = spec_masks_numpy(g.float(), (0.5,))[0]
    assert np.array_equal(mask.cpu().numpy(), expect), f"seed={seed}"


def test_channel_mask_matches_for_several_ratios(device):
    seed = fresh_seed()
    g = fresh_gammas(sum(PRERESNET101_BN), "randn", seed).to(device)
    masks = ebkernels.channel_mask(g, RATIOS)
    assert masks.shape == (3, g.numel()) and masks.dtype == torch.bool and masks.device == g.device
    assert np.array_equal(masks.cpu().numpy(), spec_masks_numpy(g, RATIOS))
    for p, m in zip(RATIOS, masks):
        assert torch.equal(ebkernels.channel_mask(g, p), m)
        if torch.unique(g.abs()).numel() == g.numel():  # no ties: exactly total - 1 - floor(total*p) survive
            assert int(m.sum()) == g.numel() - 1 - math.floor(g.numel() * p)


@pytest.mark.parametrize("kind", KINDS)
def test_host_rule_is_the_kernels(kind):
    """``ratio_keep`` (the host rule pruning and the other criteria use) is the SPEC formula the kernel
    computes, ties and every kind of gamma included."""
    seed = fresh_seed()
    g = fresh_gammas(1000, kind, seed)
    expect = spec_masks_numpy(g, RATIOS)
    for p, e in zip(RATIOS, expect):
        assert np.array_equal(ratio_keep(g.abs(), p).numpy(), e), (kind, seed, p)


def test_pack_unpack_and_popcount():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for total in (1, 31, 32, 33, 95, 1000):
        keep = torch.rand(3, total, generator=gen) < 0.5
        words = pack_masks(keep)
        assert words.shape == (3, n_words(total)) and words.dtype == torch.int32
        assert torch.equal(unpack_masks(words, total), keep)
        # bit layout: channel i at word i // 32, bit i % 32
        i = int(torch.randint(0, total, (1,), generator=gen))
        assert ((int(words[0, i // 32]) >> (i % 32)) & 1) == int(keep[0, i])
        assert torch.equal(popcount_words(words), keep.sum(-1))


def test_update_rejects_bad_arguments():
    g = torch.randn(40)
    ks = torch.tensor([20], dtype=torch.int32)
    ring = torch.zeros((1, 2, 2), dtype=torch.int32)
    with pytest.raises(TypeError, match="gammas must be a 1-D float32"):
        early_bird_update(g.double(), ks, ring, 0)
    with pytest.raises(ValueError, match=r"ring must be an int32 tensor \[R, H>=1, 2\]"):
        early_bird_update(g, ks, torch.zeros((1, 2, 3), dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"ks must be an int32 tensor of shape \(1,\)"):
        early_bird_update(g, ks.long(), ring, 0)
    with pytest.raises(ValueError, match=r"slot=2 is out of range; accepted: an int in \[0, 2\)"):
        early_bird_update(g, ks, ring, 2)
    with pytest.raises(ValueError, match="backend='cuda' is not supported"):
        early_bird_update(g, ks, ring, 0, backend="cuda")
    with pytest.raises(ValueError, match="gammas has 0 channels"):
        early_bird_update(torch.zeros(0), ks, torch.zeros((1, 2, 0), dtype=torch.int32), 0)


def test_custom_op_fake_shapes():
    """The torch.library op traces with fake tensors (torch.compile / meta)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = torch.empty(70)
        ks = torch.empty(3, dtype=torch.int32)
        ring = torch.empty((3, 4, 3), dtype=torch.int32)
        packed, dist, thr = torch.ops.ebkernels.early_bird_update(g, ks, ring, 1, "reference")
    assert packed.shape == (3, 3) and packed.dtype == torch.int32
    assert dist.shape == (3, 4) and dist.dtype == torch.float64
    assert thr.shape == (3,) and thr.dtype == torch.float32
