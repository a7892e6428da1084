"""ebkernels: int8 tensor-core training kernels and the early-bird ticket workflow, as public names.

Rooms (docs/architecture.md): ``ops`` (the kernels: ``ops.gemm``, ``ops.fused``, the quantizers and the
leaves they share), ``modules`` (``QConv2d``, ``QLinear``), ``fusion`` + ``convert`` (the model-level
transform), ``detector`` (the early-bird mask and its kernel), ``models``, ``pruning``, ``methods``,
``train`` (the thin trainer), ``data``; ``config`` (``QConfig``, ``KernelSettings``)."""
from ._backend import force_backend
from ._rng import manual_seed
from .config import QConfig
from .data import load_dataset
from .detector import EarlyBird, channel_mask, mask_distance
from .models import build_model
from .convert import dequantize_model, quantize_model
from .modules import QConv2d, QLinear
from .ops.gemm.conv import qconv2d
from .ops.gemm.linear import qlinear
from .ops.quantize import dequantize, quantize
from .pruning import count_flops, count_params, load_ticket, prune, reinit, save_ticket

__version__ = "0.1.0"

__all__ = ["manual_seed", "QConfig", "quantize", "dequantize", "force_backend", "qlinear", "qconv2d", "EarlyBird", "channel_mask", "mask_distance",
           "build_model", "prune", "reinit", "save_ticket", "load_ticket", "count_flops", "count_params",
           "QConv2d", "QLinear", "quantize_model", "dequantize_model", "load_dataset", "__version__"]
