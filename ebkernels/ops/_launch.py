"""Launch facts every op's host code shares, each defined once (a leaf: imports nothing of ops).

- ``cdiv``: host ceil-division (the launchers' grids and plans); ``cached_plan``: one tile plan per shape;
- ``MAX_TERMS``: the longest int32-exact reduction of int8 products (SPEC §2);
- ``CHANNEL_PAD`` / ``code_channels`` / ``padded_channels``: how the int8 code buffers pad channels;
- ``conv_out`` / ``conv2d_output_size``: a convolution's output extent;
- ``alignment``, ``nchw_strides``, ``nhwc_rows``, ``offsets_fit_int32``: what a launcher tells a kernel
  about its operands' layout (16-byte alignment, strides, 32- or 64-bit offsets);
- ``elementwise_tiles``, ``ELEMENTWISE_WARPS``, ``NO_FP_FUSION``: the per-element BatchNorm kernels' grid;
- ``SMALL_NUMEL``: a "small" tensor (the tests' line between their cases; the kernels decide by the bytes one
  program moves, ``one_program_numel``);
- ``PROGRAM_BYTES`` / ``one_program_numel`` / ``MIN_PROGRAMS``: what one program may stream by itself and the
  grid a large launch needs (issue 20: no serial phase);
- ``as_4d``, ``is_dense``, ``row_major``, ``output_order_walk``: a tensor's sizes and strides as the element-wise
  kernels walk them;
  ``leading``: the real channels of a padded buffer.
"""
from __future__ import annotations

import functools

import torch

from .._triton import triton

__all__ = ["cdiv", "cached_plan", "BoundLaunch", "MAX_TERMS", "CHANNEL_PAD", "SMALL_NUMEL", "ELEMENTWISE_WARPS",
           "NO_FP_FUSION", "code_channels", "padded_channels", "conv_out", "conv2d_output_size", "alignment",
           "nchw_strides", "nhwc_rows", "offsets_fit_int32", "leading", "geometry", "reads_codes_channel_major",
           "elementwise_tiles", "memory_format", "PROGRAM_BYTES", "MIN_PROGRAMS", "one_program_numel",
           "filling_block", "as_4d", "pad_4d", "is_dense", "row_major", "output_order_walk"]

# 127² · n < 2^31 holds for n <= 133,144; chunks of 2^17 = 131,072 terms keep every int32 partial exact.
MAX_TERMS = 1 << 17

# channel counts of the int8 code buffers are padded to a multiple of this (16 bytes: the kernels' ALIGN)
CHANNEL_PAD = 16

# what the tests call a small tensor (no kernel rule: one program handles what moves <= PROGRAM_BYTES)
SMALL_NUMEL = 1 << 16

# one SM streams roughly 30-60 GB/s by itself: a program that moves at most 64 KiB is done in ~1-2 µs; a launch
# that moves 256 KiB or more gets at least a quarter of an H100's 132 SMs (issue 20, "no serial phase")
PROGRAM_BYTES = 64 * 1024
MIN_PROGRAMS = 33


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host integers (``triton.cdiv`` costs ~1 µs a call on the host: issue 20 item 5)."""
    return -(-a // b)


def _key(args) -> tuple:
    """``args`` with every list as a tuple (hashable); a plain loop: this runs for every launch."""
    out = []
    for a in args:
        out.append(tuple(a) if type(a) is list else a)
    return tuple(out)


def _store(cache: dict, key, value):
    if len(cache) >= 4096:
        cache.clear()
    cache[key] = value
    return value


def cached_plan(fn):
    """Plans are pure functions of their arguments (the SM count is one): one per shape, computed once
    (issue 20 item 5: re-planning cost ~24 µs per launch). List arguments are keyed as tuples; the cached
    ``Plan`` is shared, never modified by its users."""
    cache: dict = {}

    @functools.wraps(fn)
    def plan(*args, **kwargs):
        if not kwargs:
            try:  # the eager callers pass tuples: the arguments are the key as they are
                hit = cache.get(args)
            except TypeError:  # a list among them (a custom op's list[int] argument): keyed as tuples
                key = _key(args)
                hit = cache.get(key)
                if hit is None:
                    hit = _store(cache, key, fn(*args))
                return hit
            if hit is None:
                hit = _store(cache, args, fn(*args))
            return hit
        key = (_key(args), tuple((k, tuple(v) if type(v) is list else v) for k, v in kwargs.items()))
        hit = cache.get(key)
        if hit is None:
            hit = _store(cache, key, fn(*args, **kwargs))
        return hit

    plan.cache = cache
    return plan


def one_program_numel(bytes_per_element: int) -> int:
    """The most elements one program may handle when it moves ``bytes_per_element`` bytes for each."""
    return PROGRAM_BYTES // max(1, bytes_per_element)


def filling_block(n: int, block: int, bytes_per_element: int) -> int:
    """``block`` (elements per program of a one-pass kernel over ``n``), halved (down to 256) while a launch
    that moves 256 KiB or more would have fewer than ``MIN_PROGRAMS`` programs."""
    while block > 256 and n * bytes_per_element >= 4 * PROGRAM_BYTES and -(-n // block) < MIN_PROGRAMS:
        block //= 2
    return block


class BoundLaunch:
    """A kernel with its grid and compile-time arguments fixed (held by a cached plan): a launch passes only its
    run-time arguments to ``kernel.run``, the constexprs appended by position (the kernels declare them last) and
    only the compile options (``num_warps``, ...) as keywords — no ``kernel[grid]`` wrapper, no keyword arguments
    spelled out at each call site and no dictionary of twenty constexprs unpacked per launch (issue 20 item 5:
    ~2 µs, then ~0.8 µs a launch). Where the constexprs are not the signature's last parameters, or a call passes
    a different number of run-time arguments, they go by keyword as before. ``kernel.run`` is looked up at every
    call, so a launcher patched on the class (the cost model's recorder, the tests' launch spy: they name the
    positional constexprs with ``_triton.constexpr_names``) still sees every launch."""

    __slots__ = ("kernel", "grid", "consts", "runtime", "tail", "options")

    def __init__(self, kernel, grid, **consts):
        self.kernel, self.grid, self.consts = kernel, tuple(grid), consts
        names = list(kernel.arg_names)
        given = [n for n in names if n in consts]
        first = len(names) - len(given)
        if names[first:] == given:  # the constexprs are the signature's tail: passed by position
            self.runtime, self.tail = first, tuple(consts[n] for n in given)
            self.options = {k: v for k, v in consts.items() if k not in given}
        else:
            self.runtime, self.tail, self.options = -1, (), consts

    def __call__(self, *args):
        if len(args) == self.runtime:
            return self.kernel.run(*args, *self.tail, grid=self.grid, warmup=False, **self.options)
        return self.kernel.run(*args, grid=self.grid, warmup=False, **self.consts)


# 8 warps: 16 elements of a 4K-element tile per thread (at 4 warps the index and BatchNorm math of 32
# elements per thread took 200+ registers)
ELEMENTWISE_WARPS = 8

# z = y*a + b must round twice, as the references (and the interpreter) do: no fma contraction
NO_FP_FUSION = {"enable_fp_fusion": False}


def padded_channels(channels: int, multiple: int) -> int:
    """``channels`` rounded up to a multiple of ``multiple`` (unchanged for ``multiple <= 1``)."""
    return channels if multiple <= 1 else -(-channels // multiple) * multiple


def code_channels(channels: int) -> int:
    """Channels of the int8 code buffers the Triton path stores for ``channels`` real ones: zero-padded to a
    multiple of ``CHANNEL_PAD`` (the aligned path), except below ``CHANNEL_PAD``: there the kernels pack
    (tap, channel) into K / the weight-grad's columns (``gemm.tiles`` rules 2 and 5) and padding would only
    multiply the work (a Cin = 3 first layer by 16/3). The plan printer counts the same."""
    if channels < CHANNEL_PAD:
        return channels
    return padded_channels(channels, CHANNEL_PAD)


def conv_out(H: int, KH: int, stride: int, pad: int, dil: int) -> int:
    """Output extent of a convolution along one axis."""
    return (H + 2 * pad - dil * (KH - 1) - 1) // stride + 1


def conv2d_output_size(H, W, KH, KW, stride, padding, dilation):
    """(OH, OW) of a 2-D convolution (``stride``, ``padding``, ``dilation``: pairs)."""
    return (conv_out(H, KH, stride[0], padding[0], dilation[0]),
            conv_out(W, KW, stride[1], padding[1], dilation[1]))


def memory_format(channels_last: bool):
    """The torch memory format of an output written channels-last or not."""
    return torch.channels_last if channels_last else torch.contiguous_format


def alignment(values=(), tensors=()) -> int:
    """16 when every integer in ``values`` is a multiple of 16 and every tensor in ``tensors`` starts on a
    16-byte boundary, else 1: the ``ALIGN`` constexpr. With 16, the kernels tell the compiler so and it
    emits 16-byte vector loads/stores (and the ahead-of-time build sees what the JIT would infer)."""
    for v in values:  # plain loops, no generators: a launcher calls this per launch (issue 20 item 5)
        if int(v) % 16:
            return 1
    for t in tensors:
        if t.data_ptr() % 16:
            return 1
    return 16


def nchw_strides(t):
    """(s_n, s_h, s_w, s_c) of a logical NCHW tensor (any memory format)."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def nhwc_rows(t):
    """(s_n, s_c, s_h, s_w) of a 4-D tensor in its own memory layout."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def leading(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t[:rows, :cols]``, without a view op where that is all of ``t`` (the real channels of a padded code or
    gradient buffer; every aten op costs host time: issue 20 item 5)."""
    shape = t.shape
    if shape[0] == rows and shape[1] == cols:
        return t
    return t[:rows, :cols]


def geometry(t: torch.Tensor) -> tuple:
    """``(shape, strides, 16-byte aligned start)`` of ``t``: what a launch plan depends on (``cached_plan``
    keys by it: one plan per geometry, not per call)."""
    return t.shape, t.stride(), t.data_ptr() % 16 == 0


def offsets_fit_int32(*tensors) -> bool:
    """Whether every element offset of every tensor (or ``(shape, strides)`` pair) fits int32 (then the
    kernels keep 32-bit offsets)."""
    for t in tensors:  # plain loops: this runs for every launch (issue 20 item 5, host time)
        shape, strides = (t.shape, t.stride()) if isinstance(t, torch.Tensor) else t[:2]
        last = 0
        for d, st in zip(shape, strides):
            if d > 0:
                last += (d - 1) * abs(st)
        if last >= 2**31:
            return False
    return True


@functools.lru_cache(maxsize=4096)
def elementwise_tiles(C: int, elements: int = 4096):
    """(rows, channels) per program of the per-element BatchNorm kernels: whole 16-byte channel runs,
    about ``elements`` elements (4K; 2K for the kernels with more live state per element)."""
    cb = min(128, triton.next_power_of_2(max(C, 16)))
    return max(16, elements // cb), cb


def pad_4d(shape, strides):
    """``shape`` and ``strides`` padded to 4 dims (leading sizes 1, strides 0)."""
    pad = 4 - len(shape)
    return [1] * pad + list(shape), [0] * pad + list(strides)


def as_4d(t: torch.Tensor):
    """Sizes and strides of ``t`` padded to 4 dims (leading 1s); ``None`` if it has more dims."""
    if t.dim() > 4:
        return None
    return pad_4d(t.shape, t.stride())


def is_dense(sizes, strides) -> bool:
    """True when (sizes, strides), dims ordered outermost first, is a contiguous row-major block."""
    expect = 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


def row_major(sizes):
    strides, acc = [], 1
    for size in reversed(sizes):
        strides.append(acc)
        acc *= size
    return strides[::-1]


@functools.lru_cache(maxsize=4096)
def output_order_walk(shape, x_strides, out_strides, cm_strides=None) -> tuple:
    """How an element-wise kernel walks a tensor of at most 4 dims (``shape``, input strides ``x_strides``) in
    its output's memory order, so that the stores are contiguous: ``(sizes, x strides, out strides, row-major
    strides, second-output strides (zeros: none), input dense in that order, output dense with the input's strides,
    that order the logical one)``, every stride tuple in walk order, padded to 4 dims. Once per geometry (the
    quantizer's launcher asks at every call: issue 20 item 5)."""
    sizes, xs = pad_4d(shape, x_strides)
    os_ = pad_4d(shape, out_strides)[1]
    cs = pad_4d(shape, cm_strides)[1] if cm_strides is not None else [0, 0, 0, 0]
    ls = row_major(sizes)
    order = sorted(range(4), key=lambda d: (-os_[d], -d)) if len(shape) else [0, 1, 2, 3]
    sizes, xs, os_, ls, cs = ([v[d] for d in order] for v in (sizes, xs, os_, ls, cs))
    dense = is_dense(sizes, xs)
    return (tuple(sizes), tuple(xs), tuple(os_), tuple(ls), tuple(cs), dense,
            dense and is_dense(sizes, os_) and xs == os_, order == sorted(order))


def reads_codes_channel_major(kernel_hw, stride, padding) -> bool:
    """Whether a conv's weight-grad reads its input codes channel-major: a 1×1 kernel, stride 1, no padding (X̃ = X,
    row m = pixel m: both GEMM operands K-major). The rule of the per-layer conv and of the fused blocks."""
    return tuple(kernel_hw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
