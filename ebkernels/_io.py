"""File writes, reads and digests shared by checkpoints, run metadata and ticket files.

``atomic_write(path, write)`` calls ``write(tmp)`` on a fresh temp file in ``path``'s directory (the
name ends with ``path``'s base name, so savers that look at the suffix, e.g. ``np.savez``, keep it),
fsyncs it, ``os.replace``-s it over ``path`` and fsyncs the directory: readers see the old file or the
new one, never a partial one. On any error the temp file is removed and the error re-raised; an OSError
(disk full…) as :class:`WriteFailed`, which names the file and the bytes being written.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import uuid

import torch

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "WriteFailed",
           "fsync_dir", "load_plain", "NotPlainData", "content_digest", "remove_stale_temporaries"]


def fsync_dir(directory: str) -> None:
    """fsync a directory (makes a rename durable); a no-op where the platform / filesystem refuses."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: str) -> str:
    d, base = os.path.split(path)
    # unique per call (pid + random token), same directory (os.replace stays a rename), same suffix
    return os.path.join(d, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{base}")


TMP_NAME = re.compile(r"\.tmp-[0-9]+-[0-9a-f]{8}-.+")  # exactly the names _tmp_path makes


def remove_stale_temporaries(directory: str, extra=None) -> list[str]:
    """Remove the temp files that writes killed mid-way (``kill -9``) left in ``directory``: regular
    files named as :func:`atomic_write` names them (or matching the compiled pattern ``extra``), not
    in subfolders. Only call it while no other process writes there (e.g. under the run's lock).
    Returns the removed paths."""
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            ours = TMP_NAME.fullmatch(entry.name) or (extra is not None and extra.fullmatch(entry.name))
            if ours and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                    removed.append(entry.path)
    return sorted(removed)


class WriteFailed(OSError):
    """An atomic write the system refused (disk full, quota, I/O error): the file it was to replace is
    unchanged and its temp file removed. ``path``, ``nbytes`` (what was being written) and ``errno``."""

    def __init__(self, path: str, nbytes: int | None, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path, self.nbytes = path, nbytes
        size = f"{nbytes:,} bytes" if nbytes is not None else "unknown size"
        self.message = (f"cannot write {path} ({size}): {cause.strerror or cause}; the file there before "
                        f"is unchanged")

    def __str__(self) -> str:
        return self.message


def atomic_write(path, write, nbytes: int | None = None) -> str:
    """``write(tmp_path)`` then fsync and rename over ``path``; returns ``path`` (as a str). An OSError
    on the way becomes :class:`WriteFailed` (``nbytes``: the size being written, for its message)."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteFailed):
            raise WriteFailed(path, nbytes, e) from e
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def atomic_write_bytes(path, data: bytes) -> str:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write, nbytes=len(data))


def atomic_write_text(path, text: str) -> str:
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path) -> str:
    """``torch.save`` into memory first (a pickling error touches no file; the size is known), then
    :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def content_digest(obj) -> str:
    """``"sha256:<hex>"`` over plain data (tensors, numbers, strings, None, lists/tuples, dicts): tensors by
    dtype, shape and values in row-major order, dicts by sorted keys. Equal for a saved object and the
    same object loaded back, so a file can carry the digest of the rest of its content."""
    h = hashlib.sha256()
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):  # one kind: a tuple may come back from a file as a list
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(f"S{len(b)}:".encode() + b)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"{type(obj).__name__[0]}{obj!r};".encode())  # repr of a float is exact
    else:
        raise TypeError(f"content_digest: a {type(obj).__name__} is not plain data; accepted: tensors, numbers, "
                        f"strings, None, lists, tuples, dicts")


class NotPlainData(ValueError):
    """A torch file that asks to import or call something: refused unread (unpickling it could run code)."""


def load_plain(path, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only, so no
    pickled code runs. Raises :class:`NotPlainData` naming what the file wanted to import; a truncated or
    corrupt file raises what ``torch.load`` raises (its pickle errors shortened)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        # the unpickler's words for an import or a call; anything else it refuses is a damaged file
        refusals = ("Unsupported global", "unsupported GLOBAL", "Trying to call reduce", "Can only build",
                    "Can only create new object")
        if not any(r in message for r in refusals):
            # torch's text advises weights_only=False, the one thing not to do with a damaged file
            detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
            raise pickle.UnpicklingError(f"damaged pickle data ({detail.group(1) if detail else 'unreadable'})") \
                from None
        wanted = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", message)
        what = f"it asks to import {wanted.group(1)}" if wanted else "it asks to build objects other than plain data"
        raise NotPlainData(f"{os.fspath(path)} holds more than plain data (tensors, numbers, strings, lists, "
                           f"dicts): {what}; refused without running any of it") from None
