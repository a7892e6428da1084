"""Test setup: without CUDA, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before ebkernels (and so any @triton.jit) is imported.

torchvision: the tests that need its model definitions skip, with the reason, where
``ebkernels.models.torchvision_models.import_torchvision`` cannot import it (``@pytest.mark.torchvision``);
CI sets EBKERNELS_REQUIRE_TORCHVISION=1, so there they must run.
"""
import contextlib
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


TORCHVISION_MISSING = _import_torchvision()


def pytest_configure(config):
    config.addinivalue_line("markers", "torchvision: needs torchvision's model definitions (skipped, with the "
                                       "reason, where torchvision cannot be imported)")


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    """The device Triton kernels run on: CPU under the interpreter, and CUDA where present."""
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none present")
    skip_torchvision = pytest.mark.skip(reason=str(TORCHVISION_MISSING))
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "torchvision" in item.keywords and TORCHVISION_MISSING is not None:
            item.add_marker(skip_torchvision)


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
