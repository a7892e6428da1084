"""The tests' own helpers (tests/helpers.py) do what they promise: ``fresh_seed`` honours
EBKERNELS_TEST_SEED (fixed default, replay, random per test), a failing test reports its seed, the launch
spy records a launch's kernel, grid and constexprs and can skip running it."""
import types

import pytest
import torch
import triton
import triton.language as tl

from helpers import DEFAULT_SEED, SEED_VARIABLE, LaunchSpy, fresh_seed, spy_launches


def _as_test(monkeypatch, test_id):
    monkeypatch.setenv("PYTEST_CURRENT_TEST", f"{test_id} (call)")


def test_fresh_seed_default_replay_and_random(monkeypatch):
    _as_test(monkeypatch, "tests/test_x.py::test_a")
    monkeypatch.delenv(SEED_VARIABLE, raising=False)
    assert fresh_seed() == fresh_seed() == DEFAULT_SEED
    monkeypatch.setenv(SEED_VARIABLE, "424242")
    assert fresh_seed() == 424242
    monkeypatch.setenv(SEED_VARIABLE, "random")
    seeds = []
    for test in ("test_a", "test_b", "test_c"):
        _as_test(monkeypatch, f"tests/test_x.py::{test}")
        seeds.append(fresh_seed())
        assert fresh_seed() == seeds[-1]  # one seed per test
        assert 0 <= seeds[-1] < 2**31 - 1
    assert len(set(seeds)) > 1 and DEFAULT_SEED not in seeds  # fresh ones
    for bad in ("abc", "-1", str(2**31)):
        monkeypatch.setenv(SEED_VARIABLE, bad)
        with pytest.raises(ValueError, match="EBKERNELS_TEST_SEED"):
            fresh_seed()


def test_a_failing_test_reports_its_seed(monkeypatch):
    import conftest  # the hook that adds the report section

    _as_test(monkeypatch, "tests/test_x.py::test_y[case]")
    monkeypatch.setenv(SEED_VARIABLE, "77")
    assert fresh_seed() == 77
    report = types.SimpleNamespace(when="call", failed=True, sections=[])
    hook = conftest.pytest_runtest_makereport(types.SimpleNamespace(nodeid="tests/test_x.py::test_y[case]"), None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(types.SimpleNamespace(get_result=lambda: report))
    assert report.sections == [("test seed", "77 (replay: EBKERNELS_TEST_SEED=77 python -m pytest "
                                             "'tests/test_x.py::test_y[case]')")]


@triton.jit
def _fill_kernel(out_ptr, n, value, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, value, mask=i < n)


def test_launch_spy(device, monkeypatch):
    out = torch.zeros(100, device=device)
    others = spy_launches(monkeypatch, "some_other_kernel")
    with LaunchSpy("_fill_kernel") as spy:
        _fill_kernel[(4,)](out, 100, 3.0, BLOCK=32)
    assert spy.calls == [{"BLOCK": 32, "grid": (4,), "kernel": "_fill_kernel"}] and bool((out == 3).all())
    with LaunchSpy(run=False) as dry:  # recorded, not run
        _fill_kernel[(2,)](out, 100, 5.0, BLOCK=64)
    assert dry.count == {"_fill_kernel": 1} and dry.calls[0]["grid"] == (2,) and bool((out == 3).all())
    _fill_kernel[(4,)](out, 100, 7.0, BLOCK=32)  # the spies are off again
    assert len(spy.calls) == 1 and len(dry.calls) == 1 and bool((out == 7).all())
    assert others == []
