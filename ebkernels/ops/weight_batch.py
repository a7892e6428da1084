"""The weight codes of many convolutions from one pair of multi-program launches (issue 20 item 1).

Before: each fused block quantized its own weight in one launch of ONE program (up to 64K weights: 5-50 µs
on one SM, ~100 times per PreResNet-101 step), or in two launches plus a third in backward for a large one.
Now the codes of every weight of a model come from two launches over all of them together, right where the
step begins (the model's forward: ``fusion`` pushes the batch, every block looks its weight up):

- ``weight_absmax_many_kernel``: one program per ``BLOCK`` weights of one tensor, max |w| per tensor with an
  integer atomic max and a last arriver per tensor (``_reduce.publish_max``: O(1), order-free);
- ``weight_codes_many_kernel``: one program per [64 Cout, 64 Cin] tile of one tap of one tensor (padding
  included), the scale ``Shift(max|w|)`` (WAGE mode: 1) and the codes in both GEMM layouts (``weight_codes``:
  OHWI with Cin padded, Cout-contiguous with Cout padded), both stored in 64-byte runs (the tile is
  transposed on chip), every tensor's regions in one flat int8 buffer.

No program moves more than 24 KiB; the tensors are read through one anchor pointer (the lowest address)
plus per-tensor element offsets from a small device table, cached per set of weights (built once, so a
captured step does no host-to-device copy). Semantics: the codes are ``quantize(W)`` of the weight as it is
when the model's forward starts, bit-identical to the per-layer path; a block whose weight changed since
(its ``_version``), or that runs outside such a forward, quantizes its own weight with the same two kernels
(``weight_quant``, a batch of one). The fused block keeps both layouts for backward only for weights of at most
``KEEP_CODES_NUMEL`` elements (no weight launch in backward for them); those form batches of their own, so a kept
view does not keep the large weights' codes alive, and a large weight's codes are re-derived in backward.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

from .._backend import use_triton
from .._registry import aot_kernel
from .._triton import tl, triton
from ._buffers import counter_pool, empty_output
from ._launch import MIN_PROGRAMS, cdiv, padded_channels
from ._reduce import publish_max
from ._scale import scale_from_bits, scale_mode_code
from .quantize import quantize_reference
from ._tl import round_half_even
from .weight_codes import _load_weight_block
from ._dispatch import custom_op

__all__ = ["WeightItem", "weight_codes_many", "weight_codes_many_reference", "weight_quant", "recode_many", "BLOCK",
           "TILE", "KEEP_CODES_NUMEL"]

BLOCK = 2048
# weights up to this many elements keep their codes for backward (the fused block); their codes share a buffer
# apart from the larger weights', whose buffer then dies with the forward (``weight_codes_many``)
KEEP_CODES_NUMEL = 1 << 16
TILE = 64  # the codes kernel's [Cout, Cin] tile
_COLS = 16  # table row: w_off CO CI COp CIp KHW sw_o sw_i sw_t n_real n_pad first_a blocks_a first_b fwd_off dgrad_off
_SIG = {"w_ptr": "*fp32", "table_ptr": "*i64", "prog_ptr": "*i32", "cnt_ptr": "*i32", "bits_ptr": "*i32",
        "scale_ptr": "*fp32", "codes_ptr": "*i8", "n_total": "i64"}


@triton.jit
def _row(table_ptr, t):
    r = table_ptr + t.to(tl.int64) * 16
    return (tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), tl.load(r + 4), tl.load(r + 5),
            tl.load(r + 6), tl.load(r + 7), tl.load(r + 8))


@aot_kernel(signature={k: _SIG[k] for k in ("w_ptr", "table_ptr", "prog_ptr", "cnt_ptr", "bits_ptr", "n_total")},
            constexprs=[{"BLOCK": b} for b in (BLOCK, BLOCK // 2, BLOCK // 4)], num_warps=8)
@triton.jit
def weight_absmax_many_kernel(w_ptr, table_ptr, prog_ptr, cnt_ptr, bits_ptr, n_total, BLOCK: tl.constexpr):
    """Program p: block ``p - first_a[t]`` of the real elements of tensor ``t = prog[p]`` (read at
    ``w_ptr + w_off[t]``); max |w| bits per tensor into ``bits[t]`` (``publish_max`` over the pool counters
    ``cnt[2t:2t+2]``, its ``blocks_a[t]`` programs). ``n_total``: all real elements (for the cost model)."""
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + pid)
    w_off, CO, CI, COp, CIp, KHW, sw_o, sw_i, sw_t = _row(table_ptr, t)
    row = table_ptr + t.to(tl.int64) * 16
    n_real = tl.load(row + 9)
    b = pid - tl.load(row + 11)
    idx = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = _load_weight_block(w_ptr + w_off, idx, CO, CI, CI, KHW, sw_o, sw_i, sw_t, n_real)[5]
    bits = tl.max(tl.abs(w).to(tl.int32, bitcast=True), axis=0)
    publish_max(bits, tl.load(row + 12).to(tl.int32), cnt_ptr + 2 * t, bits_ptr + t)


@aot_kernel(signature={k: _SIG[k] for k in ("w_ptr", "table_ptr", "prog_ptr", "bits_ptr", "scale_ptr", "codes_ptr",
                                            "n_total")},
            constexprs=[{"BITS": 8, "SCALE_MODE": m, "TILE": t, "FROM_SCALE": f} for m in (0, 1, 2)
                        for f in (False, True) for t in (TILE, TILE // 2, TILE // 4)], num_warps=8)
@triton.jit
def weight_codes_many_kernel(w_ptr, table_ptr, prog_ptr, bits_ptr, scale_ptr, codes_ptr, n_total,
                             BITS: tl.constexpr, SCALE_MODE: tl.constexpr, TILE: tl.constexpr,
                             FROM_SCALE: tl.constexpr):
    """Program p: tile ``p - first_b[t]`` = (tap, Cout block, Cin block) of the padded (COp, KH·KW, CIp) of
    tensor ``t = prog[p]``: the scale from ``bits[t]`` (stored by tile 0 at ``scale[t]``) and the codes at
    ``codes + fwd_off[t]`` (OHWI, Cin padded: ``(co·KHW + tap)·CIp + ci``, co < CO) and ``codes +
    dgrad_off[t]`` (``(tap·CI + ci)·COp + co``, ci < CI), zero in the padding. ``n_total``: all padded
    elements (for the cost model). ``FROM_SCALE``: the scales are given at ``scale[t]`` (backward's re-derivation
    of the forward's codes: ``BackwardCodes``), ``bits`` is not read."""
    S: tl.constexpr = 2.0 ** (BITS - 1)
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + pid)
    w_off, CO, CI, COp, CIp, KHW, sw_o, sw_i, sw_t = _row(table_ptr, t)
    row = table_ptr + t.to(tl.int64) * 16
    b = pid - tl.load(row + 13)
    if FROM_SCALE:
        scale = tl.load(scale_ptr + t)
    else:
        scale = scale_from_bits(tl.load(bits_ptr + t), SCALE_MODE, BITS)
        if b == 0:
            tl.store(scale_ptr + t, scale)
    n_co, n_ci = tl.cdiv(COp, TILE), tl.cdiv(CIp, TILE)
    tap = b // (n_co * n_ci)
    rem = b - tap * (n_co * n_ci)
    co = (rem // n_ci) * TILE + tl.arange(0, TILE)
    ci = (rem % n_ci) * TILE + tl.arange(0, TILE)
    real = (co < CO)[:, None] & (ci < CI)[None, :]
    w = tl.load(w_ptr + w_off + (co * sw_o)[:, None] + (ci * sw_i)[None, :] + tap * sw_t, mask=real,
                other=0.0).to(tl.float32)
    q = round_half_even(tl.minimum(tl.maximum(tl.math.div_rn(w, scale) * S, -(S - 1.0)), S - 1.0))
    q = tl.where((q != q) | ~real, 0.0, q).to(tl.int8)
    fwd = codes_ptr + tl.load(row + 14) + ((co * KHW + tap) * CIp)[:, None] + ci[None, :]
    tl.store(fwd, q, mask=(co < CO)[:, None] & (ci < CIp)[None, :])
    dgrad = codes_ptr + tl.load(row + 15) + ((tap * CI + ci) * COp)[None, :] + co[:, None]
    tl.store(dgrad, q, mask=(co < COp)[:, None] & (ci < CI)[None, :])


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
class WeightItem(NamedTuple):
    """One weight to quantize and how: bits, scale mode (``ops._scale``), the channel padding of its two layouts."""

    weight: torch.Tensor
    bits: int
    mode: str
    ci_pad: int  # the forward layout's Cin multiple (<= 1: none)
    co_pad: int  # the input-grad layout's Cout multiple


def _geometry(shape, ci_pad, co_pad):
    CO, CI, KH, KW = shape
    return CO, CI, KH, KW, padded_channels(CO, co_pad), padded_channels(CI, ci_pad)


def _regions(items) -> tuple[list, int]:
    """Per item (fwd offset, dgrad offset) in the flat codes buffer (16-byte aligned), and its size."""
    out, off = [], 0
    for it in items:
        CO, CI, KH, KW, COp, CIp = _geometry(it.weight.shape, it.ci_pad, it.co_pad)
        fwd = off
        off += -(-CO * CIp * KH * KW // 16) * 16
        dgrad = off
        off += -(-COp * CI * KH * KW // 16) * 16
        out.append((fwd, dgrad))
    return out, max(off, 16)


def _view_specs(items, regions) -> tuple:
    """Per item the ``as_strided`` arguments of its two layouts in the flat codes buffer: fwd, memory [CO, KH, KW,
    CIp] seen as (CO, CIp, KH, KW); dgrad, memory [KH, KW, CI, COp] seen as (COp, CI, KH, KW)."""
    out = []
    for it, (f, d) in zip(items, regions):
        CO, CI, KH, KW, COp, CIp = _geometry(it.weight.shape, it.ci_pad, it.co_pad)
        out.append((((CO, CIp, KH, KW), (KH * KW * CIp, 1, KW * CIp, CIp), f),
                    ((COp, CI, KH, KW), (1, COp, KW * CI * COp, CI * COp), d)))
    return tuple(out)


class _Layout(NamedTuple):
    """What a batch's host side works out from its weights' shapes and paddings alone (``_layout``: once)."""

    regions: tuple  # (fwd offset, dgrad offset) per item
    size: int  # bytes of the flat codes buffer
    block: int  # the absmax kernel's BLOCK (``_grid_sizes``)
    tile: int  # the codes kernel's TILE
    padded: int  # all padded elements (``_padded_total``)
    views: tuple  # ``_view_specs``


_LAYOUTS: dict = {}


def _layout(items) -> _Layout:
    """The batch's ``_Layout``, once per list of (shape, paddings) (issue 20 item 5: ~12 µs of host work per weight
    and call before)."""
    if torch.compiler.is_compiling():  # no host cache inside a traced region (a side effect of its own)
        return _make_layout(items)
    key = tuple((it.weight.shape, it.ci_pad, it.co_pad) for it in items)
    hit = _LAYOUTS.get(key)
    if hit is None:
        if len(_LAYOUTS) >= 4096:
            _LAYOUTS.clear()
        hit = _LAYOUTS[key] = _make_layout(items)
    return hit


def _make_layout(items) -> _Layout:
    regions, size = _regions(items)
    block, tile = _grid_sizes(items)
    return _Layout(tuple(regions), size, block, tile, _padded_total(items), _view_specs(items, regions))


def _views(codes, scales, layout: _Layout):
    """(fwd, dgrad, scale) per item: views into the flat buffers. ``as_strided``: one view op per layout where
    a slice, a view and a permute make three, one ``unbind`` for every scale (issue 20 item 5: every aten op
    costs host time). ``codes``: a buffer of the batch's own, so its storage starts at its first element."""
    each_scale = scales.unbind(0)
    return [(codes.as_strided(*fwd), codes.as_strided(*dgrad), sc)
            for (fwd, dgrad), sc in zip(layout.views, each_scale)]


def _strides(w):
    CO, CI, KH, KW = w.shape
    tap = w.stride(3) if KW > 1 or KH == 1 else w.stride(2)
    return w.stride(0), w.stride(1), tap


_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()  # (launch tables, anchor index), most recent last
_TABLES_KEPT = 512


def _grid_sizes(items) -> tuple[int, int]:
    """(the absmax kernel's BLOCK, the codes kernel's TILE): 2048 and 64, halved (twice at most) while a launch
    would have fewer than ``MIN_PROGRAMS`` programs (a few small weights: no launch on a few SMs)."""
    geo = [_geometry(it.weight.shape, it.ci_pad, it.co_pad) for it in items]
    block, tile = BLOCK, TILE
    while block > BLOCK // 4 and sum(cdiv(CO * CI * KH * KW, block) for CO, CI, KH, KW, _, _ in geo) < MIN_PROGRAMS:
        block //= 2
    while tile > TILE // 4 and sum(KH * KW * cdiv(COp, tile) * cdiv(CIp, tile)
                                   for _, _, KH, KW, COp, CIp in geo) < MIN_PROGRAMS:
        tile //= 2
    return block, tile


def _tables(items, layout: _Layout, device):
    """The device tables of a batch (cached: the weights keep their storage from step to step)."""
    key = (device, tuple((it.weight.data_ptr(), it.weight.shape, it.weight.stride(), it.ci_pad, it.co_pad)
                         for it in items))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    regions, block, tile = layout.regions, layout.block, layout.tile
    anchor = min(range(len(items)), key=lambda i: items[i].weight.data_ptr())
    base, size = items[anchor].weight.data_ptr(), items[anchor].weight.element_size()
    rows, prog_a, prog_b = [], [], []
    for t, (it, (f, d)) in enumerate(zip(items, regions)):
        CO, CI, KH, KW, COp, CIp = _geometry(it.weight.shape, it.ci_pad, it.co_pad)
        n_real, n_pad = CO * CI * KH * KW, COp * CIp * KH * KW
        blocks_a, blocks_b = cdiv(n_real, block), KH * KW * cdiv(COp, tile) * cdiv(CIp, tile)
        rows.append([(it.weight.data_ptr() - base) // size, CO, CI, COp, CIp, KH * KW, *_strides(it.weight), n_real,
                     n_pad, len(prog_a), blocks_a, len(prog_b), f, d])
        prog_a += [t] * blocks_a
        prog_b += [t] * blocks_b
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    prog = torch.tensor(prog_a + prog_b, dtype=torch.int32).to(device)
    hit = (table, prog[:len(prog_a)], prog[len(prog_a):], anchor)
    _TABLES[key] = hit
    while len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return hit


def weight_codes_many_reference(items):
    """(fwd, dgrad, scale) per item in PyTorch: the quantizer's scale and codes, both layouts zero-padded."""
    out = []
    for it in items:
        w = it.weight
        CO, CI, KH, KW, COp, CIp = _geometry(w.shape, it.ci_pad, it.co_pad)
        q, s = quantize_reference(w, it.bits, mode=it.mode)
        fwd = torch.zeros((CO, KH, KW, CIp), dtype=torch.int8, device=w.device).permute(0, 3, 1, 2)
        dgrad = torch.zeros((KH, KW, CI, COp), dtype=torch.int8, device=w.device).permute(3, 2, 0, 1)
        fwd[:, :CI] = q
        dgrad[:CO] = q
        out.append((fwd, dgrad, s))
    return out


@custom_op("ebkernels::weight_codes_many", mutates_args=())
def _many_op(weights: list[torch.Tensor], bits: int, scale_mode: str, ci_pads: list[int], co_pads: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    items = [WeightItem(w, bits, scale_mode, p, q) for w, p, q in zip(weights, ci_pads, co_pads)]
    layout = _layout(items)
    device = weights[0].device
    codes = empty_output((layout.size,), torch.int8, device)
    scales = empty_output((len(items),), torch.float32, device)
    if not use_triton(*weights):
        _fill_reference(codes, scales, items, layout, True)
        return codes, scales
    table, prog_a, prog_b, anchor = _tables(items, layout, device)
    n_real = sum(w.numel() for w in weights)
    bits_t = empty_output((len(items),), torch.int32, device)
    w0 = weights[anchor]
    weight_absmax_many_kernel[(prog_a.numel(),)](w0, table, prog_a, counter_pool(device, 2 * len(items)), bits_t,
                                                 n_real, BLOCK=layout.block, num_warps=8)
    weight_codes_many_kernel[(prog_b.numel(),)](w0, table, prog_b, bits_t, scales, codes, layout.padded,
                                                BITS=bits, SCALE_MODE=scale_mode_code(scale_mode), TILE=layout.tile,
                                                FROM_SCALE=False, num_warps=8)
    return codes, scales


def recode_many(items: list, scales: torch.Tensor) -> list:
    """``(fwd, dgrad)`` per item again, from the given per-item ``scales`` (one launch; what the forward's
    ``_many_op`` wrote for the same weights and scales, bit for bit)."""
    layout = _layout(items)
    device = items[0].weight.device
    codes = empty_output((layout.size,), torch.int8, device)
    if not use_triton(*(it.weight for it in items)):
        _fill_reference(codes, scales, items, layout, False)
    else:
        table, _, prog_b, anchor = _tables(items, layout, device)
        weight_codes_many_kernel[(prog_b.numel(),)](items[anchor].weight, table, prog_b, scales, scales, codes,
                                                    layout.padded, BITS=items[0].bits,
                                                    SCALE_MODE=scale_mode_code(items[0].mode), TILE=layout.tile,
                                                    FROM_SCALE=True, num_warps=8)
    return [v[:2] for v in _views(codes, scales, layout)]


def _padded_total(items) -> int:
    """All padded elements of a batch's codes (the codes kernel's ``n_total``, for the cost model)."""
    return sum(COp * CIp * KH * KW for _, _, KH, KW, COp, CIp in
               (_geometry(it.weight.shape, it.ci_pad, it.co_pad) for it in items))


def _fill_reference(codes, scales, items, layout: _Layout, with_scales: bool) -> None:
    """The reference path's codes (and, ``with_scales``, scales) into a batch's flat buffers."""
    for (f, d, s), (fv, dv, sv) in zip(weight_codes_many_reference(items), _views(codes, scales, layout)):
        fv.copy_(f)
        dv.copy_(d)
        if with_scales:
            sv.copy_(s)


@_many_op.register_fake
def _(weights, bits, scale_mode, ci_pads, co_pads):
    items = [WeightItem(w, bits, scale_mode, p, q) for w, p, q in zip(weights, ci_pads, co_pads)]
    size = _layout(items).size
    return (weights[0].new_empty((size,), dtype=torch.int8), weights[0].new_empty((len(items),), dtype=torch.float32))


def weight_codes_many(items: list, backward: Optional[list] = None) -> list:
    """``(fwd, dgrad, scale)`` for every ``WeightItem`` (module docstring), from two launches per group of
    items that share dtype, device, bits, scale mode and size class (up to ``KEEP_CODES_NUMEL``
    elements or more: a kept small weight's codes do not keep the large ones' alive). ``backward`` (a list):
    filled with, per item, ``(group items, group scales, index)`` for a large weight (what ``recode_many``
    derives its group's codes again from, in one launch), else None."""
    if backward is not None:
        backward[:] = [None] * len(items)
    groups: dict = {}
    for i, it in enumerate(items):
        key = (it.weight.dtype, it.weight.device, it.bits, it.mode, it.weight.numel() <= KEEP_CODES_NUMEL)
        groups.setdefault(key, []).append(i)
    out: list = [None] * len(items)
    for (_, _, bits, mode, small), idx in groups.items():
        sub = [items[i] for i in idx]
        live = [k for k, it in enumerate(sub) if it.weight.numel()]
        if live:
            # the codes need no autograd: grad mode off in eager rather than a detach (an aten op) per weight; detached
            # under torch.compile, where a grad-mode region is a subgraph of its own
            compiling = torch.compiler.is_compiling()
            with contextlib.nullcontext() if compiling else torch.no_grad():
                codes, scales = _many_op([sub[k].weight.detach() if compiling else sub[k].weight for k in live],
                                         int(bits), str(mode), [int(sub[k].ci_pad) for k in live],
                                         [int(sub[k].co_pad) for k in live])
            lsub = [sub[k] for k in live]
            for k, v in zip(live, _views(codes, scales, _layout(lsub))):
                out[idx[k]] = v
            if backward is not None and not small:
                for j, k in enumerate(live):
                    backward[idx[k]] = (lsub, scales, j)
        for k, it in enumerate(sub):
            if not it.weight.numel():
                out[idx[k]] = weight_codes_many_reference([it])[0]
    return out


def weight_quant(item: WeightItem):
    """One weight's codes (a batch of one: the same two launches)."""
    return weight_codes_many([item])[0]
