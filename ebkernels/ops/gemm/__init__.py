"""The int8 tensor-core GEMMs (SPEC §8): ``tiles`` (the per-shape tile table and the plans it makes),
``mainloop`` (implicit-GEMM main loops and the end every GEMM program shares: split-K fix-up, epilogue,
fused G quantization from ``gquant``), ``host`` (launcher plumbing, exact sums of the reference path),
and the ops: ``linear`` (``qlinear``), ``conv`` (``qconv2d``: references, custom ops, autograd Function)
with its kernels ``conv_fwd_dgrad``, ``conv_wgrad`` and ``conv_wgrad_tma``; ``plans`` is what
``python -m ebkernels.aot --plan`` prints."""
