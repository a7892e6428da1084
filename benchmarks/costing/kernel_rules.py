"""What each ebkernels Triton launch does, read from its recorded arguments: the model's view of a kernel.

One rule per kernel (by function ``__name__``), each returning ``Work``: DRAM bytes, L2 bytes, int8 MMA
work issued (tiles × BM·BN·BK per K step: padding, ragged edges and recompute included) and useful, the
serial phase that follows the parallel body (a loop in one program), fences and atomics. Time is
``price.launch_time``'s business. A kernel without a rule gets ``generic`` (every distinct tensor argument
read or written once) and is flagged in the report.

Bytes rule: every distinct tensor (by storage) is read or written once from DRAM. A GEMM operand re-read
by other tiles (the activation by each column tile, the weight by each row tile; in the weight-grad E by
each tap × Cin tile and X by each Cout tile × tap) is served from L2 while its footprint is at most
``Rules.l2_resident_bytes`` (25 MiB: half the 50 MiB L2, the rest is the other operand's and the output's),
else every re-read is charged to DRAM again. Every K step's operand tiles also cross L2 → SM (priced at
the L2 rate), and so do split-K's int64 atomics into the workspace.

Serial-phase rule: a loop that runs in one program after (or instead of) the parallel work costs, per
iteration, one dependent round trip (``hbm_latency_us``; ``l2_latency_us`` for partials just written) or
its bytes at one SM's streaming rate (``sm_stream_bw``), whichever is longer: Triton does not pipeline
the loads of a loop without ``tl.dot``.

Same-address atomics: every program of a launch that counts itself in on one counter (and folds a max into
one word: ``publish_max``) issues atomics that the L2 serialises; ``same_address_atomics`` of them per
launch cost ``atomic_same_address_ns`` each, a floor under the launch's body (``price.launch_time``).
"""
from __future__ import annotations

import dataclasses
import math

from .cards import RULES
from .trace import Launch

__all__ = ["Work", "kernel_work", "RULED"]

from ebkernels.ops._reduce import GROUP as GROUP_STATS, TB as TB_STATS  # noqa: E402  (merge group / step)


@dataclasses.dataclass
class Work:
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    mma_ops: float = 0.0  # issued int8 ops (2 per multiply-add)
    useful_ops: float = 0.0
    program_mma_ops: float = 0.0  # the largest program's (wave quantization)
    program_transposes: float = 0.0  # byte-wise shared-memory stores of the largest program (per thread)
    serial_us: float = 0.0
    serial_what: str = ""
    all_serial: bool = False  # one program: the whole launch is its loop
    program_bytes: float = 0.0  # bytes one program streams through its own loop
    fence_programs: int = 0  # programs that run the fenced code (split fix-ups: all)
    same_address_atomics: int = 0  # atomics the L2 serialises on one word (counters, published maxima)
    gemm: bool = False
    matched: bool = True  # a conv GEMM's layer was found (else useful = issued, and the report says so)
    rule: str = ""


def _foot(launch: Launch, names) -> float:
    """Bytes of the named tensors, each storage once (the larger view where two share one)."""
    seen: dict = {}
    for n in names:
        t = launch.t(n)
        if t is not None:
            seen[t.storage] = max(seen.get(t.storage, 0), min(t.nbytes, t.extent) if t.extent else t.nbytes)
    return float(sum(seen.values()))


def _size(launch: Launch, name: str) -> float:
    t = launch.t(name)
    return float(t.nbytes) if t is not None else 0.0


def _loop_us(iterations: float, bytes_per_iter: float, latency: float) -> float:
    return iterations * max(latency, bytes_per_iter / RULES.sm_stream_bw * 1e6)


def _rereads(footprint: float, readers: int) -> float:
    """DRAM bytes of the re-reads of an operand read by ``readers`` tiles (the L2 rule)."""
    if readers <= 1 or footprint <= RULES.l2_resident_bytes:
        return 0.0
    return (readers - 1) * footprint


def generic(launch: Launch) -> Work:
    return Work(hbm_bytes=_foot(launch, launch.tensors), rule="generic (no rule: every tensor once)")


# ----------------------------------------------------------------------------------------------------------
# last-arriver reductions (``ebkernels.ops._reduce``): the serial tail after every program has stored its partial
# ----------------------------------------------------------------------------------------------------------
def _publish_max_us() -> float:
    """``publish_max``'s last program: its count-in round trip, then the exchange that takes the max out
    (O(1): every program folded its value in with an atomic max)."""
    return 2 * RULES.l2_latency_us


def _finalize_us() -> float:
    """The BatchNorm finalisation after the last merge (``bn_finalize_channels``: reads the merged statistics,
    writes bnp and the channel block's max |z| with ``store_block_max``): one dependent round trip."""
    return RULES.l2_latency_us


def _merge_levels(tiles: int, group: int = GROUP_STATS) -> list:
    """Partials the largest merge of each level of ``finish_reduction``'s tree reads (at most ``group``)."""
    out, n = [], max(tiles, 1)
    while True:
        out.append(min(n, group))
        if n <= group:
            return out
        n = math.ceil(n / group)


def _merge_bytes(tiles: int, moments: bool, cols: int, group: int = GROUP_STATS) -> float:
    """Bytes the largest merge's one program reads: its partials, 4 rows each for MOMENTS (mean, M2, max,
    min), 2 for SUMS."""
    return (4 if moments else 2) * max(_merge_levels(tiles, group)) * cols * 4.0


def _finish_reduction_us(tiles: int, moments: bool, group: int = GROUP_STATS) -> float:
    """The chain of ``finish_reduction``: per level, the count-in round trip, the merge of its group (every
    row of at most TB_STATS partials loaded at once: one round trip, Chan's M2 from registers), the counter
    reset and the group partial's store before the next level's count-in."""
    levels = _merge_levels(tiles, group)
    iters = sum(math.ceil(n / max(TB_STATS, group)) + 2 for n in levels)
    return iters * RULES.l2_latency_us


# ----------------------------------------------------------------------------------------------------------
# quantizers
# ----------------------------------------------------------------------------------------------------------
def quantize_absmax(launch: Launch) -> Work:
    w = Work(hbm_bytes=_foot(launch, ["x_ptr"]), program_bytes=launch.get("BLOCK", 1024) * launch.t("x_ptr").itemsize)
    w.serial_us, w.serial_what = _publish_max_us(), "publish_max (atomic max, last arriver O(1))"
    w.same_address_atomics = 2 * launch.programs
    return w


def quantize_codes(launch: Launch) -> Work:
    x, c = launch.t("x_ptr"), launch.t("codes_ptr")
    inplace = x is not None and c is not None and x.storage == c.storage
    per = launch.get("BLOCK", 1024) * (x.itemsize + c.itemsize)
    return Work(hbm_bytes=_size(launch, "x_ptr") + _size(launch, "codes_ptr") if inplace else
                _foot(launch, ["x_ptr", "codes_ptr"]), program_bytes=per)


def gquant_codes(launch: Launch) -> Work:
    """The weight-grad's G codes pass (GQ=1): G read and written in place, BLOCK per program, every program
    counting itself in on one word (the last zeroes the scratch)."""
    g = launch.t("g_ptr")
    w = Work(hbm_bytes=2 * _size(launch, "g_ptr"), program_bytes=launch.get("BLOCK", 1024) * 2 * g.itemsize)
    w.same_address_atomics = launch.programs
    return w


def quantize_small(launch: Launch) -> Work:
    """One program: an absmax loop over x, then a codes loop (reads x again, writes the codes)."""
    x, c = launch.t("x_ptr"), launch.t("codes_ptr")
    n, block = x.numel, launch.get("BLOCK", 1024)
    it = math.ceil(n / block)
    us = _loop_us(it, block * x.itemsize, RULES.hbm_latency_us)
    us += _loop_us(it, block * (x.itemsize + c.itemsize), RULES.hbm_latency_us)
    total = 2 * x.nbytes + c.nbytes
    return Work(hbm_bytes=total, serial_us=us, all_serial=True, program_bytes=total,
                serial_what=f"one program: {n} elements, 2 loops × {it} iterations")


def weight_absmax_many(launch: Launch) -> Work:
    """Every weight of a batch read once (``n_total`` elements of ``w_ptr``'s type, read through the table),
    BLOCK per program; per tensor a ``publish_max`` (counted as if all programs hit one word: charge more)."""
    size = launch.t("w_ptr").itemsize
    w = Work(hbm_bytes=launch.get("n_total") * size, program_bytes=launch.get("BLOCK") * size)
    w.serial_us, w.serial_what = _publish_max_us(), "publish_max per tensor (O(1))"
    w.same_address_atomics = 2 * launch.programs
    return w


def weight_codes_many(launch: Launch) -> Work:
    """The weights read again (``n_total``: the padded index space, charged whole) and both layouts written
    (the flat ``codes`` buffer), each in 64-byte runs of a [64, 64] tile (transposed on chip)."""
    size = launch.t("w_ptr").itemsize
    n = launch.get("n_total")
    return Work(hbm_bytes=n * size + _size(launch, "codes_ptr"),
                program_bytes=launch.get("TILE") ** 2 * (size + 2))


def weight_codes(launch: Launch) -> Work:
    # the input-grad layout is written one byte per 32-byte sector (stride COp): charged at L2 per sector
    return Work(hbm_bytes=_foot(launch, ["w_ptr", "fwd_ptr", "dgrad_ptr"]), l2_bytes=32.0 * launch.get("n", 0))


# ----------------------------------------------------------------------------------------------------------
# BatchNorm kernels
# ----------------------------------------------------------------------------------------------------------
def _partials(launch: Launch) -> float:
    """Tile partials: written once, read once by the merges (L2)."""
    return _size(launch, "part_ptr") + _size(launch, "grp_ptr")


def bn_stats(launch: Launch) -> Work:
    w = Work(hbm_bytes=_foot(launch, ["x_ptr", "xb_ptr"]), l2_bytes=2 * _partials(launch))
    grp = launch.get("GROUP", GROUP_STATS)
    w.serial_us = _finish_reduction_us(launch.grid[0], True, grp) + _finalize_us()
    w.program_bytes = _merge_bytes(launch.grid[0], True, launch.get("CB"), grp)
    w.serial_what = (f"merge of {launch.grid[0]} tile partials ({len(_merge_levels(launch.grid[0], grp))} levels)"
                     " + finalize + block max")
    return w


def bn_relu_quant(launch: Launch) -> Work:
    # every program also reads the producer's max |z| per 16 channels (``max_of_blocks``), from L2
    return Work(hbm_bytes=_foot(launch, ["y_ptr", "out_ptr"]), l2_bytes=launch.programs * _size(launch, "zmax_ptr"))


def bn_relu_bwd_reduce(launch: Launch) -> Work:
    w = Work(hbm_bytes=_foot(launch, ["dz_ptr", "y_ptr"]), l2_bytes=2 * _partials(launch))
    w.serial_us = _finish_reduction_us(launch.grid[0], False)
    w.program_bytes = _merge_bytes(launch.grid[0], False, launch.get("CB"))
    w.serial_what = f"merge of {launch.grid[0]} tile partials ({len(_merge_levels(launch.grid[0]))} levels)"
    return w


def bn_relu_bwd(launch: Launch) -> Work:
    mode = launch.get("MODE")
    w = Work(hbm_bytes=_foot(launch, ["dz_ptr", "y_ptr"]))
    if mode == 0:
        w.serial_us = _publish_max_us()
        w.serial_what = "publish_max (atomic max, last arriver O(1))"
        w.same_address_atomics = 2 * launch.programs
    elif mode == 1:
        bp = launch.get("BP", 32)
        # NHWC codes, and the channel-major copy: runs of BP bytes per channel (a 32-byte sector: BP >= 32)
        w.hbm_bytes += _size(launch, "out_ptr") + _size(launch, "cm_ptr") * max(1.0, 32 / bp)
    else:
        w.hbm_bytes += _size(launch, "out_ptr")
    return w


def maxpool_fwd(launch: Launch) -> Work:
    return Work(hbm_bytes=_foot(launch, ["x_ptr", "out_ptr", "arg_ptr"]))


def maxpool_bwd(launch: Launch) -> Work:
    windows = launch.get("KH", 2) * launch.get("KW", 2)  # every input pixel reads its windows' dp and arg
    return Work(hbm_bytes=_foot(launch, ["dp_ptr", "arg_ptr", "dx_ptr"]),
                l2_bytes=windows * (_size(launch, "dp_ptr") + _size(launch, "arg_ptr")))


def wgrad_tma_operands(launch: Launch) -> Work:
    """The TMA weight-grad's operand copies: the input codes once per column shift (KW copies) and E once,
    unless E already is the operand (``WITH_E`` false: no E bytes)."""
    with_e = bool(launch.get("WITH_E", True))
    kw = launch.grid[2] - int(with_e)
    x = _size(launch, "x_ptr")
    moved = _foot(launch, ["xd_ptr"] + (["e_ptr", "ed_ptr"] if with_e else []))
    return Work(hbm_bytes=x + _rereads(x, kw) + moved, l2_bytes=kw * x)


# ----------------------------------------------------------------------------------------------------------
# GEMMs (the shared end: split fix-up, G quantization) -- conv forward / input-grad / fused conv+BN /
# weight-grads / Linear
# ----------------------------------------------------------------------------------------------------------
def _gemm_end(launch: Launch, w: Work, tiles: int, splits: int) -> None:
    bm, bn = launch.get("BM"), launch.get("BN")
    if launch.get("SPLIT_FIX"):
        ws = tiles * bm * bn * 8.0
        w.l2_bytes += splits * ws + 2 * ws  # every split's int64 atomics; the last one's read and zeroing
        w.hbm_bytes += ws
        w.fence_programs = tiles * splits
    # GQ=1: each finishing program folds its tile into max |G| (one atomic; the codes pass is its own launch,
    # priced by its rule); GQ=2: the launch's one tile is quantized in the registers of the program that
    # finishes it, no pass over memory: neither adds bytes or a loop here
    if launch.get("GQ", 0) == 1:
        w.same_address_atomics += tiles


def _gemm_work(launch: Launch, a: str, b: str, out: str, tiles: int, splits: int, row_tiles: int, col_tiles: int,
               steps_total: float, steps_program: float, useful: float) -> Work:
    """The common GEMM accounting: ``steps_total`` K steps over all programs, ``steps_program`` in the
    largest one; A re-read by ``col_tiles``, B by ``row_tiles``."""
    bm, bn, bk = launch.get("BM"), launch.get("BN"), launch.get("BK")
    fa, fb = _size(launch, a), _size(launch, b)
    w = Work(gemm=True)
    w.hbm_bytes = _foot(launch, [a, b, out]) + _rereads(fa, col_tiles) + _rereads(fb, row_tiles)
    w.l2_bytes = steps_total * (bm + bn) * bk
    w.mma_ops = 2.0 * steps_total * bm * bn * bk
    w.program_mma_ops = 2.0 * steps_program * bm * bn * bk
    w.useful_ops = useful if useful else w.mma_ops
    w.matched = useful is not None
    _gemm_end(launch, w, tiles, splits)
    return w


def _k_iters(flat: bool, bk: int, taps: int, r: int) -> int:
    return math.ceil(taps * r / bk) if flat else taps * math.ceil(r / bk)


def conv_fwd_dgrad(launch: Launch, useful) -> Work:
    from ebkernels.ops.gemm.tiles import dgrad_phase_taps

    g = launch.get
    bn, bk, flat = g("BN"), g("BK"), bool(g("FLAT"))
    tiles, splits = launch.grid[0], launch.grid[1]
    kh, kw, r = g("KH"), g("KW"), g("R")
    if g("TRANSPOSED"):
        sh, sw = g("stride_h"), g("stride_w")
        ph = dgrad_phase_taps(kh, sh, g("pad_h"), g("dil_h"))
        pw = dgrad_phase_taps(kw, sw, g("pad_w"), g("dil_w"))
        iters = [_k_iters(flat, bk, a[1] * b[1], r) for a in ph for b in pw]
        per_phase = tiles // (sh * sw)
        total, most = per_phase * sum(iters), max(iters)
    else:
        total = tiles * _k_iters(flat, bk, kh * kw, r)
        most = _k_iters(flat, bk, kh * kw, r)
    most = min(most, g("per_split") or most)
    col_tiles = math.ceil(g("NCOL") / bn)
    kind = "dgrad" if g("TRANSPOSED") else "fwd"
    return _gemm_work(launch, "src_ptr", "w_ptr", "out_ptr", tiles, splits, tiles // col_tiles, col_tiles, total,
                      most, useful(kind, launch))


def conv_bn(launch: Launch, useful) -> Work:
    g = launch.get
    bm, bn, bk, flat = g("BM"), g("BN"), g("BK"), bool(g("FLAT"))
    num_m, num_n = math.ceil(g("M") / bm), math.ceil(g("NCOL") / bn)
    steps = _k_iters(flat, bk, g("taps"), g("R"))
    w = _gemm_work(launch, "src_ptr", "w_ptr", "y_ptr", launch.grid[0], 1, num_m, num_n, launch.grid[0] * steps, steps,
                   useful("fwd", launch))
    w.hbm_bytes += (_size(launch, "dz_ptr") if g("MODE") == 1 else 0.0)
    w.l2_bytes += 2 * _partials(launch)
    w.serial_us = _finish_reduction_us(num_m, g("MODE") == 0) + (_finalize_us() if g("MODE") == 0 else 0.0)
    w.serial_what = f"merge of {num_m} tile partials" + (" + finalize + block max" if g("MODE") == 0 else "")
    w.program_bytes = _merge_bytes(num_m, g("MODE") == 0, bn)
    return w


def conv_wgrad(launch: Launch, useful) -> Work:
    g = launch.get
    bm, bk = g("BM"), g("BK")
    tiles, splits = launch.grid[0], launch.grid[1]
    co_tiles = math.ceil(g("CO") / bm)
    col_tiles = tiles // co_tiles
    per = g("m_per_split")
    steps_total = tiles * sum(math.ceil(min(per, g("M") - s * per) / bk) for s in range(splits))
    taps = g("taps")
    w = _gemm_work(launch, "e_ptr", "x_ptr", "out_ptr", tiles, splits, co_tiles * taps, col_tiles, steps_total,
                   math.ceil(per / bk), useful("wgrad", launch))
    return w


def conv_wgrad_tma(launch: Launch, useful) -> Work:
    g = launch.get
    bm = g("BM")
    tiles, splits = launch.grid[0], launch.grid[1]
    co_tiles = math.ceil(g("CO") / bm)
    kh = g("taps") // g("KW")
    q, per = g("q_total"), g("q_per_split")
    return _gemm_work(launch, "e_desc", "x_desc", "out_ptr", tiles, splits, co_tiles * kh, tiles // co_tiles,
                      tiles * q, min(per, q), useful("wgrad", launch))


def linear(launch: Launch, useful) -> Work:
    g = launch.get
    bn, bk = g("BN"), g("BK")
    tiles, splits = launch.grid[0], launch.grid[1]
    num_n = math.ceil(g("N") / bn)
    steps = math.ceil(g("K") / bk)
    per = math.ceil(g("k_per_split") / bk) if g("k_per_split") else steps
    return _gemm_work(launch, "a_ptr", "b_ptr", "out_ptr", tiles, splits, tiles // num_n, num_n, tiles * steps,
                      min(per, steps), 2.0 * g("M") * g("N") * g("K"))  # (a Linear: its extents are real)


SIMPLE = {"quantize_absmax_kernel": quantize_absmax, "quantize_codes_kernel": quantize_codes,
          "quantize_small_kernel": quantize_small, "weight_absmax_many_kernel": weight_absmax_many,
          "weight_codes_many_kernel": weight_codes_many, "gquant_codes_kernel": gquant_codes,
          "weight_codes_kernel": weight_codes, "bn_stats_kernel": bn_stats, "bn_relu_quant_kernel": bn_relu_quant,
          "bn_relu_bwd_reduce_kernel": bn_relu_bwd_reduce, "bn_relu_bwd_kernel": bn_relu_bwd,
          "maxpool2d_int8_kernel": maxpool_fwd, "maxpool2d_int8_bwd_kernel": maxpool_bwd,
          "wgrad_tma_operands_kernel": wgrad_tma_operands}
GEMMS = {"conv2d_int8_fwd_dgrad_kernel": conv_fwd_dgrad, "conv2d_int8_bn_kernel": conv_bn,
         "conv2d_int8_wgrad_kernel": conv_wgrad, "conv2d_int8_wgrad_tma_kernel": conv_wgrad_tma,
         "linear_int8_gemm_kernel": linear}
RULED = set(SIMPLE) | set(GEMMS)


def kernel_work(launch: Launch, useful) -> Work:
    """``useful(kind, launch)``: the useful multiply-add ops of a conv GEMM launch (``layers.useful_ops``)."""
    if launch.kernel in GEMMS:
        w = GEMMS[launch.kernel](launch, useful)
    elif launch.kernel in SIMPLE:
        w = SIMPLE[launch.kernel](launch)
    else:
        return generic(launch)
    w.rule = launch.kernel
    return w
