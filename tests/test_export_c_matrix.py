"""The standalone C library of a matrix-memory cell (celldsl/export/c_matrix.py): written from a
MatrixRecurrent's one-layer parameters, compiled with the system compiler and a small C harness
(tests/c_harness.py), run at two (T, N), against the torch backend of the same layer (outputs and
final states), in float32 and float64. Also: a user cell, names that are C keywords or the generated
code's own names, and the located refusals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import zoo
from c_harness import CC, compile_harness, needs_cc, run_harness
from matrix_layers import matrix_layer

import celldsl
from celldsl.compiler import compile_cell
from celldsl.export.c_matrix import matrix_sources, write_layer_library, write_matrix_library
from celldsl.lang.errors import CellError
from celldsl.nn.matrix import MatrixRecurrent

DTYPES = {"f32": (torch.float32, 2e-5), "f64": (torch.float64, 1e-12)}
WIDTHS = {"K": 3, "V": 4, "R": 2, "R_d": 2, "D": 4, "N_s": 3, "O": 5, "H": 5}
I = 3


def sizes_of(name: str) -> dict[str, int]:
    """2 heads where the cell has heads, small distinct widths."""
    ir = compile_cell(name).ir
    return {**({"heads": 2} if ir.heads else {}), **{w: WIDTHS[w] for w in ir.widths}}


def layer_of(cell, sizes, seed=0) -> MatrixRecurrent:
    layer = matrix_layer(cell, sizes=sizes, inputs=I, seed=seed)
    with torch.no_grad():  # parameters of ~unit scale (the default init is small: a weak test)
        for p in layer.parameters():
            p.mul_(1.5)
    return layer


def build(layer, directory: Path, dt: str) -> tuple[Path, Path]:
    """Write the library and the harness, compile both: (executable, weights file)."""
    paths = write_layer_library(layer, directory, DTYPES[dt][0])
    return compile_harness(paths[0], dt), paths[2]


def inputs(layer, T: int, N: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, I, generator=g, dtype=torch.float64)
    shapes = [layer.ir.state_shape(s, layer.layer_sizes[0]) for s in layer.ir.states]
    if not layer.ir.heads:  # no heads axis ([N, H]; a `: 1` state [N, 1])
        shapes = [sh[1:] or (1,) for sh in shapes]
    states = [0.5 * torch.randn(N, *sh, generator=g, dtype=torch.float64) for sh in shapes]
    return x, states


def reference(layer, x, states):
    with torch.no_grad():
        out, finals = layer(x, tuple(s[None] for s in states))
    finals = [finals] if isinstance(finals, torch.Tensor) else list(finals)
    return out, [f[0] for f in finals]


def check(layer, tmp_path: Path, shapes=((7, 3), (1, 2)), dtypes=("f32", "f64")):
    """The library against the layer at each (T, N) and dtype; T = 7 passes prev(x, 3)'s ring twice."""
    for dt in dtypes:
        exe, weights = build(layer, tmp_path / dt, dt)
        tol = DTYPES[dt][1]
        for T, N in shapes:
            x, states = inputs(layer, T, N, seed=T + N)
            want_out, want_finals = reference(layer, x, states)
            out, finals = run_harness(exe, weights, dt, x, states)
            torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
            for got, want in zip(finals, want_finals, strict=True):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_cc
@pytest.mark.parametrize("name", zoo.MATRIX + zoo.SHAPED)
def test_every_matrix_zoo_cell_in_c(tmp_path, name):
    check(layer_of(name, sizes_of(name)), tmp_path)


@needs_cc
def test_built_by_recurrent_and_the_weights_file(tmp_path):
    """celldsl.Recurrent's layer (flstm: one head, H = hidden_size); the .bin is the parameters in
    declaration order, little-endian, and the header lists each at its offset."""
    layer = celldsl.Recurrent("flstm", I, 6, sizes={"R": 2}, backend="torch", dtype=torch.float64)
    check(layer, tmp_path, dtypes=("f64",))
    weights = torch.cat([getattr(layer, f"{p}_l0").detach().reshape(-1) for p in layer.ir.params])
    assert (tmp_path / "f64" / "celldsl_flstm.bin").read_bytes() == weights.numpy().astype("<f8").tobytes()
    header = (tmp_path / "f64" / "celldsl_flstm.h").read_text()
    assert "at 0: W1_x [2, 3]" in header and "at 6: W1_h [2, 6]" in header
    assert f"#define CELLDSL_FLSTM_WEIGHT_COUNT {weights.numel()}" in header


# A user cell: a shared (no heads axis) low-rank map of prev(x) and x, a mean, a max, a transpose of a
# projection, an identity, diag, and an output that is no state.
USER = """cell my_cell
input x
state S : (K, V) per head
state z : 1 per head
output y
param W_k : (K, x) per head
param W_v : (V, x) per head
param A : (R, x)
param B : (K, R) per head
param g : 1 per head
a = tanh(B @ (A @ (x - 0.5 * prev(x, 2))))
k = W_k @ x + a
v = W_v @ x
p = W_k @ x
kt = pᵀ
decay = sigmoid(a + g)
S' = diag(decay) @ (I - 0.1 * k @ kᵀ) @ S + k @ vᵀ
z' = 0.5 * z + mean(S') - max(kt) / 4
Sn = S'
y = Snᵀ @ k * sigmoid(z')
"""


@needs_cc
def test_user_cell(tmp_path):
    layer = layer_of(USER, {"heads": 2, "K": 3, "V": 4, "R": 2})
    check(layer, tmp_path)


# Names that are C keywords, libm functions or the generated code's own names (the step's V, h, st, ns,
# the loop's work, cur, nxt, t, n, hh, g, e, o, a0, v0): user text never reaches C but as comments.
RENAMED = """cell int
input double
state V : (K, K) per head
state work : K per head
output h
param st, ns : (K, double) per head
param cur : K per head
param t : 1 per head
param exp : double
e = st @ (double - exp * prev(double))
a0 = ns @ double
V' = sigmoid(t) * V + e @ a0ᵀ
work' = tanh(V' @ a0 + cur)
h = work' * t
"""


@needs_cc
def test_names_that_are_c_keywords_or_generated_names(tmp_path):
    layer = layer_of(RENAMED, {"heads": 2, "K": 3})
    check(layer, tmp_path, shapes=((5, 2), (2, 3)))
    name, source, header = matrix_sources(layer.compiled, layer.layer_sizes[0])
    assert name == "celldsl_int"
    assert "malloc" not in source and "free(" not in source  # the caller's workspace only
    assert "int celldsl_int_forward(" in header
    assert all(ord(c) < 128 for c in source + header)


def test_cell_name_is_an_identifier_and_comments_are_sanitised():
    text = USER.replace("cell my_cell", "cell Ωmega_é").replace("param g : 1 per head",
                                                                "param g : 1 per head  # */ evil")
    layer = layer_of(text, {"heads": 2, "K": 3, "V": 4, "R": 2})
    name, source, header = matrix_sources(layer.compiled, layer.layer_sizes[0])
    assert name == "celldsl_mega"
    assert all(ord(c) < 128 for c in source + header) and "evil" not in source + header
    # the cell's other names reach the header's comments only, never the .c
    text = text.replace("W_k", "zz_secret_key")
    name, source, header = matrix_sources(compile_cell(text), layer.layer_sizes[0])
    assert "zz_secret_key" not in source
    assert all(line.lstrip().startswith("at ") for line in header.splitlines() if "zz_secret_key" in line)


def test_what_the_c_loop_cannot_express_is_refused_located(tmp_path):
    """prev() of a matrix per step (hoisted it would be T matrices): refused at the prev(), as the cpu
    backend refuses it, and nothing is written."""
    text = """cell shiftmat
input x
state S : (K, K) per head
output o
param W : (K, x) per head
k = W @ x
M = prev(k @ kᵀ)
S' = 0.5 * S + M
o = S' @ k
"""
    layer = layer_of(text, {"heads": 2, "K": 3})
    with pytest.raises(CellError, match="cannot write this matrix-memory cell: prev") as err:
        write_layer_library(layer, tmp_path / "o")
    assert (err.value.line, err.value.column) == (7, 5)
    assert not (tmp_path / "o").exists()


def test_bad_arguments_are_refused():
    layer = layer_of("gla", sizes_of("gla"))
    params = {p: getattr(layer, f"{p}_l0") for p in layer.ir.params}
    with pytest.raises(ValueError, match="missing 'x'"):
        write_matrix_library(layer.compiled, sizes_of("gla"), params, "unused")
    with pytest.raises(ValueError, match="parameter 'W_q' must be a tensor of shape"):
        write_matrix_library(layer.compiled, layer.layer_sizes[0], {**params, "W_q": torch.zeros(2)},
                             "unused")
    with pytest.raises(TypeError, match="float32 or float64"):
        write_matrix_library(layer.compiled, layer.layer_sizes[0], params, "unused", torch.float16)
    with pytest.raises(ValueError, match="writes a matrix-memory cell"):
        write_matrix_library(compile_cell("lstm"), {"heads": 1, "x": 3}, {}, "unused")
    two = MatrixRecurrent("gla", I, sizes_of("gla"), num_layers=2, backend="torch")
    with pytest.raises(ValueError, match="one layer and one direction"):
        write_layer_library(two, "unused")


# Values computed before the step in C (the cpu backend's torch side): prev() at several distances, of
# the input and of a projection, reductions and diag / the identity of host values, shared and per head.
HOST_FEATURES = [
    ("W_k @ (x - prev(x, 2))", "g * S + k @ vᵀ", "qᵀ @ S'"),
    ("tanh(W_k @ prev(x)) + W_k @ x", "diag(sigmoid(k)) @ S + k @ vᵀ", "qᵀ @ tanh(S')"),
    ("W_k @ x / max(abs(sum(W_k @ prev(x, 4))), 1)", "S - g * k @ (kᵀ @ S) + k @ vᵀ", "qᵀ @ S' * mean(S')"),
    ("W_k @ x * mean(prev(x, 3)) - min(x)", "(I - g * k @ kᵀ) @ S + g * k @ vᵀ", "qᵀ @ S'"),
    ("diag(sigmoid(c_k)) @ W_k @ x + prev(W_k @ x)", "g * S + (1 - g) * tanh(S + k @ vᵀ)", "qᵀ @ S'"),
    ("(eye @ W_k) @ x + 2 ^ sum(c_k)", "g * S + k @ vᵀ", "qᵀ @ S' / max(abs(sum(S')), 1)"),
]


def host_cell(feature: str, update: str, readout: str) -> str:
    return ("cell rnd\ninput x\nstate S : (K, V) per head\noutput o\n"
            "param W_q, W_k : (K, x) per head\nparam W_v : (V, x) per head\nparam c_k : K per head\n"
            "param w_g : x per head\nparam b_g : 1 per head\n"
            f"q = W_q @ prev(x)\nk = {feature}\nv = W_v @ x\ng = sigmoid(w_gᵀ @ x + b_g)\n"
            f"S' = {update}\no = {readout}\n")


@needs_cc
@pytest.mark.parametrize("feature,update,readout", HOST_FEATURES)
def test_values_before_the_step(tmp_path, feature, update, readout):
    import warnings

    from celldsl.lang.errors import CellWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)  # g is unused by some updates
        layer = layer_of(host_cell(feature, update, readout), {"heads": 2, "K": 3, "V": 2})
    check(layer, tmp_path, shapes=((9, 2), (3, 1)))


@needs_cc
def test_two_libraries_link_into_one_program(tmp_path):
    """Each library defines one external symbol, its forward: two exported cells link together."""
    nm = shutil.which("nm")
    objects = []
    for name in ("gla", "mamba"):
        paths = write_layer_library(layer_of(name, sizes_of(name)), tmp_path, torch.float32)
        obj = tmp_path / f"{name}.o"
        subprocess.run([CC, "-std=c99", "-O1", "-c", "-o", str(obj), str(paths[0])], check=True)
        objects.append(obj)
        if nm:
            out = subprocess.run([nm, "-g", "--defined-only", str(obj)], check=True, capture_output=True,
                                 text=True).stdout
            assert [line.split()[-1] for line in out.splitlines()] == [f"celldsl_{name}_forward"]
    main_c = tmp_path / "main.c"
    main_c.write_text('#include "celldsl_gla.h"\n#include "celldsl_mamba.h"\n'
                      "int main(void) { return (celldsl_gla_forward(0, 1, 0, 0, 0, 0, 0, 0) == -1 && "
                      "celldsl_mamba_forward(1, 0, 0, 0, 0, 0, 0, 0) == -1) ? 0 : 1; }\n")
    exe = tmp_path / "both"
    subprocess.run([CC, "-std=c99", "-I", str(tmp_path), "-o", str(exe), str(main_c), *map(str, objects),
                    "-lm"], check=True)
    assert subprocess.run([str(exe)]).returncode == 0


@needs_cc
@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_celldsl_export_c_of_a_matrix_cell(tmp_path, capsys, dt):
    """`celldsl export gla --c DIR --weights sd.pt --sizes ...` (before: refused) writes the library of the
    saved layer's weights; compiled with the harness it gives the layer's numbers."""
    from celldsl.cli.main import main

    layer = layer_of("gla", sizes_of("gla"), seed=3)
    torch.save(layer.state_dict(), tmp_path / "sd.pt")
    sizes = ",".join(f"{k}={v}" for k, v in sizes_of("gla").items())
    hidden = layer.output_size
    args = ["export", "gla", "--c", str(tmp_path / "lib"), "--input-size", str(I),
            "--hidden-size", str(hidden), "--weights", str(tmp_path / "sd.pt"), "--sizes", sizes]
    args += ["--float64"] if dt == "f64" else []
    assert main(args) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["celldsl_gla.c", "celldsl_gla.h", "celldsl_gla.bin"]
    exe = compile_harness(Path(written[0]), dt)
    x, states = inputs(layer, 6, 2)
    want_out, want_finals = reference(layer, x, states)
    out, finals = run_harness(exe, Path(written[2]), dt, x, states)
    tol = DTYPES[dt][1]
    torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
    for got, want in zip(finals, want_finals, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_celldsl_export_c_refusals_say_why(tmp_path, capsys):
    from celldsl.cli.main import main

    base = ["export", "gla", "--c", str(tmp_path / "lib"), "--input-size", "3"]
    assert main([*base, "--hidden-size", "8", "--sizes", "heads=3"]) == 1
    assert "celldsl: error:" in capsys.readouterr().err
    assert main([*base, "--hidden-size", "8", "--input-sizes", "ctx=2"]) == 1
    assert "takes no --input-sizes" in capsys.readouterr().err
    assert not (tmp_path / "lib").exists()
