"""pytest-benchmark setup for ``benchmarks/``: the device, and the backend each benchmark runs under.

On a GPU the Triton kernels run. Without one, the smoke shapes run on the PyTorch reference path
(never the Triton interpreter, which is far too slow to time anything) and the numbers are CPU smoke
figures, not GPU results. Run with ``python -m pytest benchmarks/bench_layers.py --benchmark-enable``
(pytest.ini disables pytest-benchmark timing by default, so without the flag each case runs once).
"""
import contextlib

import pytest
import torch


@pytest.fixture
def bench_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def bench_backend(bench_device):
    """A context manager: ``force_backend("reference")`` on CPU, nothing on a GPU."""
    if bench_device.type == "cuda":
        return contextlib.nullcontext()
    from ebkernels._backend import force_backend

    return force_backend("reference")
