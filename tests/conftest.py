"""Shared test set-up.

One intra-op thread: the tests' tensors are tiny, so threads only add synchronisation, and on a busy
2-core machine OpenMP's spinning threads made a 4 ms training step take 90 ms.

Fresh allocations are filled with NaN (torch's deterministic mode fills `torch.empty` memory), so a
kernel or loop that reads memory it never wrote turns results into NaN instead of passing by luck.
warn_only: no op is refused, non-deterministic ones only warn.
"""

import os

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def nan_filled_allocations_one_thread():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on GPU runs
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.set_num_threads(threads)


@pytest.fixture
def fake_chorales(monkeypatch):
    """Ten small random piano rolls in place of JSB Chorales, so that the labs' chorale tests do not
    load music21's corpus."""
    from celldsl.labs.pianoroll import Chorale
    from celldsl.labs.tasks import chorales

    rng = np.random.default_rng(0)
    fake = [Chorale(n, f"fake{n}", (rng.random((6 + n, 88)) < 0.05).astype(np.uint8)) for n in range(1, 11)]
    monkeypatch.setattr(chorales, "load_chorales", lambda: fake)
