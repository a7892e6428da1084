"""One module per op: its Triton kernels, its PyTorch reference and its autograd function."""
