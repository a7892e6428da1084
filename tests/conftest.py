"""Test setup: without CUDA, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before ebkernels (and so any @triton.jit) is imported.

Requirements a machine may lack (requirements.txt installs them; a GPU machine run without that install
may not have them): torchvision (``@pytest.mark.torchvision``: its model definitions, imported through
``ebkernels.models.torchvision_models.import_torchvision``), torch-pruning (``@pytest.mark.torch_pruning``),
matplotlib (``@pytest.mark.matplotlib``). Their tests skip, with the reason, where the import fails, unless
``EBKERNELS_REQUIRE_<NAME>=1`` (CI sets it for each, see .ci/run): then they run and fail, and so does
test_requirements_available.py (``helpers.REQUIREMENTS``).

A failing test that asked ``helpers.fresh_seed()`` for its seed reports it ("test seed" section).
"""
import contextlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import REQUIREMENTS, SEED_VARIABLE, required, seed_of  # noqa: E402


def pytest_configure(config):
    for marker, (_, variable) in REQUIREMENTS.items():
        config.addinivalue_line("markers", f"{marker}: needs {marker} (skipped, with the reason, where it cannot be "
                                           f"imported, unless {variable}=1)")


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    """The device Triton kernels run on: CPU under the interpreter, and CUDA where present."""
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none present")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        for marker, (missing, _) in REQUIREMENTS.items():
            if missing is not None and item.get_closest_marker(marker) and not required(marker):
                item.add_marker(pytest.mark.skip(reason=missing))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's seed (``helpers.fresh_seed``), with the variable that replays it."""
    report = (yield).get_result()
    seed = seed_of(item.nodeid) if report.when == "teardown" or report.failed else None
    if report.failed and seed is not None:
        report.sections.append(("test seed", f"{seed} (replay: {SEED_VARIABLE}={seed} python -m pytest "
                                             f"'{item.nodeid}')"))


@pytest.fixture
def rng_state():
    """For tests that reseed the stochastic rounding: the device random state put back afterwards."""
    from ebkernels import _rng

    state = _rng.get_state()
    yield
    _rng.set_state(state)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread avoids thread contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poisoned():
    """Every int8-kernel output / partial buffer starts poisoned (NaN, -128, 0x7F7F7F7F): unwritten elements
    fail (``ebkernels.config.override(poison_outputs=True)``)."""
    from ebkernels.config import override

    with override(poison_outputs=True):
        yield


@pytest.fixture
def settings():
    """``settings(**changes)``: ``ebkernels.config.override(**changes)`` until the end of the test (nested
    calls stack; all restored at teardown)."""
    from ebkernels.config import override

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(override(**changes))
