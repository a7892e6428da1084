"""The weight-grad's G quantization (SPEC §2: ``Shift(max|G|)``, stochastic rounding by default) fused into
the GEMM that produces G: the device side (``gquant_max`` / ``gquant_tile``, called from
``mainloop.finish_gemm_tile``) and the launcher side (``gquant_plan`` / ``gquant_off`` / ``gquant_finish``).
The codes are the quantizer's own (``ops._scale.codes_of``), so G matches ``quantize_dequantize`` bit for bit.
G's scale is ``Shift(max|G|)``, or ``max|G|·S/(S-1)`` in mode absmax: the mode reaches only the codes pass
(``gquant_codes_kernel``), so an absmax G takes GQ=1 at every size (no new GEMM constexpr).

Two modes, neither with a serial phase (issue 20 item 1) or a fence (item 2):

- ``GQ=1`` (several output tiles): every program that finishes a tile folds it into max |G| with a relaxed
  integer ``atomic_max`` on the float32 bits (order-free, so deterministic; NaN above all), the program that
  finishes tile 0 takes the random ticket; the launcher then runs the multi-program codes pass
  (``gquant_codes_kernel``), which reads both: the scale is known only when every tile is done, and a
  kernel boundary is the only wait that costs nothing. The three words [counter, max, ticket] come from the
  stream's counter pool (zero at launch) and the codes pass's last program zeroes them again: no memset.
- ``GQ=2`` (the launch has ONE output tile and G is that dense row-major buffer): the one program that
  finishes the tile holds all of G in registers, so it knows the scale at once and stores the values of the
  codes instead of the raw tile: no second pass, no re-read, no extra launch.
"""
from __future__ import annotations

import torch

from ..._registry import aot_kernel
from ..._rng import device_state
from ..._triton import tl, triton
from .._buffers import counter_slice
from .._launch import BoundLaunch, cached_plan, cdiv, filling_block, pad_4d
from .._scale import codes_of, scale_from_bits, scale_mode_code
from ..quantize import block_codes, block_elements

__all__ = ["gquant_max", "gquant_tile", "gquant_codes_kernel", "gquant_off", "gquant_plan", "gquant_finish"]


@triton.jit
def gquant_max(y, mask, gq_ptr, rng_ptr, first, STOCHASTIC: tl.constexpr):
    """``GQ=1``: fold the finished fp32 tile ``y`` into ``gq[1]`` (bits of max |G|; ``gq`` int32 [3], zero at
    launch) with a relaxed atomic max; the ``first`` program (true in exactly one) takes the random ticket
    into ``gq[2]``. Relaxed: only the codes pass, a later launch, reads them."""
    bits = tl.max(tl.max(tl.where(mask, tl.abs(y), 0.0).to(tl.int32, bitcast=True), axis=1), axis=0)
    tl.atomic_max(gq_ptr + 1, bits, sem="relaxed")
    if STOCHASTIC:
        if first:
            tl.store(gq_ptr + 2, tl.atomic_add(rng_ptr + 1, 1, sem="relaxed").to(tl.int32))


@triton.jit
def gquant_tile(y, mask, offs, out_ptr, rng_ptr, BITS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """``GQ=2``: the launch's only tile ``y`` (fp32, ``mask`` the real elements, ``offs`` their int64 offsets
    in the dense row-major G = their logical indices): max |G|, its scale, the codes (the quantizer's
    ``codes_of``, noise at the logical index) and their values stored at ``offs``."""
    bits = tl.max(tl.max(tl.where(mask, tl.abs(y), 0.0).to(tl.int32, bitcast=True), axis=1), axis=0)
    scale = scale_from_bits(bits, 0, BITS)  # Shift: an absmax G takes GQ=1 (module docstring)
    if STOCHASTIC:
        seed = tl.load(rng_ptr)
        ticket = tl.atomic_add(rng_ptr + 1, 1, sem="relaxed").to(tl.int32)
    else:
        seed = 0
        ticket = 0
    q = codes_of(y, scale, seed, ticket, offs, BITS, STOCHASTIC)
    S: tl.constexpr = 2.0 ** (BITS - 1)
    tl.store(out_ptr + offs, (q * (scale / S)).to(out_ptr.dtype.element_ty), mask=mask)


_SIG = {"g_ptr": "*fp32", "gq_ptr": "*i32", "rng_ptr": "*i64", "n": "i64", "d1": "i64", "d2": "i64", "d3": "i64",
        "s0": "i64", "s1": "i64", "s2": "i64", "s3": "i64", "l0": "i64", "l1": "i64", "l2": "i64", "l3": "i64"}


@aot_kernel(signature=_SIG, constexprs=[{"BITS": 8, "STOCHASTIC": s, "SCALE_MODE": m, "BLOCK": 1024} for s in (True, False)
                        for m in (0, 2)],
            num_warps=8)
@triton.jit
def gquant_codes_kernel(g_ptr, gq_ptr, rng_ptr, n, d1, d2, d3, s0, s1, s2, s3, l0, l1, l2, l3, BITS: tl.constexpr,
                        STOCHASTIC: tl.constexpr, SCALE_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """``GQ=1``'s codes pass, in place over the real gradient view (n elements; sizes d1..d3, strides s0..s3;
    logical strides l0..l3 for the noise): the scale of ``gq[1]`` in ``SCALE_MODE``, the ticket ``gq[2]``, the quantizer's
    codes (``quantize.block_codes``) stored as their values. Each program then counts itself in at ``gq[0]``
    (acquire-release, after a CTA barrier: every thread has read gq) and the last one zeroes the three words."""
    scale = scale_from_bits(tl.load(gq_ptr + 1), SCALE_MODE, BITS)
    ticket = tl.load(gq_ptr + 2)
    if STOCHASTIC:
        seed = tl.load(rng_ptr)
    else:
        seed = 0
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    block_codes(g_ptr, g_ptr, idx, n, d1, d2, d3, s0, s1, s2, s3, s0, s1, s2, s3, l0, l1, l2, l3, scale, seed, ticket,
                BITS, STOCHASTIC, False, False, True)
    tl.debug_barrier()
    done = tl.atomic_add(gq_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        tl.store(gq_ptr + 1, 0)
        tl.store(gq_ptr + 2, 0)
        tl.atomic_xchg(gq_ptr, 0, sem="relaxed")


def gquant_off(dummy: torch.Tensor):
    """``gquant_plan``'s form for a launch without the fused G quantization (GQ=0): placeholder arguments
    the kernel never reads (``dummy``: any tensor of the launch), the mode, the rounding."""
    return (dummy, dummy, 0, 1, 1, 1, 0, 0, 0, 0), 0, False


def single_tile_mode(real: torch.Tensor, out: torch.Tensor, n_tiles: int) -> bool:
    """Whether ``GQ=2`` applies: one output tile, and the gradient is all of ``out``, dense row-major (its
    memory offsets are the logical indices the stochastic noise is drawn at)."""
    return (n_tiles == 1 and real.data_ptr() == out.data_ptr() and real.numel() == out.numel()
            and out.is_contiguous())


def gquant_plan(real: torch.Tensor, bits_g: int, rounding_g: str, scale_g: str = "shift",
                out: torch.Tensor | None = None, n_tiles: int = 0):
    """Launcher side of the fused G quantization for the (real part of the) gradient buffer ``real`` of
    ``out`` (a launch of ``n_tiles`` output tiles; G's scale mode ``scale_g``): the kernel arguments (gq
    scratch, rng state, gn, sizes d1..d3, strides s0..s3), the GQ mode and the rounding."""
    stochastic = rounding_g == "stochastic"
    if out is not None and scale_g == "shift" and single_tile_mode(real, out, n_tiles):
        rng = device_state(real.device) if stochastic else out
        return (out, rng, 0, 1, 1, 1, 0, 0, 0, 0), 2, stochastic
    gq = counter_slice(real.device, 0, 3)  # [counter, max bits, ticket]: zero; the codes pass leaves them zero
    rng = device_state(real.device) if stochastic else gq
    return (gq, rng, *_view_args(real.shape, real.stride())), 1, stochastic


@cached_plan
def _view_args(shape, strides) -> tuple:
    """(n, sizes d1..d3, strides s0..s3) of a gradient view of this geometry, padded to 4 dims: once per shape."""
    sizes, strides4 = pad_4d(shape, strides)
    n = 1
    for d in shape:
        n *= d
    return (n, sizes[1], sizes[2], sizes[3], *strides4)


@cached_plan
def _codes_launch(n: int, d1: int, d2: int, d3: int, itemsize: int, bits: int, stochastic: bool, scale_g: str):
    """(the codes pass bound with its grid and constexprs, G's logical row-major strides): once per shape."""
    block = filling_block(n, block_elements(False), 2 * itemsize)
    launch = BoundLaunch(gquant_codes_kernel, (cdiv(n, block),), BITS=bits, STOCHASTIC=stochastic,
                         SCALE_MODE=scale_mode_code(scale_g), BLOCK=block, num_warps=8)
    return launch, (d1 * d2 * d3, d2 * d3, d3, 1)  # row-major strides of the logical (n / (d1·d2·d3), d1, d2, d3)


def gquant_finish(real: torch.Tensor, plan_args, mode: int, bits: int, stochastic: bool,
                  scale_g: str = "shift") -> None:
    """After a ``GQ=1`` launch: the codes pass over ``real`` in place (scale of G's mode ``scale_g`` and
    ticket from gq)."""
    if mode != 1 or real.numel() == 0:
        return
    gq, rng, n, d1, d2, d3, *strides = plan_args
    launch, ls = _codes_launch(n, d1, d2, d3, real.element_size(), bits, stochastic, scale_g)
    launch(real, gq, rng, n, d1, d2, d3, *strides, *ls)
