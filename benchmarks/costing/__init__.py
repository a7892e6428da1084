"""The cost model behind ``benchmarks/cost_model.py``: a training step's launches, recorded, priced on a card.

One responsibility per module:

- ``cards``: the H100 / H200 parameters and every rate and rule constant (the only numbers);
- ``trace``: the recorder (Triton launches stubbed and recorded, aten ops recorded, host time measured);
- ``step``: one real training step of a model in each mode (int8 fused / per-layer for real, bf16 / fp32 on
  fake tensors);
- ``fences``: fences, atomics, byte-wise transposes, shared memory and registers per build, from the sm_90
  AOT build (cached in ``fences_sm90.json``);
- ``kernel_rules``: what each ebkernels kernel moves and computes, and its serial phase;
- ``layers``: the real channel counts behind padded codes (useful MMA work);
- ``aten_rules``: what each PyTorch op costs (cuDNN / cuBLAS efficiencies stated there);
- ``price``: time per launch (roofline with shares, waves, fences, serial tails) and per step (graph, eager);
- ``report``: the markdown tables, issue 20's target rows and the five review findings;
- ``session``: the figures ``gpu_session.py`` prints next to what it measures.

The rules in short (details in each module): DRAM bytes = every distinct tensor once, plus a GEMM operand's
re-reads when it is larger than 25 MiB (half the L2), else they hit L2; L2 → SM bytes of every K step's
tiles at 5.5 TB/s; int8 MMA issued = tiles × BM·BN·BK per K step (padding, ragged edges, recompute
included) at 50 % of 1979 TOPS, wave-quantised; a launch with fewer programs than SMs gets that share of
the machine; a one-program loop costs one dependent round trip (0.7 µs DRAM, 0.35 µs L2) or its bytes at
30 GB/s per iteration; a fence 0.5 µs per wave of programs; 3 µs per launch in a CUDA graph, 4 µs eager;
host time measured on the CPU that records, plus Triton's and CUDA's launch cost on a GPU host.
Every figure is a prediction, labelled so.
"""
