"""Mutated matrix-memory cells compile or give a located CellError, never another exception
(the matrix IR, lang/tensors.py, is new code on top of the parser the main fuzz test covers)."""

from __future__ import annotations

import re
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import CELLS, MATRIX

from celldsl import compile_cell
from celldsl.lang.errors import CellError, CellWarning

# issue 26's cells: the matrix-memory ones and lru, chrono_lstm (sin/cos, init expressions); the
# elementwise zoo is fuzzed by tests/test_fuzz.py too
ZOO = {name: (CELLS / f"{name}.cell").read_text() for name in [*MATRIX, "chrono_lstm", "lru"]}
TOKEN = re.compile(r"[^\W\d]\w*|\d+\.?\d*(?:[eE][-+]?\d+)?|\*\*|\n|\S")
VOCAB = sorted({t for text in ZOO.values() for t in TOKEN.findall(text)}) + [
    "per", "head", "(", ")", ",", "1", "K", "V", "x", "I", "eye", "diag", "norm", "sum", "mean", "ᵀ", "^T",
    "@", "*", "0", "-1", "1e309", "max", "where", "<", "prev", "init", "heads", "(4)", ": 1", "'",
]  # fmt: skip


def mutate(text: str, data) -> str:
    tokens = TOKEN.findall(text)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        i = data.draw(st.integers(0, len(tokens) - 1), label="at")
        op = data.draw(st.sampled_from(["delete", "insert", "swap", "replace"]), label="op")
        if op == "delete" and len(tokens) > 1:
            del tokens[i]
        elif op == "insert":
            tokens.insert(i, data.draw(st.sampled_from(VOCAB), label="token"))
        elif op == "swap":
            j = data.draw(st.integers(0, len(tokens) - 1), label="with")
            tokens[i], tokens[j] = tokens[j], tokens[i]
        else:
            tokens[i] = data.draw(st.sampled_from(VOCAB), label="token")
    return " ".join(tokens).replace(" \n ", "\n")


@pytest.mark.parametrize("cell", sorted(ZOO))
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_matrix_cells_compile_or_fail_located(cell, data):
    text = mutate(ZOO[cell], data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        try:
            compile_cell(text.encode(), use_cache=False)
        except CellError as err:
            assert err.line is not None and err.column is not None, str(err)
            assert 1 <= err.line <= text.count("\n") + 1
            assert str(err).startswith(f"<cell>:{err.line}:{err.column}: error: ")
