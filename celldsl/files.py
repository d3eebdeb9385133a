"""Reading a file that must be a regular file: cell files and the cache's entries.

Opening a FIFO that has no writer waits forever, and a device may never end; so the file is opened
without blocking, checked with fstat on the open descriptor (no race between the check and the
read), and anything but a regular file is refused with an OSError that says what it is.
"""

from __future__ import annotations

import errno
import os
import stat

KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFileError(OSError):
    """The path names a FIFO, a device, a socket or a folder where a regular file was expected."""


def kind(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO (named pipe)")."""
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def open_regular(path, follow: bool = True) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path` and its stat (follow=False: a symlink at
    `path` is refused). Raises NotRegularFileError for anything else, OSError when it cannot be opened."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: a FIFO opens at once instead of waiting for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            what = f"it is {kind(info.st_mode)}, not a regular file"
            raise NotRegularFileError(errno.EINVAL, what, str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_regular(path, limit: int = -1, follow: bool = True) -> bytes:
    """The bytes of the regular file at `path` (at most `limit` of them when limit >= 0)."""
    fd, _info = open_regular(path, follow)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)
