"""The on-disk cache of generated code: where it lives, what it is keyed by, how it is written and read.

celldsl imports Python modules and loads shared libraries from this folder, so the folder is trusted
only when no one else can write to it: `root()` refuses a folder (or a parent of it) that another
user owns or that others may write to, unless the sticky bit protects it as on /tmp. Nothing is
unpickled from here: a compiled cell is rebuilt from its text (cell files are data), and the cache
holds only what the compiler generated from it, keyed by the cell text, the file name and a digest of
the compiler's own source (so code written by another version of celldsl is never reused).

Binary artifacts (the C kernels' .so) are written with a SHA-256 of their bytes beside them and
verified before every load (`verified`); a missing, truncated or foreign file is rebuilt, never
mapped into the process.

    $CELLDSL_CACHE (default ~/.cache/celldsl)/<key>/...   per cell: generated torch module, C source and .so
    $CELLDSL_CACHE/triton/<digest>/<name>.py              Triton modules, content-addressed
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from .lang.errors import printable

PACKAGE = Path(__file__).resolve().parent
_private_root: Path | None = None  # a fallback for the process when the configured folder is unwritable


class UnsafeCacheError(PermissionError):
    """The cache folder could be written by another user, so code loaded from it is not trusted."""


def configured() -> Path:
    """The folder the user configured: $CELLDSL_CACHE, else ~/.cache/celldsl."""
    root = os.environ.get("CELLDSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "celldsl")
    return Path(root).absolute()


def root() -> Path:
    """The cache folder, created private (0700) if missing and checked to be safe to load code from.

    Raises UnsafeCacheError for a folder others can write to. A folder that cannot be created or
    written (a read-only home, a file in its place) costs only speed: the process then uses a private
    temporary folder, with one warning."""
    global _private_root
    path = configured()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private(path)
        if os.access(path, os.W_OK | os.X_OK):
            return path
        reason = "it is not writable"
    except UnsafeCacheError:
        raise
    except OSError as err:
        reason = err.strerror or str(err)
    if _private_root is None:
        _private_root = Path(tempfile.mkdtemp(prefix="celldsl-cache-"))
        warnings.warn(
            f"celldsl: cannot use the cache folder {printable(str(path))} ({reason}); compiled code "
            f"goes to {_private_root} for this process (set CELLDSL_CACHE to a writable folder)",
            RuntimeWarning,
            stacklevel=3,
        )
    return _private_root


def check_private(path: Path) -> None:
    """Raise UnsafeCacheError unless `path` and every folder above it belong to this user (or root)
    and no one else may write to them (a sticky, world-writable folder such as /tmp is fine above)."""
    if not hasattr(os, "getuid"):  # Windows: no POSIX owners or modes to check
        return
    me, folder = os.getuid(), path
    while True:
        info = os.stat(folder)
        where = "it" if folder == path else f"the folder {printable(str(folder))} above it"
        problem = None
        if info.st_uid not in (me, 0):
            problem = f"{where} belongs to another user (uid {info.st_uid})"
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (
            folder == path or not info.st_mode & stat.S_ISVTX
        ):
            problem = f"other users can write to {where} (mode {stat.S_IMODE(info.st_mode):o})"
        if problem:
            raise UnsafeCacheError(
                f"celldsl refuses the cache folder {printable(str(path))}: {problem}. celldsl imports and "
                "loads compiled code from its cache, so the cache must be private: set CELLDSL_CACHE to a "
                "folder of your own that only you can write to"
            )
        if folder.parent == folder:
            return
        folder = folder.parent


# ---- keys ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def compiler_digest() -> str:
    """SHA-256 of the compiler's own source (the package but the labs, and the grammar): any code change
    gives new keys, so an entry written by another version is never read back."""
    h = hashlib.sha256()
    files = sorted(p for p in PACKAGE.rglob("*.py") if "labs" not in p.relative_to(PACKAGE).parts)
    for p in files:
        h.update(str(p.relative_to(PACKAGE)).encode() + b"\0" + p.read_bytes() + b"\0")
    from .lang.syntax import grammar_text

    h.update(grammar_text().encode())
    return h.hexdigest()


def key(*parts: str) -> str:
    """The cache key of a compiled cell: the compiler digest and the given parts (text, file name)."""
    data = "\0".join([compiler_digest(), *parts]).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:32]


# ---- writing and reading ----------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, shared: bool = False) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename: readers see the
    old file or the new one, never a part; a symlink at `path` is replaced, not followed. The file is
    private (0600) unless `shared`, which gives the usual 0666 less the umask (`celldsl compile -o`)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        if shared:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_if_changed(path: Path, text: str) -> None:
    """Write generated source unless the file already holds exactly it."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(path, data)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def seal(path: Path) -> None:
    """Record the SHA-256 of a finished artifact beside it (written after the artifact is in place)."""
    atomic_write(_checksum_path(path), hashlib.sha256(path.read_bytes()).hexdigest().encode())


def verified(path: Path) -> bool:
    """True when `path` exists and matches the checksum `seal` recorded for it. Anything else (no
    checksum, a truncated or replaced file) removes both, so the caller rebuilds."""
    try:
        expected = _checksum_path(path).read_text().strip()
        if hashlib.sha256(path.read_bytes()).hexdigest() == expected:
            return True
    except OSError:
        pass
    for stale in (path, _checksum_path(path)):
        try:
            stale.unlink()
        except OSError:
            pass
    return False
