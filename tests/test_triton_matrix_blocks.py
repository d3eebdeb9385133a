"""The value-block split of the Triton matrix schedule (matrix_emit.value_width, matrix_loop.blocks):
one program per (sequence, head, block of the state's value rows), on the interpreter in float64.

V = 5 split in blocks of 2 (3 programs, the last one masked) and of 4 (2 programs), against the einsum
references of tests/matrix_references.py and backend="torch": outputs, final states, and the gradients
of the input, the initial states and every parameter (the shared per-step vectors' gradients are the
sum of the blocks' partial ones). The decision is read from the IR: m2rnn's `H @ W` contracts the value
width, so it keeps one program. AOT: the split kernels compile for sm_80 and sm_90.

What this does not prove: that a GPU runs them (no GPU has; the schedule stays opt-in)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from matrix_layers import REFERENCES, I, matrix_layer, random_states, ref_params, weighted_grads
from test_triton_matrix import AOT_SIZES, N

from celldsl.compiler import compile_cell
from celldsl.targets.triton.matrix_emit import split_blocker, value_width
from celldsl.targets.triton.matrix_loop import TritonMatrixLoop, aot_jobs


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _layer(cell, backend="triton", **kw):
    """The zoo cell on the Triton loop in segments of 2 steps (or on `backend`)."""
    return matrix_layer(f"cells/{cell}.cell", backend, checkpoint=2, **kw)


@pytest.mark.parametrize(("cell", "block"), [("gla", 2), ("mlstm", 4), ("deltanet", 2)])
def test_split_matches_reference_and_torch(cell, block):
    """V=5 in blocks of `block` (5 is divisible by neither); T=3 with checkpoints every 2 steps."""
    layer, twin = _layer(cell), _layer(cell, backend="torch")
    layer.loop.value_block = block
    sizes = layer.layer_sizes[0]
    assert layer.loop.split == "V" and layer.loop.blocks(sizes) == -(-5 // block) > 1
    x = torch.randn(3, N, I, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, N)
    out, finals = layer(x, state0)
    ref_out, ref_finals = REFERENCES[cell](ref_params(layer), x, tuple(s[0] for s in state0))
    torch_out, torch_finals = twin(x, state0)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, torch_out, rtol=1e-12, atol=1e-12)
    for a, b, c in zip(finals, ref_finals, torch_finals, strict=True):
        torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    wrt = [x, *state0, *layer.parameters()]
    got = weighted_grads(out, finals, wrt)
    want = weighted_grads(ref_out, [f[None] for f in ref_finals], wrt)
    twin_got = weighted_grads(torch_out, torch_finals, [x, *state0, *twin.parameters()])
    for a, b, c in zip(got, want, twin_got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def test_split_packed_sequences():
    """Packed lengths with a split: each block's state stops at its sequence's last step."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    layer, twin = _layer("mlstm"), _layer("mlstm", backend="torch")
    layer.loop.value_block = 2
    lengths = torch.tensor([3, 1])
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, N)
    results = []
    for m in (layer, twin):
        out, finals = m(pack_padded_sequence(x, lengths, enforce_sorted=False), state0)
        out = pad_packed_sequence(out)[0]
        results.append((out, finals, weighted_grads(out, finals, [x, *state0, *m.parameters()])))
    (a, fa, ga), (b, fb, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for u, v in zip([*fa, *ga], [*fb, *gb], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)


def test_split_with_hoisted_values():
    """rwkv6 (prev(): its r, k, w ... are read per step as hoisted values, whose gradients each block
    writes in part): V = 4 in blocks of 2, against backend="torch" with the same parameters."""
    sizes = {"heads": 2, "K": 3, "V": 4, "R": 2, "R_d": 3}
    layer, twin = _layer("rwkv6", sizes=sizes, inputs=5), _layer("rwkv6", "torch", sizes=sizes, inputs=5)
    twin.load_state_dict(layer.state_dict())
    layer.loop.value_block = 2
    assert layer.loop.split == "V" and layer.loop.blocks(layer.layer_sizes[0]) == 2
    x = torch.randn(3, N, 5, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, N)
    out, finals = layer(x, state0)
    want, want_finals = twin(x, state0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(finals, want_finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    got = weighted_grads(out, finals, [x, *state0, *layer.parameters()])
    ref = weighted_grads(want, want_finals, [x, *state0, *twin.parameters()])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_split_decision():
    """Read from the IR: the value width where no node couples its rows, None where one does (m2rnn's
    W is V x V and `H @ W` contracts V, and `qᵀ @ H'` contracts K), and the node that blocks it is named."""
    assert {c: value_width(compile_cell(f"cells/{c}.cell").ir)
            for c in ("gla", "mlstm", "deltanet", "hgrn2", "m2rnn")} == {
        "gla": "V", "mlstm": "V", "deltanet": "V", "hgrn2": "V", "m2rnn": None}
    ir = compile_cell("cells/m2rnn.cell").ir
    blocker = ir.nodes[split_blocker(ir, "V")]  # the first of them: W, a V x V tile (mixes rows)
    assert (blocker.op, blocker.kind.rows, blocker.kind.cols) == ("param", "V", "V")
    assert any(n.op == "matmul" and ir.nodes[n.args[0]].kind.cols == "V" for n in ir.nodes)  # H @ W
    # gla's K rows: `qᵀ @ S'` contracts K (diag(alpha) @ S is a scale node: row by row), so K is not
    # split, V is
    gla = compile_cell("cells/gla.cell").ir
    blocker = gla.nodes[split_blocker(gla, "K")]
    assert blocker.op == "matmul" and gla.nodes[blocker.args[0]].kind.cols == "K"
    loop = TritonMatrixLoop(ir, value_block=2)
    assert loop.split is None and loop.blocks({"heads": 3, "K": 4, "V": 5}) == 1


def test_unsplit_cell_runs_single_block():
    """m2rnn with a small value_block still runs one program per (sequence, head), against torch."""
    layer, twin = _layer("m2rnn"), _layer("m2rnn", backend="torch")
    layer.loop.value_block = 2
    x = torch.randn(2, N, I, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, N)
    out, finals = layer(x, state0)
    want, want_finals = twin(x, state0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    got = weighted_grads(out, finals, [x, *state0, *layer.parameters()])
    ref = weighted_grads(want, want_finals, [x, *state0, *twin.parameters()])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_reduction_over_values_blocks_the_split():
    """An IR edited so that gla's output sums S' over everything: V no longer splits."""
    ir = compile_cell("cells/gla.cell").ir
    assert value_width(ir) == "V"
    s_new = ir.new_state["S"]
    total = dataclasses.replace(ir.nodes[s_new], op="sum", args=(s_new,),
                                kind=dataclasses.replace(ir.nodes[s_new].kind, rows="1", cols="1"))
    edited = dataclasses.replace(ir, nodes=[*ir.nodes, total])
    assert split_blocker(edited, "V") == len(ir.nodes) and value_width(edited) is None


@pytest.mark.parametrize("value_block", [0, 3, True, 2.0])
def test_value_block_must_be_a_power_of_two(value_block):
    with pytest.raises(ValueError, match="power of two"):
        TritonMatrixLoop(compile_cell("cells/gla.cell").ir, value_block=value_block)


@pytest.fixture
def aot_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_aot_split_mlstm(aot_env):
    """mlstm's kernels with V=32 in blocks of 16 (2 programs per head) compile for sm_80 and sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    loop = compile_cell("cells/mlstm.cell").loop("triton")
    loop.value_block = 16
    assert loop.blocks(AOT_SIZES) == 2
    for name, fn, signature, constexprs in aot_jobs(loop, AOT_SIZES):
        for capability in (80, 90):
            kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                    target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
            assert len(kernel.asm["cubin"]) > 0, (name, capability)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled split kernels")
@pytest.mark.parametrize("cell", ["gla", "mlstm", "deltanet"])
def test_gpu_split_matches_torch(cell, monkeypatch):
    """On a lent GPU (compiled kernels, not the interpreter): V = 5 in blocks of 2, float64, against
    the torch loop, forward, final states and gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer, twin = _layer(cell).cuda(), _layer(cell, backend="torch").cuda()
    layer.loop.value_block = 2
    x = torch.randn(9, N, I, dtype=torch.float64, device="cuda", requires_grad=True)
    out, finals = layer(x)
    want, want_finals = twin(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    got = weighted_grads(out.cpu(), [f.cpu() for f in finals], [x, *layer.parameters()])
    ref = weighted_grads(want.cpu(), [f.cpu() for f in want_finals], [x, *twin.parameters()])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
