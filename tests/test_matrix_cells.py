"""The matrix-memory zoo cells (issue 26) on the torch target against the einsum references of
tests/matrix_references.py (written from the papers): outputs, final states and gradients in float64,
gradcheck of the derived reverse-time backward, and that the triton loop is opt-in."""

from __future__ import annotations

import pytest
import torch
from matrix_layers import HEADS, REFERENCES, SIZES, I, K, R, V, matrix_layer, ref_params, reference_layout
from zoo import MATRIX

import celldsl
from celldsl.compiler import CompiledMatrixCell, compile_cell
from celldsl.nn.matrix import MatrixRecurrent

T, N = 5, 2  # the sizes: tests/matrix_layers.py
CELLS = ["deltanet", "gated_deltanet", "gla", "hgrn2", "m2rnn", "mlstm"]  # those with a REFERENCES entry


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("steps", [1, T])
def test_matches_reference(cell, steps):
    layer = matrix_layer(f"cells/{cell}.cell")  # the cpu backend: test_matrix_cpu.py
    x = torch.randn(steps, N, I, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(1, N, *layer.ir.state_shape(s, layer.layer_sizes[0]), dtype=torch.float64,
                               requires_grad=True) for s in layer.ir.states)
    out, finals = layer(x, state0)
    finals = [f[0] for f in finals]
    ref_out, ref_finals = REFERENCES[cell](ref_params(layer), x, tuple(s[0] for s in state0))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(finals, ref_finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    wrt = [x, *state0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + sum((s * s).sum() for s in finals), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + sum((s * s).sum() for s in ref_finals), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell):
    layer = matrix_layer(f"cells/{cell}.cell", seed=1)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(2, *layer.ir.state_shape(s, layer.layer_sizes[0]), dtype=torch.float64,
                               requires_grad=True) for s in layer.ir.states)
    params = list(layer.parameters())

    def f(x, *rest):
        states, ps = rest[: len(state0)], rest[len(state0):]
        out, finals = layer.loop.run(x, list(states), list(ps), layer.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, *state0, *[p.detach().clone().requires_grad_() for p in params]))


def test_backward_does_not_run_autograd_through_the_loop():
    """The derived backward (a reverse-time recurrence) gives first-order gradients; the output's
    graph is one node, not T steps of torch ops."""
    layer = matrix_layer("cells/deltanet.cell")
    out, _ = layer(torch.randn(T, N, I, dtype=torch.float64, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_FunctionBackward"


@pytest.mark.parametrize("cell", CELLS)
def test_triton_is_opt_in(cell):
    """backend="triton" builds the generated Triton loop (tests/test_triton_matrix.py runs it); "auto"
    never picks it (no GPU has verified it)."""
    layer = MatrixRecurrent(f"cells/{cell}.cell", I, SIZES, backend="triton")
    assert type(layer.loop).__name__ == "TritonMatrixLoop"
    auto = MatrixRecurrent(f"cells/{cell}.cell", I, SIZES, backend="auto")
    assert type(auto.loop).__name__ != "TritonMatrixLoop"


def test_auto_runs_the_c_loop_with_torch_behind_it():
    layer = MatrixRecurrent("cells/gla.cell", I, SIZES, backend="auto")
    assert type(layer.loop).__name__ == "CMatrixLoop" and layer.loop.fallback is layer.compiled.torch_loop
    assert layer.W_a1_l0.shape == (R, I)
    out, (S,) = layer(torch.randn(T, N, I))
    assert out.shape == (T, N, HEADS * V) and S.shape == (1, N, HEADS, K, V)


@pytest.mark.parametrize("cell", MATRIX)
def test_recurrent_without_sizes_is_one_head_of_hidden_size(cell):
    """celldsl.Recurrent(cell, I, H) for any matrix cell: heads = 1 and every width = H (docs/language.md),
    so the output is H wide and each state is one head of H-sized rows and columns."""
    layer = celldsl.Recurrent(cell, 5, 6)
    assert layer.layer_sizes == [{"heads": 1, **{w: 6 for w in layer.ir.widths}, "x": 5}]
    out, states = layer(torch.randn(3, 2, 5))
    assert out.shape == (3, 2, 6)
    for name, state in zip(layer.ir.states, states, strict=True):
        kind = layer.ir.kinds[name]
        assert state.shape == (1, 2, 1, *[6 for d in (kind.rows, kind.cols) if d != "1"])


INIT_SIZE = """cell decayed
input x
state S : (K, V) per head
output o
param W_k : (K, x) per head
param W_v : (V, x) per head
param b : K per head
init b = log(uniform(1, T_max - 1))
k = W_k @ x
v = W_v @ x
S' = diag(sigmoid(b)) @ S + k @ vᵀ
o = kᵀ @ S'
"""


def test_recurrent_names_the_sizes_that_do_not_follow_from_hidden_size():
    needs = r"'decayed' needs sizes=\{'T_max': ...\}: its init lines read T_max"
    with pytest.raises(ValueError, match=needs):
        celldsl.Recurrent(INIT_SIZE, 4, 6)
    assert celldsl.Recurrent(INIT_SIZE, 4, 6, sizes={"T_max": 10}).layer_sizes == [
        {"T_max": 10, "heads": 1, "K": 6, "V": 6, "x": 4}]


def test_compile_cell_gives_a_matrix_cell():
    compiled = compile_cell("mlstm")  # a zoo name finds cells/
    assert isinstance(compiled, CompiledMatrixCell) and compiled.states == ["C", "n", "m"]
    assert "a (V, K) matrix per head" in compiled.explain()


def test_layer_arguments():
    with pytest.raises(ValueError, match="needs the sizes 'V'"):
        MatrixRecurrent("cells/gla.cell", I, {"heads": 2, "K": 3, "R": 2})
    with pytest.raises(ValueError, match="no matrix state; use celldsl.Recurrent"):
        MatrixRecurrent("cells/lstm.cell", I, {"heads": 2})
    layer = MatrixRecurrent("cells/gla.cell", I, {"heads": 2, "K": 3, "V": 4, "R": 2})
    with pytest.raises(ValueError, match=r"x must be \[T, N, 6\]"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="state must be 1 tensor"):
        layer(torch.randn(2, 3, I), (torch.zeros(3, 2, 3, 4),))


def test_cell_of_a_matrix_cell_is_its_step():
    """celldsl.Cell builds a matrix cell's MatrixCell (tests/test_matrix_step.py runs it)."""
    from celldsl.nn.matrix import MatrixCell

    assert type(celldsl.Cell("gla", 4, 8)) is MatrixCell and type(celldsl.Cell("gru", 4, 8)) is celldsl.Cell


def test_matrix_recurrent_is_exported():
    assert celldsl.MatrixRecurrent is MatrixRecurrent


def test_the_docs_example_is_the_zoo_cell():
    """docs/language.md's matrix-memory example is cells/mlstm.cell's statements, comments aside."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "language.md").read_text()
    block = doc.split("## Matrix memories")[1].split("```")[1]

    def statements(text):
        lines = (line.split("#")[0].strip() for line in text.splitlines())
        return [" ".join(line.split()) for line in lines if line and not line.startswith(("doc ", "cite "))]

    assert statements(block) == statements((root / "cells" / "mlstm.cell").read_text())


def test_the_docs_layer_shapes():
    layer = celldsl.MatrixRecurrent("mlstm", 64, sizes={"heads": 4, "K": 16, "V": 32})
    out, (C, n, m) = layer(torch.randn(3, 2, 64))
    assert out.shape == (3, 2, 128) and C.shape == (1, 2, 4, 32, 16) and n.shape == (1, 2, 4, 16)
    assert m.shape == (1, 2, 4)


def _params_of(layer, cell, layer_index, direction):
    """One layer and direction's parameters in the references' layout."""
    suffix = f"_l{layer_index}" + ("_reverse" if direction else "")
    return {name: reference_layout(layer.ir, name, getattr(layer, name + suffix)) for name in layer.ir.params}


@pytest.mark.parametrize("cell", ["deltanet", "mlstm"])
def test_two_layers_bidirectional_batch_first(cell):
    """Layer 1 reads both directions of layer 0 side by side; the reverse direction reads time backwards."""
    torch.manual_seed(2)
    layer = MatrixRecurrent(f"cells/{cell}.cell", I, {"heads": HEADS, "K": K, "V": V}, num_layers=2,
                            bidirectional=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(N, T, I, dtype=torch.float64, requires_grad=True)
    out, finals = layer(x)
    seq, want_finals = x.transpose(0, 1), []
    for k in range(2):
        fwd, sf = REFERENCES[cell](_params_of(layer, cell, k, 0), seq, None)
        bwd, sb = REFERENCES[cell](_params_of(layer, cell, k, 1), seq.flip(0), None)
        seq = torch.cat([fwd, bwd.flip(0)], -1)
        want_finals += [sf, sb]
    torch.testing.assert_close(out, seq.transpose(0, 1), rtol=1e-10, atol=1e-10)
    for i, f in enumerate(finals):
        torch.testing.assert_close(f, torch.stack([s[i] for s in want_finals]), rtol=1e-10, atol=1e-10)
    wrt = [x, *layer.parameters()]
    got = torch.autograd.grad(out.square().sum() + finals[0].sum(), wrt)
    want = torch.autograd.grad(seq.square().sum() + torch.stack([s[0] for s in want_finals]).sum(), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell", ["gla", "m2rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences_run_each_sequence_over_its_own_length(cell, bidirectional):
    from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

    torch.manual_seed(3)
    layer = MatrixRecurrent(f"cells/{cell}.cell", I, SIZES,
                            bidirectional=bidirectional, dtype=torch.float64)
    seqs = [torch.randn(n, I, dtype=torch.float64, requires_grad=True) for n in (3, 5, 1)]
    out, finals = layer(pack_sequence(seqs, enforce_sorted=False))
    padded, lengths = pad_packed_sequence(out)
    assert lengths.tolist() == [3, 5, 1]
    loss = padded.square().sum() + sum(f.square().sum() for f in finals)
    got = torch.autograd.grad(loss, [*seqs, *layer.parameters()])
    want_loss = 0
    for j, s in enumerate(seqs):
        parts = []
        for d in range(layer.num_directions):
            seq = s[:, None] if d == 0 else s.flip(0)[:, None]
            o, st = REFERENCES[cell](_params_of(layer, cell, 0, d), seq, None)
            parts.append(o[:, 0] if d == 0 else o[:, 0].flip(0))
            for f, r in zip(finals, st, strict=True):
                torch.testing.assert_close(f[d, j], r[0], rtol=1e-10, atol=1e-10)
            want_loss = want_loss + sum(r.square().sum() for r in st)
        o = torch.cat(parts, -1)
        torch.testing.assert_close(padded[: len(s), j], o, rtol=1e-10, atol=1e-10)
        assert padded[len(s):, j].abs().max().item() == 0 if len(s) < 5 else True
        want_loss = want_loss + o.square().sum()
    want = torch.autograd.grad(want_loss, [*seqs, *layer.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


MIXED = """cell mixed
input x
state S : (V, K) per head
state u : x per head
output o
param W_k : (K, x) per head
param W_v : (V, x) per head
param U : (V, V) per head
param c : 1 per head
k = W_k @ x
v = W_v @ x
u' = tanh(u * c + x)
S' = diag(sigmoid(U @ v)) @ S + (sum(u') / 3) * v @ kᵀ
o = S' @ k / norm(k) + mean(x) * (U @ v) + max(S') - min(u')
"""


@pytest.mark.parametrize(("steps", "batch"), [(1, 1), (4, 3)])
def test_gradcheck_where_the_input_and_parameters_meet_the_states(steps, batch):
    """x read by a state's update (its gradient gathered over the steps into the hoisted backward), a
    vector state of the input's width, sum/mean/norm/max/min/diag: the derived backward against finite
    differences, T = N = 1 too (m2rnn covers a parameter read per step)."""
    torch.manual_seed(4)
    layer = MatrixRecurrent(MIXED, 3, {"heads": 2, "K": 2, "V": 3}, dtype=torch.float64)
    x = torch.randn(steps, batch, 3, dtype=torch.float64, requires_grad=True)
    state0 = tuple(torch.randn(batch, *layer.ir.state_shape(s, layer.layer_sizes[0]), dtype=torch.float64,
                               requires_grad=True) for s in layer.ir.states)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, *rest):
        out, finals = layer.loop.run(x, list(rest[:2]), list(rest[2:]), layer.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, *state0, *params))


def test_the_command_line(capsys, tmp_path):
    """check and explain work on matrix cells; compile (the Triton target's tool) refuses at the state."""
    from celldsl.cli.main import main

    assert main(["check", "cells/gla.cell", "cells/deltanet.cell"]) == 0
    assert capsys.readouterr().out.splitlines() == ["cells/gla.cell: ok", "cells/deltanet.cell: ok"]
    assert main(["explain", "cells/deltanet.cell"]) == 0
    assert "S  [a (V, K) matrix per head]" in capsys.readouterr().out
    assert main(["compile", "cells/deltanet.cell", "-o", str(tmp_path / "k")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cells/deltanet.cell:14:7: error: "
                          "the triton backend does not run matrix states yet")
    assert not (tmp_path / "k").exists()


def test_reductions_over_a_width_against_a_hand_loop():
    """sum, mean, max, min and norm of one head's vector, and of the input (shared by the heads)."""
    text = """cell r
input x
state s : 1 per head
output o
param W : (V, x) per head
v = W @ x
s' = s + max(v) - min(v) + mean(v) * sum(x)
o = v / norm(v) * s'
"""
    torch.manual_seed(5)
    layer = MatrixRecurrent(text, 4, {"heads": 2, "V": 3}, dtype=torch.float64)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    out, (s_final,) = layer(x)
    W, s, outs = layer.W_l0, torch.zeros(2, 2, dtype=torch.float64), []
    for x_t in x:
        v = torch.einsum("hvi,ni->nhv", W, x_t)
        s = s + v.amax(-1) - v.amin(-1) + v.mean(-1) * x_t.sum(-1, keepdim=True)
        outs.append((v / v.norm(dim=-1, keepdim=True) * s[..., None]).reshape(2, -1))
    torch.testing.assert_close(out, torch.stack(outs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_final[0], s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_state_or_input_of_another_dtype_is_refused_not_misread(backend):
    """Before, float64 states with a float32 input ran on the cpu loop, which read the float64 buffers as
    float32 (outputs in the thousands); torch.nn refuses mixed dtypes, and so do these layers."""
    from celldsl.lang.errors import CellTensorError

    layer = MatrixRecurrent("cells/gla.cell", I, {"heads": 2, "K": 3, "V": 4, "R": 2}, backend=backend)
    x = torch.randn(5, 3, I)
    _, states = layer(x)
    with pytest.raises(CellTensorError, match="state S is torch.float64 .* but the input is torch.float32"):
        layer(x, tuple(s.double() for s in states))
    with pytest.raises(CellTensorError, match="parameters are torch.float32"):
        layer(x.double(), tuple(s.double() for s in states))


def test_the_cpu_loop_refuses_buffers_of_another_dtype():
    """The C loop's last line of defence: it reads raw memory, so every buffer it is handed must have one
    dtype (here the states float64 and the projections float32, as a caller bypassing the layer's checks
    or an ambient autocast would hand it)."""
    layer = MatrixRecurrent("cells/gla.cell", I, {"heads": 2, "K": 3, "V": 4, "R": 2}, backend="cpu")
    sizes = layer.layer_sizes[0]
    x = torch.randn(5, 3, I)
    states = [torch.zeros(3, *layer.ir.state_shape(s, sizes), dtype=torch.float64) for s in layer.ir.states]
    params = [getattr(layer, layer.param_name(n, 0, 0)) for n in layer.ir.params]
    with pytest.raises(TypeError, match="contiguous CPU tensors of one dtype"):
        layer.loop.run(x, states, params, sizes)
