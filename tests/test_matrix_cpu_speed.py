"""The C matrix loop's speed rewrites (issue 26): an output `W @ v` applied by torch after the loop
(matrix_rewrite.split_output), pointwise values of parameters only hoisted (matrix_emit.host_nodes),
equal pointwise nodes merged (matrix_rewrite.rewrite), an exp's derivative read from its value. Each
is checked as a decision on the IR or source, and the loops against the torch target (float64 values
and gradients, with lengths and a checkpoint segment boundary) and gradcheck."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from celldsl.compiler import compile_cell
from celldsl.lang.errors import CellWarning
from celldsl.nn.matrix import MatrixRecurrent
from celldsl.targets.c.matrix_emit import host_nodes, matrix_c_source, used_host
from celldsl.targets.c.matrix_rewrite import rewrite, split_output
from celldsl.targets.matrix_hoist import matmul

MAMBA = {"heads": 1, "D": 6, "N_s": 3, "R": 2, "O": 5}


def test_mamba_out_proj_split_and_exp_once():
    ir = rewrite(compile_cell("mamba").ir)
    exps = [n for n in ir.nodes if n.op == "pointwise" and str(n.expr) == "exp(a0)" and n.kind.cols != "1"
            and ir.nodes[n.args[0]].op != "param"]
    assert len(exps) == 1  # exp(dA), written twice in the cell, computed once
    out = ir.nodes[ir.output_node]
    split, w = split_output(ir)
    assert w == "W_out" and out.op == "matmul"
    assert split.nodes[split.output_node].kind.rows == "D"
    assert all(n.op != "matmul" or ir.nodes[n.args[0]].name != "W_out" for n in split.nodes)
    host = host_nodes(split)
    nodes = split.nodes
    neg_a = [i for i, n in enumerate(nodes) if n.op == "pointwise" and nodes[n.args[0]].op == "pointwise"
             and nodes[nodes[n.args[0]].args[0]].name == "A_log"]
    assert neg_a and all(host[i] for i in neg_a)  # A = -exp(A_log): once, by torch


def test_exp_derivative_reads_its_value():
    ir, _ = split_output(rewrite(compile_cell("mamba").ir))
    src = matrix_c_source(ir, {**MAMBA, "x": 4})
    back = src[src.index("cd_mx_back_f64("):]
    back = back[:back.index("\n}\n")]
    assert "exp(V->" not in back and "exp(h[" not in back  # no exponential recomputed in the backward


@pytest.mark.parametrize("cell", ["gla", "mlstm", "deltanet"])
def test_other_outputs_not_split(cell):
    assert split_output(rewrite(compile_cell(cell).ir))[1] is None


def test_mamba_split_loop_matches_torch():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        cpu = MatrixRecurrent("cells/mamba.cell", 4, MAMBA, backend="cpu", dtype=torch.float64)
        ref = MatrixRecurrent("cells/mamba.cell", 4, MAMBA, backend="torch", dtype=torch.float64)
    ref.load_state_dict(cpu.state_dict())
    assert cpu.loop.post == "W_out"
    x = torch.randn(40, 3, 4, dtype=torch.float64, requires_grad=True)  # 40: beyond one checkpoint segment
    lengths = torch.tensor([40, 17, 1])  # the padded steps' outputs stay zero through W_out
    out, fin = cpu(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out_t, fin_t = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out, out_t = out.data, out_t.data
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fin[0], fin_t[0], rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum() + (fin[0] ** 2).sum(), [x, *cpu.parameters()])
    want = torch.autograd.grad((out_t * g).sum() + (fin_t[0] ** 2).sum(), [x, *ref.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


HEADED = """cell po
input x
state S : (K, V) per head
output o
param W_q, W_k : (K, x) per head
param W_v : (V, x) per head
param W_o : (P, V) {share}
param a_log : (K, V) per head
q = W_q @ x
k = W_k @ x
v = W_v @ x
S' = exp(-exp(a_log)) * S + k @ vᵀ
y = qᵀ @ S'
o = W_o @ yᵀ
"""


@pytest.mark.parametrize("share", ["per head", ""])
def test_headed_output_projection(share, tmp_path):
    path = tmp_path / "po.cell"
    path.write_text(HEADED.format(share=share))
    sizes = {"heads": 2, "K": 3, "V": 4, "P": 5}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        cpu = MatrixRecurrent(str(path), 4, sizes, backend="cpu", dtype=torch.float64)
        ref = MatrixRecurrent(str(path), 4, sizes, backend="torch", dtype=torch.float64)
    ref.load_state_dict(cpu.state_dict())
    assert cpu.loop.post == "W_o"
    x = torch.randn(35, 2, 4, dtype=torch.float64, requires_grad=True)
    out, fin = cpu(x)
    out_t, fin_t = ref(x)
    torch.testing.assert_close(out, out_t, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum() + fin[0].sum(), [x, *cpu.parameters()])
    want = torch.autograd.grad((out_t * g).sum() + fin_t[0].sum(), [x, *ref.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    params = [p.detach().clone().requires_grad_() for p in cpu.parameters()]
    xs = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, s, *ps):
        o, finals = cpu.loop.run(x, [s], list(ps), cpu.layer_sizes[0])
        return (o, *finals)

    assert torch.autograd.gradcheck(f, (xs, s0, *params))


def test_loop_skips_what_only_torch_or_nothing_reads():
    ir, _ = split_output(rewrite(compile_cell("mamba").ir))
    names = {ir.nodes[j].name for j in used_host(ir)}
    assert "conv_w3" not in names  # conv_w3 * u_in feeds only the hoisted conv sum: torch's alone
    gla = rewrite(compile_cell("gla").ir)
    src = matrix_c_source(gla, {"heads": 2, "K": 3, "V": 4, "R": 2, "x": 5})
    bstep = src[src.index("cd_mx_bstep_f64("):]
    bstep = bstep[:bstep.index("\n}\n")]
    assert f"V->v{gla.output_node}[" not in bstep  # the backward's rebuild skips the readout
    assert f"V->v{gla.output_node}[" in src[src.index("cd_mx_fast_f64("):]


def test_hoisted_projection_backward_is_a_view():
    a = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)  # W: heads 2, 3 x 4
    b = torch.randn(5, 1, 4, 1, dtype=torch.float64, requires_grad=True)  # x for 5 steps
    v = matmul(a.detach(), b)  # (x's path only: W's own indexing is one small parameter)
    torch.testing.assert_close(v, torch.einsum("hrk,nkc->nhrc", a[0], b[:, 0]))
    seen, todo = set(), [v.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
    names = {type(f).__name__ for f in seen}
    assert "SelectBackward0" not in names  # its backward zero-fills x's shape per projection
    assert torch.autograd.gradcheck(matmul, (a, b))
