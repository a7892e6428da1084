"""The early-bird ticket detector (SPEC §3, paper §3.3 Algorithm 1).

``channel_mask`` gives the global channel mask at a pruning ratio, ``mask_distance`` the normalised
Hamming distance of two masks, and ``EarlyBird`` runs the per-epoch detection: one fused launch per
step (all ratios at once; see ``ebkernels.detector.early_bird_mask``) and one host read of the distances
for the verdict.

Stopping rules (``mode``):

- ``"consecutive"`` (paper Algorithm 1): each step pushes ``d(m_t, m_{t-1})`` into a FIFO of length
  ``window``; the ticket is found when the FIFO is full and ``max(FIFO) < eps`` (strict).
- ``"window"`` (the reference code): the last ``window`` masks are kept; the ticket is found when
  the window is full and the newest mask is within ``<= eps`` of each of the ``window - 1`` older ones.

Epochs are counted by ``step`` calls from 0: ``found_epoch == 7`` means the 8th call found the ticket.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_choice, check_ratio
from .early_bird_mask import BACKENDS, early_bird_update, n_words, popcount_words, ratio_ks, unpack_masks

__all__ = ["channel_mask", "mask_distance", "EarlyBird", "gather_gammas", "MODES", "NonFiniteImportanceError"]

MODES = ("consecutive", "window")
_STATE_FORMAT = "ebkernels.EarlyBird/1"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def gather_gammas(gammas_or_model, name: str = "gammas_or_model"):
    """``(flat float32 gammas, layout)`` from a model (every ``nn.BatchNorm2d`` in ``modules()`` order),
    a list/tuple of tensors (concatenated in order) or one 1-D tensor. ``layout`` is a tuple of
    ``(source name, channels)`` used to notice a changed channel set between steps."""
    if isinstance(gammas_or_model, nn.Module):
        parts, layout = [], []
        for mod_name, mod in gammas_or_model.named_modules():
            if isinstance(mod, nn.BatchNorm2d):
                if mod.weight is None:
                    raise ValueError(f"{name}: BatchNorm2d {mod_name or '<root>'!r} has affine=False (no gamma); "
                                     "accepted: BatchNorm2d layers with affine=True, or pass the gammas as tensors")
                parts.append(mod.weight.detach().reshape(-1))
                layout.append((mod_name or "<root>", mod.weight.numel()))
        if not parts:
            raise ValueError(f"{name}: the model ({type(gammas_or_model).__name__}) has no nn.BatchNorm2d layers; "
                             "accepted: a model with BatchNorm2d layers, a list of gamma tensors or a 1-D tensor")
    elif isinstance(gammas_or_model, torch.Tensor):
        if gammas_or_model.dim() != 1:
            raise ValueError(f"{name}: a tensor of gammas must be 1-D, got shape {tuple(gammas_or_model.shape)}; "
                             "accepted: a 1-D tensor, a list of tensors or a model with BatchNorm2d layers")
        parts, layout = [gammas_or_model.detach()], [("tensor", gammas_or_model.numel())]
    elif isinstance(gammas_or_model, (list, tuple)):
        if not gammas_or_model:
            raise ValueError(f"{name}: empty list of gamma tensors; accepted: one or more float tensors")
        parts, layout = [], []
        for i, t in enumerate(gammas_or_model):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] is a {type(t).__name__}; accepted: torch.Tensor (e.g. bn.weight)")
            parts.append(t.detach().reshape(-1))
            layout.append((f"[{i}]", t.numel()))
    else:
        raise TypeError(f"{name} is a {type(gammas_or_model).__name__}; accepted: an nn.Module with BatchNorm2d "
                        "layers, a list/tuple of gamma tensors, or a 1-D tensor")
    for (src, _), t in zip(layout, parts):
        if not t.is_floating_point():
            raise TypeError(f"{name}: gammas {src} have dtype {t.dtype}; accepted: a floating dtype")
    devices = {t.device for t in parts}
    if len(devices) > 1:
        raise ValueError(f"{name}: gammas are spread over devices {sorted(map(str, devices))}; "
                         "accepted: all on one device")
    total = sum(n for _, n in layout)
    if total == 0:
        raise ValueError(f"{name}: no channels (every gamma tensor is empty); accepted: at least one channel")
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    return flat.float().contiguous(), tuple(layout)


class NonFiniteImportanceError(ValueError):
    """BN gammas holding NaN or inf: |gamma| ranks no channel (a diverged model, or damaged weights).
    ``where`` names the layers and counts."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


def _non_finite_error(gammas: torch.Tensor, layout, name: str) -> NonFiniteImportanceError:
    """The error for non-finite ``gammas``, naming the layers (sources) that hold them."""
    bad = []
    for (src, n), part in zip(layout, torch.split(gammas.detach().cpu(), [n for _, n in layout])):
        n_nan, n_inf = int(part.isnan().sum()), int(part.isinf().sum())
        if n_nan or n_inf:
            bad.append(f"{src!r} ({n_nan} NaN, {n_inf} inf of {n} channels)")
    where = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more layers" if len(bad) > 3 else "")
    return NonFiniteImportanceError(
        f"{name}: non-finite BatchNorm gammas in {where}; channel importance |gamma| must be finite to rank "
        f"channels (NaN or inf means the model diverged, e.g. too high a learning rate, or its weights are damaged)",
        where)


def _check_backend_runs_on(backend: str, device: torch.device) -> None:
    """An explicit ``backend="triton"`` needs CUDA tensors, or CPU tensors under the Triton interpreter;
    said here, before Triton's own "0 active drivers"."""
    from .. import _backend  # (lazy: the detector stays importable without it)

    if backend != "triton" or (_backend.HAS_TRITON and (device.type == "cuda" or
                                                        (device.type == "cpu" and _backend.INTERPRET))):
        return
    needs = ("the triton package (not installed)" if not _backend.HAS_TRITON else
             f"CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before ebkernels is imported (the "
             f"Triton interpreter); the gammas are on {device}"
             + ("" if device.type != "cpu" or _backend.INTERPRET else " and the interpreter is off"))
    raise ValueError(f"backend='triton' needs {needs}; accepted here: backend='auto' (picks what runs on this "
                     f"machine), 'native' (the C++ op, when built) or 'reference'")


def _ratios(ratio) -> tuple[tuple[float, ...], bool]:
    """``(ratios, single)``: a float, or a non-empty tuple/list of distinct floats, each in (0, 1)."""
    if isinstance(ratio, (tuple, list)):
        if not ratio:
            raise ValueError("ratio=() is empty; accepted: a float in (0, 1) or a tuple of such floats")
        ratios = tuple(check_ratio(p) for p in ratio)
        if len(set(ratios)) != len(ratios):
            raise ValueError(f"ratio={tuple(ratio)!r} repeats a value; accepted: distinct ratios")
        return ratios, False
    return (check_ratio(ratio),), True


def _describe(layout) -> str:
    total = sum(n for _, n in layout)
    shown = ", ".join(f"{s}:{n}" for s, n in layout[:4]) + (", ..." if len(layout) > 4 else "")
    return f"{len(layout)} tensors, {total} channels ({shown})"


# --------------------------------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------------------------------
def channel_mask(gammas_or_model, ratio, backend: str = "auto") -> torch.Tensor:
    """The SPEC §3 channel mask: ``keep = |gamma| > sort(|gamma|)[floor(total * ratio)]``.

    ``gammas_or_model``: a model (all ``nn.BatchNorm2d`` in ``modules()`` order), a list of gamma
    tensors, or a 1-D tensor. Returns a bool tensor ``[total]`` on the gammas' device (``[R, total]``
    for a tuple of R ratios). One host synchronisation: the check that every gamma is finite
    (:class:`NonFiniteImportanceError`, a ValueError naming the layer, otherwise).
    """
    check_choice("backend", backend, BACKENDS)
    ratios, single = _ratios(ratio)
    gammas, layout = gather_gammas(gammas_or_model)
    _check_backend_runs_on(backend, gammas.device)
    if not bool(torch.isfinite(gammas).all()):
        raise _non_finite_error(gammas, layout, "gammas_or_model")
    total = gammas.numel()
    ks = torch.tensor(ratio_ks(total, ratios), dtype=torch.int32, device=gammas.device)
    ring = torch.zeros((len(ratios), 1, n_words(total)), dtype=torch.int32, device=gammas.device)
    packed, _, _ = early_bird_update(gammas, ks, ring, 0, backend=backend)
    masks = unpack_masks(packed, total)
    return masks[0] if single else masks


def _mask_vector(name: str, m) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} is a {type(m).__name__}; accepted: a 1-D torch.Tensor mask (bool, or 0/1 numbers)")
    if m.dim() != 1:
        raise ValueError(f"{name} has shape {tuple(m.shape)}; accepted: a 1-D mask (one entry per channel)")
    if m.numel() == 0:
        raise ValueError(f"{name} is empty; accepted: a mask with at least one channel")
    return m if m.dtype == torch.bool else m != 0


def mask_distance(m1: torch.Tensor, m2: torch.Tensor) -> float:
    """Normalised Hamming distance ``popcount(m1 XOR m2) / total`` as a Python float (exact: an integer
    count divided by the channel count). Masks are bool (or 0/1 numbers: non-zero means kept)."""
    a, b = _mask_vector("m1", m1), _mask_vector("m2", m2)
    if a.numel() != b.numel():
        raise ValueError(f"m1 has {a.numel()} channels and m2 has {b.numel()}; accepted: masks over the same "
                         "channels (equal lengths)")
    differing = int(torch.ne(a, b.to(a.device)).sum().item())
    return differing / a.numel()


# --------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------
class EarlyBird:
    """Per-epoch early-bird ticket detection (SPEC §3) for one or several pruning ratios.

    ``EarlyBird(ratio, eps=0.1, window=5, mode="consecutive")``; call ``step(model)`` once per epoch
    (after the epoch's training). It returns True from the epoch the ticket is found on — with several
    ratios, once every ratio has found its ticket (``found_epoch`` tells each ratio's epoch). ``model``
    may also be a list of gamma tensors or a 1-D tensor, with the same channel set at every step.

    Attributes (per ratio — a dict keyed by ratio — when ``ratio`` is a tuple):
    ``found_epoch`` (int or None), ``distances`` (``d(m_t, m_{t-1})`` for t = 1, 2, ...),
    ``last_distances`` (the distances the latest verdict compared with eps), ``masks`` (the full packed
    history, int32 ``[T, ceil(total/32)]``, channel i at word i//32 bit i%32; see ``mask(t)``),
    ``pairwise_distances()`` (``[T, T]`` float64, the paper's Fig. 3).
    ``backend`` ("auto", "triton", "native", "reference") picks the implementation of the fused update.
    """

    def __init__(self, ratio, eps: float = 0.1, window: int = 5, mode: str = "consecutive",
                 backend: str = "auto"):
        self.ratios, self._single = _ratios(ratio)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps={eps!r} is not supported; accepted: a finite float > 0")
        check_choice("mode", mode, MODES)
        min_window = 2 if mode == "window" else 1
        if isinstance(window, bool) or not isinstance(window, int) or window < min_window:
            raise ValueError(f"window={window!r} is not supported for mode={mode!r}; accepted: an int >= {min_window}")
        check_choice("backend", backend, BACKENDS)
        self.eps, self.window, self.mode, self.backend = float(eps), window, mode, backend
        # the ring holds what a verdict compares: the previous mask, or the last `window` masks
        self._ring_len = 2 if mode == "consecutive" else window
        self._reset()

    def _reset(self):
        R = len(self.ratios)
        self._layout = None
        self._total = None
        self._epoch = 0
        self._history: list[torch.Tensor] = []  # packed [R, W] per step
        self._dists: list[list[float]] = [[] for _ in range(R)]
        self._last: list[list[float]] = [[] for _ in range(R)]
        self._found: list[int | None] = [None] * R
        self._ring = None
        self._ks = None

    # ---- per-ratio views -----------------------------------------------------------------------
    def _per_ratio(self, values):
        return values[0] if self._single else dict(zip(self.ratios, values))

    @property
    def epoch(self) -> int:
        """Number of ``step`` calls so far."""
        return self._epoch

    @property
    def total(self) -> int | None:
        """Channel count of the watched set (None before the first step)."""
        return self._total

    @property
    def found_epoch(self):
        return self._per_ratio(list(self._found))

    @property
    def found(self) -> bool:
        """True once every ratio has found its ticket (what ``step`` returns)."""
        return all(f is not None for f in self._found)

    @property
    def distances(self):
        return self._per_ratio([list(d) for d in self._dists])

    @property
    def last_distances(self):
        return self._per_ratio([list(d) for d in self._last])

    def _stacked(self) -> torch.Tensor:
        if not self._history:
            return torch.zeros((0, len(self.ratios), n_words(self._total or 0)), dtype=torch.int32)
        dev = self._history[-1].device
        return torch.stack([h.to(dev) for h in self._history])

    @property
    def masks(self):
        stacked = self._stacked()
        return self._per_ratio([stacked[:, r] for r in range(len(self.ratios))])

    def mask(self, epoch: int):
        """The bool channel mask of step ``epoch`` (a dict per ratio when several)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not -self._epoch <= epoch < self._epoch:
            raise ValueError(f"epoch={epoch!r} is out of range; accepted: an int in [0, {self._epoch}) "
                             f"(steps done: {self._epoch})")
        unpacked = unpack_masks(self._history[epoch], self._total)
        return self._per_ratio(list(unpacked))

    def pairwise_distances(self):
        """``[T, T]`` float64 (CPU) matrix of normalised Hamming distances between all recorded masks."""
        stacked = self._stacked()
        T = stacked.shape[0]
        out = []
        for r in range(len(self.ratios)):
            m = stacked[:, r]
            mat = torch.zeros((T, T), dtype=torch.float64)
            for i in range(T):  # one row at a time: bounded memory for millions of channels
                mat[i] = popcount_words(torch.bitwise_xor(m[i:i + 1], m)).cpu().double() / self._total
            out.append(mat)
        return self._per_ratio(out)

    # ---- the step ------------------------------------------------------------------------------
    def _prepare(self, device: torch.device):
        R, H, W = len(self.ratios), self._ring_len, n_words(self._total)
        if self._ks is None or self._ks.device != device:
            self._ks = torch.tensor(ratio_ks(self._total, self.ratios), dtype=torch.int32, device=device)
        if self._ring is None:
            # (re)built from the history tail, e.g. after load_state_dict
            self._ring = torch.zeros((R, H, W), dtype=torch.int32, device=device)
            for t in range(max(0, self._epoch - H), self._epoch):
                self._ring[:, t % H] = self._history[t].to(device)
        elif self._ring.device != device:
            self._ring = self._ring.to(device)

    def step(self, model) -> bool:
        """Record this epoch's masks and update the verdict; True once the ticket is found. Non-finite
        gammas raise :class:`NonFiniteImportanceError` (naming the layer) and leave the detector as it was."""
        gammas, layout = gather_gammas(model, "model")
        _check_backend_runs_on(self.backend, gammas.device)
        first = self._layout is None
        if first:
            self._layout, self._total = layout, gammas.numel()
        elif [n for _, n in layout] != [n for _, n in self._layout]:
            # widths only: names differ under wrappers (DDP's "module.", torch.compile's "_orig_mod.")
            raise ValueError(f"model: the BatchNorm layout changed between steps: recorded {_describe(self._layout)}, "
                             f"now {_describe(layout)}; accepted: the same channel set at every step "
                             "(use a new EarlyBird, or load_state_dict, for a different model)")
        self._prepare(gammas.device)
        t, H = self._epoch, self._ring_len
        packed, dist, _ = early_bird_update(gammas, self._ks, self._ring, t % H, backend=self.backend)
        # the one host read of the step: the distances and whether every gamma was finite
        readback = torch.cat([dist.reshape(-1), torch.isfinite(gammas).all().reshape(1).to(dist.dtype)]).tolist()
        if readback[-1] != 1.0:
            # nothing recorded; the ring slot just written is rewritten by the next step before it is read
            if first:
                self._reset()
            raise _non_finite_error(gammas, layout, "model")
        self._history.append(packed)
        dist_host = [readback[r * H:(r + 1) * H] for r in range(len(self.ratios))]
        for r, row in enumerate(dist_host):
            if t >= 1:
                self._dists[r].append(row[(t - 1) % H])
            if self.mode == "consecutive":
                fifo = self._dists[r][-self.window:]
                hit = len(self._dists[r]) >= self.window and max(fifo) < self.eps
                self._last[r] = fifo
            else:
                older = [row[(t - j) % H] for j in range(self.window - 1, 0, -1) if t - j >= 0]
                hit = t + 1 >= self.window and all(d <= self.eps for d in older)
                self._last[r] = older
            if hit and self._found[r] is None:
                self._found[r] = t
        self._epoch += 1
        return self.found

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue identically (CPU tensors and plain Python)."""
        return {
            "format": _STATE_FORMAT,
            "ratios": list(self.ratios), "eps": self.eps, "window": self.window, "mode": self.mode,
            "total": self._total,
            "layout": [list(x) for x in self._layout] if self._layout is not None else None,
            "epoch": self._epoch,
            "masks": self._stacked().cpu(),
            "distances": [list(d) for d in self._dists],
            "last_distances": [list(d) for d in self._last],
            "found_epoch": list(self._found),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; the settings (ratios, eps, window, mode) must match this detector's."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: not an EarlyBird state_dict (format {got!r}); accepted: "
                             f"EarlyBird.state_dict() output with format {_STATE_FORMAT!r}")
        mine = {"ratios": list(self.ratios), "eps": self.eps, "window": self.window, "mode": self.mode}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"state: {key}={state[key]!r} but this EarlyBird has {key}={value!r}; "
                                 "accepted: a state saved by an EarlyBird with the same settings")
        masks = state["masks"]
        R = len(self.ratios)
        if state["epoch"] != masks.shape[0] or (masks.shape[0] and masks.shape[1] != R):
            raise ValueError(f"state: masks of shape {tuple(masks.shape)} do not match epoch={state['epoch']} "
                             f"and {R} ratios")
        self._reset()
        self._total = state["total"]
        self._layout = tuple(tuple(x) for x in state["layout"]) if state["layout"] is not None else None
        self._epoch = int(state["epoch"])
        self._history = [m.to(torch.int32).contiguous() for m in masks]
        self._dists = [list(map(float, d)) for d in state["distances"]]
        self._last = [list(map(float, d)) for d in state["last_distances"]]
        self._found = [None if f is None else int(f) for f in state["found_epoch"]]

    def __repr__(self) -> str:
        ratio = self.ratios[0] if self._single else self.ratios
        return (f"EarlyBird(ratio={ratio!r}, eps={self.eps}, window={self.window}, mode={self.mode!r}, "
                f"epoch={self._epoch}, found_epoch={self.found_epoch!r})")
