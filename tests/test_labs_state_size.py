"""The lab's sizing options (issue 26 item 6): `--width`, `--size NAME=N`, `compare --state-size S`
(cells compared at an equal recurrent state in one model width), and a comparison that goes on
past a run whose loss stops being finite. Tiny sizes, a few steps."""

import json
from pathlib import Path

import pytest
import torch

from celldsl.labs import cli
from celldsl.labs.model import sizes_for_state
from celldsl.labs.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
CELLS = {name: str(ROOT / "cells" / f"{name}.cell") for name in ("lstm", "mlstm", "gla", "deltanet", "gru")}
TINY = ["-o", "vocab=16", "-o", "pairs=2", "-o", "T=12", "-o", "test_size=6", "--batch", "4"]
QUIET = ["--quiet", "--no-pictures"]


def _state_numbers(model, width: int) -> int:
    """Numbers in the first layer's final state for one sequence, from a forward run (independent
    of sizes_for_state's counting): every state tensor [L, N, ...] at layer 0, sequence 0."""
    _, state = model.rnn(torch.zeros(3, 2, width))
    states = state if isinstance(state, tuple | list) else (state,)
    return sum(s[0, 0].numel() for s in states)


@pytest.mark.parametrize(
    "cell, state, expected",
    [
        ("lstm", 64, {"hidden": 32}),  # h and c: 2 x 32
        ("gla", 64, {"K": 8, "V": 8}),  # S : (K, V), output V = width / heads
        ("deltanet", 64, {"K": 8, "V": 8}),  # S : (V, K)
        ("mlstm", 64, {"K": 7, "V": 8}),  # C (V x K) + n (K) + m (1): 7 -> 64, 8 -> 73; 64 is closer
    ],
)
def test_state_size_sizes_each_cell_in_one_model_width(cell, state, expected):
    task = make_task("mqar", {"vocab": "16", "pairs": "2", "T": "12"})
    hidden, sizes, count = sizes_for_state(CELLS[cell], state, 8)
    for name, value in expected.items():
        assert (hidden if name == "hidden" else sizes[name]) == value
    model = task.build_model(CELLS[cell], hidden, 2, width=8, sizes=sizes or None)
    assert model.embedding.weight.shape == (16, 8)  # the model width is the same for every cell
    assert _state_numbers(model, 8) == count
    assert abs(count - state) <= {"mlstm": 1}.get(cell, 0)


def test_state_size_with_heads_splits_the_width():
    hidden, sizes, count = sizes_for_state(CELLS["gla"], 64, 8, {"heads": 2})
    assert (hidden, sizes["heads"], sizes["V"], sizes["K"], count) == (8, 2, 4, 8, 64)
    with pytest.raises(ValueError, match="heads=3 does not divide the model width 8"):
        sizes_for_state(CELLS["gla"], 64, 8, {"heads": 3})
    # a size the LSTM does not declare is not given to it
    assert sizes_for_state(CELLS["lstm"], 64, 8, {"heads": 2}) == (32, {}, 64)


def test_compare_at_a_state_size_lists_the_sizes_and_state(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "mqar", CELLS["lstm"], CELLS["gla"], "--state-size", "32", "--width", "8"]
    assert cli.main([*args, "--steps", "2", "--eval-every", "1", *TINY, *QUIET, "--out", str(out)]) == 0
    rows = {r["cell"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lstm"]["hidden"] == 16 and rows["lstm"]["state_per_layer"] == 32
    assert rows["gla"]["sizes"] == {"heads": 1, "V": 8, "K": 4} and rows["gla"]["state_per_layer"] == 32
    assert rows["lstm"]["width"] == rows["gla"]["width"] == 8
    text = (out / "results.md").read_text()
    assert "| cell | hidden | width | sizes | state/layer | parameters |" in text
    assert "| gla | 8 | 8 | heads=1 V=8 K=4 | 32 |" in text
    gla = json.loads((out / "gla" / "seed0" / "metrics.json").read_text())
    assert gla["parameters"] == rows["gla"]["parameters"]
    assert gla["config"]["sizes"] == {"heads": 1, "V": 8, "K": 4} and gla["config"]["width"] == 8


def test_train_takes_width_and_sizes(tmp_path):
    out = tmp_path / "run"
    args = ["train", "mqar", "--cell", CELLS["deltanet"], "--hidden", "8", "--width", "6", "--size", "K=3"]
    assert cli.main([*args, "--steps", "1", "--eval-every", "1", *TINY, *QUIET, "--out", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["sizes"] == {"K": 3} and saved["width"] == 6 and saved["state_per_layer"] == 8 * 3
    # W_q (K, x): 3 x 6 at layer 0, whose input is the 6-wide embedding
    expected = 16 * 6 + (3 * 6 + 3 * 6 + 8 * 6 + 6 + 1) + 8 * 16 + 16
    assert saved["parameters"] == expected


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "heads=0"], "expected NAME=N with N a positive integer"),
        (["--size", "heads"], "expected NAME=N"),
        (["--size", "=3"], "expected NAME=N"),
        (["--size", "K=x"], "expected NAME=N"),
        (["--size", "K=2", "--size", "K=3"], "K given twice"),
        (["--width", "0"], "expected a positive integer"),
        (["--state-size", "0"], "expected a positive integer"),
        (["--state-size", "16", "--param-budget", "100"], "not allowed with --param-budget"),
        (["--state-size", "16", "--hidden", "4,4"], "or one --hidden per cell"),
        (["--state-size", "16", "--hidden", "4", "--width", "4"], "not both"),
    ],
)
def test_bad_sizes_are_usage_errors(tmp_path, capsys, extra, message):
    args = ["compare", "mqar", CELLS["lstm"], CELLS["gla"], *extra, "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as usage:
        cli.main(args)
    assert usage.value.code == 2 and message in capsys.readouterr().err


def test_a_size_no_cell_has_is_one_error_line(tmp_path, capsys):
    args = ["compare", "mqar", CELLS["lstm"], CELLS["gla"], "--size", "Q=2", "--steps", "1", *TINY]
    assert cli.main([*args, "--out", str(tmp_path / "x")]) == 1
    assert "celldsl: error: --size Q: no cell here declares it" in capsys.readouterr().err
    args = ["train", "mqar", "--cell", CELLS["gla"], "--size", "Q=2", "--steps", "1", *TINY]
    assert cli.main([*args, "--out", str(tmp_path / "y")]) == 1
    assert "unknown: Q" in capsys.readouterr().err


BOOM = """cell boom
input x
state h
output h
param weight_ih = [W]
param weight_hh = [U]
h' = exp(exp(W @ x + U @ h) * 1e30)
"""


def test_compare_records_a_diverged_run_and_finishes_the_others(tmp_path, capsys):
    boom = tmp_path / "boom.cell"
    boom.write_text(BOOM)
    out = tmp_path / "cmp"
    args = ["compare", "mqar", CELLS["lstm"], str(boom), CELLS["gru"], "--hidden", "4"]
    assert cli.main([*args, "--steps", "3", "--eval-every", "1", *TINY, *QUIET, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "boom seed 0: training loss is nan at step 1" in captured.err
    rows = {r["cell"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["lstm", "boom", "gru"]  # the cell after the diverged one ran too
    assert rows["boom"]["diverged_at"] == [1] and rows["boom"]["test_acc"] == []
    assert rows["lstm"]["diverged_at"] == rows["gru"]["diverged_at"] == [None]
    assert rows["lstm"]["steps"] == rows["gru"]["steps"] == [3] and len(rows["gru"]["test_acc"]) == 1
    table = (out / "results.md").read_text()
    boom_line = next(line for line in table.splitlines() if line.startswith("| boom |"))
    assert "diverged" in boom_line and "| 1 |" in boom_line and "diverged at step" in table
    saved = json.loads((out / "boom" / "seed0" / "metrics.json").read_text())
    assert saved["diverged_at"] == 1
    # `train` on its own still fails with the message and exit status 1
    args = ["train", "mqar", "--cell", str(boom), "--hidden", "4", "--steps", "2", *TINY, *QUIET]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 1
    assert "celldsl: error: training loss is nan at step 1; try a smaller --lr" in capsys.readouterr().err
