"""WAGE-style per-tensor quantizer (SPEC §2): absmax -> per-tensor scale -> int8 codes.

``q = round(clip(x / s) * S)`` with ``S = 2**(bits-1)``, ``clip`` to ``±(1 - 1/S)``, so the codes lie in
``[-(S-1), S-1]``; ``s`` by the scale ``mode`` of ``_scale``: ``Shift(max|x|) = 2**round(log2(max|x|))``
("shift"), the fixed scale 1 ("wage") or ``max|x|·S/(S-1)`` ("absmax"). The value a code stands for is
``q * s / S``.

Non-finite input: ``max|x|`` is NaN when ``x`` holds a NaN and +inf when it holds an inf (as
``torch.amax`` gives), and the scale takes that value, in every mode; codes are 0 wherever ``x / s``
is NaN. Dequantizing then yields NaN/inf instead of silently finite numbers.

Two implementations, one contract: ``quantize_reference`` (PyTorch, ``quantize_reference.py``; the oracle and
the CPU path) and two Triton kernels (absmax with an integer atomic max, then scale + codes). The scale stays a
device tensor: nothing is read back to the host. ``block_codes`` / ``quantize_codes_kernel`` also serve the
weight-grad's fused G quantization (``gemm.gquant``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _rng
from .._backend import use_triton
from .._checks import check_bits, check_choice, check_tensor
from .._registry import aot_kernel
from .._triton import tl, triton
from ._buffers import counter_pool, empty_output
from ._dispatch import absent, present
from ._launch import (BoundLaunch, cached_plan, cdiv, as_4d, filling_block, one_program_numel, output_order_walk,
                      padded_channels, row_major)
from ._reduce import publish_max
from ._scale import SCALE_MODES, codes_of, scale_from_bits, scale_mode_code
from .quantize_reference import quantize_reference
from ._tl import strided_offsets_4d
from ._dispatch import custom_op

__all__ = ["quantize", "quantize_dequantize", "dequantize", "quantize_reference", "quantize_triton", "block_codes",
           "quantize_codes_kernel", "block_elements", "as_4d", "row_major"]

# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
def block_elements(linear: bool) -> int:
    """Elements per program: the strided index decode needs int64 registers per element, so the
    strided variants take half the block of the linear ones (no register spills at 8 warps). Launchers
    shrink it for mid-sized tensors (``_launch.filling_block``)."""
    return 2048 if linear else 1024


@triton.jit
def _block_absmax_bits(x_ptr, idx, n, d1, d2, d3, s0, s1, s2, s3, DENSE: tl.constexpr):
    """max |x| over a block of linear indices, as float32 bits (non-negative floats order like their
    bits, NaN's above inf's: the integer max propagates NaN as ``torch.amax`` does)."""
    mask = idx < n
    if DENSE:  # any order is fine for a max: read the storage linearly
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    else:
        x = tl.load(x_ptr + strided_offsets_4d(idx, d1, d2, d3, s0, s1, s2, s3), mask=mask, other=0.0)
    return tl.max(tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True), axis=0)


@triton.jit
def block_codes(x_ptr, out_ptr, idx, n, d1, d2, d3, s0, s1, s2, s3, o0, o1, o2, o3, l0, l1, l2, l3, scale, seed,
                 ticket, BITS: tl.constexpr, STOCHASTIC: tl.constexpr, SAME_ORDER: tl.constexpr,
                 LOGICAL: tl.constexpr, DEQUANT: tl.constexpr):
    """Codes of a block of linear indices (in the output's memory order), stored in the output's layout:
    int8 codes, or (``DEQUANT``) the values they stand for, ``q * scale / S``, in out's float dtype.
    Stochastic noise is drawn at the element's row-major logical index (``LOGICAL``: the iteration
    order is that order; else strides l0..l3 map to it), so any layout gets the same codes."""
    S: tl.constexpr = 2.0 ** (BITS - 1)
    mask = idx < n
    if SAME_ORDER:  # input and output dense in one order: no index decode
        x_offs = idx
        out_offs = idx
    else:
        x_offs = strided_offsets_4d(idx, d1, d2, d3, s0, s1, s2, s3)
        out_offs = strided_offsets_4d(idx, d1, d2, d3, o0, o1, o2, o3)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    if STOCHASTIC and not LOGICAL:
        lidx = strided_offsets_4d(idx, d1, d2, d3, l0, l1, l2, l3)
    else:
        lidx = idx
    y = codes_of(x, scale, seed, ticket, lidx, BITS, STOCHASTIC)
    if DEQUANT:
        tl.store(out_ptr + out_offs, (y * (scale / S)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_offs, y.to(tl.int8), mask=mask)
    return y


_SIG_COMMON = {"n": "i64", "d1": "i64", "d2": "i64", "d3": "i64", "s0": "i64", "s1": "i64", "s2": "i64", "s3": "i64"}
_SIG_OUT = {"o0": "i64", "o1": "i64", "o2": "i64", "o3": "i64", "l0": "i64", "l1": "i64", "l2": "i64", "l3": "i64",
            "seed": "i64"}
_SIG_CM = {"cm_ptr": "*i8", "c0": "i64", "c1": "i64", "c2": "i64", "c3": "i64"}


@aot_kernel(signature={"x_ptr": "*fp32", "amax_bits_ptr": "*i32", "sem_ptr": "*i32", "rng_ptr": "*i64", **_SIG_COMMON},
            constexprs=[{"DENSE": True, "TICKET": False, "BLOCK": 2048}, {"DENSE": False, "TICKET": True, "BLOCK": 1024}],
            num_warps=8, aligned=("x_ptr",))
@triton.jit
def quantize_absmax_kernel(x_ptr, amax_bits_ptr, sem_ptr, rng_ptr, n, d1, d2, d3, s0, s1, s2, s3,
                           DENSE: tl.constexpr, TICKET: tl.constexpr, BLOCK: tl.constexpr):
    """``amax_bits[0]`` = bits of max |x|: every program folds its block's max into the pool counters
    ``sem[0:2]`` (``_reduce.publish_max``: an integer atomic max, the last program takes it out): no zeroed
    buffer, no float atomics, no slot scan. ``TICKET``: that program also takes the next random ticket of the
    device state ``rng`` into ``amax_bits[1]`` (stochastic rounding in the codes pass that follows)."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    last = publish_max(_block_absmax_bits(x_ptr, idx, n, d1, d2, d3, s0, s1, s2, s3, DENSE), tl.num_programs(0),
                       sem_ptr, amax_bits_ptr)
    if last:
        if TICKET:
            tl.store(amax_bits_ptr + 1, tl.atomic_add(rng_ptr + 1, 1, sem="relaxed").to(tl.int32))
        else:
            tl.store(amax_bits_ptr + 1, 0)  # no ticket


@aot_kernel(signature={"x_ptr": "*fp32", "amax_bits_ptr": "*i32", "rng_ptr": "*i64", "codes_ptr": "*i8",
                       "scale_ptr": "*fp32", **_SIG_COMMON, **_SIG_OUT, **_SIG_CM},
            constexprs=[{"BITS": 8, "STOCHASTIC": s, "DEVICE_SEED": s, "SCALE_MODE": m, "SAME_ORDER": o,
                         "LOGICAL": o, "DEQUANT": False, "BLOCK": block_elements(o), "CM": False}
                        for s in (False, True) for o in (True, False) for m in ((0, 2) if o else (0,))]
            + [{"BITS": 8, "STOCHASTIC": True, "DEVICE_SEED": True, "SCALE_MODE": 0, "SAME_ORDER": False,
                "LOGICAL": False, "DEQUANT": False, "BLOCK": 1024, "CM": True}],
            num_warps=8, aligned=("x_ptr", "codes_ptr"))
@triton.jit
def quantize_codes_kernel(x_ptr, amax_bits_ptr, rng_ptr, codes_ptr, scale_ptr, n, d1, d2, d3, s0, s1, s2, s3, o0, o1,
                          o2, o3, l0, l1, l2, l3, seed, cm_ptr, c0, c1, c2, c3, BITS: tl.constexpr,
                          STOCHASTIC: tl.constexpr, DEVICE_SEED: tl.constexpr, SCALE_MODE: tl.constexpr,
                          SAME_ORDER: tl.constexpr, LOGICAL: tl.constexpr, DEQUANT: tl.constexpr, BLOCK: tl.constexpr,
                          CM: tl.constexpr):
    """Scale from the absmax bits, then codes (``_block_codes``) in the output's own layout; ``CM``: the same
    codes also at ``cm_ptr`` with strides c0..c3 (a second layout: the channel-major codes a weight-grad
    reads), written by the pass that makes them instead of a copy afterwards.
    ``DEVICE_SEED``: seed and ticket from the device state / the absmax pass, else (``seed``, 0)."""
    scale = scale_from_bits(tl.load(amax_bits_ptr), SCALE_MODE, BITS)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(scale_ptr, scale)
    if DEVICE_SEED:
        seed = tl.load(rng_ptr)
        ticket = tl.load(amax_bits_ptr + 1)
    else:
        ticket = 0
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    y = block_codes(x_ptr, codes_ptr, idx, n, d1, d2, d3, s0, s1, s2, s3, o0, o1, o2, o3, l0, l1, l2, l3, scale, seed,
                    ticket, BITS, STOCHASTIC, SAME_ORDER, LOGICAL, DEQUANT)
    if CM:
        tl.store(cm_ptr + strided_offsets_4d(idx, d1, d2, d3, c0, c1, c2, c3), y.to(tl.int8), mask=idx < n)


@aot_kernel(signature={"x_ptr": "*fp32", "rng_ptr": "*i64", "codes_ptr": "*i8", "scale_ptr": "*fp32", **_SIG_COMMON,
                       **_SIG_OUT},
            constexprs=[{"BITS": 8, "STOCHASTIC": s, "DEVICE_SEED": s, "SCALE_MODE": m, "DENSE": o,
                         "SAME_ORDER": o, "LOGICAL": o, "DEQUANT": s, "BLOCK": 1024}
                        for s in (False, True) for o in (True, False) for m in ((0, 2) if o else (0,))],
            num_warps=8, aligned=("x_ptr", "codes_ptr"))
@triton.jit
def quantize_small_kernel(x_ptr, rng_ptr, codes_ptr, scale_ptr, n, d1, d2, d3, s0, s1, s2, s3, o0, o1, o2, o3, l0,
                          l1, l2, l3, seed, BITS: tl.constexpr, STOCHASTIC: tl.constexpr, DEVICE_SEED: tl.constexpr,
                          SCALE_MODE: tl.constexpr, DENSE: tl.constexpr, SAME_ORDER: tl.constexpr,
                          LOGICAL: tl.constexpr, DEQUANT: tl.constexpr, BLOCK: tl.constexpr):
    """Small tensors (a classifier's weight or error, a small weight gradient: at most 64 KiB moved,
    ``_launch.one_program_numel``) in one launch of one program: the absmax loop, then the codes loop. Same
    numbers as the two-kernel path."""
    bits = tl.zeros((), tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        bits = tl.maximum(bits, _block_absmax_bits(x_ptr, idx, n, d1, d2, d3, s0, s1, s2, s3, DENSE))
    scale = scale_from_bits(bits, SCALE_MODE, BITS)
    tl.store(scale_ptr, scale)
    if DEVICE_SEED:
        seed = tl.load(rng_ptr)
        ticket = tl.atomic_add(rng_ptr + 1, 1, sem="relaxed").to(tl.int32)  # one program: nobody else reads it
    else:
        ticket = 0
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        block_codes(x_ptr, codes_ptr, idx, n, d1, d2, d3, s0, s1, s2, s3, o0, o1, o2, o3, l0, l1, l2, l3, scale,
                     seed, ticket, BITS, STOCHASTIC, SAME_ORDER, LOGICAL, DEQUANT)


def quantize_triton(x: torch.Tensor, bits: int = 8, stochastic: bool = False, mode: str = "shift",
                    seed: int | None = 0, out: torch.Tensor | None = None, dequant: bool = False,
                    cm: torch.Tensor | None = None, amax: torch.Tensor | None = None):
    """Triton path. ``out``: an int8 tensor of x's shape with any strides (e.g. channels-last, or a view
    into a channel-padded buffer) to write the codes into (``dequant``: a float tensor for the values
    the codes stand for); ``cm``: a second int8 tensor of x's shape that gets the same codes (any
    strides: e.g. channel-major). ``seed`` None: stochastic noise from the device random state. ``amax``: the
    int32 ``[bits of max |x|, ticket]`` its producer already wrote (``bn_relu_bwd(mode="float_absmax")``): no
    pass of its own, the codes pass only."""
    if out is None:
        out = torch.empty_like(x, dtype=x.dtype if dequant else torch.int8)
    if x.dim() > 4:
        if not (x.is_contiguous() and out.is_contiguous()):
            raise ValueError("quantize: tensors with more than 4 dims must be contiguous")
        x, out_view = x.view(-1), out.view(-1)
    else:
        out_view = out
    n = x.numel()
    scale = torch.empty((), device=x.device, dtype=torch.float32)
    if n == 0:
        scale.fill_(1.0)
        return out, scale
    device_seed = stochastic and seed is None
    rng = _rng.device_state(x.device) if device_seed else scale
    small, absmax, codes, args, cs = _quant_launches(x.shape, x.stride(), out_view.stride(),
                                                     None if cm is None else cm.stride(), x.element_size(),
                                                     out_view.element_size(), bits, stochastic, device_seed, mode,
                                                     dequant, amax is None)
    seed_arg = 0 if seed is None else seed
    if small:
        codes(x, rng, out_view, scale, *args, seed_arg)
        return out, scale
    amax_bits = amax
    if amax_bits is None:
        amax_bits = torch.empty(2, device=x.device, dtype=torch.int32)  # [bits, ticket]
        absmax(x, amax_bits, counter_pool(x.device, 2), rng, *args[:8])
    codes(x, amax_bits, rng, out_view, scale, *args, seed_arg, out_view if cm is None else cm, *cs)
    return out, scale


@cached_plan
def _quant_launches(shape, x_strides, out_strides, cm_strides, x_size: int, out_size: int, bits: int,
                    stochastic: bool, device_seed: bool, mode: str, dequant: bool, own_absmax: bool) -> tuple:
    """(one program?, the absmax launch or None, the codes launch, their integer arguments before the seed, the
    second layout's strides) of ``quantize_triton`` for a geometry and a call's flags: the walk in the output's
    memory order (``output_order_walk``), the grids, the constexprs — once per shape."""
    sizes, xs, os_, ls, cs, dense, same_order, logical = output_order_walk(shape, x_strides, out_strides, cm_strides)
    n = 1
    for d in shape:
        n *= d
    common = dict(BITS=bits, STOCHASTIC=stochastic, DEVICE_SEED=device_seed, SCALE_MODE=scale_mode_code(mode),
                  SAME_ORDER=same_order, LOGICAL=logical, DEQUANT=dequant)
    args = (n, sizes[1], sizes[2], sizes[3], *xs, *os_, *ls)
    # one program reads x twice and writes the codes: only while that moves at most PROGRAM_BYTES
    if own_absmax and cm_strides is None and n <= one_program_numel(2 * x_size + out_size):
        return True, None, BoundLaunch(quantize_small_kernel, (1,), DENSE=dense, BLOCK=1024, num_warps=8,
                                       **common), args, cs
    absmax = None
    if own_absmax:
        block = filling_block(n, block_elements(dense), x_size)
        absmax = BoundLaunch(quantize_absmax_kernel, (cdiv(n, block),), DENSE=dense, TICKET=device_seed,
                             BLOCK=block, num_warps=8)
    block = filling_block(n, block_elements(same_order), x_size + out_size)
    codes = BoundLaunch(quantize_codes_kernel, (cdiv(n, block),), BLOCK=block, CM=cm_strides is not None,
                        num_warps=8, **common)
    return False, absmax, codes, args, cs


# ----- the public op (registered with torch.library so torch.compile can trace it) ------------------
@custom_op("ebkernels::quantize", mutates_args=("rng", "cm"))
def _quantize_op(x: torch.Tensor, bits: int, stochastic: bool, scale_mode: str, seed: int,
                 channels_last: bool, pad_channels_to: int, dequant: bool, rng: torch.Tensor, cm: torch.Tensor,
                 amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # seed < 0: stochastic noise from the device random state ``rng`` (which this op advances); ``cm``: an int8
    # tensor shaped like the codes (any strides) that gets them too, written by the same pass (``absent``: none);
    # ``amax``: [bits of max |x|, ticket] from x's producer (``quantize_triton``)
    with _rng.bound(rng):
        return _quantize_impl(x, bits, stochastic, scale_mode, seed, channels_last, pad_channels_to, dequant,
                              present(cm), amax)


def _given_ticket(amax):  # the ticket x's producer took (``amax[1]``), for the reference's noise
    return None if amax is None else amax[1].long()


def _quantize_impl(x, bits, stochastic, scale_mode, seed, channels_last, pad_channels_to, dequant, cm, amax=None):
    seed_arg = None if seed < 0 else seed
    if pad_channels_to > 1:  # (N, Cp, H, W) NHWC codes, Cp = C rounded up; channels >= C are 0
        N, C, H, W = x.shape
        Cp = padded_channels(C, pad_channels_to)
        codes = empty_output((N, Cp, H, W), torch.int8, x.device, torch.channels_last)
        real, cm_real = (codes, cm) if Cp == C else (codes[:, :C], (cm[:, :C] if cm is not None else None))
        if use_triton(x):
            _, s = quantize_triton(x, bits, stochastic, scale_mode, seed_arg, out=real, cm=cm_real, amax=amax)
        else:
            q, s = quantize_reference(x, bits, stochastic, scale_mode, seed_arg, _given_ticket(amax))
            real.copy_(q)
            if cm is not None:
                cm_real.copy_(q)
        if Cp > C:  # (no slice or fill where no channel is padding: aten ops cost host time)
            codes[:, C:].zero_()  # after (and outside) the absmax over the real tensor: 0 adds 0 to every sum
            if cm is not None:
                cm[:, C:].zero_()
        return codes, s
    if use_triton(x):
        out = None
        if channels_last:
            out = torch.empty_like(x, dtype=x.dtype if dequant else torch.int8, memory_format=torch.channels_last)
        return quantize_triton(x, bits, stochastic, scale_mode, seed_arg, out=out, dequant=dequant, cm=cm, amax=amax)
    codes, s = quantize_reference(x, bits, stochastic, scale_mode, seed_arg, _given_ticket(amax))
    if cm is not None:
        cm.copy_(codes)
    if dequant:
        codes = (codes.float() * (s / 2 ** (bits - 1))).to(x.dtype)
    if channels_last:
        codes = codes.contiguous(memory_format=torch.channels_last)
    return codes, s


@_quantize_op.register_fake
def _(x, bits, stochastic, scale_mode, seed, channels_last, pad_channels_to, dequant, rng, cm, amax=None):
    if pad_channels_to > 1:
        N, C, H, W = x.shape
        codes = torch.empty((N, padded_channels(C, pad_channels_to), H, W), dtype=torch.int8, device=x.device,
                            memory_format=torch.channels_last)
        return codes, x.new_empty((), dtype=torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    codes = torch.empty_like(x, dtype=x.dtype if dequant else torch.int8, memory_format=fmt)
    return codes, x.new_empty((), dtype=torch.float32)


def _check_args(x, bits, rounding, mode, seed, channels_last, pad_channels_to):
    check_tensor("x", x)
    check_bits("bits", bits)
    check_choice("rounding", rounding, ("nearest", "stochastic"))
    check_choice("mode", mode, tuple(SCALE_MODES))
    if channels_last and x.dim() != 4:
        raise ValueError(f"channels_last=True needs a 4-D tensor, got {x.dim()}-D shape {tuple(x.shape)}")
    if isinstance(pad_channels_to, bool) or not isinstance(pad_channels_to, int) or pad_channels_to < 0:
        raise ValueError(f"pad_channels_to={pad_channels_to!r} is not supported; accepted: an int >= 0")
    if pad_channels_to > 1 and not channels_last:
        raise ValueError("pad_channels_to needs channels_last=True (a 4-D tensor written in NHWC order)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed={seed!r} is not supported; accepted: None or an int in [0, 2**63)")


def _seed_args(stochastic: bool, seed, device):
    """(seed argument, rng tensor) of the op: the device state (always passed: a mutable argument is never
    optional; the op advances it only when a stochastic call gives no seed)."""
    return (-1 if stochastic and seed is None else (seed or 0)), _rng.device_state(device)


def quantize(x: torch.Tensor, bits: int = 8, rounding: str = "nearest", mode: str = "shift",
             seed: int | None = None, channels_last: bool = False, pad_channels_to: int = 0):
    """Quantize ``x`` to ``bits``-bit integer codes with a per-tensor scale (SPEC §2).

    Returns ``(codes, scale)``: int8 codes of x's shape and a 0-dim float32 tensor on x's device.
    ``rounding``: "nearest" (half to even) or "stochastic" (``floor(x*S/s + u)``, u ~ U[0,1) from Philox at
    each element's row-major index): with ``seed`` an int, the same seed gives the same codes; with
    ``seed=None`` the noise comes from the device's random state (``ebkernels.manual_seed``; each call a
    fresh ticket, drawn on the device: no host synchronisation). ``mode``: "shift" (``s = Shift(max|x|)``),
    "wage" (``s = 1``) or "absmax" (``s = max|x|·S/(S-1)``: max|x| maps to code S-1; ``ops._scale``).
    ``channels_last=True`` writes the codes of a 4-D tensor in NHWC memory order.
    ``pad_channels_to`` (> 1, needs ``channels_last``): the codes come back as (N, Cp, H, W) in NHWC order
    with ``Cp`` = C rounded up to that multiple and channels ``>= C`` equal to 0 (the scale is the one of
    x itself): 16-byte aligned pixel rows for the int8 kernels, at ``Cp - C`` extra bytes per pixel.
    """
    _check_args(x, bits, rounding, mode, seed, channels_last, pad_channels_to)
    stochastic = rounding == "stochastic"
    seed_arg, rng = _seed_args(stochastic, seed, x.device)
    return _quantize_op(x, bits, stochastic, mode, seed_arg, channels_last, pad_channels_to, False, rng, absent(x))


def quantize_dequantize(x: torch.Tensor, bits: int = 8, rounding: str = "nearest", mode: str = "shift",
                        seed: int | None = None) -> torch.Tensor:
    """``dequantize(*quantize(x, ...))`` in one pass (x's dtype and layout): what the weight gradient's G
    quantization hands the optimizer. Same arguments as ``quantize``."""
    _check_args(x, bits, rounding, mode, seed, False, 0)
    stochastic = rounding == "stochastic"
    seed_arg, rng = _seed_args(stochastic, seed, x.device)
    return _quantize_op(x, bits, stochastic, mode, seed_arg, False, 0, True, rng, absent(x))[0]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``codes * scale / 2**(bits-1)`` as float32."""
    check_tensor("codes", codes, (torch.int8,))
    check_bits("bits", bits)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), device=codes.device)
    if scale.device != codes.device:
        raise ValueError(f"codes on {codes.device} and scale on {scale.device}; they must share a device")
    return codes.float() * (scale.float() / 2 ** (bits - 1))
