"""Test setup: without CUDA, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before ebkernels (and so any @triton.jit) is imported.

torchvision (test-only shim). The torchvision wheels that install next to the CPU torch 2.13 of this
repository are CUDA builds: their compiled library ``torchvision/_C.so`` needs libtorch_cuda and does
not load, and ``import torchvision`` then fails in ``torchvision/_meta_registrations.py``, which
registers fake kernels for the operators ``torchvision::nms`` and ``torchvision::qnms`` that _C.so
would have defined ("operator torchvision::nms does not exist"). The model definitions
(``torchvision.models``) are pure Python and need none of the compiled operators. So, only when that
exact error occurs, :func:`_import_torchvision` defines the two operator *schemas* (no kernels: calling
them would fail, and no model test calls them) and imports torchvision again. Where torchvision is not
installed, or fails for another reason, ``TORCHVISION_MISSING`` says why and the tests that need it
skip with that reason (``@pytest.mark.torchvision``).
"""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _import_torchvision():
    """None when ``import torchvision`` works (with the shim where needed), else why it does not."""
    try:
        import torchvision  # noqa: F401
        return None
    except ImportError as exc:
        return (f"torchvision is not installed ({exc}); `pip install torchvision==0.28.0` (in requirements.txt) installs the "
                f"release for torch 2.13")
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            return f"torchvision does not import: {exc}"
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # the failed, half-initialised import
    lib = torch.library.Library("torchvision", "DEF")  # kept alive below: the schemas live as long as it
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM_LIBRARIES.append(lib)
    try:
        import torchvision  # noqa: F401,F811
        return None
    except Exception as exc:
        return f"torchvision does not import even with the test shim for its missing operators: {exc}"


_SHIM_LIBRARIES = []
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
def poisoned(monkeypatch):
    """Every int8-kernel output / partial buffer starts poisoned (NaN, 0x7f...): unwritten elements fail."""
    from _flow import poison_empty
    from ebkernels.ops import _igemm

    monkeypatch.setattr(_igemm, "empty_output", poison_empty)
