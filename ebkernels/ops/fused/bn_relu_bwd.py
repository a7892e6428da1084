"""Backward of BatchNorm + activation (``bn_math.ACTIVATIONS``) without a float y kept from the forward (SPEC §9), producing the error
E of the layer below quantized in two passes after the sums.

The math is ``bn_math.bn_grad_in``: per channel the sums [Σ g, Σ g·xhat] (from the recompute epilogue
of ``conv_bn``, or from ``bn_relu_bwd_reduce`` here for a BatchNorm on a float tensor), then per
element ``dy = a·((g - m1) - xhat·m2)``. E's per-tensor scale (``Shift(max |dy|)``, or another
``scale_mode`` of ``ops._scale``) needs every dy before the first code, so:

- ``bn_relu_bwd(..., mode="absmax")``: one read of (dz, y), the float32 bits of max |dy| by an integer
  atomic max (NaN wins), and, for stochastic rounding, the ticket of the device random state (``_rng``);
- ``bn_relu_bwd(..., mode="codes")``: a second read, the int8 codes written in both layouts the
  convolution backward reads: NHWC (input-grad) and channel-major ``[C, N·H·W]`` (weight-grad's K-major
  operand), channels padded to 16 with zeros;
- ``bn_relu_bwd(..., mode="float")``: dy itself (a BatchNorm whose input is a float tensor: the
  residual stream), in the layout of ``out``; with ``addend`` (the gradient the stream's shortcut brings to
  the same tensor) ``dy + addend``, rounded once, in place of autograd's separate sum.

``dz`` may come gathered (``inv``: channel c of y reads channel ``inv[c]`` of dz, -1 = not gathered, g =
0), the backward of a ``ChannelSelection``. References in PyTorch with the same float32 operations
(``bn_relu_bwd_reference``); ``rounding="stochastic"`` draws the same Philox numbers as the kernel (``_rng``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _rng
from ..._backend import use_triton
from ..._registry import aot_kernel
from ..._triton import tl, triton
from .._buffers import counter_pool, empty_channel_major, empty_output
from .._launch import cdiv, BoundLaunch, ELEMENTWISE_WARPS, NO_FP_FUSION, cached_plan, elementwise_tiles
from .._reduce import GROUP, SUMS, TB, ReductionSpace, finish_reduction, publish_max, store_partials, tile_sums
from .._scale import scale_from_bits, scale_mode_code
from .._tl import cast_rne, decode_rows, elementwise_tile, round_half_even
from .._dispatch import custom_op
from .bn_math import act_code, bn_grad_in
from .bn_relu_bwd_reference import bn_relu_bwd_reduce_reference, bn_relu_bwd_reference

__all__ = ["bn_relu_bwd_reduce", "bn_relu_bwd", "bn_relu_bwd_reduce_reference", "bn_relu_bwd_reference",
           "MODES"]

MODES = {"absmax": 0, "codes": 1, "float": 2, "float_absmax": 3}


@triton.jit
def _load_inputs(dz_ptr, y_ptr, inv_ptr, bnp_ptr, m, m_ok, c, c_ok, C, H, W, sd_n, sd_c, sd_h, sd_w, sy_n, sy_c,
                 sy_h, sy_w, HAS_INV: tl.constexpr):
    """(dz, y, a, b, mean, rstd) of a [rows, channels] tile; dz through the channel map when ``HAS_INV``."""
    n, h, w = decode_rows(m, H, W)
    n = n.to(tl.int64)
    h = h.to(tl.int64)
    w = w.to(tl.int64)
    mask = m_ok[:, None] & c_ok[None, :]
    if HAS_INV:
        dc = tl.load(inv_ptr + c, mask=c_ok, other=-1)
        dmask = mask & (dc >= 0)[None, :]
        dc = tl.maximum(dc, 0).to(tl.int64)
    else:
        dc = c.to(tl.int64)
        dmask = mask
    dz = tl.load(dz_ptr + (n * sd_n + h * sd_h + w * sd_w)[:, None] + (dc * sd_c)[None, :], mask=dmask,
                 other=0.0).to(tl.float32)
    y = tl.load(y_ptr + (n * sy_n + h * sy_h + w * sy_w)[:, None] + (c.to(tl.int64) * sy_c)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    a = tl.load(bnp_ptr + c, mask=c_ok, other=0.0)[None, :]
    b = tl.load(bnp_ptr + C + c, mask=c_ok, other=0.0)[None, :]
    mean = tl.load(bnp_ptr + 2 * C + c, mask=c_ok, other=0.0)[None, :]
    rstd = tl.load(bnp_ptr + 3 * C + c, mask=c_ok, other=0.0)[None, :]
    return dz, y, a, b, mean, rstd


_REDUCE_SIG = {"dz_ptr": "*bf16", "y_ptr": "*bf16", "inv_ptr": "*i32", "bnp_ptr": "*fp32", "part_ptr": "*fp32",
               "grp_ptr": "*fp32", "out_ptr": "*fp32", "sem_ptr": "*i32", "M": "i32", "C": "i32", "H": "i32",
               "W": "i32", "sd_n": "i64", "sd_c": "i64", "sd_h": "i64", "sd_w": "i64", "sy_n": "i64", "sy_c": "i64",
               "sy_h": "i64", "sy_w": "i64"}


@aot_kernel(signature=_REDUCE_SIG,
            constexprs=[{"HAS_INV": i, "ACT": 1, "BP": 32, "CB": 128, "TB": TB, "GROUP": GROUP} for i in (False, True)],
            num_warps=ELEMENTWISE_WARPS, fp_fusion=False)
@triton.jit
def bn_relu_bwd_reduce_kernel(dz_ptr, y_ptr, inv_ptr, bnp_ptr, part_ptr, grp_ptr, out_ptr, sem_ptr, M, C, H, W, sd_n,
                              sd_c, sd_h, sd_w, sy_n, sy_c, sy_h, sy_w, HAS_INV: tl.constexpr, ACT: tl.constexpr,
                              BP: tl.constexpr, CB: tl.constexpr, TB: tl.constexpr, GROUP: tl.constexpr):
    """Grid (row tiles, channel blocks): the sums [Σ g, Σ g·xhat] per channel, merged in the kernel."""
    pid_m, pid_n, m, c, m_ok, c_ok = elementwise_tile(M, C, BP, CB)
    T = tl.num_programs(0)
    dz, y, a, b, mean, rstd = _load_inputs(dz_ptr, y_ptr, inv_ptr, bnp_ptr, m, m_ok, c, c_ok, C, H, W, sd_n, sd_c,
                                           sd_h, sd_w, sy_n, sy_c, sy_h, sy_w, HAS_INV)
    _, g, xhat = bn_grad_in(dz, y, a, b, mean, rstd, 0.0, 0.0, ACT)
    s0, s1 = tile_sums(g, g * xhat, m_ok)
    store_partials(part_ptr, pid_m, T, C, c, c_ok, s0, s1, s0, s1, 1)
    finish_reduction(part_ptr, grp_ptr, out_ptr, sem_ptr, pid_m, T, pid_n, tl.num_programs(1), M, BP, c, c_ok, C, 1,
                     GROUP, TB, CB)


_BWD_SIG = {"dz_ptr": "*bf16", "y_ptr": "*bf16", "inv_ptr": "*i32", "bnp_ptr": "*fp32", "sums_ptr": "*fp32",
            "amax_ptr": "*i32", "sem_ptr": "*i32", "rng_ptr": "*i64", "out_ptr": "*i8", "cm_ptr": "*i8", "scale_ptr": "*fp32",
            "add_ptr": "*bf16", "M": "i32",
            "C": "i32", "Cp": "i32", "H": "i32", "W": "i32", "sd_n": "i64", "sd_c": "i64", "sd_h": "i64",
            "sd_w": "i64", "sy_n": "i64", "sy_c": "i64", "sy_h": "i64", "sy_w": "i64", "so_n": "i64", "so_c": "i64",
            "so_h": "i64", "so_w": "i64", "sa_n": "i64", "sa_c": "i64", "sa_h": "i64", "sa_w": "i64", "n_f": "fp32"}
_BWD_AOT = ([{"MODE": 0, "HAS_INV": False, "HAS_SUMS": True, "ACT": 1, "BITS": 8, "STOCHASTIC": s, "CM": True,
              "SCALE_MODE": 0, "BP": 32, "CB": 128, "HAS_ADD": False} for s in (False, True)]
            + [{"MODE": 1, "HAS_INV": False, "HAS_SUMS": True, "ACT": 1, "BITS": 8, "STOCHASTIC": s, "CM": True,
                "SCALE_MODE": m, "BP": 16 if s else 32, "CB": 128, "HAS_ADD": False} for s in (False, True)
               for m in (0, 2)]
            + [{"MODE": 2, "HAS_INV": i, "HAS_SUMS": True, "ACT": 1, "BITS": 8, "STOCHASTIC": False, "CM": False,
                "SCALE_MODE": 0, "BP": 32, "CB": 128, "HAS_ADD": a} for i in (False, True) for a in (False, True)]
            + [{"MODE": 3, "HAS_INV": i, "HAS_SUMS": True, "ACT": 1, "BITS": 8, "STOCHASTIC": s, "CM": False,
                "SCALE_MODE": 0, "BP": 32, "CB": 128, "HAS_ADD": True} for i in (False, True) for s in (False, True)])


@aot_kernel(signature=_BWD_SIG, constexprs=_BWD_AOT, num_warps=ELEMENTWISE_WARPS, fp_fusion=False)
@triton.jit
def bn_relu_bwd_kernel(dz_ptr, y_ptr, inv_ptr, bnp_ptr, sums_ptr, amax_ptr, sem_ptr, rng_ptr, out_ptr, cm_ptr, scale_ptr,
                       add_ptr, M, C, Cp, H, W, sd_n, sd_c, sd_h, sd_w, sy_n, sy_c, sy_h, sy_w, so_n, so_c, so_h, so_w,
                       sa_n, sa_c, sa_h, sa_w, n_f, MODE: tl.constexpr, HAS_INV: tl.constexpr, HAS_SUMS: tl.constexpr, ACT: tl.constexpr,
                       BITS: tl.constexpr, STOCHASTIC: tl.constexpr, CM: tl.constexpr, SCALE_MODE: tl.constexpr,
                       BP: tl.constexpr, CB: tl.constexpr, HAS_ADD: tl.constexpr):
    """Grid (row tiles, channel blocks over Cp). ``MODE`` 0: max |dy| bits into ``amax[0]`` (``publish_max``
    over the pool counters ``sem[0:2]``; the last program also takes the random ticket into ``amax[1]`` when
    ``STOCHASTIC``); 1: codes at ``m * Cp + c`` (NHWC)
    and, with ``CM``, at ``c * M + m`` (channel-major), channels C..Cp-1 written 0, the scale of ``amax[0]``
    in ``SCALE_MODE`` (``_scale``) stored by program (0, 0); 2: dy in ``out`` (3: and, as mode 0, the bits of
    max |stored dy| and the ticket into ``amax``, for a quantizer of it: ``quantize(amax=)``) (strides so_*; ``HAS_ADD``: plus
    ``add`` (strides sa_*: e.g. a channel prefix of a wider gradient) before the one rounding). ``HAS_SUMS`` False: eval-mode BatchNorm (m1 = m2 = 0)."""
    pid_m, pid_n, m, c, m_ok, c_ok = elementwise_tile(M, C, BP, CB)
    dz, y, a, b, mean, rstd = _load_inputs(dz_ptr, y_ptr, inv_ptr, bnp_ptr, m, m_ok, c, c_ok, C, H, W, sd_n, sd_c,
                                           sd_h, sd_w, sy_n, sy_c, sy_h, sy_w, HAS_INV)
    if HAS_SUMS:
        m1 = tl.math.div_rn(tl.load(sums_ptr + c, mask=c_ok, other=0.0), n_f)[None, :]  # "/" is approximate
        m2 = tl.math.div_rn(tl.load(sums_ptr + C + c, mask=c_ok, other=0.0), n_f)[None, :]  # on NVIDIA GPUs
    else:
        m1 = 0.0
        m2 = 0.0
    dy, _, _ = bn_grad_in(dz, y, a, b, mean, rstd, m1, m2, ACT)
    mask = m_ok[:, None] & c_ok[None, :]
    first = (pid_m == 0) & (pid_n == 0)
    if MODE == 0:
        bits = tl.abs(tl.where(mask, dy, 0.0)).to(tl.int32, bitcast=True)
        num_n = tl.num_programs(1)
        last = publish_max(tl.max(tl.max(bits, axis=1), axis=0), tl.num_programs(0) * num_n, sem_ptr, amax_ptr)
        if last:
            if STOCHASTIC:
                tl.store(amax_ptr + 1, tl.atomic_add(rng_ptr + 1, 1, sem="relaxed").to(tl.int32))
            else:
                tl.store(amax_ptr + 1, 0)  # no ticket
    elif MODE == 1:
        S: tl.constexpr = 2.0 ** (BITS - 1)
        scale = scale_from_bits(tl.load(amax_ptr), SCALE_MODE, BITS)
        q = tl.minimum(tl.maximum(tl.math.div_rn(dy, scale) * S, -(S - 1.0)), S - 1.0)
        offs = m.to(tl.int64)[:, None] * C + c[None, :]
        if STOCHASTIC:
            q = tl.floor(q + _rng.uniform(tl.load(rng_ptr), tl.load(amax_ptr + 1), offs))
        else:
            q = round_half_even(q)
        q = tl.where((q != q) | ~mask, 0.0, q).to(tl.int8)
        pad_mask = m_ok[:, None] & (c < Cp)[None, :]
        tl.store(out_ptr + m.to(tl.int64)[:, None] * Cp + c[None, :], q, mask=pad_mask)
        if CM:
            tl.store(cm_ptr + c.to(tl.int64)[None, :] * M + m[:, None], q, mask=pad_mask)
        if first:
            tl.store(scale_ptr, scale)
    else:
        n, h, w = decode_rows(m, H, W)
        offs = (n.to(tl.int64) * so_n + h.to(tl.int64) * so_h + w.to(tl.int64) * so_w)[:, None] + \
            c.to(tl.int64)[None, :] * so_c
        if HAS_ADD:
            a_offs = (n.to(tl.int64) * sa_n + h.to(tl.int64) * sa_h + w.to(tl.int64) * sa_w)[:, None] + \
                c.to(tl.int64)[None, :] * sa_c
            dy = dy + tl.load(add_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
        stored = cast_rne(dy, out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, stored, mask=mask)
        if MODE == 3:  # and, for the quantizer that reads it next, max |stored value| and its random ticket
            bits = tl.abs(tl.where(mask, stored.to(tl.float32), 0.0)).to(tl.int32, bitcast=True)
            last = publish_max(tl.max(tl.max(bits, axis=1), axis=0), tl.num_programs(0) * tl.num_programs(1),
                               sem_ptr, amax_ptr)
            if last:
                if STOCHASTIC:
                    tl.store(amax_ptr + 1, tl.atomic_add(rng_ptr + 1, 1, sem="relaxed").to(tl.int32))
                else:
                    tl.store(amax_ptr + 1, 0)


# --------------------------------------------------------------------------------------------------
# Launchers and ops
# --------------------------------------------------------------------------------------------------
@cached_plan
def _reduce_plan(shape, dz_rows, y_rows, has_inv: bool, act: str) -> tuple:
    """(launch, ints, tiles, channel blocks) of ``bn_relu_bwd_reduce_kernel`` for a geometry: once per shape."""
    N, C, H, W = shape
    M = N * H * W
    BP, CB = elementwise_tiles(C)
    T, num_n = cdiv(M, BP), cdiv(C, CB)
    launch = BoundLaunch(bn_relu_bwd_reduce_kernel, (T, num_n), HAS_INV=has_inv, ACT=act_code(act), BP=BP, CB=CB,
                         TB=TB, GROUP=GROUP, num_warps=ELEMENTWISE_WARPS, **NO_FP_FUSION)
    return launch, (M, C, H, W, *dz_rows, *y_rows), T, num_n


def _reduce_triton(dz, y, bnp, inv, act):
    launch, ints, T, num_n = _reduce_plan(y.shape, dz.stride(), y.stride(), inv is not None, act)
    space = ReductionSpace(SUMS, T, num_n, y.shape[1], y.device)
    launch(dz, y, inv if inv is not None else space.sem, bnp, space.part, space.grp, space.out, space.sem, *ints)
    return space.out


@custom_op("ebkernels::bn_relu_bwd_reduce", mutates_args=())
def _reduce_op(dz: torch.Tensor, y: torch.Tensor, bnp: torch.Tensor, inv: Optional[torch.Tensor],
               act: str) -> torch.Tensor:
    if use_triton(dz, y) and y.numel() < 2**31:
        return _reduce_triton(dz, y, bnp, inv, act)
    return bn_relu_bwd_reduce_reference(dz, y, bnp, inv, act)


@_reduce_op.register_fake
def _(dz, y, bnp, inv, act):
    return y.new_empty((2, y.shape[1]), dtype=torch.float32)


def bn_relu_bwd_reduce(dz, y, bnp, inv=None, act="relu"):
    """[Σ g, Σ g·xhat] (2, C) of the gradient ``dz`` w.r.t. ``act(y*a + b)`` (through the channel map
    ``inv``), y any float tensor (N, C, H, W)."""
    act_code(act)
    return _reduce_op(dz, y, bnp, inv, act)


@cached_plan
def _bwd_plan(shape, dz_rows, y_rows, add_rows, mode: str, has_inv: bool, has_sums: bool, act: str, bits: int,
              stochastic: bool, pad_to: int, channels_last_out: bool, scale_mode: str) -> tuple:
    """(launch, ints, Cp) of ``bn_relu_bwd_kernel`` for a geometry and a call's flags: once per shape
    (``add_rows``: the addend's strides, None without one)."""
    N, C, H, W = shape
    M = N * H * W
    m = MODES[mode]
    Cp = C if (mode != "codes" or pad_to <= 1) else -(-C // pad_to) * pad_to
    # stochastic codes: the Philox state per element as well: 2K elements per program
    BP, CB = elementwise_tiles(Cp, 2048 if (stochastic and mode == "codes") else 4096)
    if mode in ("absmax", "codes"):
        so = (0, 0, 0, 0)  # (codes: the kernel derives both code layouts from Cp)
    elif channels_last_out:  # the float result: NHWC or NCHW, contiguous
        so = (H * W * C, 1, W * C, C)
    else:
        so = (C * H * W, H * W, W, 1)
    launch = BoundLaunch(bn_relu_bwd_kernel, (cdiv(M, BP), cdiv(Cp, CB)), MODE=m, HAS_INV=has_inv,
                         HAS_SUMS=has_sums, ACT=act_code(act), BITS=bits, STOCHASTIC=stochastic, CM=True,
                         SCALE_MODE=scale_mode_code(scale_mode) if mode == "codes" else 0, BP=BP, CB=CB,
                         HAS_ADD=add_rows is not None, num_warps=ELEMENTWISE_WARPS, **NO_FP_FUSION)
    ints = (M, C, Cp, H, W, *dz_rows, *y_rows, *so, *(add_rows if add_rows is not None else (0, 0, 0, 0)), float(M))
    return launch, ints, Cp


def _bwd_triton(dz, y, bnp, sums, inv, act, mode, bits, stochastic, pad_to, amax, out_dtype, channels_last_out,
                scale_mode, addend=None):
    shape = y.shape
    dev = y.device
    launch, ints, Cp = _bwd_plan(shape, dz.stride(), y.stride(), None if addend is None else addend.stride(), mode,
                                 inv is not None, sums is not None, act, bits, stochastic, pad_to, channels_last_out,
                                 scale_mode)
    rng = _rng.device_state(dev) if stochastic else bnp
    scale = out = cm = None
    sem = counter_pool(dev, 2)
    if mode == "absmax":
        out = torch.empty_strided((2,), (1,), dtype=torch.int32, device=dev)  # [bits, ticket] (cheaper than empty)
        amax, dst, dcm = out, out, out
    elif mode == "codes":
        N, _, H, W = shape
        out = empty_output((N, Cp, H, W), torch.int8, dev, torch.channels_last)
        cm = empty_channel_major((N, Cp, H, W), torch.int8, dev)
        scale = empty_output((), torch.float32, dev)
        dst, dcm = out, cm
    else:
        out = empty_output(shape, out_dtype, dev, torch.channels_last if channels_last_out else torch.contiguous_format)
        amax = torch.empty_strided((2,), (1,), dtype=torch.int32, device=dev) if mode == "float_absmax" else bnp
        dst, dcm = out, out
    launch(dz, y, inv if inv is not None else bnp, bnp, sums if sums is not None else bnp, amax, sem, rng, dst, dcm,
           scale if scale is not None else bnp, addend if addend is not None else bnp, *ints)
    if mode == "codes":
        return out, cm, scale
    if mode == "absmax":
        return (out,)
    return (out,) if mode == "float" else (out, amax)


def _bwd_direct(dz, y, bnp, sums, inv, act, out_mode, bits, stochastic, pad_to, amax, out_dtype, channels_last_out,
                scale_mode, addend, rng) -> tuple:
    """The op's direct path: its results without the empty tensors padding them to three (``bn_relu_bwd``)."""
    with _rng.bound(rng):
        return tuple(_bwd_impl(dz, y, bnp, sums, inv, act, out_mode, bits, stochastic, pad_to, amax, out_dtype,
                               channels_last_out, scale_mode, addend))


@custom_op("ebkernels::bn_relu_bwd", mutates_args=("rng",), direct=_bwd_direct)
def _bwd_op(dz: torch.Tensor, y: torch.Tensor, bnp: torch.Tensor, sums: Optional[torch.Tensor],
            inv: Optional[torch.Tensor], act: str, out_mode: str, bits: int, stochastic: bool, pad_to: int,
            amax: Optional[torch.Tensor], out_dtype: Optional[torch.dtype], channels_last_out: bool,
            scale_mode: str, addend: Optional[torch.Tensor],
            rng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # rng: the device random state, which mode "absmax" advances for stochastic rounding (the ticket); always
    # given (a mutable argument is never optional). Three results always (a mutating op returns a fixed tuple
    # to be functionalized): modes "absmax" and "float" pad theirs with empty tensors. ``out_mode``: not
    # ``mode``, a keyword of torch's auto_functionalized
    return _three(_bwd_direct(dz, y, bnp, sums, inv, act, out_mode, bits, stochastic, pad_to, amax, out_dtype,
                              channels_last_out, scale_mode, addend, rng), y)


def _three(results, y):
    return tuple(results) + tuple(y.new_empty((0,)) for _ in range(3 - len(results)))


def _bwd_impl(dz, y, bnp, sums, inv, act, mode, bits, stochastic, pad_to, amax, out_dtype, channels_last_out,
              scale_mode, addend):
    if use_triton(dz, y) and y.numel() < 2**31:
        return list(_bwd_triton(dz, y, bnp, sums, inv, act, mode, bits, stochastic, pad_to, amax, out_dtype,
                                channels_last_out, scale_mode, addend))
    return list(bn_relu_bwd_reference(dz, y, bnp, sums, inv, act, mode, bits, stochastic, pad_to, amax, out_dtype,
                                      channels_last_out, scale_mode, addend))


@_bwd_op.register_fake
def _(dz, y, bnp, sums, inv, act, out_mode, bits, stochastic, pad_to, amax, out_dtype, channels_last_out,
      scale_mode, addend, rng):
    N, C, H, W = y.shape
    if out_mode == "absmax":
        return _three([y.new_empty((2,), dtype=torch.int32)], y)
    if out_mode in ("float", "float_absmax"):
        fmt = torch.channels_last if channels_last_out else torch.contiguous_format
        out = [torch.empty((N, C, H, W), dtype=out_dtype, device=y.device, memory_format=fmt)]
        return _three(out + ([y.new_empty((2,), dtype=torch.int32)] if out_mode == "float_absmax" else []), y)
    Cp = C if pad_to <= 1 else -(-C // pad_to) * pad_to
    nhwc = torch.empty((N, Cp, H, W), dtype=torch.int8, device=y.device, memory_format=torch.channels_last)
    cm = torch.empty((Cp, N, H, W), dtype=torch.int8, device=y.device).permute(1, 0, 2, 3)
    return nhwc, cm, y.new_empty((), dtype=torch.float32)


def bn_relu_bwd(dz, y, bnp, sums=None, inv=None, act="relu", mode="codes", bits=8, stochastic=False, pad_to=16,
                amax=None, out_dtype=torch.float32, channels_last_out=True, scale_mode="shift", addend=None):
    """Per element ``dy = a·((g - m1) - xhat·m2)`` (``sums`` None: eval, m1 = m2 = 0). ``mode="absmax"``:
    ``[bits of max |dy|, random ticket]`` (int32 [2]); ``"codes"`` (needs that ``amax``): ``(codes NHWC (N, Cp,
    H, W), codes channel-major (same shape, memory [Cp, N, H, W]), scale)`` with the scale rule ``scale_mode``
    ("shift", "wage" or "absmax": ``ops._scale``); ``"float"``: ``(dy,)`` in
    ``out_dtype``, channels-last when ``channels_last_out`` (``addend``, of y's shape: ``(dy + addend,)``, the sum
    in float32, rounded once); ``"float_absmax"``: ``(dy, [bits of max |dy|, ticket])``, what a quantizer of dy
    takes as its ``amax`` instead of a pass of its own."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; accepted: {', '.join(MODES)}")
    if mode == "codes" and amax is None:
        raise ValueError("mode='codes' needs the amax that mode='absmax' returned")
    if addend is not None and (not mode.startswith("float") or tuple(addend.shape) != tuple(y.shape)):
        raise ValueError(f"an addend needs mode='float' and y's shape {tuple(y.shape)}; got mode={mode!r}, "
                         f"shape {tuple(addend.shape)}")
    rng = _rng.device_state(y.device)
    act_code(act)
    out = _bwd_op(dz, y, bnp, sums, inv, act, mode, int(bits), bool(stochastic), int(pad_to), amax, out_dtype,
                  bool(channels_last_out), str(scale_mode), addend, rng)
    return out if mode == "codes" else out[:2] if mode == "float_absmax" else out[:1]
