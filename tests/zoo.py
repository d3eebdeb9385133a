"""The zoo as the tests see it.

Most zoo cells build as `Recurrent(cell, I, H)` and run on one input with H-wide states: the
zoo-wide tests (references, gradcheck, gradgradcheck, the Triton interpreter) take those, GENERIC.
The others need something a generic test does not give, and tests/test_language2.py runs each of
them the same ways (its reference on every backend, packed and bidirectional, gradcheck):
"""

from pathlib import Path

CELLS = Path(__file__).resolve().parents[1] / "cells"
ZOO = sorted(p.stem for p in CELLS.glob("*.cell"))
SPECIAL = {
    "lstm_proj": "a declared width: sizes={'P': ...}",
    "slstm_heads": "a hidden size that divides by its 4 heads",
    "phased_lstm": "an extra input: the time stamps t",
}
GENERIC = [c for c in ZOO if c not in SPECIAL]
