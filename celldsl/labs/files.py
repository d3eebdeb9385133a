"""Atomic file writes and the cache directory.

Why atomic: a run can be interrupted (Ctrl-C, a killed job) while it writes a checkpoint,
a metrics file or the chorale cache. Writing to a temporary file in the same directory and
then `os.replace`-ing it means readers only ever see the old file or the complete new one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..lang.errors import printable


class WriteError(OSError):
    """A file could not be written (a full disk, a folder turned read-only); the previous version of
    the file, if any, is still there and complete. `str()` is one line for the user."""

    def __str__(self) -> str:
        name = printable(str(self.filename))
        return f"cannot write {name}: {self.strerror}; the previous {Path(name).name}, if any, is kept"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that a crash never leaves a half-written file behind: a temporary
    file beside it, flushed to disk, then renamed over it. Raises WriteError (the old file kept)
    when the disk is full or the folder cannot be written."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise WriteError(err.errno, err.strerror or str(err), str(path)) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_with(path: str | os.PathLike, save: Callable[[io.BytesIO], None]) -> Path:
    """Atomic write for writers that take a file object (numpy.savez, Figure.savefig)."""
    buf = io.BytesIO()
    save(buf)
    return atomic_write_bytes(path, buf.getvalue())


def cache_dir() -> Path:
    """Where parsed data is kept between runs: $CELLDSL_CACHE, else $XDG_CACHE_HOME/celldsl,
    else ~/.cache/celldsl."""
    if os.environ.get("CELLDSL_CACHE"):
        return Path(os.environ["CELLDSL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "celldsl"
