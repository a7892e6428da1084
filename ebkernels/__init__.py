"""ebkernels: int8 tensor-core training kernels and the early-bird ticket workflow."""
from ._backend import force_backend
from .config import QConfig
from .ops.quantize import dequantize, quantize

__version__ = "0.1.0"

__all__ = ["QConfig", "quantize", "dequantize", "force_backend", "__version__"]
