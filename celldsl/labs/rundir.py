"""The run folder (`--out`): ours, private to write, one run at a time, never overwritten by accident.

Why each check:

- ours and not writable by group or others: `--resume` loads checkpoint.pt from the folder, and a
  folder someone else created first (or can write into) lets them plant the checkpoint, or swap
  metrics.csv under a run. The folder is checked as it resolves (a symlink to it is checked where
  it points), before anything is read from it or written to it;
- a lock (`fcntl.flock` on `run.lock` in the folder, held for the whole run): two runs into one
  folder would interleave their checkpoints and metrics; the second is refused;
- a folder that holds a run (checkpoint.pt or metrics) is continued only with `--resume` and
  replaced only with `--overwrite`, never silently.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..lang.errors import printable

LOCK = "run.lock"
RUN_FILES = ("checkpoint.pt", "metrics.csv", "metrics.json")  # what makes a folder hold a run


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (a file in its place, a run already there, in use)."""


class UnsafeRunFolderError(PermissionError):
    """The run folder belongs to another user or others can write to it."""


def _name(path: Path) -> str:
    return printable(str(path))


def check_private(
    path: Path,
    st: os.stat_result | None = None,
    what: str = "run folder",
    advice: str = "choose another --out",
) -> None:
    """Refuse a folder (or file) that is not ours or that group or others may write to."""
    st = st or os.stat(path)
    uid = os.getuid()
    if st.st_uid != uid:
        raise UnsafeRunFolderError(
            f"refusing {what} {_name(path)}: it belongs to uid {st.st_uid}, not to you (uid {uid}); "
            f"it must be your own ({advice})"
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UnsafeRunFolderError(
            f"refusing {what} {_name(path)}: others can write to it (mode "
            f"{stat.S_IMODE(st.st_mode):o}); make it private (chmod go-w) or {advice}"
        )


def make_folder(out: Path) -> Path:
    """Create `out` if missing (without group/other write, whatever the umask) and check it.
    Returns the folder it resolves to."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {_name(out)} is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot create the run folder {_name(out)}: {err.strerror}") from None
    real = out.resolve()
    if created:
        os.chmod(real, stat.S_IMODE(os.stat(real).st_mode) & ~0o022)
    check_private(real)
    return real


def holds_run(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


@contextmanager
def run_folder(out: str | os.PathLike, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Hold `out` for one run: created and checked, locked against other runs, and refused when it
    already holds a run and neither `resume` nor `overwrite` says what to do with it. With
    `overwrite`, the old run's checkpoint and metrics are removed first, so that a stopped new run
    never leaves a mix of both."""
    import fcntl

    if resume and overwrite:
        raise RunFolderError("--resume continues the run in the folder and --overwrite replaces it: give one")
    out = Path(out)
    real = make_folder(out)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(real / LOCK, flags, 0o600)
    except OSError as err:
        raise RunFolderError(f"cannot lock the run folder {_name(out)}: {err.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"run folder {_name(out)} is in use by another run (it holds the lock {LOCK}); wait for "
                "that run to end or choose another --out"
            ) from None
        found = holds_run(real)
        if found and not (resume or overwrite):
            raise RunFolderError(
                f"{_name(out)} already holds a run ({', '.join(found)}): continue it with --resume, or "
                "replace it with --overwrite"
            )
        if overwrite:
            for name in found:
                (real / name).unlink()
        yield real
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new run)
