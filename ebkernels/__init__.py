"""ebkernels: int8 tensor-core training kernels and the early-bird ticket workflow."""
from ._backend import force_backend
from ._rng import manual_seed
from .config import QConfig
from .detector import EarlyBird, channel_mask, mask_distance
from .ops.quantize import dequantize, quantize
from .ops.linear_int8 import qlinear
from .ops.conv2d_int8 import qconv2d
from .modules import QConv2d, QLinear, dequantize_model, quantize_model
from .models import build_model
from .pruning import count_flops, count_params, load_ticket, prune, reinit, save_ticket
from .data import load_dataset

__version__ = "0.1.0"

__all__ = ["manual_seed", "QConfig", "quantize", "dequantize", "force_backend", "qlinear", "qconv2d", "EarlyBird", "channel_mask", "mask_distance",
           "build_model", "prune", "reinit", "save_ticket", "load_ticket", "count_flops", "count_params",
           "QConv2d", "QLinear", "quantize_model", "dequantize_model", "load_dataset", "__version__"]
