"""Seeding and checkpoints, so that a run resumed from a checkpoint ends exactly where the
uninterrupted run would have (on the CPU).

That needs everything that changes during training in the checkpoint: model and optimizer
state, the data generator's state, the global torch / numpy / python RNG states (dropout and
anything else drawing from them), the step, and the running loss sums and history.

A checkpoint is data, never code: it is loaded with `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers, so the RNG states are stored as plain ints, lists and
tensors. The only other types allowed are the numpy globals that rebuild a uint32 numpy array, for
checkpoints written before that (their numpy RNG state was one).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..lang.errors import printable
from .files import atomic_torch_save
from .rundir import check_private

CHECKPOINT = "checkpoint.pt"

# what a checkpoint of an older celldsl needs beyond weights_only's defaults: its numpy RNG state
# was a numpy array (uint32); numpy 1 pickled the rebuild function under numpy.core, numpy 2 under
# numpy._core
_REBUILD_ARRAY = np.zeros(0, np.uint32).__reduce__()[0]  # the function numpy pickles arrays with
_LEGACY_NUMPY = [
    (_REBUILD_ARRAY, "numpy.core.multiarray._reconstruct"),
    (_REBUILD_ARRAY, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the dtype's state is set on it
]


class CheckpointError(ValueError):
    """checkpoint.pt cannot be read, or does not fit the run resuming from it."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch from `seed`; return a separate generator for the data, so
    that the data stream does not depend on how many random numbers initialisation drew."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1_000_003)


def rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG's state, as types `torch.load(weights_only=True)` rebuilds by default."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None or float)
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "data": data_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_gen: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, **payload: Any) -> Path:
    """Write DIR/checkpoint.pt atomically (an interrupted save keeps the previous checkpoint)."""
    return atomic_torch_save(Path(out_dir) / CHECKPOINT, payload)


def load_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint in `out_dir`, or None when there is none. Raises CheckpointError for a file
    that is not ours, that others can write, or that is not a complete checkpoint (truncated, or
    holding anything but tensors and plain data)."""
    path = Path(out_dir) / CHECKPOINT
    name = printable(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(f"cannot read {name}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:  # the file checked is the file read
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{name} is not a regular file")
        check_private(path, st, what="checkpoint")
        data = f.read()
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(err))
        what = f" (it asks for {printable(refused[1] or refused[2])}, which is not data)" if refused else ""
        raise CheckpointError(f"refusing {name}: not a checkpoint of tensors and plain data{what}") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot read {name}: the file is damaged or truncated ({type(err).__name__}); delete it to "
            "start again, or restore a copy"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{name} is not a celldsl checkpoint")
    return payload
