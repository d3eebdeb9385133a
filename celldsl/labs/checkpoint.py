"""Seeding and checkpoints, so that a run resumed from a checkpoint ends exactly where the
uninterrupted run would have (on the CPU).

That needs everything that changes during training in the checkpoint: model and optimizer
state, the data generator's state, the global torch / numpy / python RNG states (dropout and
anything else drawing from them), the step, and the running loss sums and history.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_torch_save

CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch from `seed`; return a separate generator for the data, so
    that the data stream does not depend on how many random numbers initialisation drew."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1_000_003)


def rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "data": data_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, **payload: Any) -> Path:
    """Write DIR/checkpoint.pt atomically (an interrupted save keeps the previous checkpoint)."""
    return atomic_torch_save(Path(out_dir) / CHECKPOINT, payload)


def load_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return None
    # weights_only=False: the payload holds RNG states (tuples, numpy arrays) written by us
    return torch.load(path, map_location="cpu", weights_only=False)
