"""Run directories: where a run's files live, its lock, its settings record and its checkpoints.

One run = one directory named from a hash of its settings (``<out>/<model>-<dataset>-<mode>-<hash>``):

- ``settings.json``: the resolved settings (what the hash is taken of); checked against the name on
  every run, so a damaged record is reported, never silently kept;
- ``checkpoint.pt``: written atomically (temp file + fsync + ``os.replace``) after every epoch; holds
  the model, optimizer, detector state (``EarlyBird.state_dict``), RNG state and all records, so a
  run killed at any point, even by ``kill -9``, continues from its last completed epoch. Plain data
  only (loaded with ``weights_only=True``) plus a SHA-256 digest of its content, checked on load;
- ``metrics.jsonl`` (one record per epoch) and ``masks.npz`` (the packed mask history per ratio),
  rewritten with every checkpoint;
- ``ticket_<tag>.pt``, ``pruned_<tag>[_reinit].pt``, ``summary.json``, plots and ``log.txt`` (see job.py).

Temp files of writes killed mid-way are removed when the run next takes its lock; a write the
system refuses (disk full) stops the run with a message naming the checkpoint it can resume from.
"""
from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import torch

from .. import _rng

from .._io import (NotPlainData, atomic_torch_save, atomic_write_bytes, atomic_write_text, content_digest, load_plain,
                   remove_stale_temporaries)
from .settings import Settings, TrainerError, run_mode, settings_hash

__all__ = ["RunDir", "RunLock", "run_dir_for", "new_state", "describe_progress", "atomic_write_json", "json_default",
           "ratio_key"]

_PROBE_NAME = re.compile(r"\.write-test-[0-9]+")  # RunDir.create's writability probe


def ratio_key(r: float) -> str:
    """A ratio as it names files and JSON keys: ``0.5`` -> ``"0.5"``."""
    return f"{r:g}"


def run_dir_for(s: Settings) -> str:
    """Where a run with these (resolved) settings lives."""
    name = f"{s.model.replace(':', '_')}-{s.dataset}-{run_mode(s)}-{settings_hash(s)}"
    return os.path.join(s.out, name)


def new_state(params: int, flops: int) -> dict:
    """A run's state before its first epoch, what every checkpoint holds (plain data and tensors).

    ``phase`` goes search -> retrain -> done; ``epoch`` counts the finished epochs of the phase (of
    retraining job ``retrain_index``); ``model``/``optimizer``/``detector`` are state_dicts (None
    between phases); ``records`` are the metrics.jsonl lines; ``dense`` is the dense network's cost.
    """
    return {"version": 1, "phase": "search", "epoch": 0, "records": [], "tickets": [], "retrain_jobs": [],
            "retrain_index": 0, "results": [], "found": {},
            "wall": {"search": 0.0, "prune": 0.0, "retrain": 0.0, "eval": 0.0},
            "energy": {}, "model": None, "optimizer": None, "detector": None,
            "dense": {"params": int(params), "flops": int(flops)}}


def describe_progress(state: dict) -> str:
    """How far a checkpointed run got, in words (for the resume line and error messages)."""
    n_jobs = len(state.get("retrain_jobs", []))
    if state["phase"] == "search":
        return f"search epoch {state['epoch']} done"
    if state["phase"] == "retrain" and state["epoch"] == 0:
        index = state["retrain_index"]
        return (f"search done after epoch {state.get('search_epochs')}, retraining not started" if index == 0
                else f"retraining job {index} of {n_jobs} done")
    if state["phase"] == "retrain":
        return f"retraining job {state['retrain_index'] + 1} of {n_jobs}, epoch {state['epoch']} done"
    return "search and retraining done, summary not written yet"


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


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


class RunDir:
    """The files of one run. Only rank 0 creates or writes them."""

    def __init__(self, settings: Settings, say=print):
        self.settings = settings
        self.say = say  # where notes to the user go (the run's log)
        self._said_no_digest = False
        self.last_progress = None  # describe_progress of the checkpoint on disk, once saved or loaded
        self.path = run_dir_for(settings)
        self.checkpoint_path = self.file("checkpoint.pt")
        self.summary_path = self.file("summary.json")
        self.settings_path = self.file("settings.json")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def ticket_path(self, tag: str) -> str:
        return self.file(f"ticket_{tag.replace('@', '_e')}.pt")

    def pruned_path(self, job_name: str) -> str:
        return self.file(f"pruned_{job_name.replace('@', '_e').replace('+', '_')}.pt")

    def lock(self) -> RunLock:
        return RunLock(self.path)

    # ---- creation -------------------------------------------------------------------------------
    def create(self) -> None:
        """Make the directory (checking that it is writable) and record the settings in it."""
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = self.file(f".write-test-{os.getpid()}")  # see _PROBE_NAME
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
            if not os.path.exists(self.settings_path):
                s = self.settings
                atomic_write_json(self.settings_path, {**self._settings_record(), "out": s.out,
                                                       "data_dir": s.data_dir})
        except OSError as e:
            raise TrainerError(f"cannot write the run directory {self.path!r} ({e.strerror or e}); "
                               f"choose a writable folder with --out") from e
        problem = self._settings_json_problem()
        if problem:
            raise TrainerError(f"{self.settings_path} is corrupt: {problem}. The directory name is the hash of the "
                               f"settings ({settings_hash(self.settings)}) and this command's settings match it: "
                               f"delete settings.json and run again to have it rewritten from them, or move the "
                               f"run directory away")

    def _settings_record(self) -> dict:
        return {"hash": settings_hash(self.settings), **self.settings.hashed()}

    def _settings_json_problem(self) -> str | None:
        """What is wrong with settings.json, or None when it records exactly these settings (``out`` and
        ``data_dir`` may differ: they are not part of the hash)."""
        try:
            with open(self.settings_path) as f:
                recorded = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"it cannot be read as JSON ({e})"
        if not isinstance(recorded, dict):
            return f"it holds a JSON {type(recorded).__name__}, not the settings object"
        expected = json.loads(json.dumps(self._settings_record(), default=list))  # tuples as JSON has them
        for key, value in expected.items():
            if key not in recorded:
                return f"it has no {key!r}"
            if recorded[key] != value:
                return f"it records {key}={recorded[key]!r} where these settings have {value!r}"
        unknown = sorted(set(recorded) - set(expected) - {"out", "data_dir"})
        if unknown:
            return f"it has entries no setting has: {', '.join(map(repr, unknown))}"
        return None

    def remove_stale_temporaries(self) -> None:
        """Delete what writes killed mid-way left here (``.tmp-*`` files of atomic writes, write probes);
        called under the run's lock, when nothing else writes here."""
        removed = remove_stale_temporaries(self.path, extra=_PROBE_NAME)
        if removed:
            self.say(f"removed {len(removed)} temporary file(s) left by interrupted writes: "
                     f"{', '.join(os.path.basename(p) for p in removed)}")

    # ---- summary --------------------------------------------------------------------------------
    def read_summary(self) -> dict | None:
        """The summary of a finished run, or None while the run is unfinished."""
        if not os.path.exists(self.summary_path):
            return None
        with open(self.summary_path) as f:
            return json.load(f)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        """checkpoint.pt (with the RNG state), then metrics.jsonl and masks.npz from the same state."""
        state = dict(state, rng=torch.get_rng_state(), ebk_rng=_rng.get_state())
        state["digest"] = content_digest(state)  # load_checkpoint recomputes it: a changed byte is caught
        atomic_torch_save(state, self.checkpoint_path)
        self.last_progress = describe_progress(state)
        atomic_write_text(self.file("metrics.jsonl"),
                          "".join(json.dumps(r, default=json_default) + "\n" for r in state["records"]))
        self._write_masks(state)

    def _write_masks(self, state: dict) -> None:
        """masks.npz: per ratio ``p<ratio>`` int32 [epochs, ceil(channels/32)], channel i at word i//32,
        bit i%32 (the detector's packing), and ``channels``."""
        det = state.get("detector")
        if not det or not det["epoch"]:
            return
        arrays = {f"p{ratio_key(r)}": det["masks"][:, i].numpy() for i, r in enumerate(det["ratios"])}
        arrays["channels"] = np.array(det["total"])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.file("masks.npz"), buffer.getbuffer())

    def load_checkpoint(self) -> dict | None:
        """The last checkpoint's state, or None when the run has none yet."""
        if not os.path.exists(self.checkpoint_path):
            return None
        try:
            state = load_plain(self.checkpoint_path)
        except NotPlainData as e:
            raise TrainerError(f"the checkpoint {e}. This trainer never writes such a file: if you did not "
                               f"put it there, find out who did; move it away to start this run afresh") from None
        except Exception as e:
            raise TrainerError(f"the checkpoint {self.checkpoint_path} cannot be read ({type(e).__name__}: {e}); "
                               f"move it away to start this run afresh") from e
        if not isinstance(state, dict) or "phase" not in state:
            raise TrainerError(f"the checkpoint {self.checkpoint_path} is not a checkpoint of this trainer "
                               f"(no run state in it); move it away to start this run afresh")
        stored = state.pop("digest", None)
        if stored is None:  # written before checkpoints carried digests: usable, but say so once
            if not self._said_no_digest:
                self._said_no_digest = True
                self.say(f"note: the checkpoint {self.checkpoint_path} carries no content digest (written by an "
                         f"older ebkernels): resuming without an integrity check; the next checkpoint has one")
            self.last_progress = describe_progress(state)
            return state
        try:
            actual = content_digest(state)
        except TypeError as e:
            actual = str(e)
        if actual != stored:
            raise TrainerError(f"the checkpoint {self.checkpoint_path} is corrupt: its content does not match the "
                               f"SHA-256 digest stored in it (changed bytes in its data); move it away to start "
                               f"this run afresh")
        self.last_progress = describe_progress(state)
        return state

    def checkpoint_note(self) -> str:
        """Which checkpoint a failed run can resume from."""
        if self.last_progress is None:
            return f"No checkpoint was written yet (run directory {self.path})"
        return f"The last checkpoint, {self.checkpoint_path} ({self.last_progress}), is intact"
