"""The Triton schedules (persistent, fused_step, time_loop, scan) on Triton's CPU interpreter, against
the torch backend's loop (targets/loop.py, itself checked against hand-written references).

What this proves: the schedules' tile math, indexing, masks and padding (H = 5, 16, 17, 33 against
tiles of 16; batch rows against tiles of 16), the phase order of a step and of its backward, packed
sequences (each column stops at its length), the saved tensors (exactly the torch loop's, so every
backward reads every forward), the final states, every gradient, and the scan's chunks (T across
several chunk boundaries, and T = 1000 at the GPU's chunk of 64).

What it does not prove: the interpreter runs programs one after another, so the persistent kernels
run their SEQUENTIAL form: one program per batch tile doing every hidden slice in turn, phase by
phase, with the weights loaded per slice and no grid barrier. The same kernel source and tile math
run on the GPU, but the barrier's memory ordering, the co-residency of the programs, the weights
staying on chip, cooperative launch and every timing are checked only on hardware
(tests/test_triton_schedules_gpu.py) and by reading the compiled PTX (tests/test_triton_aot.py).
"""

import os
import re

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from zoo import ELEMENTWISE, LAYER_ARGS

import celldsl
from celldsl.compiler import compile_cell
from celldsl.ops.function import split_params
from celldsl.targets.triton.applies import SCHEDULES, declines
from celldsl.targets.triton.choice import ASSUMED, choose
from celldsl.targets.triton.columns import ColumnLoop
from celldsl.targets.triton.schedules import DenseLoop

ZOO_CELLS = ELEMENTWISE  # the matrix cells' Triton schedule: tests/test_triton_matrix.py
PAIRS = [(c, s) for c in ZOO_CELLS for s in SCHEDULES
         if s != "graphed" and declines(compile_cell(c).plan)[s] is None]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_loop(compiled, schedule):
    dense = schedule in ("persistent", "fused_step")
    return DenseLoop(compiled, schedule) if dense else ColumnLoop(compiled, schedule)


def lengths_for(N, T, packed):
    return [T] * N if not packed else [max(1, T - (i * T) // N) for i in range(N)]


def run_both(cell, schedule, H, N, T, dtype, packed, chunk=None, seed=0, I=None):
    """Forward and backward of the torch loop and the schedule's loop on the same inputs:
    (outputs, final states, saved tensors, gradients) of each. I: the concatenated input's width."""
    compiled = compile_cell(cell)
    I = I or (H if compiled.ir.needs_hidden_size else H + 2)
    torch.manual_seed(seed)
    layer = celldsl.Recurrent(cell, I, H, backend="torch", dtype=dtype, **LAYER_ARGS.get(cell, {}))
    ref, loop = compiled.torch_loop, make_loop(compiled, schedule)
    if chunk is not None:
        loop.chunk = chunk
    hw, sw, vec, sc = split_params(ref, layer._weights(0, 0))
    g = torch.Generator().manual_seed(seed + 1)
    rows = sum(compiled.ir.width(n) == "row" for n in compiled.ir.inputs)  # `: 1` inputs follow x's I columns
    x = torch.randn(T, N, I + rows, generator=g, dtype=dtype)
    states = [0.5 * torch.randn(N, H, generator=g, dtype=dtype) for _ in compiled.states]
    batch_sizes = None
    if packed:
        lengths = lengths_for(N, T, True)
        x = pack_padded_sequence(x, torch.tensor(lengths)).data
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
    results = []
    for lp in (ref, loop):
        out, finals, saved = lp.forward(x, states, hw, sw, vec, sc, batch_sizes)
        results.append([out, finals, saved])
    go = torch.randn(results[0][0].shape, generator=g, dtype=dtype)
    gs = [torch.randn(N, H, generator=g, dtype=dtype) for _ in compiled.states]
    gs[-1] = None  # a final state without a gradient
    for lp, r in zip((ref, loop), results, strict=True):
        d = lp.backward(x, states, hw, sw, vec, sc, r[0], r[2], go, gs, batch_sizes)
        r.append([d[0], *d[1], *d[2], *d[3], *d[4], *d[5]])
    return results


def assert_same(results, atol, rtol, normwise=False):
    """normwise: atol scales with the reference tensor's largest entry (at least 1), because a float32
    sum's rounding error scales with its largest terms, not with the result."""
    (out_r, fin_r, saved_r, grad_r), (out_s, fin_s, saved_s, grad_s) = results
    torch.testing.assert_close(out_s, out_r, atol=atol, rtol=rtol)
    pairs = (("final state", fin_s, fin_r), ("saved", saved_s, saved_r), ("gradient", grad_s, grad_r))
    for what, a, b in pairs:
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert u.shape == v.shape, f"{what}[{i}]: {u.shape} vs {v.shape}"
            assert torch.isfinite(u).all(), f"{what}[{i}] has NaN or inf (an unwritten element?)"
            scale = max(1.0, v.abs().max().item()) if normwise else 1.0
            torch.testing.assert_close(u, v, atol=atol * scale, rtol=rtol,
                                       msg=lambda m, w=what, i=i: f"{w}[{i}]: {m}")


# What the schedules' tiles cannot hold (targets/triton/applies.tile_decline), by zoo cell: each is refused
# with its reason, and runs on the graphed path (tests/test_language2.py checks it there).
REFUSED = {
    "ln_gru": "takes a mean or sum over a row",
    "ln_lstm": "takes a mean or sum over a row",
    "lstm_proj": "the state h is P wide, not H",
    "phased_lstm": "the step reads t, one value per sequence",
    "slstm_heads": "is block-diagonal (4 heads)",
}
COLUMN_CELLS = {"indrnn", "sru", "mingru", "minlstm", "qrnn", "qrnn_f"}
# kinds of dense step: one GEMM stage (lstm), two stages with a computed operand (gru_cho's U @ (r * h)),
# a pointwise function before the first GEMM (mut3's tanh(h)): both dense schedules on each
DENSE_KINDS = ("lstm", "gru_cho", "mut3")
# one dense schedule each: the full gate recurrence (the largest GEMM), four states with exponential
# gates, a bias inside the product (r * (U h + b)), two stages reading x elementwise, a combined
# weight (W - Wᵀ - γI), relu's step function
DENSE_ONCE = {"greff_fgr": "persistent", "slstm": "fused_step", "gru": "persistent", "mut1": "fused_step",
              "antisymmetric_rnn": "persistent", "rnn_relu": "fused_step"}
EVERY_CELL = os.environ.get("CELLDSL_EVERY_CELL") == "1"


def _each_kind() -> list[tuple[str, str]]:
    """Both dense schedules on DENSE_KINDS, one on each of DENSE_ONCE, and every column cell on every
    column schedule that applies (they are cheap); CELLDSL_EVERY_CELL=1: every pair (PAIRS), about
    3 minutes more of CI's 2 cores. persistent and fused_step emit the same phase bodies, so the
    cells left out differ from these in gates and constants, not in what the kernels do."""
    if EVERY_CELL:
        return PAIRS
    chosen = [(c, s) for c in DENSE_KINDS for s in ("persistent", "fused_step")] + list(DENSE_ONCE.items())
    return sorted(chosen + [(c, s) for c, s in PAIRS if s in ("time_loop", "scan")])


EACH = _each_kind()


def test_every_dense_and_column_cell_has_its_schedules():
    dense = {c for c in ZOO_CELLS if compile_cell(c).plan.recurrence == "dense"} - set(REFUSED)
    assert {c for c, s in PAIRS if s == "persistent"} == dense == {c for c, s in PAIRS if s == "fused_step"}
    assert {c for c, s in PAIRS if s == "time_loop"} == COLUMN_CELLS
    assert {c for c, s in PAIRS if s == "scan"} == COLUMN_CELLS - {"indrnn", "sru"}
    assert len(dense) == 21  # chrono_lstm (an LSTM, T_max sized: LAYER_ARGS) among them
    assert set(EACH) <= set(PAIRS) and {s for _, s in EACH} == set(SCHEDULES) - {"graphed"}
    assert {c for c, _ in EACH} >= COLUMN_CELLS | set(DENSE_KINDS) | set(DENSE_ONCE)


@pytest.mark.parametrize("cell", sorted(REFUSED))
def test_what_the_tiles_cannot_hold_is_refused_with_the_reason(cell, capsys):
    """Widths other than H, heads, row reductions and one-value-per-sequence inputs: every schedule but
    graphed declines with the reason, explain --sizes shows it and picks graphed, and forcing one is
    a ValueError that says why (never a kernel that computes something else)."""
    from celldsl.cli.main import main

    why = declines(compile_cell(cell).plan)
    assert why["graphed"] is None
    assert all(why[s] for s in SCHEDULES if s != "graphed"), why
    assert REFUSED[cell] in why["persistent"] and REFUSED[cell] in why["fused_step"]
    assert main(["explain", cell, "--sizes", "N=16,H=768"]) == 0
    out = capsys.readouterr().out
    assert "the compiler's choice: graphed" in out
    assert f"persistent does not apply: {why['persistent']}" in out
    expected = f"'persistent' does not apply to cell '{cell}'.*{re.escape(REFUSED[cell])}"
    with pytest.raises(ValueError, match=expected):
        celldsl.Recurrent(cell, 8, 8, backend="triton", schedule="persistent")


ROW_STATE_DENSE = """
cell row_state_dense
input x
state h
state n : 1
output h
param W, U
n' = 0.5 * n
h' = tanh(W @ prev(x) + U @ h) + n'
"""

ROW_STATE_COLUMN = """
cell row_state_column
input x
state h
state n : 1
output h
param W
n' = 0.5 * n
h' = 0.5 * h + W @ prev(x) + n'
"""


@pytest.mark.parametrize("text", [ROW_STATE_DENSE, ROW_STATE_COLUMN], ids=["dense", "column"])
def test_a_row_state_is_refused_by_every_schedule_with_the_reason(text):
    """A `: 1` state (one value per sequence) fits no [rows, H] tile: every schedule the recurrence
    could take says so (the column ones before their own reasons), and forcing one is a ValueError."""
    why = declines(compile_cell(text).plan)
    assert why["graphed"] is None
    kinds = ("persistent", "fused_step") if text is ROW_STATE_DENSE else ("time_loop", "scan")
    for s in kinds:
        assert why[s] and "the state n is one value per sequence (`: 1`)" in why[s], why
        with pytest.raises(ValueError, match=re.escape("the state n is one value per sequence")):
            celldsl.Recurrent(text, 3, 4, backend="triton", schedule=s)


def test_torch_lstm_with_proj_size_refuses_the_dense_schedules():
    """celldsl.LSTM(proj_size=P) runs cells/lstm_proj.cell, whose h is P wide."""
    with pytest.raises(ValueError, match="the state h is P wide"):
        celldsl.LSTM(4, 8, proj_size=3, backend="triton", schedule="persistent")
    assert celldsl.LSTM(4, 8, backend="triton", schedule="persistent").schedule == "persistent"


@pytest.mark.parametrize(("cell", "schedule"), EACH, ids=[f"{c}-{s}" for c, s in EACH])
def test_schedule_matches_torch_loop_float64_packed(cell, schedule):
    """H = 17 (two slices of 16, the second masked), two sequences of lengths 3 and 2."""
    assert_same(run_both(cell, schedule, 17, 2, 3, torch.float64, packed=True), atol=1e-10, rtol=1e-9)


FLOAT32 = [("lstm", "persistent"), ("slstm", "persistent"), ("gru_cho", "fused_step"),
           ("antisymmetric_rnn", "fused_step"), ("sru", "time_loop"), ("qrnn", "scan")]


@pytest.mark.parametrize(("cell", "schedule"), FLOAT32, ids=[f"{c}-{s}" for c, s in FLOAT32])
def test_schedule_matches_torch_loop_float32(cell, schedule):
    """float32 storage and math, padded batch, H = 16 (one full slice), one cell per schedule and kind
    (sLSTM's exponential gates, AntisymmetricRNN's combined weight, QRNN's prev(x)). tl.dot sums in
    another order than the torch loop's GEMMs: 1e-4 relative to each tensor's largest entry. sLSTM's
    exponential gates make its weight gradients reach ~160 at this seed, with terms that cancel: CI's
    CPU once missed a plain 1e-4 by 2.4e-4 on an entry of 1.4 in a tensor whose largest is 157."""
    assert_same(run_both(cell, schedule, 16, 2, 2, torch.float32, packed=False), atol=1e-4, rtol=1e-4,
                normwise=True)


# every H (one partial slice, one full, three with the last partial), N and T at least once
SIZES = [(5, 1, 1), (16, 3, 4), (33, 1, 4), (33, 3, 1)]


@pytest.mark.parametrize(("H", "N", "T"), SIZES, ids=[f"H{h}-N{n}-T{t}" for h, n, t in SIZES])
def test_persistent_lstm_at_every_size(H, N, T):
    assert_same(run_both("lstm", "persistent", H, N, T, torch.float64, packed=N > 1), atol=1e-10, rtol=1e-9)


REPRESENTATIVE = [("gru_cho", "persistent"), ("mut3", "fused_step"), ("sru", "time_loop"), ("mingru", "scan")]


@pytest.mark.parametrize(("H", "N", "T"), [(5, 1, 1), (33, 3, 4)], ids=["H5-N1-T1", "H33-N3-T4"])
@pytest.mark.parametrize(("cell", "schedule"), REPRESENTATIVE, ids=[f"{c}-{s}" for c, s in REPRESENTATIVE])
def test_representative_schedules_at_the_extreme_sizes(cell, schedule, H, N, T):
    """Two GEMM stages (gru_cho's U @ (r * h)), a stage-0 pointwise (mut3's tanh(h)), an output that
    is not a state (sru), a scan."""
    assert_same(run_both(cell, schedule, H, N, T, torch.float64, packed=N > 1), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_scan_across_chunk_boundaries(cell):
    """T = 40 in chunks of 8: five chunks, the state and its gradient carried across four boundaries;
    packed, so sequences end inside chunks."""
    assert_same(run_both(cell, "scan", 5, 3, 40, torch.float64, packed=True, chunk=8), atol=1e-10, rtol=1e-9)


def test_a_thousand_steps_at_the_gpu_chunk():
    """T = 1000 with the GPU's chunk of 64 (16 chunks, the last one partial), float32: the scan's
    rounding differs from the sequential loop's but stays at float32 level."""
    assert_same(run_both("mingru", "scan", 5, 1, 1000, torch.float32, packed=False, chunk=64), atol=2e-5,
                rtol=1e-5)


# ---- through the layers -------------------------------------------------------------------------


LAYER_CASES = [("lstm", "persistent"), ("rnn_tanh", "fused_step"), ("sru", "time_loop"), ("mingru", "scan"),
               ("minlstm", "auto"), ("sum_step", "scan"), ("output_projection", "time_loop")]


@pytest.mark.parametrize(("cell", "schedule"), LAYER_CASES, ids=[f"{c}-{s}" for c, s in LAYER_CASES])
def test_layer_schedule_two_layers_bidirectional_packed(cell, schedule):
    """`schedule=` on Recurrent: 2 layers, bidirectional (SRU: one direction), packed, float32, against
    backend="torch"."""
    torch.manual_seed(0)
    # issue 26: a mean in the step (whole-row programs), an output projection (the states' kernels first)
    cell = {"sum_step": SUM_STEP, "output_projection": OUTPUT_PROJECTION}.get(cell, cell)
    square = compile_cell(cell).ir.needs_hidden_size  # SRU's x meets h: every layer's input is H wide
    I, both = (16, False) if square else (6, True)
    ref = celldsl.Recurrent(cell, I, 16, num_layers=2, bidirectional=both, backend="torch")
    tri = celldsl.Recurrent(cell, I, 16, num_layers=2, bidirectional=both, backend="triton",
                            schedule=schedule)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, I, generator=torch.Generator().manual_seed(3))
    results = []
    for m in (ref, tri):
        xx = x.clone().requires_grad_()
        out, final = m(pack_padded_sequence(xx, torch.tensor([3, 2, 1])))
        final = final if isinstance(final, tuple) else (final,)
        loss = out.data.square().sum() + sum((f * f.detach().sign()).sum() for f in final)
        results.append([out.data, *final, *torch.autograd.grad(loss, [xx, *m.parameters()])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


GRADCHECK = [("lstm", "persistent"), ("sru", "time_loop"), ("minlstm", "scan")]


@pytest.mark.parametrize(("cell", "schedule"), GRADCHECK, ids=[f"{c}-{s}" for c, s in GRADCHECK])
def test_gradcheck_float64(cell, schedule):
    """The schedules' backward kernels against finite differences of their own forward kernels (the
    fused_step kernels run the persistent ones' phase bodies with a K loop; they are checked against
    the torch loop, whose backward is gradchecked in tests/test_gradcheck.py)."""
    hidden = 3
    I = hidden if compile_cell(cell).ir.needs_hidden_size else 4
    torch.manual_seed(0)
    m = celldsl.Recurrent(cell, I, hidden, backend="triton", schedule=schedule, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 2, I, dtype=torch.float64, requires_grad=True)
    states = tuple((0.5 * torch.randn(1, 2, hidden, dtype=torch.float64)).requires_grad_()
                   for _ in m.compiled.states)
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

    def f(x, *rest):
        st, ps = rest[: len(states)], rest[len(states):]
        out, final = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, st))
        return (out, *(final if isinstance(final, tuple) else (final,)))

    assert torch.autograd.gradcheck(f, (x, *states, *params), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_persistent_half_storage_computes_in_fp32(dtype):
    """bf16/fp16 storage, fp32 tl.dot accumulation and pointwise math, the cell state carried in
    fp32: within the storage dtype's rounding of the float32 torch loop on the same rounded weights."""
    torch.manual_seed(0)
    ref = celldsl.Recurrent("lstm", 6, 16, backend="torch")
    tri = celldsl.Recurrent("lstm", 6, 16, backend="triton", schedule="persistent").to(dtype)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in tri.state_dict().items()})
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    out_t, (h_t, c_t) = tri(x)
    out_r, (h_r, c_r) = ref(x.float())
    assert out_t.dtype == dtype
    eps = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out_t.float(), out_r, atol=4 * eps, rtol=0)
    torch.testing.assert_close(c_t.float(), c_r, atol=4 * eps, rtol=0)


# ---- the choice and its errors ---------------------------------------------------------------------


LINEAR_USER_CELL = """
cell leaky_integrator
input x
state h, g
output y
param W, U, b, v
param k : scalar
a = sigmoid(W @ x + b)
h' = a * h + (1 - a) * tanh(U @ x)
g' = k * g + v * (U @ x)
y = tanh(h') * v + g' * g'
"""

MIXED_USER_CELL = """
cell mixed
input x
state h, g
output h
param W, b
h' = 0.5 * h + 0.1 * g + W @ x
g' = 0.3 * g + b
"""


def test_a_linear_user_cell_gets_the_scan(capsys):
    """Linearity and the coefficients come from the SymPy form, not the name: a cell outside the zoo,
    two states, an output that is not a state (its gradient reaches lambda through the state it
    reads). explain names the scan as the choice; the scan matches the torch loop."""
    from celldsl.cli.explain import explain
    from celldsl.cli.main import main

    compiled = compile_cell(LINEAR_USER_CELL)
    text = explain(compiled, {"N": 16, "H": 768})
    assert "the compiler's choice: scan" in text
    assert "the CUDA default: graphed" in text
    assert choose(compiled.plan, 16, 768, 1024, "bfloat16", ASSUMED)[0] == "scan"
    assert_same(run_both(LINEAR_USER_CELL, "scan", 5, 3, 10, torch.float64, packed=True, chunk=4),
                atol=1e-10, rtol=1e-9)
    assert main(["explain", "mingru", "--sizes", "N=16,H=768"]) == 0
    assert "the compiler's choice: scan" in capsys.readouterr().out


def test_a_linear_cell_that_mixes_states_gets_no_scan():
    why = declines(compile_cell(MIXED_USER_CELL).plan)
    assert why["scan"] and "reading the state(s) g" in why["scan"]
    assert why["time_loop"] is None
    assert_same(run_both(MIXED_USER_CELL, "time_loop", 5, 3, 4, torch.float64, packed=False), atol=1e-10,
                rtol=1e-9)


def test_dense_choice_follows_the_sizes():
    plan = compile_cell("lstm").plan
    assert choose(plan, 16, 768, 1024, "bfloat16", ASSUMED)[0] == "persistent"
    assert choose(plan, 16, 2048, 1024, "bfloat16", ASSUMED)[0] == "fused_step"  # weights too large
    assert choose(plan, 256, 1024, 128, "bfloat16", ASSUMED)[0] == "fused_step"  # too many programs
    assert choose(plan, 16, 768, 1024, "float32", ASSUMED)[0] == "fused_step"  # fp32 weights: 256 KiB


def test_schedules_that_do_not_apply_are_clear_errors():
    with pytest.raises(ValueError, match="'scan' does not apply to cell 'lstm'.*graphed, persistent"):
        celldsl.Recurrent("lstm", 4, 4, backend="triton", schedule="scan")
    with pytest.raises(ValueError, match="schedule 'persistent' does not apply to cell 'mingru'"):
        celldsl.GRU  # noqa: B018 - the classic layers take schedule= too
        celldsl.Recurrent("mingru", 4, 4, schedule="persistent")
    with pytest.raises(ValueError, match="schedule must be one of"):
        celldsl.LSTM(4, 4, schedule="fastest")
    with pytest.raises(ValueError, match="backend='torch' has none"):
        celldsl.Recurrent("lstm", 4, 4, backend="torch", schedule="persistent")


def test_a_forced_schedule_that_does_not_fit_says_what_to_use(monkeypatch):
    """On the GPU path (not the interpreter) a persistent launch that cannot fit raises before it
    launches anything; configure gives the reason on an assumed H100/H200."""
    from celldsl.targets.triton.choice import configure

    c = configure(compile_cell("lstm").plan, "persistent", 16, 2048, 1024, "bfloat16", ASSUMED)
    assert not c.fits and "exceed the on-chip budget" in c.why
    monkeypatch.delenv("TRITON_INTERPRET")
    layer = celldsl.Recurrent("lstm", 4, 4, backend="triton", schedule="persistent")
    with pytest.raises(ValueError, match="needs CUDA tensors|runs on the Triton backend"):
        layer(torch.randn(2, 1, 4))


def test_explain_without_sizes_lists_the_schedules_and_why_not(capsys):
    from celldsl.cli.main import main

    assert main(["explain", "sru"]) == 0
    out = capsys.readouterr().out
    assert "time_loop  applies" in out and "scan       does not apply: the recurrence is elementwise" in out
    assert "persistent does not apply" in out
    with pytest.raises(SystemExit):
        main(["explain", "sru", "--sizes", "N=16"])
    assert "--sizes needs H" in capsys.readouterr().err


# ---- user names in the schedules' kernels ------------------------------------------------------------


def _rename(text: str, names: dict[str, str]) -> str:
    import re

    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m.group(1)], text)


DENSE_TWIN = """
cell twin
input x
state h, c
output h
param W, U, R, b, v
param k : scalar
g = sigmoid(W @ x + U @ h + b + k)
c' = g * c + (1 - g) * tanh(R @ (g * h) + v * c)
h' = tanh(c') * g
"""


@pytest.mark.parametrize("schedule", ["persistent", "fused_step"])
def test_dense_kernels_with_their_own_locals_as_user_names(schedule):
    """States, parameters and inputs named after the dense kernels' own locals and arguments compute
    what the plain names compute (the scope is seeded with every fixed name)."""
    names = {"x": "rows", "h": "cols", "c": "kk", "W": "w0_0", "U": "weight0_ptr", "R": "mask", "b": "live",
             "v": "t", "k": "BLOCK_N", "g": "lib"}
    plain = run_both(DENSE_TWIN, schedule, 17, 3, 3, torch.float64, packed=True)
    odd = run_both(_rename(DENSE_TWIN, names), schedule, 17, 3, 3, torch.float64, packed=True)
    assert_same(odd, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(odd[1][0], plain[1][0])


COLUMN_TWIN = """
cell twin
input x
state h
output h
param W, V, b, v
param k : scalar
z = sigmoid(W @ x + b)
h' = (1 - z) * h + z * (V @ x) * k + v
"""


@pytest.mark.parametrize("schedule", ["time_loop", "scan"])
def test_column_kernels_with_their_own_locals_as_user_names(schedule):
    names = {"x": "offs", "h": "unit", "W": "batch", "V": "inside", "b": "live", "v": "at", "k": "CHUNK",
             "z": "scan_coefficients"}
    plain = run_both(COLUMN_TWIN, schedule, 5, 3, 6, torch.float64, packed=True, chunk=4)
    odd = run_both(_rename(COLUMN_TWIN, names), schedule, 5, 3, 6, torch.float64, packed=True, chunk=4)
    assert_same(odd, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(odd[1][0], plain[1][0])


# ---- issue 26, item 5: the column schedules where the dense kernels' tiles do not reach -------------------


SUM_STEP = """
cell sum_step
input x
state h
output h
param W, U, b
z = W @ x
a = sigmoid(U @ x + b)
h' = a * h + (1 - a) * (z - mean(z)) + 0.1 * sum(z)
"""

ROW_INPUT = """
cell row_input
input x
input dt : 1
state h
output h
param W, b
param k : scalar
a = exp(-softplus(b) * dt)
h' = a * h + (1 - a) * tanh(W @ x) + k * dt
"""

HEADS_INPUT = """
cell heads_input
input x
state h
output h
param W : heads(2)
param U, b
a = sigmoid(U @ x + b)
h' = a * h + (1 - a) * (W @ x)
"""

# elementwise (not linear) with a mean in the step whose backward reduces too, and an output that is no
# state: time_loop only
SUM_ELEMENTWISE = """
cell sum_elementwise
input x
state h
output y
param W, v
z = W @ x
h' = tanh(h + z - mean(z * v))
y = h' * sum(z)
"""

# (cell, H, I or None): H = 17 puts a masked tail in the whole-row programs (BLOCK 32); heads need I = H even
CHEAP = {"sum_step": (SUM_STEP, 17, None), "row_input": (ROW_INPUT, 5, 8), "heads_input": (HEADS_INPUT, 6, 6),
         "sum_elementwise": (SUM_ELEMENTWISE, 17, None)}
CHEAP_PAIRS = [(c, s) for c in CHEAP for s in ("time_loop", "scan") if (c, s) != ("sum_elementwise", "scan")]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("cell", "schedule"), CHEAP_PAIRS, ids=[f"{c}-{s}" for c, s in CHEAP_PAIRS])
def test_cheap_schedules_keep_sum_row_inputs_and_heads(cell, schedule, packed):
    """A mean or sum in the step (programs that hold whole rows), a `: 1` input (one load per row; its
    gradient the sum over the row) and heads on an input projection (a torch GEMM before the loop) keep
    time_loop and scan: the same forward, final states, saved tensors and every gradient as the torch
    loop in float64, padded and packed, T = 6 across two scan chunks of 4."""
    text, H, I = CHEAP[cell]
    why = declines(compile_cell(text).plan)
    assert why[schedule] is None, why
    assert why["persistent"], "the dense kernels still refuse these (their tiles hold slices of a row)"
    assert_same(run_both(text, schedule, H, 3, 6, torch.float64, packed=packed, chunk=4, I=I), atol=1e-10,
                rtol=1e-9)


def test_an_elementwise_sum_cell_has_no_scan():
    assert "not linear" in declines(compile_cell(SUM_ELEMENTWISE).plan)["scan"]


@pytest.mark.parametrize("schedule", ["time_loop", "scan"])
def test_cheap_schedule_gradcheck_through_the_layer(schedule):
    """A `: 1` input and a mean in one step, through Recurrent: gradcheck of the schedule's own backward
    kernels against finite differences of its forward kernels."""
    text = """
cell both
input x
input dt : 1
state h
output h
param W, U, b
z = W @ x
a = sigmoid(U @ x + b) * exp(-dt * dt)
h' = a * h + (1 - a) * (z - mean(z))
"""
    torch.manual_seed(0)
    m = celldsl.Recurrent(text, 3, 3, backend="triton", schedule=schedule, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    dt = torch.rand(3, 2, 1, dtype=torch.float64).requires_grad_()
    h0 = (0.5 * torch.randn(1, 2, 3, dtype=torch.float64)).requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

    def f(x, dt, h0, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, h0), {"dt": dt})

    assert torch.autograd.gradcheck(f, (x, dt, h0, *params), fast_mode=True)


OUTPUT_PROJECTION = """
cell output_projection
input x
state h
output y
param W, U, V, b
a = sigmoid(U @ x + b)
h' = a * h + (1 - a) * tanh(W @ x)
y = tanh(V @ h')
"""

# two states, two output GEMMs (one on a product of a new and an old state), an input projection both the
# states and the output read
OUTPUT_PROJECTION_2 = """
cell output_projection2
input x
state h, c
output y
param W, U, V, R, b
param k : scalar
a = sigmoid(U @ x + b)
c' = a * c + (1 - a) * tanh(W @ x)
h' = 0.9 * h + k * (W @ x)
y = tanh(V @ (c' * h) + R @ h') * (U @ x)
"""

# elementwise, a mean in the step (whole-row programs) and an output reading the old state too
OUTPUT_PROJECTION_MEAN = """
cell output_projection_mean
input x
state h
output y
param W, V, v
h' = tanh(h + W @ x - mean(W @ x))
y = V @ (h' * v) + h
"""

PROJECTED = {"output_projection": OUTPUT_PROJECTION, "output_projection2": OUTPUT_PROJECTION_2,
             "output_projection_mean": OUTPUT_PROJECTION_MEAN}
PROJECTED_PAIRS = [(c, s) for c in PROJECTED for s in ("time_loop", "scan")
                   if (c, s) != ("output_projection_mean", "scan")]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("cell", "schedule"), PROJECTED_PAIRS, ids=[f"{c}-{s}" for c, s in PROJECTED_PAIRS])
def test_an_output_projection_keeps_the_column_schedules(cell, schedule, packed):
    """A per-step GEMM only the output reads: the states' plan runs in the column kernels, then the output
    of every step at once from the previous states; the output's gradient of each previous state enters
    the states' backward kernels as a direct gradient. Forward, final states, saved tensors (the torch
    loop's) and every gradient against the torch loop in float64, T = 6 across two scan chunks."""
    text = PROJECTED[cell]
    plan = compile_cell(text).plan
    assert plan.gemms and plan.recurrence != "dense"
    assert declines(plan)[schedule] is None, declines(plan)
    assert_same(run_both(text, schedule, 17, 3, 6, torch.float64, packed=packed, chunk=4), atol=1e-10,
                rtol=1e-9)


def test_an_output_projection_of_an_input_the_states_do_not_read_is_refused():
    text = OUTPUT_PROJECTION.replace("param W, U, V, b", "param W, U, V, b, Z").replace(
        "y = tanh(V @ h')", "y = tanh(V @ h' + Z @ x)")
    why = declines(compile_cell(text).plan)
    assert why["persistent"] is None
    for s in ("time_loop", "scan"):
        assert "the output reads an input projection the states do not" in why[s], why
        with pytest.raises(ValueError, match="the output reads an input projection the states do not"):
            celldsl.Recurrent(text, 4, 4, backend="triton", schedule=s)


@pytest.mark.parametrize("schedule", ["time_loop", "scan"])
def test_output_projection_gradcheck_through_the_layer(schedule):
    torch.manual_seed(0)
    m = celldsl.Recurrent(OUTPUT_PROJECTION_2, 4, 3, backend="triton", schedule=schedule, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    states = tuple((0.5 * torch.randn(1, 2, 3, dtype=torch.float64)).requires_grad_() for _ in range(2))
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

    def f(x, h0, c0, *ps):
        out, final = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, (h0, c0)))
        return (out, *final)

    assert torch.autograd.gradcheck(f, (x, *states, *params), fast_mode=True)


def test_explain_calls_an_output_projection_no_gemm_on_the_state(capsys, tmp_path):
    """y = V @ h' is the only per-step GEMM: the recurrence is linear, and explain names the GEMM as an
    output projection (it once said 'dense: a GEMM on the state every step'); every schedule applies."""
    from celldsl.cli.main import main

    path = tmp_path / "output_projection.cell"
    path.write_text(OUTPUT_PROJECTION)
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("recurrence:"))
    assert "dense" not in line and "a GEMM on the state every step" not in line
    assert line.startswith("recurrence: linear in the state") and "[V] is an output projection" in line
    for s in ("persistent", "fused_step", "time_loop ", "scan      "):
        assert f"{s} applies" in out, s
    # its per-step GEMM leaves the loop on the column schedules (one GEMM over all steps): the choice
    assert choose(compile_cell(OUTPUT_PROJECTION).plan, 16, 768, 1024, "bfloat16", ASSUMED)[0] == "scan"
    assert_same(run_both(OUTPUT_PROJECTION, "persistent", 5, 3, 4, torch.float64, packed=True), atol=1e-10,
                rtol=1e-9)


def test_explain_says_a_coupled_linear_recurrence_has_no_scan(capsys, tmp_path):
    """h' = 0.5 h + 0.1 g + W x reads g: linear, but no scan of independent columns. explain's recurrence
    line says so, agreeing with its scan line (it once said '(a parallel scan applies)' above 'scan does
    not apply'); a cell whose states are each their own scan still says so."""
    from celldsl.cli.main import main

    path = tmp_path / "mixed.cell"
    path.write_text(MIXED_USER_CELL)
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("recurrence:"))
    assert "coupled" in line and "h' reads g" in line and "scan applies" not in line
    assert "scan of its own" not in line
    assert "scan       does not apply: the new state h' = a * h + b has a or b reading the state(s) g" in out
    assert main(["explain", "mingru"]) == 0
    out = capsys.readouterr().out
    words = "recurrence: linear in the state: s' = a * s + b with a, b free of states (each state is a scan"
    assert words in out and "scan       applies" in out
