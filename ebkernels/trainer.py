"""Compatibility: the trainer moved to the package :mod:`ebkernels.train`; these names still import."""
from .train import (Job, Settings, SyncBatchNorm2d, TrainerError, build_parser, lr_at, main,  # noqa: F401
                    resolve_settings, run, run_dir_for, settings_from_args, settings_hash)
from .train.dist import Dist, setup_dist  # noqa: F401
from .train.energy import EnergyMeter  # noqa: F401
from .train.job import make_detector  # noqa: F401
from .train.report import build_summary, print_summary, write_plots  # noqa: F401
from .train.rundir import RunLock, atomic_write_json  # noqa: F401
from .train.settings import (DATASET_DEFAULTS, DETECTOR_MODES, NOT_HASHED, PRECISIONS,  # noqa: F401
                             RETRAIN_INITS, RETRAIN_PRECISIONS)

__all__ = ["Settings", "TrainerError", "resolve_settings", "run", "main", "build_parser", "run_dir_for",
           "lr_at", "SyncBatchNorm2d"]
