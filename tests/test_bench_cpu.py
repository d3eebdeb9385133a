"""bench/cpu.py at a tiny size: it prints the command, every row of its table and the targets, and its
rows compute the same thing (the table's max-abs-diff column is the output difference from celldsl)."""

import importlib.util
import re
from pathlib import Path

import pytest

from celldsl.runtime import cpu_fused

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_every_row(capsys):
    bench = load_bench()
    paths = "plain,fused,default" if cpu_fused.compiler() is not None else "plain,default"
    argv = ["--T", "3", "--N", "2", "--I", "4", "--H", "4", "--repeats", "1", "--warmup", "0"]
    argv += ["--paths", paths]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert f"command: `python bench/cpu.py {' '.join(argv)}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| cell")]
    labels = {"plain": "[generated torch code]", "fused": "[C kernels]", "default": "[backend auto]"}
    expected = []
    for cell in bench.ALL_CELLS:
        title = bench.TITLE[cell]
        if cell in ("lstm", "gru"):
            expected.append((title, f"torch.nn.{cell.upper()}"))
        for path in paths.split(","):
            expected.append((title, labels[path]))
        expected.append((title, "textbook per-gate"))
    assert len(rows) == len(expected)
    for row, (title, label) in zip(rows, expected, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].startswith(title) and label in cells[1], row
        fwd, fwdbwd, ratio, diff = (float(c) for c in cells[2:6])
        assert fwd > 0 and fwdbwd > 0 and ratio > 0
        assert diff < 1e-4, row  # the same weights and equations: the same outputs
    for target in ("LSTM forward+backward", "Greff vanilla", "MUT1 forward+backward", "sLSTM"):
        assert re.search(rf"- {re.escape(target)}.*: \d+\.\d\d", text), target


def test_bench_rejects_unknown_cells_and_paths():
    bench = load_bench()
    for argv in (["--cells", "lstm,nope"], ["--paths", "fast"], ["--clock", "cpu", "--threads", "2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
