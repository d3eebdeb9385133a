"""bench/cpu.py at tiny sizes (--smoke): it prints the command, the CPU, every table with every row,
and every target line; its rows compute the same thing (the max-abs-diff column is the output
difference from celldsl)."""

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| implementation |", "| cell |"))]


def test_bench_prints_every_table_row_and_target(capsys):
    bench = load_bench()
    argv = ["--smoke", "--cells", "lstm,mut1,indrnn"]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert f"command: `python bench/cpu.py {' '.join(argv)}`" in text
    assert "load average" in text and "torch CPU capability" in text
    titles = re.findall(r"^(LSTM|GRU|indrnn|sru|mingru|minlstm), T=\d+ N=\d+", text, flags=re.M)
    assert titles == ["LSTM", "GRU", "LSTM", "LSTM"] + list(bench.LONG_CELLS) * 2 + ["LSTM", "GRU"]
    rows = table_rows(text)
    nn_rows, zoo_rows, long_rows = rows[:16], rows[16:19], rows[19:-22]
    step_rows, small_rows = rows[-22:-6], rows[-6:]
    labels = ["torch.nn.", "celldsl.", "Python loop", "textbook"]
    for i, row in enumerate(nn_rows):
        assert labels[i % 4] in row[0], row
    assert [r[0] for r in zoo_rows] == ["lstm", "mut1", "indrnn"]
    assert len(long_rows) == 3 * 2 * len(bench.LONG_CELLS)
    steps = ("LSTMCell", "GRUCell", "LSTM", "GRU")  # cells, then layers on T = 1
    assert re.findall(r"^(\w+), one step with state in and out, (?:T=1, )?N=(\d+)", text, flags=re.M) == [
        (name, n) for name in steps for n in ("2", "1")]
    assert [r[0] for r in step_rows] == [
        f"{lib}.{name}" for name in steps for _ in range(2) for lib in ("torch.nn", "celldsl")
    ]
    assert [r[0].split(" ")[0] for r in small_rows] == [
        "torch.nn.LSTM", "celldsl.LSTM", "torch.nn.GRU", "celldsl.GRU", "torch.nn.LSTM", "celldsl.LSTM"]
    assert "LSTM, bidirectional, 2 layers, T=20 N=8 I=64 H=64" in text
    for row in nn_rows + long_rows + step_rows + small_rows:
        fwd, fwdbwd, r1, r2, diff = (float(c) for c in row[-5:])
        assert fwd > 0 and fwdbwd > 0 and r1 > 0 and r2 > 0
        assert diff < 1e-4, row  # the same weights and equations: the same outputs
    for row in zoo_rows:
        assert float(row[-1]) < 1e-4, row
    targets = re.findall(r"^- .*: (met|MISSED by \d+%)$", text, flags=re.M)
    # the step table: 4 modules x 2 batches x fwd, fwd+bwd; the small one: 3 layers x fwd, fwd+bwd
    assert len(targets) == 5 + 3 + 2 + 4 + 16 + 6


def test_bench_rejects_unknown_tables_cells_and_clocks():
    bench = load_bench()
    for argv in (["--tables", "nn,gpu"], ["--cells", "lstm,nope"], ["--clock", "cpu", "--threads", "2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_gemm_ab_bench_runs_both_libraries_on_the_same_layer(capsys):
    """bench/cpu_gemm_ab.py --smoke: one row per case, both timed, the same outputs from A (HEAD's
    GEMM, built in its own cache folder) and B (the working tree's)."""
    from celldsl import cache

    path = BENCH.parent / "cpu_gemm_ab.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_gemm_ab", path)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert ab.main(["--smoke", "--rev", "HEAD"]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| T |")]
    assert [r[4] for r in rows] == ["forward", "forward+backward"]
    assert any((cache.root() / "cpu_gemm_ab").glob("*.so"))
    for row in rows:
        a_ms, b_ms, ratio, diff = float(row[5]), float(row[6]), float(row[7]), float(row[9])
        assert a_ms > 0 and b_ms > 0 and ratio > 0
        assert diff < 1e-5, row  # two builds of (nearly) the same GEMM: the same LSTM
