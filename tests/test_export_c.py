"""`celldsl export CELL --c DIR`: the standalone C library, compiled with the system compiler and run by
a small C harness (tests/c_harness.py), against the torch backend of celldsl.Recurrent on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zoo
from c_harness import compile_harness, needs_cc, run_harness

from celldsl.cli.main import main
from celldsl.export.c_library import c_name, c_sources, write_c
from celldsl.export.model import ExportError, load_cell


def build(cell, directory: Path, dtype: str) -> Path:
    """Write the library (what `celldsl export --c` writes) and the harness, compile both: the executable."""
    return compile_harness(write_c(cell, directory, dtype)[0], dtype)


def reference(cell, x: torch.Tensor, states: list[torch.Tensor]):
    """The torch backend of celldsl.Recurrent on the export's weights (float64)."""
    layer = cell.layer
    first = cell.ir.inputs[0]
    extras = {n: x[..., c] for n, c in cell.columns.items() if n != first}
    state = tuple(s[None] for s in states)
    with torch.no_grad():
        out, final = layer(x[..., cell.columns[first]], state[0] if len(state) == 1 else state, **extras)
    final = [final] if isinstance(final, torch.Tensor) else list(final)
    return out, [f[0] for f in final]


def run_c(exe: Path, cell, dtype: str, x, states):
    """The harness on the weights file written beside it (NAME.bin)."""
    return run_harness(exe, exe.parent / f"{c_name(cell)}.bin", dtype, x, states)


def inputs(cell, T: int, N: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, cell.input_size, generator=g, dtype=torch.float64)
    states = [0.5 * torch.randn(N, w, generator=g, dtype=torch.float64) for w in cell.state_widths()]
    if cell.ir.name == "phased_lstm":  # its time input is a positive time stamp
        x[..., cell.columns["t"]] = torch.arange(1, T + 1, dtype=torch.float64)[:, None, None]
    return x, states


# A user cell whose input projection reads an expression of the input (a hoisted pointwise stage), with
# an output that is no state.
HOISTED = """cell squashed
input x
state h
output y
param weight_ih = [W]
param weight_hh = [U]
param b
h' = tanh(W @ tanh(x) + U @ h + b)
y = 2 * h'
"""

# every function a cell file may call, in one step (the torch backend is the reference)
KITCHEN = """cell kitchen
input x
state h
output h
param weight_ih = [W]
param weight_hh = [U]
param b, g
param s : scalar
a = W @ x + U @ h + b
u = where(a < 0.5, tanh(a), sigmoid(a)) * clip(a, -1, 1) + abs(a)^1.5 * 0.1 + sqrt(softplus(a)) * 0.1
v = logsigmoid(a) * 0.1 + mod(a, 0.7) + floor(a) * 0.01 + max(a, g) - min(a, 0) + (a >= 0) * s
w = sum(a) * 0.01 + exp(-abs(a)) * log(1 + a*a) + (a <= 0.1) * relu(a) + 1 / (2 + a*a) + mean(a) ^ 2
h' = u + v + w
"""

# A state of one value per sequence (`: 1`), updated from a mean over the row.
ROW_STATE = """cell rowstate
input x
state h
state n : 1
output h
param weight_ih = [W]
param weight_hh = [U]
param b
a = tanh(W @ x + U @ h + b)
n' = 0.9 * n + mean(a)
h' = a * sigmoid(n)
"""

# lstm, gru; prev(x) (qrnn); an input of one value per step (phased_lstm's `t : 1`); a declared width
# (lstm_proj); means over a row (ln_lstm); heads (slstm_heads); prev(...) states (greff_fgr); two GEMM
# stages (mut1, which reads x elementwise: I = H); a hoisted pointwise stage and an output not a state.
CELLS = [("lstm", 5, {}), ("gru", 5, {}), ("qrnn", 5, {}), ("phased_lstm", 5, {}),
         ("lstm_proj", 5, {"sizes": "P=3"}), ("ln_lstm", 5, {}), ("slstm_heads", 5, {}), ("greff_fgr", 5, {}),
         ("mut1", 8, {}), (HOISTED, 5, {}), (KITCHEN, 5, {}), (ROW_STATE, 5, {})]


@needs_cc
@pytest.mark.parametrize("name,I,extra", CELLS, ids=[c if len(c) < 20 else c.split()[1] for c, _, _ in CELLS])
def test_c_library_matches_torch_backend(tmp_path, name, I, extra):
    cell = load_cell(name, I, 8, seed=3, **extra)
    T, N = 6, 3
    x, states = inputs(cell, T, N)
    want_out, want_final = reference(cell, x, states)
    for dtype, tol in (("f32", 2e-5), ("f64", 1e-12)):
        d = tmp_path / dtype
        exe = build(cell, d, dtype)
        out, finals = run_c(exe, cell, dtype, x, states)
        torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
        for got, want in zip(finals, want_final, strict=True):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_cc
def test_c_library_from_a_state_dict_and_the_command_line(tmp_path, capsys):
    """A trained layer's state_dict through `celldsl export`: the library reproduces that layer."""
    import celldsl

    torch.manual_seed(0)
    trained = celldsl.Recurrent("gru", 4, 6, backend="torch")
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.7)
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    assert main(["export", "gru", "--c", str(tmp_path / "lib"), "--input-size", "4", "--hidden-size", "6",
                 "--weights", str(tmp_path / "sd.pt")]) == 0
    cell = load_cell("gru", 4, 6, weights=tmp_path / "sd.pt")
    assert (tmp_path / "lib" / "celldsl_gru.bin").read_bytes() == \
        torch.cat([w.reshape(-1) for _, w in cell.weights()]).float().numpy().astype("<f4").tobytes()
    exe = build(cell, tmp_path / "lib", "f32")
    x, states = inputs(cell, 5, 2)
    out, finals = run_c(exe, cell, "f32", x, states)
    with torch.no_grad():
        want, h = trained.double()(x, states[0][None])
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(finals[0], h[0], rtol=2e-5, atol=2e-5)


def test_cell_name_reaches_the_c_source_only_as_an_identifier(tmp_path):
    text = (Path(__file__).parents[1] / "cells" / "rnn_tanh.cell").read_text()
    cell = load_cell(text.replace("cell rnn_tanh", "cell Ωmega_é"), 3, 4)
    name, source, header = c_sources(cell)
    assert name == "celldsl_mega"  # an ASCII identifier after the prefix
    assert all(ord(c) < 128 for c in source + header) and "Ω" not in source + header


def test_bad_weights_file_is_one_line_error(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    code = main(["export", "lstm", "--c", str(tmp_path / "o"), "--input-size", "3", "--hidden-size", "4",
                 "--weights", str(tmp_path / "bad.pt")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("celldsl: error: ") and err.count("\n") == 1 and "bad.pt" in err
    torch.save({"weight_ih_l0": torch.zeros(3, 3)}, tmp_path / "small.pt")
    code = main(["export", "lstm", "--c", str(tmp_path / "o"), "--input-size", "3", "--hidden-size", "4",
                 "--weights", str(tmp_path / "small.pt")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("celldsl: error: ") and "does not fit" in err


def test_two_layer_state_dict_is_refused(tmp_path):
    import celldsl

    torch.save(celldsl.Recurrent("gru", 4, 6, num_layers=2, backend="torch").state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ExportError, match="one layer and one direction"):
        load_cell("gru", 4, 6, weights=tmp_path / "sd.pt")


@needs_cc
@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.ELEMENTWISE)  # the matrix cells are refused: test below
def test_every_zoo_cell_in_c(tmp_path, name):
    """Every elementwise zoo cell, in double precision (cells that read x elementwise need I = H)."""
    elementwise = {"mut1", "mut2", "mut3", "indrnn", "mingru", "minlstm", "sru", "qrnn_f",
                   "antisymmetric_rnn", "lru"}
    cell = load_cell(name, 8 if name in elementwise else 5, 8, seed=4, **zoo.LAYER_ARGS.get(name, {}))
    x, states = inputs(cell, 5, 2)
    want_out, want_final = reference(cell, x, states)
    out, finals = run_c(build(cell, tmp_path, "f64"), cell, "f64", x, states)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(finals, want_final, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_load_cell_points_matrix_cells_to_their_loader():
    with pytest.raises(ExportError, match="runs on the matrix path: load it with load_matrix_cell"):
        load_cell("gla", 4, 4)


def test_cell_errors_print_as_check_prints_them(tmp_path, capsys):
    bad = tmp_path / "bad.cell"
    bad.write_text("cell bad\ninput x\nstate h\noutput h\nh' = tanh(q)\n")
    assert main(["export", str(bad), "--c", str(tmp_path / "o"), "--input-size", "3",
                 "--hidden-size", "4"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:5:11: error: unknown name 'q'" in err and not (tmp_path / "o").exists()
    assert main(["export", "qrnn", "--c", str(tmp_path / "o"), "--input-size", "3", "--hidden-size", "4",
                 "--sizes", "P=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("celldsl: error: cell 'qrnn' declares") and err.count("\n") == 1


def test_a_row_state_is_written_once_per_row():
    """The `: 1` state's buffer is one column wide: a write per column would run into the next rows
    (with equal values, so only the source shows it)."""
    _, source, _ = c_sources(load_cell(ROW_STATE, 3, 4))
    writes = [line for line in source.splitlines() if line.rstrip().endswith("/* n' */")]
    assert writes and all("[0] = " in line and "[j] = " not in line for line in writes)
