"""The native ops of csrc/ (``ebkernels._C``): the C++ CPU op (and the CUDA op where built) against the
sort-based reference, bit for bit. Skipped, with the reason, only when the extension is not built;
with EBKERNELS_REQUIRE_NATIVE=1 (set by CI, which builds it) a missing extension is a failure."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ebkernels import _native
from ebkernels.detector.early_bird_mask import early_bird_update, early_bird_update_reference, n_words, ratio_ks
from helpers import KINDS, RATIOS, TOTALS, fresh_gammas, fresh_seed, spec_masks_numpy



def test_native_extension_built_where_required():
    if os.environ.get("EBKERNELS_REQUIRE_NATIVE") != "1":
        pytest.skip("EBKERNELS_REQUIRE_NATIVE is not set")
    assert _native.available("cpu"), f"ebkernels._C missing: {_native.missing_reason()}"


needs_native = pytest.mark.skipif(
    not _native.available("cpu"),
    reason=f"native extension ebkernels._C not built: {_native.missing_reason()}")


def _compare(gammas, ratios, seed, device="cpu", H=4, slot=None):
    total = gammas.numel()
    slot = seed % H if slot is None else slot
    gen = torch.Generator().manual_seed(seed)
    ring0 = torch.randint(-2**31, 2**31, (len(ratios), H, n_words(total)), generator=gen,
                          dtype=torch.int64).to(torch.int32)
    ks = torch.tensor(ratio_ks(total, ratios), dtype=torch.int32)
    ring_ref, ring_nat = ring0.clone(), ring0.clone().to(device)
    ref = early_bird_update_reference(gammas, ks, ring_ref, slot)
    nat = early_bird_update(gammas.to(device), ks.to(device), ring_nat, slot, backend="native")
    msg = f"total={total} seed={seed} slot={slot}"
    for name, a, b in zip(("packed", "dist", "thr"), ref, nat):
        assert b.device.type == torch.device(device).type, msg
        assert b.dtype == a.dtype, f"{name}: {msg}"
        if name == "thr":  # bit patterns: a NaN threshold must equal too
            a, b = a.view(torch.int32), b.cpu().view(torch.int32)
        assert torch.equal(b.cpu(), a), f"{name}: {msg}"
    assert torch.equal(ring_nat.cpu(), ring_ref), msg
    return ref


@needs_native
@pytest.mark.parametrize("total", TOTALS)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_op_matches_reference(total, kind):
    seed = fresh_seed()
    _compare(fresh_gammas(total, kind, seed), RATIOS, seed)


@needs_native
def test_cpu_op_two_million_and_extreme_ratios():
    seed = fresh_seed()
    g = fresh_gammas(2_000_000, "mixed", seed)
    packed, _, _ = _compare(g, (1e-9, 0.3, 0.5, 0.5, 0.7, 1 - 1e-9), seed, H=2)
    expect = spec_masks_numpy(g, (0.3,))[0]
    got = ((packed[1].numpy().view(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(-1)
    assert np.array_equal(got[:g.numel()].astype(bool), expect), f"seed={seed}"


@needs_native
def test_cpu_op_nan():
    g = torch.tensor([0.5, float("nan"), 2.0, -1.0, float("-nan"), 0.1, 3.0, float("inf")])
    for p in (0.2, 0.5, 0.8):
        _compare(g, (p,), 0, H=1, slot=0)


@needs_native
def test_cpu_op_errors_and_meta():
    g = torch.randn(40)
    ks = torch.tensor([20], dtype=torch.int32)
    ring = torch.zeros((1, 3, 2), dtype=torch.int32)
    op = torch.ops.ebkernels_native.early_bird_update
    with pytest.raises(RuntimeError, match=r"ring must be int32 \[R, H>=1, 2\] for total=40"):
        op(g, ks, torch.zeros((1, 3, 5), dtype=torch.int32), 0)
    with pytest.raises(RuntimeError, match=r"slot=3 is out of range; accepted: \[0, 3\)"):
        op(g, ks, ring, 3)
    with pytest.raises(RuntimeError, match=r"ks\[0\]=40 is out of range; accepted: \[0, 40\)"):
        op(g, torch.tensor([40], dtype=torch.int32), ring, 0)
    with pytest.raises(RuntimeError, match="gammas must be a 1-D float32 tensor"):
        op(g.double(), ks, ring, 0)
    # Meta kernel: shapes without data (torch.compile / fake tensors)
    packed, dist, thr = op(g.to("meta"), ks.to("meta"), ring.to("meta"), 1)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32 and packed.device.type == "meta"
    assert dist.shape == (1, 3) and dist.dtype == torch.float64 and thr.shape == (1,)


@needs_native
def test_opcheck():
    """torch.library.opcheck: schema (the ring mutation is declared), fake/meta kernel, dispatch."""
    total = 77
    args = (torch.randn(total), torch.tensor(ratio_ks(total, RATIOS), dtype=torch.int32),
            torch.zeros((3, 2, n_words(total)), dtype=torch.int32), 1)
    torch.library.opcheck(torch.ops.ebkernels_native.early_bird_update.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_cuda_op_matches_reference():
    if not _native.available("cuda"):
        pytest.skip(f"native CUDA op not built: {_native.missing_reason() or 'extension built without CUDA'}")
    for total in TOTALS + [2_000_000]:
        for kind in ("ties", "mixed"):
            seed = fresh_seed()
            _compare(fresh_gammas(total, kind, seed), RATIOS, seed, device="cuda")


def test_missing_extension_warns_once_and_falls_back():
    """Without the extension (EBKERNELS_NO_NATIVE=1, no interpreter) the CPU path is the reference and one
    warning says why."""
    code = (
        "import warnings, torch, ebkernels\n"
        "from ebkernels import _native\n"
        "assert not _native.available('cpu') and 'EBKERNELS_NO_NATIVE' in _native.missing_reason()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m = [ebkernels.channel_mask(torch.randn(50), 0.5) for _ in range(3)]\n"
        "msgs = [str(x.message) for x in w if 'native ops unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'EBKERNELS_NO_NATIVE=1' in msgs[0]\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(EBKERNELS_NO_NATIVE="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
