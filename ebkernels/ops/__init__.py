"""The int8 training ops: Triton kernels, their launchers, their ``torch.library`` custom ops, autograd
Functions and pure-PyTorch references (SPEC §2, §8, §9). Imports point one way: ``fused`` uses ``gemm``,
both use the quantizers, every op uses the leaves; nothing here imports the model-level code above it
(``ebkernels.modules``, ``fusion``, ``convert``).

- ``gemm/``: the int8 GEMMs — tile table, main loop + tile end, Linear, convolution forward / input-grad,
  weight-grad (generic and sm_90 TMA), the weight-grad's fused G quantization;
- ``fused/``: the fused conv → BatchNorm → ReLU (→ max-pool) flow on int8 codes; ``fused.block`` is its
  entry point (one autograd Function sequencing named stages);
- ``quantize.py`` (the per-tensor quantizer), ``weight_codes.py`` (a weight's codes in both GEMM layouts);
- leaves, importing nothing of ops but each other: ``_launch`` (host launch facts, each once),
  ``_buffers`` (outputs, workspaces, counters), ``_tl`` (``@triton.jit`` index math and casts),
  ``_reduce`` (in-kernel reductions: moments, sums, order-free maxima), ``_scale`` (the scale rule).
"""
