"""Test setup: without CUDA, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before ebkernels (and so any @triton.jit) is imported.

Requirements a machine may lack (requirements.txt installs them; a GPU machine run without that install
may not have them): torchvision (``@pytest.mark.torchvision``: its model definitions, imported through
``ebkernels.models.torchvision_models.import_torchvision``), torch-pruning (``@pytest.mark.torch_pruning``),
matplotlib (``@pytest.mark.matplotlib``). Their tests skip, with the reason, where the import fails, unless
``EBKERNELS_REQUIRE_<NAME>=1`` (CI sets it for each, see .ci/run): then they run and fail, and so does
test_requirements_available.py.

A failing test that asked ``helpers.fresh_seed()`` for its seed reports it ("test seed" section).
"""
import contextlib
import importlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _import_torchvision():
    """None when ``import torchvision`` works (through the product's own import, which declares the detection
    ops a CUDA-built wheel cannot load next to the CPU torch), else why it does not."""
    from ebkernels.models.torchvision_models import import_torchvision

    try:
        import_torchvision()
        return None
    except ImportError as exc:
        return f"{exc}; `pip install -r requirements.txt` installs torchvision 0.28.0, the release for torch 2.13"


def _import(module: str, requirement: str):
    """None when ``module`` imports, else why it does not."""
    try:
        importlib.import_module(module)
        return None
    except ImportError as exc:
        return f"{exc}; `pip install -r requirements.txt` installs {requirement}"


TORCHVISION_MISSING = _import_torchvision()
# marker: (why it is missing or None, the variable that makes a missing one a failure)
REQUIREMENTS = {
    "torchvision": (TORCHVISION_MISSING, "EBKERNELS_REQUIRE_TORCHVISION"),
    "torch_pruning": (_import("torch_pruning", "torch-pruning 1.6.1"), "EBKERNELS_REQUIRE_TORCH_PRUNING"),
    "matplotlib": (_import("matplotlib", "matplotlib"), "EBKERNELS_REQUIRE_MATPLOTLIB"),
}


def required(marker: str) -> bool:
    return os.environ.get(REQUIREMENTS[marker][1]) == "1"


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
    from helpers import SEED_VARIABLE, seed_of

    report = (yield).get_result()
    seed = seed_of(item.nodeid) if report.when == "teardown" or report.failed else None
    if report.failed and seed is not None:
        report.sections.append(("test seed", f"{seed} (replay: {SEED_VARIABLE}={seed} python -m pytest "
                                             f"'{item.nodeid}')"))


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
