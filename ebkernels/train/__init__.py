"""The thin early-bird trainer (SPEC §3-4): low-precision search -> detect -> prune -> retrain.

One module per responsibility: ``settings`` (Settings, validation, the settings hash), ``cli``
(argparse -> Settings -> job), ``rundir`` (run directories, locks, checkpoints), ``dist`` (torchrun /
DDP, SyncBatchNorm), ``loop`` (one epoch, one evaluation), ``job`` (the algorithm), ``report``
(summary, plots), ``energy`` (NVML).
"""
from .cli import build_parser, main, run, settings_from_args
from .dist import SyncBatchNorm2d
from .job import Job
from .loop import lr_at
from .rundir import run_dir_for
from .settings import Settings, TrainerError, resolve_settings, settings_hash

__all__ = ["Settings", "TrainerError", "resolve_settings", "run", "main", "build_parser", "run_dir_for",
           "lr_at", "SyncBatchNorm2d", "Job", "settings_from_args", "settings_hash"]
