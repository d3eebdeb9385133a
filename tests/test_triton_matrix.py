"""The Triton schedule of matrix-memory cells (targets/triton/matrix_emit.py, matrix_loop.py) on the
interpreter (TRITON_INTERPRET=1), in float64: every matrix-state zoo cell against the einsum references
of tests/matrix_references.py (written from the papers) and against backend="torch": outputs, final
states and the gradients of the input, the initial states and the parameters; multi-head with
K != V != heads; T = 1; a checkpoint interval that does not divide T; packed, bidirectional, 2 layers.
AOT: the kernels compile for sm_80 and sm_90 (one cell by default, the rest `slow`).

What this does not prove: speed, and that a GPU runs them (the `gpu` tests are for a lent GPU; until
they pass there the schedule stays opt-in: backend="triton" only)."""

from __future__ import annotations

import pytest
import torch
from matrix_layers import COLUMN_SCALE, REFERENCES, I, matrix_layer, random_states, ref_params, weighted_grads
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from celldsl.compiler import compile_cell, compile_source
from celldsl.lang.errors import CellError
from celldsl.targets.triton.choice import VERIFIED_ON_HARDWARE
from celldsl.targets.triton.matrix_loop import MATRIX_SCHEDULE, TritonMatrixLoop, aot_jobs

T, N = 5, 2  # the sizes: tests/matrix_layers.py
CELLS = sorted(REFERENCES)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


PREV_CELLS = ("mamba", "rwkv6")  # prev(): run against their references in tests/test_matrix_prev.py


def test_every_matrix_cell_runs():
    """Every zoo matrix cell has a Triton loop; those with prev() are tested in test_matrix_prev.py."""
    from celldsl.compiler import CompiledMatrixCell
    from celldsl.resources import ZOO

    matrix = sorted(p.stem for p in ZOO.glob("*.cell")  # no heads (flstm): test_lowrank_cells.py
                    if isinstance(compile_cell(str(p)), CompiledMatrixCell) and compile_cell(str(p)).ir.heads)
    assert matrix == sorted([*CELLS, *PREV_CELLS])
    for cell in matrix:
        assert isinstance(compile_cell(f"cells/{cell}.cell").loop("triton"), TritonMatrixLoop)


def _layer(cell, backend="triton", checkpoint=2, **kw):
    """The zoo cell on the Triton loop in segments of `checkpoint` steps (or on `backend`)."""
    return matrix_layer(f"cells/{cell}.cell", backend, checkpoint=checkpoint, **kw)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("steps", [1, T])
def test_matches_reference_and_torch(cell, steps):
    """checkpoint=2 does not divide T=5 (segments 2, 2, 1); at T=1 the one segment is one step."""
    layer, twin = _layer(cell), _layer(cell, backend="torch")
    x = torch.randn(steps, N, I, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, N)
    out, finals = layer(x, state0)
    ref_out, ref_finals = REFERENCES[cell](ref_params(layer), x, tuple(s[0] for s in state0))
    torch_out, torch_finals = twin(x, state0)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, torch_out, rtol=1e-12, atol=1e-12)
    for a, b, c in zip(finals, ref_finals, torch_finals, strict=True):
        torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    got = weighted_grads(out, finals, [x, *state0, *layer.parameters()])
    want = weighted_grads(ref_out, [f[None] for f in ref_finals], [x, *state0, *layer.parameters()])
    twin_got = weighted_grads(torch_out, torch_finals, [x, *state0, *twin.parameters()])
    for a, b, c in zip(got, want, twin_got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("checkpoint", [1, 3, 4, 7, 16])
def test_checkpoint_interval(checkpoint):
    """Any interval gives the same gradients: 3 and 4 do not divide T=7, 16 is one segment longer than T."""
    layer, twin = _layer("mlstm", checkpoint=checkpoint), _layer("mlstm", backend="torch")
    x = torch.randn(7, N, I, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, N)
    out, finals = layer(x, state0)
    want_out, want_finals = twin(x, state0)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    got = weighted_grads(out, finals, [x, *state0, *layer.parameters()])
    want = weighted_grads(want_out, want_finals, [x, *state0, *twin.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell", ["gla", "deltanet"])
def test_packed_bidirectional_two_layers(cell):
    """Each sequence's state stops at its own last step (the kernels read the lengths), both
    directions, two layers, against the torch backend."""
    layer = _layer(cell, num_layers=2, bidirectional=True)
    twin = _layer(cell, backend="torch", num_layers=2, bidirectional=True)
    lengths = torch.tensor([4, 1, 3])
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, 3)
    results = []
    for m in (layer, twin):
        out, finals = m(pack_padded_sequence(x, lengths, enforce_sorted=False), state0)
        out = pad_packed_sequence(out)[0]
        results.append((out, finals, weighted_grads(out, finals, [x, *state0, *m.parameters()])))
    (a, fa, ga), (b, fb, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for u, v in zip([*fa, *ga], [*fb, *gb], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)


def test_gradcheck():
    """The generated reverse-time backward against finite differences, for the input and the initial
    state (small: the interpreter is slow, ~20 s; with every parameter too it took 4.4 min in CI; the
    parameters' gradients are compared with the references and the torch loop in float64 above)."""
    layer = _layer("gated_deltanet", checkpoint=2)
    x = torch.randn(3, 1, I, dtype=torch.float64, requires_grad=True)
    state0 = random_states(layer, 1)
    params = [p.detach() for p in layer.parameters()]

    def run(x, s):
        out, finals = layer.loop.run(x, [s[0]], params, layer.layer_sizes[0])
        return out, *finals

    assert torch.autograd.gradcheck(run, (x, state0[0]), eps=1e-6, atol=1e-7)


def test_float32_storage():
    """float32 tensors compute in float32 (COMPUTE), close to the float64 torch loop."""
    layer, twin = _layer("hgrn2"), _layer("hgrn2", backend="torch")
    x = torch.randn(T, N, I, dtype=torch.float64)
    want, _ = twin(x)
    out, _ = layer.float()(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_opt_in_only():
    """No GPU has run the schedule: it is not verified, and backend="auto" never picks it."""
    assert MATRIX_SCHEDULE not in VERIFIED_ON_HARDWARE
    compiled = compile_cell("cells/gla.cell")
    assert not isinstance(compiled.loop("auto"), TritonMatrixLoop)
    assert isinstance(compiled.loop("triton"), TritonMatrixLoop)


def test_refuses_a_state_shared_by_the_heads():
    """The emitter keeps one state per (sequence, head): an IR whose state is not per head (the
    language requires 'per head' today, so the IR is edited) is refused at the state, located."""
    import dataclasses

    from celldsl.targets.triton.matrix_emit import matrix_triton_source

    ir = compile_cell("cells/gla.cell").ir
    kinds = {**ir.kinds, "S": dataclasses.replace(ir.kinds["S"], head=False)}
    with pytest.raises(CellError) as err:
        matrix_triton_source(dataclasses.replace(ir, kinds=kinds))
    assert "gla.cell:" in str(err.value) and "not per head" in str(err.value)
    line = int(str(err.value).split("gla.cell:")[1].split(":")[0])
    assert open("cells/gla.cell", encoding="utf-8").read().splitlines()[line - 1].startswith("state S")


def test_no_cell_name_in_the_source():
    """States, parameters and widths are numbered: no name from the cell text reaches the kernels."""
    text = (open("cells/gla.cell", encoding="utf-8").read()
            .replace("W_a1", "zq_lowrank").replace("S'", "zq_mem'").replace("S +", "zq_mem +")
            .replace("state S", "state zq_mem"))
    loop = compile_source("renamed.cell", text).loop("triton")
    assert "zq_" not in loop.source and "W_a1" not in loop.source


# ---- AOT: the kernels are valid Triton for sm_80 and sm_90 (no GPU) ---------------------------------

AOT_SIZES = {"heads": 4, "K": 16, "V": 32, "R": 16, "x": 64, "R_d": 16, "D": 64, "N_s": 16, "O": 64}


def _aot(cell, text=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = compile_cell(f"cells/{cell}.cell") if text is None else compile_source(f"{cell}.cell", text)
    loop = compiled.loop("triton")
    built = []
    for name, fn, signature, constexprs in aot_jobs(loop, AOT_SIZES):
        for capability in (80, 90):
            kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                    target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
            assert len(kernel.asm["ptx"]) > 0 and len(kernel.asm["cubin"]) > 0
            built.append((name, capability))
    assert built == [(n, c) for n in ("matrix_forward_kernel", "matrix_backward_kernel") for c in (80, 90)]


@pytest.fixture
def aot_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_aot_gla(aot_env):
    _aot("gla")


def test_aot_rwkv6(aot_env):
    """A cell with prev(): its kernels read the hoisted values (q) and write their gradients (dq)."""
    _aot("rwkv6")


def test_aot_a_product_with_a_diag_on_the_right(aot_env):
    """S @ diag(a) (the IR's scale(S, aᵀ): S's columns times a row tile; gla covers diag(a) @ S)."""
    _aot("colscale", COLUMN_SCALE)


@pytest.mark.slow
@pytest.mark.parametrize("cell", [c for c in [*CELLS, *PREV_CELLS] if c not in ("gla", "rwkv6")])
def test_aot_every_cell(aot_env, cell):
    _aot(cell)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels' numbers")
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_matches_torch(cell, monkeypatch):
    """On a lent GPU (compiled kernels, not the interpreter): float64 against the torch loop, forward,
    final states and gradients, with a checkpoint interval that does not divide T."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer, twin = _layer(cell, checkpoint=4).cuda(), _layer(cell, backend="torch").cuda()
    x = torch.randn(9, N, I, dtype=torch.float64, device="cuda", requires_grad=True)
    out, finals = layer(x)
    want, want_finals = twin(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    got = weighted_grads(out.cpu(), [f.cpu() for f in finals], [x, *layer.parameters()])
    ref = weighted_grads(want.cpu(), [f.cpu() for f in want_finals], [x, *twin.parameters()])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_bench_gpu_matrix_dry_run():
    """bench/gpu_matrix.py --dry-run's code path on the CPU: each celldsl row runs and agrees with the
    torch loop; the fla rows say why they are empty (no timing is checked or claimed)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_matrix.py"
    spec = importlib.util.spec_from_file_location("celldsl_bench_gpu_matrix", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    result = bench.rows(True, ["gla", "deltanet"], 0, 1)
    impls = [(cell, impl) for cell, impl, *_ in result]
    assert impls == [(c, i) for c in ("gla", "deltanet")
                     for i in ("celldsl torch", "celldsl triton", "fla fused_recurrent (dry run)")]
    for cell, impl, fwd, both, diff in result:
        if impl.startswith("celldsl"):
            assert diff < 1e-10 and fwd > 0 and both > 0, (cell, impl)
    assert "| gla | celldsl triton |" in bench.table(result, True)
