"""The trainer's settings: one dataclass, its validation, and the hash that names a run directory.

Adding a flag: a field here (with its default), its check in :func:`resolve_settings`, its argparse
line and its mapping in ``cli.py``. A setting that cannot change what a run computes (where files go,
how progress is shown, how fast a kernel runs) goes into ``NOT_HASHED``. Any other new field goes into
``HASHED_UNLESS_DEFAULT`` with its default: it joins the hash only when a run sets it to something else,
so the runs made before the field existed keep their directory names (and resume). ``METHOD_UNUSED``
also leaves out, per ticket criterion, the settings it does not read (``method`` itself for eb and ns,
whose directories ``baseline`` already tells apart). ``INT8_ONLY`` (the int8 search's quantization) is
read by int8 searches only and hashed only there, always: when its defaults changed (issue 22: stochastic
E), the int8 searches of earlier runs computed something else, so their directories are not reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from .. import data as data_mod

__all__ = ["Settings", "TrainerError", "resolve_settings", "settings_hash", "PRECISIONS", "RETRAIN_PRECISIONS",
           "RETRAIN_INITS", "DETECTOR_MODES", "DATASET_DEFAULTS", "NOT_HASHED", "HASHED_UNLESS_DEFAULT", "INT_RANGES",
           "FLOAT_RANGES", "METHODS", "METHOD_UNUSED", "INT8_ONLY", "run_mode"]

PRECISIONS = ("int8", "bf16", "fp32")
RETRAIN_PRECISIONS = ("fp32", "bf16")
RETRAIN_INITS = ("inherit", "reinit", "both")
DETECTOR_MODES = ("consecutive", "window")
# ticket criteria (ebkernels/methods/): eb and ns use |gamma| with L1 on it; the others are the paper's
# Table 2 competitors (lt, snip, thinet) and SynFlow
METHODS = ("eb", "ns", "lt", "snip", "synflow", "thinet")
_DETECTOR = ("eps", "window", "detector_mode")
_CRITERIA_OPTIONS = ("score_batches", "synflow_rounds")
# the int8 search's QConfig (ebkernels.QConfig): scale mode and E's rounding; its float parts under autocast
INT8_ONLY = ("int8_mode", "int8_rounding_e", "int8_autocast")
_DENSE_SEARCH = INT8_ONLY + ("bn_recal_batches", "search_to_end")
# Settings a method does not read, left out of its run's hash (the same computation names one directory).
# eb and ns leave out ``method`` itself: ``baseline`` tells them apart, as it did before methods existed,
# so their run directories keep their names.
METHOD_UNUSED = {
    "eb": ("method",) + _CRITERIA_OPTIONS,
    "ns": ("method", "search_to_end") + _CRITERIA_OPTIONS,  # trains all epochs anyway
    "lt": ("sparsity", "draw_at", "search_to_end") + _CRITERIA_OPTIONS,  # trains without L1 on gamma; ranks weights
    "thinet": ("sparsity", "draw_at", "synflow_rounds", "search_to_end"),
    # at initialisation: no dense training, so no search schedule, precision, detector or L1
    "snip": ("sparsity", "draw_at", "epochs", "precision", "synflow_rounds") + _DETECTOR + _DENSE_SEARCH,
    "synflow": ("sparsity", "draw_at", "epochs", "precision", "score_batches") + _DETECTOR + _DENSE_SEARCH,
}

# Per-dataset defaults for the settings left unset on the command line. The digits entry is the
# no-argument demo: tuned so the whole job (search, detection, pruning, retraining) takes about a
# minute on 2 CPU cores and the detector fires. The others follow the paper (SPEC §4).
DATASET_DEFAULTS = {
    "digits": dict(model="vgg11", width=0.25, epochs=40, retrain_epochs=20, batch_size=64),
    "fashion-mnist": dict(model="vgg16", width=1.0, epochs=160, retrain_epochs=160, batch_size=256),
    "cifar10": dict(model="vgg16", width=1.0, epochs=160, retrain_epochs=160, batch_size=256),
    "cifar100": dict(model="vgg16", width=1.0, epochs=160, retrain_epochs=160, batch_size=256),
}
# Settings that do not change what a run computes: left out of the run directory's hash.
NOT_HASHED = ("out", "data_dir", "download", "progress", "device", "quiet", "cuda_graphs", "compile",
              "compile_backend")
# Settings added after runs existed, with their defaults: hashed only when set to something else.
HASHED_UNLESS_DEFAULT = {"small_stem": False, "coupled": "majority", "bn_recal_batches": 8, "search_to_end": False,
                        "int8_autocast": True}


# Accepted ranges, inclusive: wide enough for any real run, narrow enough that a typo is caught before
# it becomes a year-long schedule or an overflowing seed.
MAX_EPOCHS = 100_000
INT_RANGES = {"epochs": (1, MAX_EPOCHS), "retrain_epochs": (0, MAX_EPOCHS), "window": (1, MAX_EPOCHS),
              "batch_size": (2, 2**20), "train_subset": (1, 10**9), "test_subset": (1, 10**9),
              "seed": (-(2**32 - 1), 2**32 - 1), "score_batches": (1, 10**6), "synflow_rounds": (1, 10**6),
              "bn_recal_batches": (0, 10**6)}
# (lowest, lowest excluded, highest or None, highest excluded)
FLOAT_RANGES = {"eps": (0.0, True, 1.0, False),  # a mask distance lies in [0, 1]
                "lr": (0.0, True, None, False), "momentum": (0.0, False, 1.0, True),
                "sparsity": (0.0, False, None, False), "weight_decay": (0.0, False, None, False)}


# torch.compile backends --compile takes: inductor generates code (the default; mode="reduce-overhead" on CUDA),
# aot_eager traces forward and backward into one graph each and runs them with the eager ops (compiles in seconds)
COMPILE_BACKENDS = ("inductor", "aot_eager")


class TrainerError(RuntimeError):
    """A problem the user can fix; main() prints it without a traceback."""


@dataclasses.dataclass
class Settings:
    dataset: str = "digits"
    model: str | None = None
    width: float | None = None
    small_stem: bool = False
    data_dir: str | None = None
    download: bool = True
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool = True
    precision: str = "int8"
    int8_mode: str = "shift"  # QConfig.mode of the int8 search
    int8_rounding_e: str = "stochastic"  # QConfig.rounding_e of the int8 search
    int8_autocast: bool = True  # the int8 search's float parts under bf16 autocast
    ratios: tuple = (0.5,)
    eps: float = 0.1
    window: int = 5
    detector_mode: str = "consecutive"
    sparsity: float = 1e-4
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int | None = None
    epochs: int | None = None
    retrain_epochs: int | None = None
    # the dense accuracy reported during the search: BatchNorm statistics re-estimated on this many training
    # batches (a copy of the model; 0: the running statistics)
    bn_recal_batches: int = 8
    retrain_init: str = "inherit"
    retrain_precision: str = "fp32"
    baseline: bool = False  # = method "ns" (kept: older callers and run directories use it)
    method: str = "eb"
    score_batches: int = 4  # training batches SNIP's gradients and ThiNet's sampled activations read
    synflow_rounds: int = 100
    draw_at: tuple = ()
    search_to_end: bool = False  # eb: keep training the dense network to --epochs after the tickets are drawn
    coupled: str = "majority"
    sync_bn: bool = True
    seed: int = 0
    out: str = "runs"
    device: str = "auto"
    progress: bool = True
    quiet: bool = False
    cuda_graphs: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend under --compile (aot_eager: no code generation)

    def hashed(self) -> dict:
        d = dataclasses.asdict(self)
        unused = METHOD_UNUSED.get(self.method, ()) + (INT8_ONLY if self.precision != "int8" else ())
        return {k: v for k, v in d.items() if k not in NOT_HASHED and k not in unused
                and not (k in HASHED_UNLESS_DEFAULT and v == HASHED_UNLESS_DEFAULT[k])}


def run_mode(s: Settings) -> str:
    """The run directory's mode word: ``eb``, ``baseline`` (ns, as before methods existed) or the method."""
    return "baseline" if s.baseline or s.method == "ns" else s.method


def _bad(msg: str):
    raise TrainerError(msg)


# why a setting in METHOD_UNUSED has no effect on a method ({m}: the method), for the error a set one gets
_WHY_UNUSED = {
    "sparsity": "network slimming's L1 on the BN scaling factors, which --method {m} does not use",
    "draw_at": "for extra |gamma| tickets during the search of --method eb or ns; --method {m} draws its "
               "ticket by its own criterion",
    "epochs": "the dense training schedule; --method {m} scores the initial network and trains only the pruned "
              "one (--retrain-epochs)",
    "precision": "the dense search's precision; --method {m} trains no dense network (--retrain-precision "
                 "sets its ticket's)",
    "int8_autocast": "for the dense int8 search, which --method {m} does not run",
    "eps": "the early-bird detector's, which watches a dense search; --method {m} has none",
    "window": "the early-bird detector's, which watches a dense search; --method {m} has none",
    "detector_mode": "the early-bird detector's, which watches a dense search; --method {m} has none",
    "score_batches": "the training batches SNIP's gradients and ThiNet's activations read; --method {m} reads none",
    "synflow_rounds": "SynFlow's; --method {m} has no rounds",
    "int8_mode": "the int8 search's scale mode; --method {m} trains no dense network",
    "int8_rounding_e": "the int8 search's rounding of E; --method {m} trains no dense network",
    "bn_recal_batches": "for the dense search's reported accuracy; --method {m} trains no dense network",
    "search_to_end": "for --method eb, whose search stops at the detector's verdict; --method {m} draws at the end "
                     "or trains no dense network",
}


def _check_applies(s: Settings) -> None:
    """A setting the method does not read, set to anything but its default, is an error (not ignored)."""
    for key in METHOD_UNUSED[s.method]:
        if key == "method":
            continue
        default = DATASET_DEFAULTS[s.dataset].get(key, getattr(Settings, key, None))
        if getattr(s, key) != default:
            flag = ("--no-" if default is True else "--") + key.replace("_", "-")  # a flag that turns a default off
            _bad(f"{flag} is {_WHY_UNUSED[key].format(m=s.method)}; accepted with --method {s.method}: the "
                 f"default (leave {flag} out)")


def resolve_settings(s: Settings) -> Settings:
    """Fill per-dataset defaults and check every value; raises TrainerError naming what is accepted."""
    from .._checks import check_ratio
    from ..models import TORCHVISION_PREFIX
    from ..config import MODES as QMODES
    from ..config import ROUNDINGS
    from ..pruning import COUPLED_RULES

    s = dataclasses.replace(s)
    if s.method not in METHODS:
        _bad(f"--method {s.method!r} is not supported; accepted: {', '.join(METHODS)}")
    if s.baseline and s.method not in ("eb", "ns"):
        _bad(f"--baseline is --method ns; it contradicts --method {s.method}")
    if s.baseline or s.method == "ns":
        s.baseline, s.method = True, "ns"
    if s.dataset not in data_mod.DATASETS:
        _bad(f"unknown dataset {s.dataset!r}; accepted: {', '.join(data_mod.DATASETS)}")
    if isinstance(s.model, str) and s.model.strip().lower().startswith(TORCHVISION_PREFIX):
        if s.width not in (None, 1, 1.0):
            _bad(f"--width {s.width!r} is for ebkernels' own models; {s.model} is built at torchvision's widths "
                 f"(accepted: no --width, or --width 1)")
        s.width = 1.0
    for key, value in DATASET_DEFAULTS[s.dataset].items():
        if getattr(s, key) is None:
            setattr(s, key, value)
    _check_applies(s)
    if s.precision != "int8":
        for key in INT8_ONLY:
            if getattr(s, key) != getattr(Settings, key):
                flag = "--no-int8-autocast" if key == "int8_autocast" else "--" + key.replace("_", "-")
                _bad(f"{flag} sets the int8 search's arithmetic; --precision {s.precision} has none (accepted: "
                     f"--precision int8, or leave {flag} out)")
    if s.small_stem and not s.model.strip().lower().startswith(TORCHVISION_PREFIX):
        _bad(f"--small-stem adapts torchvision:<name> models; {s.model} is one of ebkernels' own (their CIFAR "
             f"stem is already 3x3 without a max-pool, except resnet18's: use --model torchvision:resnet18 "
             f"--small-stem)")
    if not s.ratios:
        _bad("at least one --ratio is needed")
    try:
        s.ratios = tuple(sorted({check_ratio(r) for r in s.ratios}))
    except (TypeError, ValueError) as e:
        _bad(f"--ratio: {e}")
    for name, value, choices in (("--precision", s.precision, PRECISIONS),
                                 ("--retrain-precision", s.retrain_precision, RETRAIN_PRECISIONS),
                                 ("--retrain-init", s.retrain_init, RETRAIN_INITS),
                                 ("--detector-mode", s.detector_mode, DETECTOR_MODES),
                                 ("--coupled", s.coupled, COUPLED_RULES),
                                 ("--int8-mode", s.int8_mode, QMODES),
                                 ("--int8-rounding-e", s.int8_rounding_e, ROUNDINGS),
                                 ("--compile-backend", s.compile_backend, COMPILE_BACKENDS)):
        if value not in choices:
            _bad(f"{name} {value!r} is not supported; accepted: {', '.join(choices)}")
    if s.compile_backend != "inductor" and not s.compile:
        _bad(f"--compile-backend {s.compile_backend} sets the backend of --compile; accepted: with --compile, or "
             "leave --compile-backend out")
    for name, (lo, hi) in INT_RANGES.items():
        v = getattr(s, name)
        if v is None and name in ("train_subset", "test_subset"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            why = " (BatchNorm cannot train on batches of one sample)" if name == "batch_size" else ""
            _bad(f"--{name.replace('_', '-')} {v!r} is not supported; accepted: an integer from {lo} to {hi}{why}")
    if s.detector_mode == "window" and s.window < 2:
        _bad(f"--window {s.window} is not supported with --detector-mode window (it compares the newest mask "
             f"with the window's older ones); accepted: 2 or more")
    for name, (lo, lo_open, hi, hi_open) in FLOAT_RANGES.items():
        v = getattr(s, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not (ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))):
            flag, low = name.replace("_", "-"), "<" if lo_open else "<="
            accepted = (f"a finite number {'>' if lo_open else '>='} {lo:g}" if hi is None else
                        f"a number with {lo:g} {low} {flag} {'<' if hi_open else '<='} {hi:g}")
            _bad(f"--{flag} {v!r} is not supported; accepted: {accepted}")
    if not (isinstance(s.width, (int, float)) and 0 < s.width <= 16):
        _bad(f"--width {s.width!r} is not supported; accepted: a multiplier with 0 < width <= 16")
    s.width = float(s.width)
    bad_draw = [e for e in s.draw_at if not (isinstance(e, int) and 1 <= e <= s.epochs)]
    if bad_draw:
        _bad(f"--draw-at {bad_draw} out of range; accepted: epochs from 1 to --epochs ({s.epochs})")
    s.draw_at = tuple(sorted(set(s.draw_at)))
    if not isinstance(s.out, str) or not s.out.strip():
        _bad(f"--out {s.out!r} is not supported: the run directory would go into the current folder; accepted: a "
             f"folder path (default runs)")
    if s.device not in ("auto", "cpu", "cuda") and not s.device.startswith("cuda:"):
        _bad(f"--device {s.device!r} is not supported; accepted: auto, cpu, cuda, cuda:N")
    return s


def settings_hash(s: Settings) -> str:
    """The first 10 hex digits of SHA-256 over the hashed settings (sorted-key JSON)."""
    blob = json.dumps(s.hashed(), sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
