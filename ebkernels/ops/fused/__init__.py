"""The fused int8 data flow between layers (SPEC §9): conv → BatchNorm → ReLU (→ max-pool) on int8 codes.
``block`` is the entry point: one autograd Function that sequences named stages (input, conv + BatchNorm
statistics, output; and their backward twins) over the kernels of ``conv_bn`` (conv with BatchNorm
statistics in its epilogue, and its backward recompute), ``bn_relu_quant`` (BatchNorm-apply + ReLU +
quantize in one pass; statistics of a float tensor), ``bn_relu_bwd`` (their backward, E's codes) and
``maxpool`` (max-pool on codes). ``bn_math`` holds the per-channel BatchNorm math they share."""
