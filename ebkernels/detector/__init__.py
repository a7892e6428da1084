"""The early-bird detector (SPEC §3): ``EarlyBird`` (the stopping rule over epochs), ``channel_mask`` and
``mask_distance`` (``early_bird``), and the one fused launch per epoch they run on — threshold selection,
mask packing, XOR + popcount against the on-device mask history — as a Triton kernel, a native op and a
PyTorch reference (``early_bird_mask``)."""
from .early_bird import MODES, EarlyBird, NonFiniteImportanceError, channel_mask, gather_gammas, mask_distance

__all__ = ["EarlyBird", "channel_mask", "mask_distance", "gather_gammas", "MODES", "NonFiniteImportanceError"]
