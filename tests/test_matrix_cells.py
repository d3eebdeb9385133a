"""The matrix-memory zoo cells (issue 26) on the torch target against the einsum references of
tests/matrix_references.py (written from the papers): outputs, final states and gradients in float64,
gradcheck of the derived reverse-time backward, and the cpu/triton refusals."""

from __future__ import annotations

import pytest
import torch
from matrix_references import ref_deltanet, ref_gated_deltanet, ref_gla, ref_hgrn2, ref_m2rnn, ref_mlstm

import celldsl
from celldsl.compiler import CompiledMatrixCell, compile_cell
from celldsl.lang.errors import CellError
from celldsl.nn.matrix import MatrixRecurrent

HEADS, K, V, I, T, N, R = 3, 4, 5, 6, 5, 2, 2  # K != V != heads != I; R: GLA's gate rank


def _ref_params(layer, cell):
    """The layer's parameters in the references' layout ([heads * rows, I] matrices, head-major)."""
    p = {}
    for name, t in layer.named_parameters():
        kind = layer.ir.kinds[name]
        if name == "W" or not kind.head:  # M2RNN's [heads, V, V]; GLA's shared W_a1 [R, I]: as stored
            p[name] = t
        elif kind.cols != "1":  # a matrix per head [heads, rows, I] -> [heads * rows, I]
            p[name] = t.reshape(-1, t.shape[-1])
        elif kind.rows not in ("1", "x"):  # a K- or V-vector per head -> [heads * K]
            p[name] = t.reshape(-1)
        else:  # w_i : x per head is [heads, I], b_i : 1 per head is [heads], as the references
            p[name] = t
    return p


REFERENCES = {
    "mlstm": lambda p, x, s: ref_mlstm(p, x, s, heads=HEADS, stabilized=True),
    "gla": lambda p, x, s: ref_gla(p, x, s, heads=HEADS),
    "deltanet": lambda p, x, s: ref_deltanet(p, x, s, heads=HEADS),
    "gated_deltanet": lambda p, x, s: ref_gated_deltanet(p, x, s, heads=HEADS),
    "hgrn2": lambda p, x, s: ref_hgrn2(p, x, s, heads=HEADS),
    "m2rnn": lambda p, x, s: ref_m2rnn(p, x, s, heads=HEADS),
}


def _layer(cell, seed=0):
    torch.manual_seed(seed)
    return MatrixRecurrent(f"cells/matrix/{cell}.cell", I, {"heads": HEADS, "K": K, "V": V, "R": R}, dtype=torch.float64)


@pytest.mark.parametrize("cell", sorted(REFERENCES))
@pytest.mark.parametrize("steps", [1, T])
def test_matches_reference(cell, steps):
    layer = _layer(cell)
    x = torch.randn(steps, N, I, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(N, *layer.ir.state_shape(s, layer.sizes), dtype=torch.float64,
                               requires_grad=True) for s in layer.ir.states)
    out, finals = layer(x, state0)
    ref_out, ref_finals = REFERENCES[cell](_ref_params(layer, cell), x, state0)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(finals, ref_finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    wrt = [x, *state0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + sum((s * s).sum() for s in finals), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + sum((s * s).sum() for s in ref_finals), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell", sorted(REFERENCES))
def test_gradcheck(cell):
    layer = _layer(cell, seed=1)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(2, *layer.ir.state_shape(s, layer.sizes), dtype=torch.float64,
                               requires_grad=True) for s in layer.ir.states)
    params = list(layer.parameters())

    def f(x, *rest):
        states, ps = rest[: len(state0)], rest[len(state0):]
        out, finals = layer.loop.run(x, list(states), list(ps), layer.sizes)
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, *state0, *[p.detach().clone().requires_grad_() for p in params]))


def test_backward_does_not_run_autograd_through_the_loop():
    """The derived backward (a reverse-time recurrence) gives first-order gradients; the output's
    graph is one node, not T steps of torch ops."""
    layer = _layer("deltanet")
    out, _ = layer(torch.randn(T, N, I, dtype=torch.float64, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_FunctionBackward"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("cell", sorted(REFERENCES))
def test_cpu_and_triton_refuse_matrix_states(cell, backend):
    with pytest.raises(CellError) as err:
        MatrixRecurrent(f"cells/matrix/{cell}.cell", I, {"heads": HEADS, "K": K, "V": V, "R": R}, backend=backend)
    text = str(err.value)
    assert f"cells/matrix/{cell}.cell:" in text and f"the {backend} backend does not run matrix states yet" in text
    assert err.value.line == next(i for i, line in enumerate(open(f"cells/matrix/{cell}.cell"), 1)
                                  if line.startswith("state "))


def test_auto_runs_torch():
    layer = MatrixRecurrent("cells/matrix/gla.cell", I, {"heads": HEADS, "K": K, "V": V, "R": R}, backend="auto")
    assert layer.loop is layer.compiled.torch_loop and layer.W_a1.shape == (R, I)
    out, (S,) = layer(torch.randn(T, N, I))
    assert out.shape == (T, N, HEADS * V) and S.shape == (N, HEADS, K, V)


def test_compile_cell_gives_a_matrix_cell():
    compiled = compile_cell("mlstm")  # a zoo name finds cells/matrix/
    assert isinstance(compiled, CompiledMatrixCell) and compiled.states == ["C", "n", "m"]
    assert "a (V, K) matrix per head" in compiled.explain()


def test_layer_arguments():
    with pytest.raises(ValueError, match="needs the sizes 'V'"):
        MatrixRecurrent("cells/matrix/gla.cell", I, {"heads": 2, "K": 3, "R": 2})
    with pytest.raises(ValueError, match="no matrix state; use celldsl.Recurrent"):
        MatrixRecurrent("cells/lstm.cell", I, {"heads": 2})
    layer = MatrixRecurrent("cells/matrix/gla.cell", I, {"heads": 2, "K": 3, "V": 4, "R": 2})
    with pytest.raises(ValueError, match=r"x must be \[T, N, 6\]"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="state must be 1 tensor"):
        layer(torch.randn(2, 3, I), (torch.zeros(3, 2, 4, 3),))


@pytest.mark.parametrize("make", [lambda: celldsl.Recurrent("mlstm", 4, 8), lambda: celldsl.Cell("gla", 4, 8)])
def test_recurrent_and_cell_point_at_matrix_recurrent(make):
    with pytest.raises(ValueError, match=r"has matrix states \(one matrix per head\); run it with "
                                         r"celldsl.MatrixRecurrent\(cell, input_size, sizes=\{'heads': 16"):
        make()


def test_matrix_recurrent_is_exported():
    assert celldsl.MatrixRecurrent is MatrixRecurrent


def test_the_docs_example_is_the_zoo_cell():
    """docs/language.md's matrix-memory example is cells/matrix/mlstm.cell's statements, comments aside."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "language.md").read_text()
    block = doc.split("## Matrix memories")[1].split("```")[1]

    def statements(text):
        lines = (line.split("#")[0].strip() for line in text.splitlines())
        return [" ".join(line.split()) for line in lines if line and not line.startswith(("doc ", "cite "))]

    assert statements(block) == statements((root / "cells" / "matrix" / "mlstm.cell").read_text())


def test_the_docs_layer_shapes():
    layer = celldsl.MatrixRecurrent("mlstm", 64, sizes={"heads": 4, "K": 16, "V": 32})
    out, (C, n, m) = layer(torch.randn(3, 2, 64))
    assert out.shape == (3, 2, 128) and C.shape == (2, 4, 32, 16) and n.shape == (2, 4, 16) and m.shape == (2, 4)
