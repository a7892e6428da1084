"""The thin early-bird trainer (SPEC §3-4, issue 5): low-precision search → detect → prune → retrain.

One run = one directory, named from a hash of its settings (``<out>/<model>-<dataset>-<hash>``):

- ``settings.json``: the resolved settings (what the hash is taken of);
- ``metrics.jsonl``: one record per epoch (phase, loss, accuracy, lr, mask distances, time);
- ``masks.npz``: the packed mask history per ratio (``np.packbits`` rows, one per epoch);
- ``checkpoint.pt``: written atomically (temp file + fsync + ``os.replace``) after every epoch; holds
  the model, optimizer, detector state (``EarlyBird.state_dict``), RNG state and all records, so a
  run killed at any point, even by ``kill -9``, continues from its last completed epoch;
- ``ticket_<tag>.pt`` (the ticket as drawn) and ``pruned_<tag>[_reinit].pt`` (retrained), both
  through ``ebkernels.pruning.save_ticket`` (loadable without pickled modules);
- ``summary.json``: epoch found per ratio, accuracies, params/FLOPs before and after, training FLOPs,
  wall time per phase, GPU energy per phase (NVML, when available); its presence marks the run
  finished, and running the same settings again only says so;
- ``mask_distance_matrix.png`` (paper Fig. 3), ``mask_distance.png``, ``accuracy.png``; ``log.txt``.

Modes: EB training (default: stop the search once every ratio's ticket is found, or at ``--epochs``)
and ``--baseline`` (train the dense network for all ``--epochs``, prune, retrain: the paper's
"progressive pruning and training"). ``--draw-at`` draws extra tickets at given epochs (Fig. 1).

Runs under ``torchrun`` with DistributedDataParallel (gloo on CPU, nccl on GPU): every rank runs the
detector on identical parameters; rank 0 writes. BatchNorm statistics are synchronised across ranks
by default (``--no-sync-bn`` to keep them per rank), so the search sees the same batches as a single
process.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from ._io import atomic_torch_save, atomic_write, atomic_write_text

__all__ = ["Settings", "TrainerError", "resolve_settings", "run", "main", "build_parser", "run_dir_for",
           "lr_at", "SyncBatchNorm2d"]

PRECISIONS = ("int8", "bf16", "fp32")
RETRAIN_PRECISIONS = ("fp32", "bf16")
RETRAIN_INITS = ("inherit", "reinit", "both")
DETECTOR_MODES = ("consecutive", "window")

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
NOT_HASHED = ("out", "data_dir", "download", "progress", "device", "quiet")


class TrainerError(RuntimeError):
    """A problem the user can fix; main() prints it without a traceback."""


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    dataset: str = "digits"
    model: str | None = None
    width: float | None = None
    data_dir: str | None = None
    download: bool = True
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool = True
    precision: str = "int8"
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
    retrain_init: str = "inherit"
    retrain_precision: str = "fp32"
    baseline: bool = False
    draw_at: tuple = ()
    sync_bn: bool = True
    seed: int = 0
    out: str = "runs"
    device: str = "auto"
    progress: bool = True
    quiet: bool = False

    def hashed(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in NOT_HASHED}


def _bad(msg: str):
    raise TrainerError(msg)


def resolve_settings(s: Settings) -> Settings:
    """Fill per-dataset defaults and check every value; raises TrainerError naming what is accepted."""
    from ._checks import check_ratio

    s = dataclasses.replace(s)
    if s.dataset not in data_mod.DATASETS:
        _bad(f"unknown dataset {s.dataset!r}; accepted: {', '.join(data_mod.DATASETS)}")
    for key, value in DATASET_DEFAULTS[s.dataset].items():
        if getattr(s, key) is None:
            setattr(s, key, value)
    if not s.ratios:
        _bad("at least one --ratio is needed")
    try:
        s.ratios = tuple(sorted({check_ratio(r) for r in s.ratios}))
    except ValueError as e:
        _bad(f"--ratio: {e}")
    for name, value, choices in (("--precision", s.precision, PRECISIONS),
                                 ("--retrain-precision", s.retrain_precision, RETRAIN_PRECISIONS),
                                 ("--retrain-init", s.retrain_init, RETRAIN_INITS),
                                 ("--detector-mode", s.detector_mode, DETECTOR_MODES)):
        if value not in choices:
            _bad(f"{name} {value!r} is not supported; accepted: {', '.join(choices)}")
    for name in ("epochs", "batch_size", "window"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _bad(f"--{name.replace('_', '-')} {v!r} is not supported; accepted: a positive integer")
    if isinstance(s.retrain_epochs, bool) or not isinstance(s.retrain_epochs, int) or s.retrain_epochs < 0:
        _bad(f"--retrain-epochs {s.retrain_epochs!r} is not supported; accepted: an integer >= 0")
    for name in ("train_subset", "test_subset"):
        v = getattr(s, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            _bad(f"--{name.replace('_', '-')} {v!r} is not supported; accepted: a positive integer")
    for name, lo in (("eps", 0.0), ("lr", 0.0)):
        v = getattr(s, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > lo):
            _bad(f"--{name} {v!r} is not supported; accepted: a positive number")
    for name in ("sparsity", "momentum", "weight_decay"):
        v = getattr(s, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            _bad(f"--{name.replace('_', '-')} {v!r} is not supported; accepted: a number >= 0")
    if not (isinstance(s.width, (int, float)) and 0 < s.width <= 16):
        _bad(f"--width {s.width!r} is not supported; accepted: a multiplier with 0 < width <= 16")
    s.width = float(s.width)
    bad_draw = [e for e in s.draw_at if not (isinstance(e, int) and 1 <= e <= s.epochs)]
    if bad_draw:
        _bad(f"--draw-at {bad_draw} out of range; accepted: epochs from 1 to --epochs ({s.epochs})")
    s.draw_at = tuple(sorted(set(s.draw_at)))
    if s.device not in ("auto", "cpu", "cuda") and not s.device.startswith("cuda:"):
        _bad(f"--device {s.device!r} is not supported; accepted: auto, cpu, cuda, cuda:N")
    return s


def settings_hash(s: Settings) -> str:
    blob = json.dumps(s.hashed(), sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_dir_for(s: Settings) -> str:
    """Where a run with these (resolved) settings lives."""
    name = f"{s.model}-{s.dataset}-{'baseline' if s.baseline else 'eb'}-{settings_hash(s)}"
    return os.path.join(s.out, name)


def lr_at(epoch: int, base_lr: float, total_epochs: int) -> float:
    """The paper's step schedule scaled to the run length: ÷10 at 50 % and at 75 % of the epochs
    (epochs 80 and 120 of 160). ``epoch`` counts from 0."""
    lr = base_lr
    if epoch >= int(0.5 * total_epochs):
        lr *= 0.1
    if epoch >= int(0.75 * total_epochs):
        lr *= 0.1
    return lr


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, lock
# --------------------------------------------------------------------------------------------------
def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


class RunLock:
    """An exclusive flock on ``<run>/.lock`` so two processes never drive the same run at once
    (released by the kernel even when the holder is killed)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.fd = None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise TrainerError(f"run directory {os.path.dirname(self.path)} is in use by another process; "
                               f"wait for it to finish (or stop it) and run again to resume")
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def broadcast_obj(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def setup_dist(device_arg: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainerError(f"--device {device_arg} asked for CUDA, but torch sees no CUDA device; "
                           f"use --device cpu (or auto)")
    if want_cuda:
        index = int(device_arg.split(":")[1]) if ":" in device_arg else (local if world > 1 else 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # share the cores between the local processes
            per = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            torch.set_num_threads(per)
    return Dist(rank, world, local, device)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over all ranks (CPU/gloo and CUDA/nccl).

    ``nn.SyncBatchNorm`` only runs on GPUs and is no ``BatchNorm2d`` (the detector and the pruner look
    for BatchNorm2d). Forward all-reduces per-channel sums and squared sums once per layer; the
    all-reduce is differentiable (``torch.distributed.nn``), so backward sums the statistics'
    gradients over ranks as well. With one process it is an ordinary BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // c), device=x.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).clamp_min(1.0), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _swap_bn(model: nn.Module, cls) -> nn.Module:
    """Replace every BatchNorm2d (exact type or SyncBatchNorm2d) by ``cls``, sharing parameters."""
    for name, child in list(model.named_children()):
        if type(child) in (nn.BatchNorm2d, SyncBatchNorm2d) and type(child) is not cls:
            new = cls.__new__(cls)
            new.__dict__ = child.__dict__.copy()
            new._parameters = child._parameters.copy()
            new._buffers = child._buffers.copy()
            setattr(model, name, new)
        else:
            _swap_bn(child, cls)
    return model


# --------------------------------------------------------------------------------------------------
# Energy (NVML, optional)
# --------------------------------------------------------------------------------------------------
class EnergyMeter:
    """Total GPU energy in joules from NVML (``pynvml``), or None where unavailable."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0  # mJ -> J
        except Exception:
            return None


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def _ratio_key(r: float) -> str:
    return f"{r:g}"


class Job:
    def __init__(self, s: Settings, dist: Dist, log_stream=None):
        self.s = s
        self.dist = dist
        self.out = log_stream or sys.stdout
        self.run_dir = run_dir_for(s)
        self.ckpt_path = os.path.join(self.run_dir, "checkpoint.pt")
        self.summary_path = os.path.join(self.run_dir, "summary.json")
        self.energy = EnergyMeter(dist.device)

    # ---- output ---------------------------------------------------------------------------------
    def log(self, msg: str, file_only: bool = False):
        if not self.dist.is_main:
            return
        if not file_only and not self.s.quiet:
            try:
                from tqdm import tqdm

                tqdm.write(msg, file=self.out)
            except ImportError:
                print(msg, file=self.out, flush=True)
            self.out.flush()
        with contextlib.suppress(OSError):
            with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        disable = (not self.s.progress) or (not self.dist.is_main) or self.s.quiet
        # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI)
        return tqdm(total=total, desc=desc, leave=False, disable=True if disable else None,
                    dynamic_ncols=True, file=sys.stderr)

    # ---- setup ----------------------------------------------------------------------------------
    def prepare(self):
        """Load data, build the model, create the run directory. Raises TrainerError on bad input."""
        s = self.s
        try:
            self.ds = data_mod.load_dataset(s.dataset, s.data_dir, s.download, s.train_subset,
                                            s.test_subset, seed=s.seed)
        except data_mod.DatasetError as e:
            raise TrainerError(str(e)) from e
        if s.batch_size % self.dist.world_size:
            _bad(f"--batch-size {s.batch_size} must be divisible by the number of processes "
                 f"({self.dist.world_size}): it is the global batch, split evenly over the ranks")
        self.local_batch = s.batch_size // self.dist.world_size
        self.model = self.build_dense()
        error = None
        if self.dist.is_main:
            try:
                self._make_run_dir()
            except TrainerError as e:
                error = str(e)
        error = self.dist.broadcast_obj(error)  # every rank stops, none waits on a barrier forever
        if error:
            raise TrainerError(error)

    def build_dense(self) -> nn.Module:
        from .models import build_model

        torch.manual_seed(self.s.seed)
        try:
            kw = {} if self.s.width == 1.0 else {"width": self.s.width}
            model = build_model(self.s.model, num_classes=self.ds.num_classes,
                                in_channels=self.ds.in_channels, **kw)
        except (ValueError, KeyError, TypeError) as e:
            raise TrainerError(f"--model {self.s.model!r}: {e}") from e
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            _bad(f"--model {self.s.model!r} has no BatchNorm2d layers: the detector needs BN scaling factors")
        return model

    def _make_run_dir(self):
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            probe = os.path.join(self.run_dir, f".write-test-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise TrainerError(f"cannot write the run directory {self.run_dir!r} ({e.strerror or e}); "
                               f"choose a writable folder with --out") from e
        settings_path = os.path.join(self.run_dir, "settings.json")
        if not os.path.exists(settings_path):
            atomic_write_json(settings_path, {"hash": settings_hash(self.s), **self.s.hashed(),
                                              "out": self.s.out, "data_dir": self.s.data_dir})

    # ---- model pieces ---------------------------------------------------------------------------
    def _prepare_for_training(self, model: nn.Module, precision: str):
        model = model.to(self.dist.device)
        if precision == "int8":
            from .modules import quantize_model

            model = quantize_model(model)
        if self.dist.enabled and self.s.sync_bn:
            model = _swap_bn(model, SyncBatchNorm2d)
        if self.dist.enabled:
            import warnings

            from torch.nn.parallel import DistributedDataParallel as DDP

            # 1-input-channel conv weights have ambiguous strides; DDP's notice about it is harmless
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            wrapped = DDP(model, device_ids=ids, broadcast_buffers=not self.s.sync_bn)
        else:
            wrapped = model
        return model, wrapped

    def _optimizer(self, model: nn.Module):
        s = self.s
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    @staticmethod
    def _float_copy(model: nn.Module) -> nn.Module:
        """A plain-float, CPU-free copy of a training model (no QConv2d, no SyncBatchNorm2d)."""
        m = copy.deepcopy(model)
        if any(type(x).__name__ in ("QConv2d", "QLinear") for x in m.modules()):
            from .modules import dequantize_model

            m = dequantize_model(m)
        return _swap_bn(m, nn.BatchNorm2d)

    def _autocast(self, precision: str):
        if precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- epochs ---------------------------------------------------------------------------------
    def train_epoch(self, model, wrapped, opt, epoch: int, lr: float, sparsity: float, precision: str,
                    desc: str) -> dict:
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
        dev = self.dist.device
        stats = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, count
        n_batches = data_mod.num_batches(self.ds, self.local_batch, True, self.dist.world_size)
        bar = self._bar(n_batches, desc)
        for i, (x, y) in enumerate(data_mod.iterate_batches(
                self.ds, self.local_batch, train=True, epoch=epoch, seed=self.s.seed, rank=self.dist.rank,
                world_size=self.dist.world_size, augment=self.s.augment, device=dev)):
            with self._autocast(precision):
                logits = wrapped(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sparsity > 0:  # network slimming: L1 subgradient on the BN scaling factors
                for bn in bns:
                    if bn.weight.grad is not None:
                        bn.weight.grad.add_(torch.sign(bn.weight.detach()), alpha=sparsity)
            opt.step()
            with torch.no_grad():
                stats += torch.stack([loss.detach().double() * len(y),
                                      (logits.argmax(1) == y).sum().double(),
                                      torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
            bar.update(1)
            if i % 10 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{stats[0].item() / max(stats[2].item(), 1):.3f}")
        bar.close()
        stats = self.dist.all_sum(stats)
        loss_sum, correct, count = stats.tolist()
        return {"train_loss": loss_sum / max(count, 1), "train_acc": 100.0 * correct / max(count, 1)}

    @torch.no_grad()
    def evaluate(self, model, precision: str = "fp32") -> dict:
        model.eval()
        dev = self.dist.device
        stats = torch.zeros(3, dtype=torch.float64, device=dev)
        for x, y in data_mod.iterate_batches(self.ds, max(self.local_batch, 256), train=False,
                                             rank=self.dist.rank, world_size=self.dist.world_size, device=dev):
            with self._autocast(precision):
                logits = model(x)
            stats += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                                  (logits.argmax(1) == y).sum().double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
        loss_sum, correct, count = self.dist.all_sum(stats).tolist()
        return {"test_loss": loss_sum / max(count, 1), "test_acc": 100.0 * correct / max(count, 1)}

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict):
        if not self.dist.is_main:
            return
        state = dict(state, rng=torch.get_rng_state())
        atomic_torch_save(state, self.ckpt_path)
        atomic_write_text(os.path.join(self.run_dir, "metrics.jsonl"),
                          "".join(json.dumps(r, default=_json_default) + "\n" for r in state["records"]))
        self._write_masks(state)

    def _write_masks(self, state: dict):
        """masks.npz: per ratio ``p<ratio>`` int32 [epochs, ceil(channels/32)], channel i at word i//32,
        bit i%32 (the detector's packing), and ``channels``."""
        det = state.get("detector")
        if not det or not det["epoch"]:
            return
        arrays = {f"p{_ratio_key(r)}": det["masks"][:, i].numpy() for i, r in enumerate(det["ratios"])}
        arrays["channels"] = np.array(det["total"])
        if arrays:
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            atomic_write(os.path.join(self.run_dir, "masks.npz"), write)

    def load_checkpoint(self) -> dict | None:
        if not os.path.exists(self.ckpt_path):
            return None
        try:
            return torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise TrainerError(f"the checkpoint {self.ckpt_path} cannot be read ({type(e).__name__}: {e}); "
                               f"move it away to start this run afresh") from e

    def _diverged(self, phase: str, epoch: int, state: dict | None):
        where = (f"the last good checkpoint is {self.ckpt_path} (after {state['phase']} epoch "
                 f"{state['epoch']})" if state and os.path.exists(self.ckpt_path)
                 else f"no checkpoint was written yet (run directory {self.run_dir})")
        raise TrainerError(f"non-finite training loss in {phase} epoch {epoch}: training stopped; {where}. "
                           f"Lower --lr or check the data, then run again (a new --lr is a new run).")

    # ---- the whole job --------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        if os.path.exists(self.summary_path):
            with open(self.summary_path) as f:
                summary = json.load(f)
            if self.dist.is_main and not s.quiet:  # printed only: a finished run's files stay untouched
                print(f"run {self.run_dir} is already finished (summary.json); nothing to do.", file=self.out)
                print_summary(summary, self.out, finished_before=True)
            return summary
        lock = RunLock(self.run_dir) if self.dist.is_main else contextlib.nullcontext()
        with lock:
            state = self.load_checkpoint()
            if state is not None:
                where = (f"{state['phase']} epoch {state['epoch']}" if state["phase"] != "retrain" else
                         f"retrain job {state['retrain_index'] + 1}, epoch {state['epoch']}")
                self.log(f"resuming {self.run_dir} from its checkpoint ({where} done)")
                torch.set_rng_state(state["rng"])
            else:
                self.log(f"run directory: {self.run_dir}")
                self.log(f"data: {self.ds.describe()}")
                self.log(f"model: {s.model} width {s.width:g}; search precision {s.precision}, ratios "
                         f"{', '.join(map(_ratio_key, s.ratios))}, eps {s.eps:g}, "
                         f"{'baseline (train fully, prune, retrain)' if s.baseline else 'EB training'}")
                state = self._fresh_state()
            if state["phase"] == "search":
                state = self.search(state)
            if state["phase"] == "retrain":
                state = self.retrain_all(state)
            summary = self.finish(state)
        return summary

    def _fresh_state(self) -> dict:
        from .pruning import count_flops, count_params

        dense = self._float_copy(self.model)
        return {"version": 1, "phase": "search", "epoch": 0, "records": [], "tickets": [], "retrain_jobs": [],
                "retrain_index": 0, "results": [], "found": {},
                "wall": {"search": 0.0, "prune": 0.0, "retrain": 0.0, "eval": 0.0},
                "energy": {}, "model": None, "optimizer": None, "detector": None,
                "dense": {"params": int(count_params(dense)),
                          "flops": int(count_flops(dense, self.ds.input_shape))}}

    def _add_energy(self, state: dict, phase: str, start: float | None):
        end = self.energy.read()
        if start is not None and end is not None:
            state["energy"][phase] = state["energy"].get(phase, 0.0) + (end - start)

    # ---- search ---------------------------------------------------------------------------------
    def _make_detector(self):
        return make_detector(self.s)

    def search(self, state: dict) -> dict:
        s = self.s
        model = self.model
        if state["model"] is not None:
            model.load_state_dict(state["model"])
        model, wrapped = self._prepare_for_training(model, s.precision)
        opt = self._optimizer(model)
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        detector = self._make_detector()  # one detector, all ratios: one fused update per epoch
        if state["detector"] is not None:
            detector.load_state_dict(state["detector"])
        total_search = s.epochs
        for epoch in range(state["epoch"], total_search):
            t0, e0 = time.perf_counter(), self.energy.read()
            lr = lr_at(epoch, s.lr, s.epochs)
            train = self.train_epoch(model, wrapped, opt, epoch, lr, s.sparsity, s.precision,
                                     f"search {epoch + 1}/{total_search}")
            if not math.isfinite(train["train_loss"]):
                self._diverged("search", epoch + 1, self.load_checkpoint())
            t1 = time.perf_counter()
            test = self.evaluate(model, s.precision if s.precision == "bf16" else "fp32")
            t2 = time.perf_counter()
            detector.step(model)  # every rank: parameters are identical, so are the verdicts
            distances, newly = {}, []
            # rank 0's verdict is the verdict (guards against float noise between ranks)
            found_now = self.dist.broadcast_obj(dict(detector.found_epoch))
            for r in s.ratios:
                key = _ratio_key(r)
                d = detector.distances[r]
                distances[key] = d[-1] if d else None
                if found_now[r] is not None and key not in state["found"]:
                    state["found"][key] = found_now[r] + 1  # the detector counts epochs from 0
                    newly.append(r)
            self._add_energy(state, "search", e0)
            state["wall"]["search"] += t1 - t0
            state["wall"]["eval"] += t2 - t1
            # draw tickets: at the detector's verdict (EB mode), at --draw-at epochs, at the end (baseline)
            last = epoch + 1 == total_search
            draws = [] if s.baseline else [(r, _ratio_key(r), True) for r in newly]
            if epoch + 1 in s.draw_at:
                draws += [(r, f"{_ratio_key(r)}@{epoch + 1}", False) for r in s.ratios]
            all_found = all(_ratio_key(r) in state["found"] for r in s.ratios)
            stop = last or (all_found and not s.baseline)
            if stop:  # the main tickets not drawn yet: baseline's final ones, or EB's never-found ones
                drawn = {t["tag"] for t in state["tickets"]} | {d[1] for d in draws}
                draws += [(r, _ratio_key(r), False) for r in s.ratios if _ratio_key(r) not in drawn]
            tp = time.perf_counter()
            for r, tag, by_detector in draws:
                state["tickets"].append(self.draw_ticket(model, r, tag, epoch + 1, by_detector))
            state["wall"]["prune"] += time.perf_counter() - tp
            record = {"phase": "search", "epoch": epoch + 1, "lr": lr, **train, **test,
                      "distances": distances, "found": sorted(state["found"].items()),
                      "time": round(t2 - t0, 4)}
            state["records"].append(record)
            dist_txt = "  ".join(f"d(p={k}) {v:.3f}" if v is not None else f"d(p={k}) -"
                                 for k, v in distances.items())
            found_txt = "  ".join(f"ticket p={_ratio_key(r)} found" for r in newly)
            self.log(f"[search] epoch {epoch + 1:3d}/{total_search}  lr {lr:.4g}  loss {train['train_loss']:.4f}  "
                     f"train {train['train_acc']:5.1f}%  test {test['test_acc']:5.1f}%  {dist_txt}  "
                     f"{t2 - t0:.1f}s  {found_txt}".rstrip())
            state.update(epoch=epoch + 1, model=self._float_copy(model).state_dict(),
                         optimizer=opt.state_dict(),
                         detector=detector.state_dict())
            if stop:
                state.update(phase="retrain", epoch=0, model=None, optimizer=None,
                             search_epochs=epoch + 1, retrain_jobs=self._retrain_jobs(state))
            self.save_checkpoint(state)
            if stop:
                break
        return state

    def draw_ticket(self, model: nn.Module, ratio: float, tag: str, epoch: int, by_detector: bool) -> dict:
        """Mask at ``ratio`` from the current BN scaling factors, prune physically, save (rank 0)."""
        from .detector import channel_mask
        from .pruning import prune, save_ticket

        dense = self._float_copy(model)
        mask = channel_mask(dense, ratio)
        pruned, report = prune(dense, mask, ratio=ratio, input_shape=self.ds.input_shape)
        acc = self.evaluate(pruned)["test_acc"]
        path = os.path.join(self.run_dir, f"ticket_{tag.replace('@', '_e')}.pt")
        if self.dist.is_main:  # save_ticket writes atomically itself
            save_ticket(path, (pruned, report), meta={"ratio": ratio, "epoch": epoch, "tag": tag,
                                                      "by_detector": by_detector, "dataset": self.s.dataset,
                                                      "search_precision": self.s.precision})
        report = _report_dict(report)
        self.log(f"  drew ticket {tag} at epoch {epoch}"
                 f"{' (detector)' if by_detector else ''}: params {report.get('params_before')} -> "
                 f"{report.get('params_after')}, multiply-adds {report.get('flops_before')} -> "
                 f"{report.get('flops_after')}, accuracy before retraining {acc:.2f}%")
        return {"tag": tag, "ratio": ratio, "epoch": epoch, "by_detector": by_detector, "path": path,
                "acc_before_retrain": acc, **report}

    def _retrain_jobs(self, state: dict) -> list:
        inits = ["inherit", "reinit"] if self.s.retrain_init == "both" else [self.s.retrain_init]
        return [{"ticket": i, "init": init} for i in range(len(state["tickets"])) for init in inits]

    # ---- retrain --------------------------------------------------------------------------------
    def retrain_all(self, state: dict) -> dict:
        self.dist.barrier()  # tickets written by rank 0 are on disk for every rank
        jobs = state["retrain_jobs"]
        while state["retrain_index"] < len(jobs):
            state = self.retrain_one(state, jobs[state["retrain_index"]])
        state.update(phase="done", model=None, optimizer=None)
        self.save_checkpoint(state)
        return state

    def retrain_one(self, state: dict, job: dict) -> dict:
        from .pruning import load_ticket, save_ticket

        s = self.s
        ticket = state["tickets"][job["ticket"]]
        name = ticket["tag"] + ("" if job["init"] == "inherit" else "+reinit")
        model = _ticket_model(load_ticket(ticket["path"]))
        if job["init"] == "reinit":
            torch.manual_seed(s.seed + 1 + job["ticket"])
            _reinit(model)
        if state["model"] is not None:
            model.load_state_dict(state["model"])
        model, wrapped = self._prepare_for_training(model, "fp32")
        opt = self._optimizer(model)
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        total = s.retrain_epochs
        test = self.evaluate(model) if total == 0 else None
        for epoch in range(state["epoch"], total):
            t0, e0 = time.perf_counter(), self.energy.read()
            lr = lr_at(epoch, s.lr, total)
            train = self.train_epoch(model, wrapped, opt, epoch, lr, 0.0, s.retrain_precision,
                                     f"retrain {name} {epoch + 1}/{total}")
            if not math.isfinite(train["train_loss"]):
                self._diverged(f"retrain ({name})", epoch + 1, self.load_checkpoint())
            t1 = time.perf_counter()
            test = self.evaluate(model, s.retrain_precision)
            t2 = time.perf_counter()
            self._add_energy(state, "retrain", e0)
            state["wall"]["retrain"] += t1 - t0
            state["wall"]["eval"] += t2 - t1
            state["records"].append({"phase": "retrain", "job": name, "epoch": epoch + 1, "lr": lr, **train,
                                     **test, "time": round(t2 - t0, 4)})
            self.log(f"[retrain {name}] epoch {epoch + 1:3d}/{total}  lr {lr:.4g}  loss {train['train_loss']:.4f}  "
                     f"train {train['train_acc']:5.1f}%  test {test['test_acc']:5.1f}%  {t2 - t0:.1f}s")
            state.update(epoch=epoch + 1, model=self._float_copy(model).state_dict(), optimizer=opt.state_dict())
            if epoch + 1 < total:
                self.save_checkpoint(state)
        final = self._float_copy(model)
        path = os.path.join(self.run_dir, f"pruned_{name.replace('@', '_e').replace('+', '_')}.pt")
        if self.dist.is_main:
            save_ticket(path, final, meta={"ratio": ticket["ratio"], "drawn_epoch": ticket["epoch"],
                                           "retrained_epochs": total, "init": job["init"],
                                           "retrain_precision": s.retrain_precision, "dataset": s.dataset})
        curve = [r["test_acc"] for r in state["records"] if r.get("job") == name]
        state["results"].append({"job": name, "ticket": ticket["tag"], "init": job["init"],
                                 "final_acc": test["test_acc"], "best_acc": max(curve) if curve else test["test_acc"],
                                 "path": path})
        state.update(retrain_index=state["retrain_index"] + 1, epoch=0, model=None, optimizer=None)
        self.save_checkpoint(state)
        return state

    # ---- summary & plots ------------------------------------------------------------------------
    def finish(self, state: dict) -> dict:
        summary = build_summary(self.s, state, self.run_dir, self.ds, self.dist)
        if self.dist.is_main:
            try:
                write_plots(self.run_dir, state, self.s)
            except Exception as e:  # plots are a convenience: a plotting failure must not lose the run
                self.log(f"warning: plots not written ({type(e).__name__}: {e})")
            atomic_write_json(self.summary_path, summary)
            if not self.s.quiet:
                print_summary(summary, self.out)
        self.dist.barrier()
        return summary


def _report_dict(report) -> dict:
    """The pruning report as plain numbers (accepts a dict or an object with attributes)."""
    keys = ("params_before", "params_after", "flops_before", "flops_after")
    if isinstance(report, dict):
        d = {k: report[k] for k in keys if k in report}
        extra = {k: v for k, v in report.items() if k not in keys and isinstance(v, (int, float, str, list))}
    else:
        d = {k: getattr(report, k) for k in keys if hasattr(report, k)}
        extra = {}
    d = {k: int(v) for k, v in d.items()}
    return {**extra, **d}


def _ticket_model(loaded) -> nn.Module:
    """``load_ticket`` may return the model or (model, metadata)."""
    if isinstance(loaded, nn.Module):
        return loaded
    if isinstance(loaded, (tuple, list)):
        for item in loaded:
            if isinstance(item, nn.Module):
                return item
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), nn.Module):
        return loaded["model"]
    raise TrainerError(f"load_ticket returned {type(loaded).__name__}, not a model")


def _reinit(model: nn.Module) -> None:
    """Fresh random weights for a pruned model ("EB Train (re-init)")."""
    from .pruning import reinit

    reinit(model)


def build_summary(s: Settings, state: dict, run_dir: str, ds, dist: Dist) -> dict:
    search_records = [r for r in state["records"] if r["phase"] == "search"]
    n_train = len(ds.train_labels)
    dense_flops = state["dense"]["flops"]
    search_epochs = state.get("search_epochs", len(search_records))
    # training cost as in the paper's FLOPs accounting: forward + backward ~ 3x forward, per sample
    train_flops_per_epoch_dense = 3 * dense_flops * n_train
    results = {r["job"]: r for r in state["results"]}
    tickets = []
    for t in state["tickets"]:
        entry = dict(t)
        entry["path"] = os.path.relpath(t["path"], run_dir)
        for init in ("inherit", "reinit"):
            job = t["tag"] + ("" if init == "inherit" else "+reinit")
            if job in results:
                res = results[job]
                key = "retrain" if init == "inherit" else "retrain_reinit"
                entry[f"{key}_acc"] = res["final_acc"]
                entry[f"{key}_best_acc"] = res["best_acc"]
                entry[f"{key}_path"] = os.path.relpath(res["path"], run_dir)
        retrain_flops = 3 * t.get("flops_after", dense_flops) * n_train * s.retrain_epochs
        entry["train_flops"] = {"search": train_flops_per_epoch_dense * t["epoch"], "retrain": retrain_flops,
                                "total": train_flops_per_epoch_dense * t["epoch"] + retrain_flops}
        tickets.append(entry)
    last = search_records[-1] if search_records else {}
    wall = {k: round(v, 3) for k, v in state["wall"].items()}
    wall["total"] = round(sum(state["wall"].values()), 3)
    return {
        "finished": True,
        "run_dir": run_dir,
        "mode": "baseline" if s.baseline else "eb",
        "settings": s.hashed(),
        "data": ds.describe(),
        "device": str(dist.device) + (f" x{dist.world_size} processes" if dist.enabled else ""),
        "search": {"epochs_run": search_epochs, "precision": s.precision,
                   "found_epoch": {_ratio_key(r): state["found"].get(_ratio_key(r)) for r in s.ratios},
                   "final_test_acc": last.get("test_acc"),
                   "best_test_acc": max((r["test_acc"] for r in search_records), default=None),
                   "distances": {_ratio_key(r): [rec["distances"].get(_ratio_key(r)) for rec in search_records]
                                 for r in s.ratios}},
        "dense": {**state["dense"], "flops_note": "forward multiply-adds per sample (count_flops)"},
        "tickets": tickets,
        "train_flops_note": "3 x forward multiply-adds x training samples x epochs; search epochs are counted up to "
                            "each ticket's draw epoch (int8 operations in an int8 search)",
        "wall_time_s": wall,
        "energy_j": state["energy"] or None,
    }


def print_summary(summary: dict, out=sys.stdout, finished_before: bool = False) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    search = summary["search"]
    p("")
    p(f"== early-bird {'baseline ' if summary['mode'] == 'baseline' else ''}summary: {summary['data']}")
    for key, ep in search["found_epoch"].items():
        if summary["mode"] == "baseline":
            txt = (f"the detector would have fired at epoch {ep}" if ep else "the detector did not fire") + \
                  f"; baseline trained all {search['epochs_run']} epochs and drew it at the end"
        else:
            txt = (f"found by the detector at epoch {ep} (search stopped after epoch {search['epochs_run']} of "
                   f"at most {summary['settings']['epochs']})" if ep else
                   f"not found by the detector within {search['epochs_run']} epochs; drawn at the last epoch")
        p(f"ticket p={key}: {txt}")
    p(f"dense network ({search['precision']} search): test accuracy {search['final_test_acc']:.2f}% after "
      f"epoch {search['epochs_run']}; {summary['dense']['params']:,} params, "
      f"{summary['dense']['flops'] / 1e6:.2f} M multiply-adds per image")
    for t in summary["tickets"]:
        pa, pb = t.get("params_after"), t.get("params_before")
        fa, fb = t.get("flops_after"), t.get("flops_before")
        line = f"ticket {t['tag']} (epoch {t['epoch']}): "
        if pa is not None and pb:
            line += f"params {pb:,} -> {pa:,} (-{100 * (1 - pa / pb):.1f}%), "
        if fa is not None and fb:
            line += f"multiply-adds {fb / 1e6:.2f}M -> {fa / 1e6:.2f}M (-{100 * (1 - fa / fb):.1f}%), "
        line += f"accuracy {t['acc_before_retrain']:.2f}% as pruned (before retraining)"
        if "retrain_acc" in t:
            line += f", {t['retrain_acc']:.2f}% retrained"
        if "retrain_reinit_acc" in t:
            line += f", {t['retrain_reinit_acc']:.2f}% retrained from re-init"
        p(line)
    w = summary["wall_time_s"]
    p(f"wall time: search {w['search']:.1f}s, prune {w['prune']:.1f}s, retrain {w['retrain']:.1f}s, "
      f"eval {w['eval']:.1f}s (total {w['total']:.1f}s)"
      + (f"; GPU energy {summary['energy_j']}" if summary.get("energy_j") else ""))
    p(f"run directory: {summary['run_dir']}  (plots: mask_distance_matrix.png, mask_distance.png, accuracy.png)")


def make_detector(s: Settings):
    """The run's detector: one EarlyBird over all ratios (a tuple, so its views are dicts by ratio)."""
    from .detector import EarlyBird

    return EarlyBird(tuple(s.ratios), eps=s.eps, window=s.window, mode=s.detector_mode)


def write_plots(run_dir: str, state: dict, s: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [_ratio_key(r) for r in s.ratios]
    pairwise = {}
    if state.get("detector"):
        det = make_detector(s)
        det.load_state_dict(state["detector"])
        pairwise = {_ratio_key(r): m.numpy() for r, m in det.pairwise_distances().items()}
    # Fig. 3: 1 - normalised pairwise distance (warmer = closer), red lines at the ticket epoch
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.1), squeeze=False)
    for ax, key in zip(axes[0], keys):
        d = pairwise.get(key, np.zeros((0, 0)))
        if d.size:
            span = d.max() - d.min()
            img = 1 - (d - d.min()) / span if span > 0 else np.ones_like(d)
            n = len(d)
            im = ax.imshow(img, cmap="viridis", origin="upper", extent=(0.5, n + 0.5, n + 0.5, 0.5))
            fe = state["found"].get(key)
            if fe:
                ax.axvline(fe, color="red", lw=1.2)
                ax.axhline(fe, color="red", lw=1.2)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"p = {key}" + (f", ticket at epoch {state['found'][key]}" if state["found"].get(key) else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
    fig.suptitle("pairwise mask distance\n(1 - normalised: warmer = closer; red: ticket)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "mask_distance_matrix.png"), dpi=110)
    plt.close(fig)

    # distance to the previous epoch's mask
    recs = [r for r in state["records"] if r["phase"] == "search"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key in keys:
        xs = [r["epoch"] for r in recs if r["distances"].get(key) is not None]
        ys = [r["distances"][key] for r in recs if r["distances"].get(key) is not None]
        line, = ax.plot(xs, ys, marker=".", label=f"p = {key}")
        if state["found"].get(key):
            ax.axvline(state["found"][key], color=line.get_color(), ls=":", lw=1)
    ax.axhline(s.eps, color="red", ls="--", lw=1, label=f"eps = {s.eps:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mask distance to previous epoch")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("mask distance per epoch (dotted: ticket found)")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "mask_distance.png"), dpi=110)
    plt.close(fig)

    # accuracy curves: search, then each retraining job continuing from its draw epoch
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([r["epoch"] for r in recs], [r["test_acc"] for r in recs], color="black",
            label=f"search ({s.precision}) test")
    ax.plot([r["epoch"] for r in recs], [r["train_acc"] for r in recs], color="gray", ls="--", lw=1,
            label="search train")
    tickets = {t["tag"]: t for t in state["tickets"]}
    for res in state["results"]:
        curve = [r for r in state["records"] if r.get("job") == res["job"]]
        start = tickets[res["ticket"]]["epoch"]
        ax.plot([start + r["epoch"] for r in curve], [r["test_acc"] for r in curve], label=f"retrain {res['job']}")
    ax.set_xlabel("epoch (retraining continues from the draw epoch)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "accuracy.png"), dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _ratio_arg(text: str) -> list:
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number; accepted: floats in (0, 1), "
                                             f"comma-separated or repeated")
    return out


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted: comma-separated epoch numbers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ebkernels",
        description="Early-bird ticket training: low-precision search -> detect -> prune -> retrain. "
                    "With no arguments: the whole job on scikit-learn's digits (well under a minute on an idle "
                    "2-core CPU).",
        epilog="examples:\n"
               "  ebkernels                                   # the demo: digits, int8 search, p = 0.5\n"
               "  ebkernels --dataset fashion-mnist --model vgg11 --width 0.25 --epochs 24 --ratio 0.3,0.5,0.7\n"
               "  ebkernels --dataset cifar10 --data-dir data/ --baseline   # progressive pruning baseline\n"
               "  torchrun --nproc-per-node 8 -m ebkernels --dataset cifar10   # DDP; rank 0 writes\n"
               "The same command again resumes an interrupted run, or says that it is finished.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(data_mod.DATASETS)}")
    g.add_argument("--data-dir", default=None,
                   help="dataset folder (default: Debian's fashion-mnist folder when present, else "
                        "$EBKERNELS_DATA or ~/.cache/ebkernels/data)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download data")
    g.add_argument("--train-subset", type=int, default=None, help="use a fixed random subset of the training set")
    g.add_argument("--test-subset", type=int, default=None, help="use a fixed random subset of the test set")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no crop/flip augmentation")
    g = p.add_argument_group("model and search")
    g.add_argument("--model", default=None, help="vgg11..vgg19, preresnet20..preresnet101, resnet18 "
                                                 "(default: vgg11 on digits, vgg16 otherwise)")
    g.add_argument("--width", type=float, default=None, help="channel width multiplier (default 0.25 on digits, 1)")
    g.add_argument("--precision", default="int8",
                   help="search-phase arithmetic: int8 (QConv2d/QLinear, default), bf16 (autocast), fp32")
    g.add_argument("--ratio", dest="ratios", type=_ratio_arg, action="append", default=None,
                   help="channel pruning ratio p in (0,1); repeat or comma-separate for several (default 0.5)")
    g.add_argument("--eps", type=float, default=0.1, help="detector threshold on the mask distance (default 0.1)")
    g.add_argument("--window", type=int, default=5, help="detector FIFO length (default 5)")
    g.add_argument("--detector-mode", default="consecutive",
                   help="stopping rule: consecutive (paper, default) or window (reference code)")
    g.add_argument("--sparsity", type=float, default=1e-4, help="L1 strength s on BN gammas (default 1e-4)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="(default 0.9)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="(default 1e-4)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (default 64 on digits, 256)")
    g.add_argument("--epochs", type=int, default=None,
                   help="search schedule length and maximum (default 40 on digits, 160); lr /10 at 50%% and 75%%")
    g.add_argument("--baseline", action="store_true",
                   help="progressive pruning baseline: train all --epochs, then prune and retrain")
    g.add_argument("--draw-at", type=_int_list, default=(), help="also draw tickets at these epochs (e.g. 5,10,20)")
    g = p.add_argument_group("retraining")
    g.add_argument("--retrain-epochs", type=int, default=None, help="default 20 on digits, 160")
    g.add_argument("--reinit", action="store_true", help="retrain from a random re-initialisation (EB Train re-init)")
    g.add_argument("--retrain-init", default=None, help="inherit (default), reinit, or both")
    g.add_argument("--retrain-precision", default="fp32", help="fp32 (default) or bf16 (autocast)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs", help="parent folder of the run directories (default runs/)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0, help="(default 0)")
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under torchrun: keep BatchNorm statistics per process")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("--print-run-dir", action="store_true", help="print the run directory of these settings and exit")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    ratios = tuple(r for group in (args.ratios or [[0.5]]) for r in group)
    init = args.retrain_init or ("reinit" if args.reinit else "inherit")
    if args.reinit and args.retrain_init not in (None, "reinit"):
        _bad(f"--reinit contradicts --retrain-init {args.retrain_init}")
    return Settings(dataset=args.dataset, model=args.model, width=args.width, data_dir=args.data_dir,
                    download=args.download, train_subset=args.train_subset, test_subset=args.test_subset,
                    augment=args.augment, precision=args.precision, ratios=ratios, eps=args.eps,
                    window=args.window, detector_mode=args.detector_mode, sparsity=args.sparsity, lr=args.lr,
                    momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                    epochs=args.epochs, retrain_epochs=args.retrain_epochs, retrain_init=init,
                    retrain_precision=args.retrain_precision, baseline=args.baseline,
                    draw_at=tuple(args.draw_at), sync_bn=args.sync_bn, seed=args.seed, out=args.out,
                    device=args.device, progress=args.progress, quiet=args.quiet)


def run(settings: Settings, log_stream=None) -> dict:
    """Run (or resume, or report) the job with these settings; returns the summary dict."""
    s = resolve_settings(settings)
    dist = setup_dist(s.device)
    job = Job(s, dist, log_stream)
    job.prepare()
    from ._backend import force_backend

    # The Triton interpreter (TRITON_INTERPRET=1) is for checking kernels; training on CPU tensors
    # takes the PyTorch reference path, which computes the same numbers much faster.
    ctx = force_backend("reference") if dist.device.type == "cpu" else contextlib.nullcontext()
    with ctx:
        return job.run()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = settings_from_args(args)
        if args.print_run_dir:
            print(run_dir_for(resolve_settings(s)))
            return 0
        run(s)
    except TrainerError as e:
        print(f"ebkernels: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebkernels: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0
