"""Freed memory kept in the process, as tcmalloc and jemalloc keep it (glibc only).

Why: glibc hands the top of its heap back to the kernel when more than its trim threshold is free
there, and that threshold follows the largest block freed so far (twice it, from 128 kB). A call
whose buffers end on top of the heap then finds fresh pages at the next call, and each page faults
on its first write: indrnn's forward+backward at T=100 N=32 H=256 took 7.6-7.8 ms so, 4.3-5.2 ms
with the thresholds below (perf: 26% of its time in page faults, 6% in brk). The scratch pool
(scratch.py) keeps the backward's temporaries; a call's results cannot be pooled (the caller and
autograd own them), so this raises glibc's thresholds instead, once, when the CPU kernels are first
built for a cell. It applies to the whole process, torch.nn's buffers too.

Bounded: at most TRIM_BYTES stay free at the top of the heap, and blocks of more than MMAP_BYTES are
still mapped and unmapped on their own. CELLDSL_KEEP_FREED=0 leaves glibc's settings alone, as do the
MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ / GLIBC_TUNABLES environment variables (the user
chose) and any C library but glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
TRIM_BYTES = 128 << 20
MMAP_BYTES = 32 << 20  # glibc's largest dynamic threshold on 64-bit machines
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_state: list[str] = []  # what keep_freed_memory did, once: "kept", or why not


def keep_freed_memory() -> str:
    """Raise glibc's trim and mmap thresholds once per process: "kept", or why it did not."""
    with _lock:
        if not _state:
            _state.append(_apply())
        return _state[0]


def _apply() -> str:
    if os.environ.get("CELLDSL_KEEP_FREED", "1") == "0":
        return "off: CELLDSL_KEEP_FREED=0"
    chosen = [name for name in USER_SETTINGS if name in os.environ]
    if chosen:
        return f"off: the environment sets {', '.join(chosen)}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "off: not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "off: no mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either turns glibc's moving thresholds off
    if mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) != 1:
        return "off: mallopt refused"
    return "kept"
