"""Ordinary cells (no `per head`) with shaped parameters: a rank-R bottleneck `W_a2 @ (W_a1 @ x)`,
chained input projections (u = W_in @ x, then a gate from u), each next to a dense `U @ h`
(issue 26 item 1). They run on the matrix path (lang/tensors.py) as one head, with H = hidden_size
and torch.nn.RNN's state layout. Checked in float64 against small torch loops written here from the
equations (not from the compiler): outputs, final states, gradients and gradcheck, on the torch and
cpu backends (and Triton's interpreter), packed sequences, two bidirectional layers; and the located
errors of what is still refused."""

from __future__ import annotations

import pytest
import torch
from shaped_cells import LOWRANK, H, I, shaped_layer
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl
from celldsl.lang.errors import CellError

CHAIN = """cell chain
input x
state h
param W_in : (h, x)
param W_g : (h, h)
param b_g : h
u = W_in @ x
g = sigmoid(W_g @ u + b_g)
h' = g * h + (1 - g) * tanh(u)
"""

MIXED = """cell mixed
input x
state h
param W_in : (D, x)
param W_g : (h, D)
param U_g : (h, h)
param W_u : (h, D)
param b_g : h
param s : scalar
u = W_in @ x
g = sigmoid(W_g @ u + U_g @ h + b_g)
h' = g * h + (1 - g) * tanh(W_u @ u) * s
"""


def step_lowrank(p, x, h):
    return torch.tanh(x @ p["W_a1"].T @ p["W_a2"].T + h @ p["U"].T + p["b"])


def step_chain(p, x, h):
    u = x @ p["W_in"].T
    g = torch.sigmoid(u @ p["W_g"].T + p["b_g"])
    return g * h + (1 - g) * torch.tanh(u)


def step_mixed(p, x, h):
    u = x @ p["W_in"].T
    g = torch.sigmoid(u @ p["W_g"].T + h @ p["U_g"].T + p["b_g"])
    return g * h + (1 - g) * torch.tanh(u @ p["W_u"].T) * p["s"]


CELLS = {"lowrank": (LOWRANK, step_lowrank, {"R": 2}), "chain": (CHAIN, step_chain, {}),
         "mixed": (MIXED, step_mixed, {"D": 3})}
T, N = 5, 3  # I, H: tests/shaped_cells.py
BACKENDS = ["torch", "cpu"]


def _layer(name, backend, seed=0, **kw):
    text, _, sizes = CELLS[name]
    return shaped_layer(text, sizes, backend, seed, **kw)


def _params(layer, k=0, d=0):
    suffix = f"_l{k}" + ("_reverse" if d else "")
    return {n.removesuffix(suffix): t for n, t in layer.named_parameters() if n.endswith(suffix)}


def reference(step, p, x, h0, lengths=None):
    """One direction over x [T, N, F] from h0 [N, H]: outputs [T, N, H] (0 after a sequence's length)
    and the state after each sequence's last step."""
    outs, h = [], h0
    for t in range(x.shape[0]):
        h = step(p, x[t], h)
        outs.append(h)
    out = torch.stack(outs)
    if lengths is None:
        return out, h
    mask = (torch.arange(x.shape[0])[:, None] < torch.as_tensor(lengths)[None, :]).to(x.dtype)[..., None]
    last = torch.stack([out[n_len - 1, n] for n, n_len in enumerate(lengths)])
    return out * mask, last


def reverse(x, lengths):
    if lengths is None:
        return x.flip(0)
    rows = [torch.cat([x[:n_len, n].flip(0), x[n_len:, n]]) for n, n_len in enumerate(lengths)]
    return torch.stack(rows, 1)


def reference_stack(layer, step, x, h0, lengths=None):
    """layers x directions, as torch.nn.RNN stacks them; h0 [L * D, N, H]."""
    D = 2 if layer.bidirectional else 1
    finals = []
    for k in range(layer.num_layers):
        outs = []
        for d in range(D):
            seq = x if d == 0 else reverse(x, lengths)
            out, last = reference(step, _params(layer, k, d), seq, h0[k * D + d], lengths)
            outs.append(out if d == 0 else reverse(out, lengths))
            finals.append(last)
        x = torch.cat(outs, -1)
    return x, torch.stack(finals)


def _compare(layer, step, x, h0, lengths=None, tol=1e-10):
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, hT = layer(inp, h0)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    ref_out, ref_hT = reference_stack(layer, step, x, h0, lengths)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(hT, ref_hT, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    wrt = [x, h0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + (hT * hT).sum(), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + (ref_hT * ref_hT).sum(), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def _inputs(LD=1, width=I):
    x = torch.randn(T, N, width, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(LD, N, H, dtype=torch.float64, requires_grad=True)
    return x, h0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CELLS))
def test_matches_reference(name, backend):
    layer = _layer(name, backend)
    x, h0 = _inputs()
    _compare(layer, CELLS[name][1], x, h0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CELLS))
def test_gradcheck(name, backend):
    layer = _layer(name, backend, seed=1)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, H, dtype=torch.float64, requires_grad=True)

    def run(x, h0, *ps):
        out, hT = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x, h0))
        return out, hT

    assert torch.autograd.gradcheck(run, (x, h0, *params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lowrank", "mixed"])
def test_packed_sequences(name, backend):
    layer = _layer(name, backend, seed=2)
    x, h0 = _inputs()
    _compare(layer, CELLS[name][1], x, h0, lengths=[5, 2, 4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CELLS))
def test_two_bidirectional_layers(name, backend):
    layer = _layer(name, backend, seed=3, num_layers=2, bidirectional=True)
    if name == "chain":  # W_in : (h, x): the second layer reads 2H, so its W_in is H x 2H
        assert layer.W_in_l1.shape == (H, 2 * H)
    x, h0 = _inputs(LD=4)
    _compare(layer, CELLS[name][1], x, h0, lengths=[5, 2, 4])


def test_triton_interpreter_matches_reference(monkeypatch):
    """The opt-in Triton loop runs a cell without heads too (its interpreter, float64)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = _layer("mixed", "triton", seed=4)
    x, h0 = _inputs()
    _compare(layer, step_mixed, x, h0)


def test_layout_is_torch_nn_rnn():
    """H is hidden_size; states [L * D, N, H] without a heads axis; one state comes back as a tensor;
    the zero state by default; parameters as declared (W_a1 : (R, x) is [R, I])."""
    layer = _layer("lowrank", "torch", num_layers=2, bidirectional=True)
    assert layer.W_a1_l0.shape == (2, I) and layer.W_a2_l0.shape == (H, 2)
    assert layer.W_a1_l1.shape == (2, 2 * H)
    assert layer.b_l0_reverse.shape == (H,) and layer.U_l1.shape == (H, H)
    x = torch.randn(T, N, I, dtype=torch.float64)
    out, hT = layer(x)
    assert out.shape == (T, N, 2 * H) and isinstance(hT, torch.Tensor) and hT.shape == (4, N, H)
    out0, hT0 = layer(x, torch.zeros(4, N, H, dtype=torch.float64))
    torch.testing.assert_close(out, out0)
    torch.testing.assert_close(hT, hT0)
    with pytest.raises(ValueError, match=r"state must be 1 tensor\(s\) of shapes \[\(4, 3, 4\)\]"):
        layer(x, torch.zeros(4, N, 1, H, dtype=torch.float64))


def test_cpu_loop_is_the_c_loop_and_agrees_with_torch():
    """backend='cpu' runs the fused C loop (its input projections W_a2 @ (W_a1 @ x) hoisted as GEMMs
    over all steps, U @ h in the loop), in float32 too."""
    from celldsl.targets.c.matrix_loop import CMatrixLoop

    torch.manual_seed(5)
    a = celldsl.Recurrent(LOWRANK, 8, 16, sizes={"R": 3}, backend="cpu")
    b = celldsl.Recurrent(LOWRANK, 8, 16, sizes={"R": 3}, backend="torch")
    b.load_state_dict(a.state_dict())
    assert isinstance(a.loop, CMatrixLoop)
    products = {n.args: a.loop.host[i] for i, n in enumerate(a.ir.nodes) if n.op == "matmul"}
    assert products == {(2, 0): True, (3, 6): True, (4, 1): False}  # W_a1 @ x, W_a2 @ (..) hoisted; U @ h not
    x = torch.randn(20, 4, 8)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=1e-5, atol=1e-5)


# ---- what is still refused: located errors and argument errors ---------------------------------

def _error(text):
    with pytest.raises(CellError) as err:
        celldsl.compile_cell(text, use_cache=False)
    return str(err.value)


def test_check_accepts_the_issue_example(tmp_path, capsys):
    """`celldsl check` once said "state 'h' needs its shape in a matrix-memory cell" here."""
    from celldsl.cli.main import main

    path = tmp_path / "lowrank.cell"
    path.write_text(LOWRANK, encoding="utf-8")
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok"
    assert celldsl.compile_cell(LOWRANK).ir.heads is False


def test_sizes_missing_a_width_names_it():
    with pytest.raises(ValueError, match=r"declares the width\(s\) R; give their sizes, e.g. sizes=\{'R'"):
        celldsl.Recurrent(LOWRANK, I, H)
    with pytest.raises(ValueError, match=r"no 'per head' values.*sizes has no 'heads'"):
        celldsl.Recurrent(LOWRANK, I, H, sizes={"R": 2, "heads": 2})
    with pytest.raises(ValueError, match=r"H is hidden_size.*sizes has no 'H'"):
        celldsl.Recurrent(LOWRANK, I, H, sizes={"R": 2, "H": 4})
    with pytest.raises(ValueError, match=r"has the sizes R \(H is hidden_size\); unknown: Q"):
        celldsl.Recurrent(LOWRANK, I, H, sizes={"R": 2, "Q": 4})


def test_unshaped_parameter_next_to_shaped_ones_is_located_with_a_hint():
    text = _error(LOWRANK.replace("param U : (h, h)", "param U"))
    assert text.startswith("<cell>:6:7: error: parameter 'U' needs its shape: this cell declares shapes "
                           "(line 4: 'param W_a1 : (R, x)')")
    assert "'param U : (h, h)'" in text and "': h' (a vector)" in text and "matrix-memory" not in text


def test_widths_that_differ_by_name_are_located_with_a_hint():
    bad = CHAIN.replace("param W_in : (h, x)", "param W_in : (D, x)").replace("param W_g : (h, h)",
                                                                              "param W_g : (h, D)")
    text = _error(bad)
    assert text.startswith("<cell>:9:14: error: elementwise operation on a H-vector and a D-vector")
    assert "W : (h, x) makes an H-vector" in text and "per head" not in text.split("\n")[0]


def test_new_state_of_another_width_is_located():
    text = _error(LOWRANK.replace("h' = tanh(W_a2 @ (W_a1 @ x) + U @ h + b)", "h' = W_a1 @ x"))
    assert text.startswith("<cell>:8:1: error: h' is a R-vector, but state 'h' is declared a H-vector")


def test_what_ordinary_cells_do_elsewhere_is_refused_by_name():
    extra = _error(LOWRANK.replace("input x", "input x, ctx"))
    assert extra.startswith("<cell>:2:10: error: a cell with shaped parameters reads one input for now")
    group = _error(LOWRANK.replace("param b : h", "param B = [b]"))
    assert "parameter groups are not supported in a cell with shaped parameters" in group


def test_unshaped_chain_points_at_declaring_shapes():
    """Without shapes a cell is elementwise, where W_a2 @ (W_a1 @ x) is refused: the hint says how to
    write it."""
    text = _error(LOWRANK.replace(" : (R, x)", "").replace(" : (h, R)", "").replace(" : (h, h)", "")
                  .replace("param b : h", "param b"))
    assert text.startswith("<cell>:8:11: error: a matrix product of an input-only expression")
    assert "declare them (param W_1 : (R, x), param W_2 : (h, R): a rank-R bottleneck)" in text


def test_a_matrix_memory_cell_still_needs_its_state_shapes():
    """`state h` unshaped means an H-vector only where no value is per head (one meaning: a matrix
    cell's widths default to hidden_size / heads, so its states say their shapes)."""
    text = _error(LOWRANK.replace("param b : h", "param b : h per head"))
    assert text.startswith("<cell>:3:7: error: state 'h' needs its shape in a matrix-memory cell")
    assert "may leave it unshaped" in text


PROJECTED = """cell lstmp
input x
state h : P
state c
output h
param W_i, W_f, W_g, W_o : (c, x)
param U_i, U_f, U_g, U_o : (c, h)
param b_i, b_f, b_g, b_o : c
param W_hr : (h, c)
i = sigmoid(W_i @ x + U_i @ h + b_i)
f = sigmoid(W_f @ x + U_f @ h + b_f)
g = tanh(W_g @ x + U_g @ h + b_g)
o = sigmoid(W_o @ x + U_o @ h + b_o)
c' = f * c + i * g
h' = W_hr @ (o * tanh(c'))
"""

COUNTER = """cell counter
input x
state h
state m : 1
output h
param W : (h, x)
param a : (R, x)
m' = m + sum(a @ x)
h' = tanh(W @ x + h * m')
"""


def ref_projected(p, x, h, c):
    outs = []
    for t in range(x.shape[0]):
        gate = {k: x[t] @ p[f"W_{k}"].T + h @ p[f"U_{k}"].T + p[f"b_{k}"] for k in "ifgo"}
        c = torch.sigmoid(gate["f"]) * c + torch.sigmoid(gate["i"]) * torch.tanh(gate["g"])
        h = (torch.sigmoid(gate["o"]) * torch.tanh(c)) @ p["W_hr"].T
        outs.append(h)
    return torch.stack(outs), (h, c)


def ref_counter(p, x, h, m):
    outs = []
    for t in range(x.shape[0]):
        m = m + (x[t] @ p["a"].T).sum(-1, keepdim=True)
        h = torch.tanh(x[t] @ p["W"].T + h * m)
        outs.append(h)
    return torch.stack(outs), (h, m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["projected", "counter"])
def test_declared_state_widths(name, backend):
    """`state h : P` is a P-vector (a state's name in a shape stands for P: W_hr : (h, c) is P x H, as
    celldsl.LSTM's proj_size) and `state m : 1` one number per sequence, [L * D, N, 1] as in an
    elementwise cell; several states come back as a tuple in the `state` line's order."""
    text, ref, sizes, widths = {"projected": (PROJECTED, ref_projected, {"P": 2}, (2, H)),
                                "counter": (COUNTER, ref_counter, {"R": 2}, (H, 1))}[name]
    torch.manual_seed(6)
    layer = celldsl.Recurrent(text, I, H, sizes=sizes, backend=backend, dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    s0 = tuple(torch.randn(1, N, w, dtype=torch.float64, requires_grad=True) for w in widths)
    out, finals = layer(x, s0)
    ref_out, ref_finals = ref(_params(layer), x, *(s[0] for s in s0))
    assert out.shape == (T, N, widths[0]) and [f.shape for f in finals] == [s.shape for s in s0]
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(finals, ref_finals, strict=True):
        torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    wrt = [x, *s0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + sum((f * f).sum() for f in finals), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + sum((f * f).sum() for f in ref_finals), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_docs_example_shapes():
    """docs/language.md's example, as printed there."""
    layer = celldsl.Recurrent(LOWRANK, 32, 64, sizes={"R": 4}, num_layers=2, bidirectional=True)
    out, h = layer(torch.randn(6, 2, 32))
    assert out.shape == (6, 2, 128) and h.shape == (4, 2, 64) and layer.W_a1_l0.shape == (4, 32)


def ref_flstm(p, x, h, c):
    """cells/flstm.cell from Kuchaiev and Ginsburg 2017: W [x, h] with W = W2 W1 (W1 [R, I + H],
    W2 [4H, R], gates i, f, o, g), then torch.nn.LSTM's c and h."""
    W1 = torch.cat([p["W1_x"], p["W1_h"]], 1)
    W2 = torch.cat([p[f"W2_{k}"] for k in "ifog"], 0)
    b = torch.cat([p[f"b_{k}"] for k in "ifog"])
    outs = []
    for t in range(x.shape[0]):
        gates = torch.cat([x[t], h], 1) @ (W2 @ W1).T + b
        i, f, o, g = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), (h, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zoo_flstm_matches_reference(backend):
    """The zoo's F-LSTM (found by name), forward, final states and gradients, and gradcheck."""
    torch.manual_seed(7)
    layer = celldsl.Recurrent("flstm", I, H, sizes={"R": 2}, backend=backend, dtype=torch.float64)
    assert layer.W1_h_l0.shape == (2, H) and layer.W2_g_l0.shape == (H, 2)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    s0 = tuple(torch.randn(1, N, H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, finals = layer(x, s0)
    ref_out, ref_finals = ref_flstm(_params(layer), x, *(s[0] for s in s0))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for a, b in zip(finals, ref_finals, strict=True):
        torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    wrt = [x, *s0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + sum((f * f).sum() for f in finals), wrt)
    want = torch.autograd.grad((ref_out * g).sum() + sum((f * f).sum() for f in ref_finals), wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def run(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x, (h0, c0)))
        return out, h, c

    small = [t[:3, :2] if t is x else t[:, :2] for t in (x, *s0)]  # 3 steps, 2 sequences
    assert torch.autograd.gradcheck(run, (*(t.detach().requires_grad_() for t in small), *params))


def test_zoo_flstm_on_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(8)
    layer = celldsl.Recurrent("flstm", I, H, sizes={"R": 2}, backend="triton", dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    out, (h, c) = layer(x)
    zeros = torch.zeros(N, H, dtype=torch.float64)
    ref_out, (ref_h, ref_c) = ref_flstm(_params(layer), x, zeros, zeros)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c[0], ref_c, rtol=1e-10, atol=1e-10)
    wrt = [x, *layer.parameters()]
    got = torch.autograd.grad(out.sum() + c.sum(), wrt)
    for a, b in zip(got, torch.autograd.grad(ref_out.sum() + ref_c.sum(), wrt), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("old", "new", "where", "says"), [
    ("state h", "state h : 2", "3:11", "a width is a name (H, P) or 1, not '2'"),
    ("param b : h", "param b : vector", "7:11", "parameter 'b' needs its shape: this cell declares shapes"),
    ("U @ h", "U @ z", "8:35", "unknown name 'z'"),
])
def test_more_mistakes_are_located(old, new, where, says):
    assert _error(LOWRANK.replace(old, new)).startswith(f"<cell>:{where}: error: {says}")
