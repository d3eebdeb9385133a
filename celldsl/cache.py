"""The on-disk cache of generated code: where it lives, what it is keyed by, how it is written and read.

celldsl imports Python modules and loads shared libraries from this folder, so the folder is trusted
only when no one else can write to it. `root()` resolves the configured path (a symlink is followed
and the folder it names is checked) and refuses it when it, or a folder above it, belongs to another
user or may be written by others (a sticky folder above, as /tmp, is fine). Every entry folder is
checked the same way, and every file is read only when it is a regular file of ours that no one else
may write (`read_trusted`), before it is loaded. Folders are made 0700 and files 0600 whatever the
umask. Nothing is unpickled from here: a compiled cell is rebuilt from its text (cell files are
data), and the cache holds only what the compiler generated from it, keyed by the cell text, the
file name and a digest of the compiler's own source (so code written by another version of celldsl
is never reused).

Binary artifacts (the C kernels' .so) are written with a SHA-256 of their bytes beside them and
verified before every load (`verified`); a missing, truncated or foreign file is rebuilt, never
mapped into the process. Generated Python modules are imported from their source only
(`import_file`): no .pyc is written or read, so a bytecode file cannot stand in for the source.

    $CELLDSL_CACHE (default ~/.cache/celldsl)/<key>/...   per cell: generated torch module, C source and .so
    $CELLDSL_CACHE/triton/<digest>/<name>.py              Triton modules, content-addressed
"""

from __future__ import annotations

import errno
import hashlib
import importlib.machinery
import importlib.util
import os
import stat
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from .files import kind, open_regular
from .lang.errors import printable

PACKAGE = Path(__file__).resolve().parent
PRIVATE = 0o700  # cache folders: only their owner may list, enter or change them
FULL_DISK = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_private_root: Path | None = None  # a fallback for the process when the configured folder is unwritable


class UnsafeCacheError(PermissionError):
    """The cache folder could be written by another user, so code loaded from it is not trusted."""


class UntrustedFileError(PermissionError):
    """A file in the cache that is not ours or that others may write: it is replaced, never loaded."""


class CacheWriteError(OSError):
    """A file could not be written for lack of space (a full disk, a quota): says where and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def configured() -> Path:
    """The folder the user configured: $CELLDSL_CACHE, else ~/.cache/celldsl."""
    root = os.environ.get("CELLDSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "celldsl")
    return Path(root).absolute()


def root() -> Path:
    """The cache folder (resolved: symlinks followed), created private (0700) if missing and checked to
    be safe to load code from.

    Raises UnsafeCacheError for a folder others can write to. A folder that cannot be created or
    written (a read-only home, a file in its place) costs only speed: the process then uses a private
    temporary folder, with one warning."""
    global _private_root
    path = configured()
    try:
        make_private(path)
        resolved = check_private(path)
        if os.access(resolved, os.W_OK | os.X_OK):
            return resolved
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


def make_private(folder: Path) -> None:
    """Create `folder` and any missing folder above it with mode 0700 whatever the umask (os.mkdir's
    mode is masked by it, so each new folder is chmod-ed after). Existing folders are left as they are:
    `check_private` judges them."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for new in reversed(missing):
        try:
            os.mkdir(new, PRIVATE)
        except FileExistsError:  # another process made it meanwhile: judged like any existing folder
            continue
        os.chmod(new, PRIVATE)


def check_private(path: Path) -> Path:
    """The folder `path` resolves to, after checking that it and every folder above it belong to this
    user (or root) and that no one else may write to them (a sticky, world-writable folder such as
    /tmp is fine above). Raises UnsafeCacheError when one is not; NotADirectoryError when it is no
    folder; FileNotFoundError when it does not exist."""
    path = Path(path)
    resolved = Path(os.path.realpath(path))
    if not hasattr(os, "getuid"):  # Windows: no POSIX owners or modes to check
        return resolved
    trusted, folder = (os.getuid(), 0), resolved
    while True:
        info = os.stat(folder)
        if folder != resolved:
            where = f"the folder {printable(str(folder))} above it"
        elif resolved != path:
            where = f"the folder {printable(str(resolved))} it resolves to"
        else:
            where = "it"
        if folder == resolved and not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"{where} is {kind(info.st_mode)}", str(path))
        problem = None
        if info.st_uid not in trusted:
            problem = f"{where} belongs to another user (uid {info.st_uid})"
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (
            folder == resolved or not info.st_mode & stat.S_ISVTX
        ):
            problem = f"other users can write to {where} (mode {stat.S_IMODE(info.st_mode):o})"
        if problem:
            raise UnsafeCacheError(
                f"refusing the cache folder {printable(str(path))}: {problem}. celldsl imports and loads "
                "compiled code from its cache, so the cache must be private: set CELLDSL_CACHE to a "
                "folder of your own that only you can write to"
            )
        if folder.parent == folder:
            return resolved
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
    private (0600, its missing folders 0700) unless `shared`, which gives the usual 0666 less the umask
    (`celldsl compile -o`). A full disk or quota raises CacheWriteError, which says so."""
    try:
        if shared:
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            make_private(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as err:
        raise _explained(err, path) from None
    try:
        if shared:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _explained(err, path) from None
        raise


def _explained(err: OSError, path: Path) -> OSError:
    """A full disk or quota as a CacheWriteError that names the file and the remedy; else `err`."""
    if err.errno not in FULL_DISK:
        return err
    return CacheWriteError(
        err.errno,
        f"cannot write {printable(str(path))}: {os.strerror(err.errno)}; free some space, or set "
        "CELLDSL_CACHE to a folder on another disk",
        str(path),
    )


def read_trusted(path: Path, limit: int = -1) -> bytes:
    """The bytes of a file in the cache, read only when its folder passes `check_private` (else
    UnsafeCacheError) and it is a regular file (not a symlink, a FIFO or a device) of ours that no one
    else may write (else UntrustedFileError or NotRegularFileError: callers rebuild or replace it)."""
    check_private(path.parent)
    fd, info = open_regular(path, follow=False)
    with os.fdopen(fd, "rb") as f:
        if hasattr(os, "getuid") and (
            info.st_uid not in (os.getuid(), 0) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            raise UntrustedFileError(
                errno.EPERM,
                f"it belongs to uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}",
                str(path),
            )
        return f.read(limit)


def write_if_changed(path: Path, text: str) -> None:
    """Write generated source unless the file already holds exactly it (and is ours: see read_trusted)."""
    data = text.encode("utf-8")
    try:
        if read_trusted(path) == data:
            return
    except UnsafeCacheError:
        raise
    except OSError:
        pass
    atomic_write(path, data)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def seal(path: Path) -> None:
    """Record the SHA-256 of a finished artifact beside it (written after the artifact is in place)."""
    atomic_write(_checksum_path(path), hashlib.sha256(read_trusted(path)).hexdigest().encode())


def verified(path: Path) -> bool:
    """True when `path` is a trusted file (read_trusted) that matches the checksum `seal` recorded for
    it. Anything else (no checksum, a truncated, replaced or foreign file) removes both, so the caller
    rebuilds. A folder that is not private raises UnsafeCacheError: nothing is loaded from it."""
    try:
        check_private(path.parent)
    except FileNotFoundError:
        return False
    try:
        expected = read_trusted(_checksum_path(path), 128).decode("ascii").strip()
        if hashlib.sha256(read_trusted(path)).hexdigest() == expected:
            return True
    except UnsafeCacheError:
        raise
    except (OSError, UnicodeDecodeError):
        pass
    for stale in (path, _checksum_path(path)):
        try:
            stale.unlink()
        except OSError:
            pass
    return False


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Compiles the module from its source every time: no __pycache__ is made (under a umask such as
    002 it would be group-writable) and no .pyc is read in place of the source."""

    def get_code(self, fullname):
        return self.source_to_code(self.get_data(self.path), self.path)


def import_file(path: Path, name: str):
    """Import the generated module at `path` as `name` (in sys.modules while it runs, as triton needs to
    resolve a kernel's globals), from its source only."""
    loader = _SourceOnlyLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
