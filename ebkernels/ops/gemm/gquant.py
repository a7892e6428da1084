"""The weight-grad's G quantization (SPEC §2: ``Shift(max|G|)`` or ``max|G|·S/(S-1)`` in mode absmax,
stochastic rounding by default) fused into the GEMM that produces G: the device side (``gquant_epilogue``,
called from ``mainloop.finish_gemm_tile``) and the launcher side (``gquant_plan`` / ``gquant_off`` /
``gquant_finish``). The codes are the quantizer's own (``ops.quantize.block_codes``), so G matches
``quantize_dequantize`` bit for bit.

The scale mode reaches only the codes pass (``quantize_codes_kernel``, GQ=1): the GEMM kernels fold max |G|
and take the ticket, whatever the mode, and their in-place small-gradient path (GQ=2) is Shift's; an
absmax G takes GQ=1 at every size (one more launch for a small gradient, no new GEMM constexpr)."""
from __future__ import annotations

import torch

from ..._rng import device_state
from ..._triton import tl, triton
from .._buffers import counter_pool
from .._launch import SMALL_NUMEL
from .._scale import scale_from_bits, scale_mode_code
from ..quantize import as_4d, block_codes, block_elements, quantize_codes_kernel, row_major

__all__ = ["gquant_epilogue", "gquant_off", "gquant_plan", "gquant_finish"]


@triton.jit
def gquant_epilogue(y, mask, gq_ptr, rng_ptr, out_ptr, gn, d1, d2, d3, s0, s1, s2, s3, ntiles, first,
                    GQ: tl.constexpr, BITS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """G quantization fused into a weight-grad GEMM, after the program stored its fp32 tile ``y``.

    ``gq`` (int32, zero at launch): [semaphore, bits of max |G|, ticket]; GQ=2 leaves it zero again. Every
    program that finishes an output tile (``ntiles`` of them: one per tile, the last split of a split
    reduction) folds its tile into the max. ``GQ=1``: the ``first`` of them (true in exactly one) takes the
    random ticket; the launcher runs the codes pass
    (``quantize_codes_kernel``) afterwards. ``GQ=2`` (small gradients): the last program to count itself
    in quantizes the whole gradient in place (the real view ``(gn elements; sizes d1..d3, strides
    s0..s3)`` of ``out``), writing the values of the codes: no further launch."""
    bits = tl.max(tl.max(tl.where(mask, tl.abs(y), 0.0).to(tl.int32, bitcast=True), axis=1), axis=0)
    tl.atomic_max(gq_ptr + 1, bits)
    if GQ == 1:
        if STOCHASTIC:
            if first:
                tl.store(gq_ptr + 2, tl.atomic_add(rng_ptr + 1, 1).to(tl.int32))
    else:
        done = tl.atomic_add(gq_ptr, 1)
        if done == ntiles - 1:
            scale = scale_from_bits(tl.atomic_xchg(gq_ptr + 1, 0), 0, BITS)  # Shift; read, reset for the pool
            tl.atomic_xchg(gq_ptr, 0)
            if STOCHASTIC:
                seed = tl.load(rng_ptr)
                ticket = tl.atomic_add(rng_ptr + 1, 1).to(tl.int32)
            else:
                seed = 0
                ticket = 0
            l2 = d3
            l1 = d2 * d3
            l0 = d1 * l1
            for start in range(0, gn, BLOCK):
                idx = start + tl.arange(0, BLOCK).to(tl.int64)
                block_codes(out_ptr, out_ptr, idx, gn, d1, d2, d3, s0, s1, s2, s3, s0, s1, s2, s3, l0, l1, l2, 1,
                             scale, seed, ticket, BITS, STOCHASTIC, False, False, True)


def gquant_off(dummy: torch.Tensor):
    """``gquant_plan``'s form for a launch without the fused G quantization (GQ=0): placeholder arguments
    the kernel never reads (``dummy``: any tensor of the launch), the mode, the rounding."""
    return (dummy, dummy, 0, 1, 1, 1, 0, 0, 0, 0), 0, False


def gquant_plan(real: torch.Tensor, bits_g: int, rounding_g: str, scale_g: str = "shift"):
    """Launcher side of ``gquant_epilogue`` for the (real part of the) gradient buffer ``real``: the
    kernel arguments (gq scratch, rng state, gn, sizes d1..d3, strides s0..s3) and the GQ mode (2, in place,
    only for a small gradient with G's scale mode ``scale_g`` "shift")."""
    mode = 2 if real.numel() <= SMALL_NUMEL and scale_g == "shift" else 1
    # GQ=2 leaves its scratch zero again (the last program resets it): the shared counter pool, no memset;
    # GQ=1's codes pass reads the max from every program, so it gets a zeroed buffer of its own
    gq = counter_pool(real.device, 3)[:3] if mode == 2 else torch.zeros(3, dtype=torch.int32, device=real.device)
    stochastic = rounding_g == "stochastic"
    rng = device_state(real.device) if stochastic else gq
    sizes, strides = as_4d(real)
    return (gq, rng, real.numel(), sizes[1], sizes[2], sizes[3], *strides), mode, stochastic


def gquant_finish(real: torch.Tensor, plan_args, mode: int, bits: int, stochastic: bool,
                  scale_g: str = "shift") -> None:
    """After a ``GQ=1`` launch: the codes pass over ``real`` in place (scale of G's mode ``scale_g`` and
    ticket from gq)."""
    if mode != 1 or real.numel() == 0:
        return
    gq, rng, n, d1, d2, d3, *strides = plan_args
    scale = torch.empty((), dtype=torch.float32, device=real.device)
    ls = row_major(as_4d(real)[0])
    block = block_elements(False)
    quantize_codes_kernel[(triton.cdiv(n, block),)](
        real, gq[1:], rng, real, scale, n, d1, d2, d3, *strides, *strides, *ls, 0, BITS=bits, STOCHASTIC=stochastic,
        DEVICE_SEED=stochastic, SCALE_MODE=scale_mode_code(scale_g), SAME_ORDER=False, LOGICAL=False, DEQUANT=True, BLOCK=block,
        num_warps=8)
