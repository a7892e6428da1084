"""Device-side random state for stochastic rounding, so a training step never reads the host.

Each device has one int64 tensor ``[seed, counter]``. A stochastic quantization takes a *ticket*: the
kernel that runs just before the rounding pass (its absmax pass) increments ``counter`` on the device
(program 0, integer atomic) and stores the old value next to the absmax; the rounding pass then draws
``u = philox(seed, element index, ticket)``. Launch order on a stream is fixed, so the tickets, and the
noise, are the same run to run; nothing is a kernel argument that a CUDA graph would freeze, so a
replayed step draws fresh noise. ``manual_seed`` sets every device's state; ``get_state`` / ``set_state``
move it through checkpoints (the trainer resumes bit-identically).

``philox_uniform_reference`` is Triton's Philox4x32-10 (``tl.random.philox`` with 10 rounds) and its
uint32 -> [0, 1) conversion in PyTorch integer arithmetic: the CPU reference path draws the very same
numbers as the kernels, so stochastic rounding is checked bit for bit too.
"""
from __future__ import annotations

import torch

from ._triton import philox, tl, triton, uint_to_uniform_float

__all__ = ["device_state", "bound", "manual_seed", "get_state", "set_state", "take_ticket_reference", "uniform",
           "philox_uniform_reference"]

_states: dict[str, torch.Tensor] = {}
_seed: int | None = None
_bound: list[torch.Tensor] = []  # the state tensors the running custom ops were given (innermost last)


class bound:
    """``with bound(rng):`` inside a custom op's implementation: ``device_state`` returns ``rng``, the state
    tensor the op was given, so the op (and every helper or nested op it calls) advances that tensor and not
    the global one. Under ``torch.compile`` the op may get a functionalized copy of the state that is written
    back after it: advancing the global tensor instead would be undone by that write-back and the next step
    would replay the same tickets."""

    __slots__ = ("state",)

    def __init__(self, state: torch.Tensor):
        self.state = state

    def __enter__(self):
        _bound.append(self.state)

    def __exit__(self, *exc):
        _bound.pop()


_KEYS: dict = {}  # device (or its name) -> the state's key, for devices that name their index (or the CPU)


def _key(device) -> str:
    key = _KEYS.get(device)  # (a lookup: this runs for every launch with stochastic rounding, issue 20 item 5)
    if key is not None:
        return key
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:  # the current device: not cached, it may change
        return str(torch.device("cuda", torch.cuda.current_device()))
    key = _KEYS[device] = str(d)
    return key


def device_state(device) -> torch.Tensor:
    """The int64 ``[seed, counter]`` tensor of ``device`` (created on first use from ``manual_seed``'s
    seed, else from ``torch.initial_seed()``: both host integers, no synchronisation). No lock (torch.compile
    traces this lookup): ``dict.setdefault`` keeps the first tensor created. The int8 modules create it when
    they are built or moved (``modules``), outside any traced region."""
    if _bound:
        return _bound[-1]
    key = _key(device)
    st = _states.get(key)
    if st is None:  # lock-free: two threads that race here both get the first tensor stored
        seed = (_seed if _seed is not None else torch.initial_seed()) % (2**63)
        st = _states.setdefault(key, torch.tensor([seed, 0], dtype=torch.int64, device=torch.device(device)))
    return st


def manual_seed(seed: int) -> None:
    """Seed the stochastic rounding on every device (counters back to 0)."""
    global _seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _seed = seed % (2**63)
    for st in _states.values():
        st.copy_(torch.tensor([_seed, 0], dtype=torch.int64))


def get_state() -> dict:
    """Host copy of every device's ``[seed, counter]`` (reads the devices: call between steps)."""
    return {"seed": _seed, "devices": {k: v.cpu().tolist() for k, v in _states.items()}}


def set_state(state: dict) -> None:
    """Restore what ``get_state`` returned."""
    global _seed
    _seed = state.get("seed")
    for key, (seed, counter) in state.get("devices", {}).items():
        device_state(key).copy_(torch.tensor([seed, counter], dtype=torch.int64))


def take_ticket_reference(device) -> torch.Tensor:
    """The reference path's ticket: a 0-dim int64 device tensor, the counter incremented (device ops)."""
    st = device_state(device)
    ticket = st[1].clone()
    st[1] += 1
    return ticket


@triton.jit
def uniform(seed, ticket, offs):
    """U[0, 1) float32 per int64 element offset ``offs`` for this (seed, ticket)."""
    lo = offs.to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    t = (lo * 0 + ticket.to(tl.uint32))
    r, _, _, _ = philox(seed, lo, hi, t, lo * 0, 10)
    return uint_to_uniform_float(r)


# ----- PyTorch twin ---------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def _umul_hi_lo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of a * b for a constant a < 2^32 and uint32 values b (in int64)."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & _M32, lo & _M32


def _umul_hi_lo_wrapping(a: int, b: torch.Tensor):
    """The same words from one int64 product: a * b < 2^64 wraps modulo 2^64 in two's complement, and
    the masks take the bits back (20× faster than splitting into 16-bit halves)."""
    p = b * a
    return (p >> 32).bitwise_and_(_M32), p.bitwise_and_(_M32)


def _wrapping_products_are_exact() -> bool:
    """torch's int64 multiply wraps on every build tried; checked once here, else the split path."""
    b = torch.tensor([0, 1, 0xFFFFFFFF, 0x80000001, 0x12345678, 0xDEADBEEF], dtype=torch.int64)
    return all(torch.equal(x, y) for a in (_PHILOX_ROUND_A, _PHILOX_ROUND_B)
               for x, y in zip(_umul_hi_lo_wrapping(a, b), _umul_hi_lo(a, b)))


_CHUNK = 1 << 15  # elements per pass: the ~12 int64 temporaries of a round stay in the CPU's L2 cache


def philox_uniform_reference(seed: int | torch.Tensor, ticket, offs: torch.Tensor) -> torch.Tensor:
    """``uniform(seed, ticket, offs)`` in PyTorch (int64 arithmetic on uint32 words). The keys stay 0-dim
    (broadcast, no host read), and a large ``offs`` is done in chunks that fit a cache: the rounds are a
    chain of cheap element-wise ops, memory-bound on whole tensors (E of every layer is drawn here on the
    CPU path since stochastic E became the default)."""
    offs = offs.to(torch.int64)
    seed = torch.as_tensor(seed, dtype=torch.int64, device=offs.device)
    ticket = torch.as_tensor(ticket, dtype=torch.int64, device=offs.device)
    keys = (seed & _M32, (seed >> 32) & _M32, ticket & _M32)
    if offs.device.type != "cpu" or offs.numel() <= _CHUNK:
        return _philox_rounds(offs, *keys)
    flat = offs.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32)
    for i in range(0, flat.numel(), _CHUNK):
        out[i:i + _CHUNK] = _philox_rounds(flat[i:i + _CHUNK], *keys)
    return out.view(offs.shape)


def _philox_rounds(offs: torch.Tensor, k0, k1, c2) -> torch.Tensor:
    c0 = offs & _M32
    c1 = (offs >> 32) & _M32
    c2 = c2.expand_as(offs)
    c3 = torch.zeros_like(offs)
    mul = _umul_hi_lo_wrapping if _WRAPS else _umul_hi_lo
    for _ in range(10):
        hi_b, lo_b = mul(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = mul(_PHILOX_ROUND_A, c0)
        # every word is < 2^32: their xor is too (no mask)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return _uint_to_uniform_reference(c0)


def _uint_to_uniform_reference(x: torch.Tensor) -> torch.Tensor:
    # triton: x as int32; x = where(x < 0, -x - 1, x); return x * 4.6566127342e-10 (float32).
    # For x >= 2^31 that is -(x - 2^32) - 1 = (2^32 - 1) - x = x ^ (2^32 - 1): one xor, no where
    xi = x.bitwise_xor((x >> 31) * _M32)
    return xi.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


_WRAPS = _wrapping_products_are_exact()
