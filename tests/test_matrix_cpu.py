"""The C target's matrix loop (targets/c/matrix_emit.py + matrix_loop.py, issue 26 item 4) against the
torch target and against the einsum references written from the papers (tests/matrix_references.py):
outputs, final states and the gradients of x, the initial states and the parameters in float64;
gradcheck; multi-head with K != V != heads; T = 1; packed sequences; bidirectional; 2 layers;
float32; random small matrix cells (torch vs cpu); the located refusal; backend="auto"."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matrix_layers import HEADS, REFERENCES, SIZES, I, V, ref_params
from torch.nn.utils.rnn import pack_padded_sequence

from celldsl.lang.errors import CellError, CellWarning
from celldsl.nn.matrix import MatrixRecurrent

CELLS = sorted(REFERENCES)


def pair(cell, dtype=torch.float64, seed=0, **kw):
    """The same layer on backend="cpu" and backend="torch"."""
    torch.manual_seed(seed)
    cpu = MatrixRecurrent(f"cells/{cell}.cell", I, SIZES, backend="cpu", dtype=dtype, **kw)
    ref = MatrixRecurrent(f"cells/{cell}.cell", I, SIZES, backend="torch", dtype=dtype, **kw)
    ref.load_state_dict(cpu.state_dict())
    return cpu, ref


def grads(out, finals, wrt, g):
    loss = (out * g).sum() + sum((s * s * (1 + k)).sum() for k, s in enumerate(finals))
    return torch.autograd.grad(loss, wrt)


def close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,N", [(1, 1), (1, 3), (7, 2), (40, 2)])  # 40 > one checkpoint segment (32)
def test_cpu_matches_torch_and_reference(cell, T, N):
    cpu, ref = pair(cell)
    assert type(cpu.loop).__name__ == "CMatrixLoop"
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    s0 = tuple(torch.randn(1, N, *cpu.ir.state_shape(s, cpu.layer_sizes[0]), dtype=torch.float64,
                           requires_grad=True) for s in cpu.ir.states)
    out, finals = cpu(x, s0)
    out_t, finals_t = ref(x, s0)
    out_r, finals_r = REFERENCES[cell](ref_params(cpu), x, tuple(s[0] for s in s0))
    for want, want_f in ((out_t, [f[0] for f in finals_t]), (out_r, list(finals_r))):
        close(out, want, 1e-10)
        for a, b in zip([f[0] for f in finals], want_f, strict=True):
            close(a, b, 1e-10)
    g = torch.randn_like(out)
    got = grads(out, [f[0] for f in finals], [x, *s0, *cpu.parameters()], g)
    want = grads(out_t, [f[0] for f in finals_t], [x, *s0, *ref.parameters()], g)
    want_r = grads(out_r, list(finals_r), [x, *s0, *cpu.parameters()], g)
    for a, b, c in zip(got, want, want_r, strict=True):
        close(a, b, 1e-9)
        close(a, c, 1e-9)


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell):
    cpu, _ = pair(cell, seed=1)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    s0 = tuple(torch.randn(2, *cpu.ir.state_shape(s, cpu.layer_sizes[0]), dtype=torch.float64,
                           requires_grad=True) for s in cpu.ir.states)
    params = [p.detach().clone().requires_grad_() for p in cpu.parameters()]

    def f(x, *rest):
        states, ps = rest[: len(s0)], rest[len(s0):]
        out, finals = cpu.loop.run(x, list(states), list(ps), cpu.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, *s0, *params))


@pytest.mark.parametrize("cell", CELLS)
def test_packed_bidirectional_two_layers(cell):
    cpu, ref = pair(cell, num_layers=2, bidirectional=True)
    lengths = torch.tensor([37, 5, 1, 33])
    x = torch.randn(37, 4, I, dtype=torch.float64, requires_grad=True)
    outs, fins = [], []
    for layer in (cpu, ref):
        out, finals = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
        outs.append(out.data)
        fins.append(finals)
    close(outs[0], outs[1], 1e-10)
    for a, b in zip(*fins, strict=True):
        close(a, b, 1e-10)
    g = torch.randn_like(outs[0])
    got = grads(outs[0], fins[0], [x, *cpu.parameters()], g)
    want = grads(outs[1], fins[1], [x, *ref.parameters()], g)
    for a, b in zip(got, want, strict=True):
        close(a, b, 1e-9)


@pytest.mark.parametrize("cell", CELLS)
def test_float32(cell):
    cpu, _ = pair(cell, dtype=torch.float32)
    ref64 = MatrixRecurrent(f"cells/{cell}.cell", I, SIZES, backend="torch", dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in cpu.state_dict().items()})
    x = torch.randn(20, 3, I)
    x64 = x.double().requires_grad_()
    x = x.requires_grad_()
    out, finals = cpu(x)
    out64, finals64 = ref64(x64)
    assert out.dtype == torch.float32
    close(out.double(), out64, 1e-4)
    for a, b in zip(finals, finals64, strict=True):
        close(a.double(), b, 1e-4)
    g = torch.randn_like(out64)
    got = grads(out, finals, [x, *cpu.parameters()], g.float())
    want = grads(out64, finals64, [x64, *ref64.parameters()], g)
    for a, b in zip(got, want, strict=True):
        close(a.double(), b, 2e-3)


def test_no_grad_forward_and_auto():
    cpu, ref = pair("mlstm")
    x = torch.randn(9, 2, I, dtype=torch.float64)
    with torch.no_grad():
        close(cpu(x)[0], ref(x)[0], 1e-10)
    auto = MatrixRecurrent("cells/gla.cell", I, SIZES)  # backend="auto"
    assert type(auto.loop).__name__ == "CMatrixLoop" and auto.loop.fallback is auto.compiled.torch_loop
    auto.bfloat16()  # a dtype the C loop does not take: auto runs torch's loop
    out, _ = auto(torch.randn(3, 2, I, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 2, HEADS * V)


def test_cpu_refuses_other_dtypes():
    cpu, _ = pair("gla")
    cpu.bfloat16()
    with pytest.raises(TypeError, match="float32 and float64"):
        cpu(torch.randn(3, 2, I, dtype=torch.bfloat16))


ODD = """cell odd
input x
state S : (K, V) per head
output o
param W_k : (K, x) per head
param W_v : (V, x) per head
k = W_k @ x
v = W_v @ x
S' = S + k @ vᵀ
o = v
"""


def test_located_refusal(tmp_path):
    """An output that reads no state has no place in the loop: refused at its definition (auto: torch)."""
    path = tmp_path / "odd.cell"
    path.write_text(ODD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        with pytest.raises(CellError) as err:
            MatrixRecurrent(str(path), 3, {"heads": 2, "K": 2, "V": 3}, backend="cpu")
        assert str(err.value).startswith(f"{path}:8:5: error: the cpu backend cannot run this matrix-memory "
                                         "cell: its output depends on no state")
        layer = MatrixRecurrent(str(path), 3, {"heads": 2, "K": 2, "V": 3})
        x = torch.randn(2, 2, 3)
        want = torch.einsum("hvi,tni->tnhv", layer.W_v_l0, x).reshape(2, 2, 6)
        torch.testing.assert_close(layer(x)[0], want)


def test_generated_c_holds_no_cell_text():
    from celldsl.compiler import compile_cell
    from celldsl.targets.c.matrix_emit import matrix_c_source

    ir = compile_cell("mlstm").ir
    src = matrix_c_source(ir, {"heads": 2, "K": 3, "V": 4, "x": 5})
    for word in ("mlstm", "i_tilde", "log_f", "W_q"):
        assert word not in src


# ---- random small matrix-state cells: torch against cpu --------------------------------------------

UPDATES = [
    "g * S + k @ vᵀ",
    "diag(sigmoid(k)) @ S + k @ vᵀ",
    "S - g * k @ (kᵀ @ S) + k @ vᵀ",
    "(I - g * k @ kᵀ) @ S + g * k @ vᵀ",
    "g * S + (1 - g) * tanh(S + k @ vᵀ)",
]
READOUTS = [
    "qᵀ @ S'",
    "qᵀ @ tanh(S')",
    "qᵀ @ S' / max(abs(sum(S')), 1)",
    "qᵀ @ S' * mean(S')",
    "qᵀ @ S' / max(abs(qᵀ @ n'), 1)",
]
FEATURES = ["ka", "tanh(ka)", "ka / sqrt(kaᵀ @ ka + 1)"]


def random_cell(update: str, readout: str, feature: str, normaliser: bool) -> str:
    n_state = "state n : K per head\n" if normaliser else ""
    n_update = "n' = g * n + k\n" if normaliser else ""
    if "n'" in readout and not normaliser:
        readout = "qᵀ @ S'"
    return (f"cell rnd\ninput x\nstate S : (K, V) per head\n{n_state}output o\n"
            "param W_q, W_k : (K, x) per head\nparam W_v : (V, x) per head\n"
            "param w_g : x per head\nparam b_g : 1 per head\n"
            f"q = W_q @ x\nka = W_k @ x\nk = {feature}\nv = W_v @ x\ng = sigmoid(w_gᵀ @ x + b_g)\n"
            f"S' = {update}\n{n_update}o = {readout}\n")


@settings(max_examples=8, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(update=st.sampled_from(UPDATES), readout=st.sampled_from(READOUTS), feature=st.sampled_from(FEATURES),
       normaliser=st.booleans())
def test_random_cells_cpu_matches_torch(tmp_path, update, readout, feature, normaliser):
    path = tmp_path / "rnd.cell"
    path.write_text(random_cell(update, readout, feature, normaliser))
    sizes = {"heads": 2, "K": 3, "V": 2}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)  # g is unused by some updates
        cpu = MatrixRecurrent(str(path), 4, sizes, backend="cpu", dtype=torch.float64)
        ref = MatrixRecurrent(str(path), 4, sizes, backend="torch", dtype=torch.float64)
    ref.load_state_dict(cpu.state_dict())
    x = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    out, finals = cpu(x)
    out_t, finals_t = ref(x)
    close(out, out_t, 1e-10)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, finals, [x, *cpu.parameters()], g),
                    grads(out_t, finals_t, [x, *ref.parameters()], g), strict=True):
        close(a, b, 1e-9)


def test_bench_matrix_table_smoke(capsys):
    """bench/cpu.py's matrix table at tiny sizes: every row runs and computes the same outputs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "cpu.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_matrix", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--tables", "matrix"]) == 0
    text = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| implementation |")]
    names = [r[0].split(".cell")[0] for r in rows[::2]]
    assert names[:3] == ["celldsl mlstm", "celldsl gla", "celldsl deltanet"]
    if names[3:] != ["celldsl mamba"]:  # a cell the cpu backend refuses: its located reason, no table
        assert len(names) == 3 and "mamba (matrix memory)" in text and "not measured:" in text
        assert "mamba.cell:" in text and "error: the cpu backend cannot run" in text
    assert all(float(r[-1]) < 1e-5 for r in rows)


def test_forward_keeps_checkpoints_no_larger_than_the_outputs():
    """With autograd the forward keeps the states every `every` steps, spaced so that they take no more
    memory than the outputs and one state (K = 40 >> V = 3 spreads them beyond 32 steps); the backward
    recomputes each segment and still matches torch's loop, which keeps every state."""
    sizes = {"heads": 2, "K": 40, "V": 3}
    torch.manual_seed(0)
    cpu = MatrixRecurrent("cells/mlstm.cell", I, sizes, backend="cpu", dtype=torch.float64)
    ref = MatrixRecurrent("cells/mlstm.cell", I, sizes, backend="torch", dtype=torch.float64)
    ref.load_state_dict(cpu.state_dict())
    x = torch.randn(150, 2, I, dtype=torch.float64, requires_grad=True)
    out, finals = cpu(x)
    kept = sum(c.numel() for c in out.grad_fn.ck)  # the first checkpoint is the initial state
    assert out.grad_fn.every > 32 and kept <= out.numel() + sum(f.numel() for f in finals)
    out_t, finals_t = ref(x)
    close(out, out_t, 1e-10)
    g = torch.randn_like(out)
    for a, b in zip(grads(out, finals, [x, *cpu.parameters()], g),
                    grads(out_t, finals_t, [x, *ref.parameters()], g), strict=True):
        close(a, b, 1e-9)


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_layer_deepcopies_and_pickles(backend):
    import copy
    import pickle

    torch.manual_seed(0)
    layer = MatrixRecurrent("cells/gla.cell", I, SIZES, backend=backend)
    x = torch.randn(4, 2, I)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(other.loop).__name__ == "CMatrixLoop"
        assert (other.loop.fallback is None) == (backend == "cpu")
        torch.testing.assert_close(other(x)[0], layer(x)[0])
