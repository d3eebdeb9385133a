"""Scratch buffers kept from one call to the next: the temporaries of the CPU backward.

Why: glibc hands a freed block of more than its trim threshold (a few MB) back to the kernel, so the
[rows, k * H] gradient buffers every backward allocates are fresh pages at every call, and each page
faults on first write: on this project's machine 13.8% of a GRU's forward+backward at T=100 N=32
H=256 was kernel time (perf), 0.3% with this pool. oneDNN keeps a scratchpad for the same reason.
Only buffers no result aliases come from here (the caller returns them when it is done), at most
MAX_BUFFER_BYTES each and MAX_BYTES kept in all, so a layer of any size costs at most that much
memory between calls.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

MAX_BUFFER_BYTES = 128 << 20
MAX_BYTES = 256 << 20

_lock = threading.Lock()
_free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}  # (dtype, numel) -> buffers not in use
_kept_bytes = 0


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def buffers():
    """Yields take(rows, cols, dtype) -> an uninitialised contiguous [rows, cols] CPU tensor; what it
    handed out is kept for the next call when the block ends. Nothing taken may outlive the block."""
    taken: list[torch.Tensor] = []

    def take(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        global _kept_bytes
        key = (dtype, rows * cols)
        with _lock:
            pool = _free.get(key)
            buf = pool.pop() if pool else None
            if buf is not None:
                _kept_bytes -= _bytes(buf)
        if buf is None:
            buf = torch.empty(rows * cols, dtype=dtype)
        taken.append(buf)
        return buf.view(rows, cols)

    try:
        yield take
    finally:
        _give_back(taken)


def _give_back(taken: list[torch.Tensor]) -> None:
    global _kept_bytes
    with _lock:
        for buf in taken:
            size = _bytes(buf)
            if size > MAX_BUFFER_BYTES or _kept_bytes + size > MAX_BYTES:
                continue  # freed: glibc may hand it back to the kernel
            _free.setdefault((buf.dtype, buf.numel()), []).append(buf)
            _kept_bytes += size


def clear() -> None:
    """Drop every kept buffer, handing its memory back (a process done training; tests)."""
    global _kept_bytes
    with _lock:
        _free.clear()
        _kept_bytes = 0
