"""The CPU fused path (targets/c/fused.py running targets/c/emit.py's kernels) computes what the
plain torch loop computes, and falls back to it when there is no compiler.

- loop level, fused vs plain TorchLoop: outputs, final states, saved tensors and every gradient, in
  float64 (to 1e-12) for padded and packed sequences, for zoo cells with one, two and no GEMM stages,
  a stage-0 pointwise, prev(...) states and an output that is not a state, and for a test cell that
  uses every function, scalar parameters and a hoisted pointwise;
- float32: the fused result is as close to the float64 result as the plain one;
- end to end: a layer on the fused loop equals the hand-written references (reference_cells.py),
  outputs and input, state and parameter gradients; torch.autograd.gradcheck in float64;
- OpenMP: kernels split over 2 threads give the 1-thread result;
- fallback: no compiler, a failing compiler, or CELLDSL_CPU_FUSED=0 -> the plain TorchLoop;
- arguments the kernels do not take (bfloat16) run the plain loop.
"""

import os
import re
import shutil
import warnings

import pytest
import torch
from reference_cells import REFERENCES
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from celldsl import Recurrent, compile_cell
from celldsl.ops.function import cell_for, split_params
from celldsl.targets.c import emit as c_source_module
from celldsl.targets.c import fused as cpu_fused
from celldsl.targets.c import gemm as cpu_gemm
from celldsl.targets.c.emit import backward_schedule, c_source
from celldsl.targets.c.fused import FusedCPULoop, build_library, cpu_loop
from celldsl.targets.loop import TorchLoop

HAVE_CC = cpu_fused.compiler() is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler ($CC, cc or gcc) to build the kernels")

ZOO = ["lstm", "gru", "greff_vanilla", "greff_fgr", "mut1", "mut3", "gru_cho", "slstm", "sru", "indrnn"]

# Every cell function, two scalars, a hoisted pointwise (P @ tanh(x)), a stage-0 pointwise (the
# operand r * h), a prev(...) state, non-integer powers and an output that is not a state.
KITCHEN = """
cell kitchen
input x
state h, c
output y
param W, U, V, P
param a, b
param s : scalar
param k : scalar
g = sigmoid(W @ x + U @ h + b)
r = relu(a * h) + softplus(c) - logsigmoid(x) + P @ tanh(x)
m = max(g, r) - min(c, h) + abs(c) * s
c' = g * c + (1 - g) * tanh(V @ (r * h) + m) / (1 + exp(-k * prev(g)))
h' = sqrt(c' * c' + 1) ^ 0.5 + exp(-abs(h)) * log(1 + g) + 0.25 * c
y = h' * s + c' - k
"""
CELLS = [*ZOO, "kitchen"]


def cell_text(stem: str) -> str:
    if stem == "kitchen":
        return KITCHEN
    from celldsl.compiler import ZOO as ZOO_DIR

    return (ZOO_DIR / f"{stem}.cell").read_text()


def make_layer(stem: str, dtype=torch.float64, hidden: int = 5, tag: str = "") -> Recurrent:
    """A layer on a private copy of the cell (its own cache key), so its loop can be replaced."""
    text = cell_text(stem) + f"\n# test_cpu_fused {tag}\n"
    input_size = hidden if compile_cell(text).ir.needs_hidden_size else 4
    layer = Recurrent(text, input_size, hidden, dtype=dtype)
    with torch.no_grad():  # keep sLSTM's exponentials and the kitchen's powers in a tame range
        for p in layer.parameters():
            p.mul_(0.8)
    return layer


def use_loop(layer: Recurrent, loop) -> None:
    """Make the registered ops run `loop` for this layer's (private) cell."""
    for cell in (cell_for(layer.compiled.key), layer.compiled):
        cell.loop = lambda backend, loop=loop: loop


def loop_args(layer, T=4, N=3, packed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(layer.parameters()).dtype
    params = split_params(layer.compiled.torch_loop, layer._weights(0, 0))
    states = [torch.randn(N, layer.hidden_size, generator=gen, dtype=dtype) for _ in layer.compiled.states]
    if packed:
        batch_sizes = torch.tensor([N, N, N - 1, 1][:T])
        x = torch.randn(int(batch_sizes.sum()), layer.input_size, generator=gen, dtype=dtype)
    else:
        batch_sizes = None
        x = torch.randn(T, N, layer.input_size, generator=gen, dtype=dtype)
    return x, states, params, batch_sizes


def run_loop(loop, x, states, params, batch_sizes, seed=1, needs_dx=True):
    """forward, then backward with random output and final-state gradients (some None).
    -> ([out, *finals, *saved], [dx, *d states, *d hoisted_w, *d step_w, *d vectors, *d scalars])."""
    with torch.no_grad():
        out, finals, saved = loop.forward(x, states, *params, batch_sizes)
        gen = torch.Generator().manual_seed(seed)
        g_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        g_states = [torch.randn(s.shape, generator=gen, dtype=s.dtype) if i % 2 == 0 else None
                    for i, s in enumerate(states)]
        kwargs = {} if needs_dx else {"needs_dx": False}
        grads = loop.backward(x, states, *params, out, saved, g_out, g_states, batch_sizes, **kwargs)
    dx, dstates, dhw, dsw, dvec, dscal = grads
    return [out, *finals, *saved], [dx, *dstates, *dhw, *dsw, *dvec, *dscal]


def max_err(a, b):
    """Largest difference between matching tensors of two lists (same shapes and dtypes)."""
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
    return max(float((u - v).abs().max()) if u.numel() else 0.0 for u, v in zip(a, b, strict=True))


def rel_err(a, b):
    """max_err relative to the largest magnitude of `a` (sLSTM's gradients reach the hundreds)."""
    return max_err(a, b) / max(1.0, max(float(u.abs().max()) for u in a if u.numel()))


@needs_cc
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("stem", CELLS)
def test_fused_equals_plain_float64(stem, packed):
    layer = make_layer(stem)
    fused = cpu_loop(layer.compiled)
    assert isinstance(fused, FusedCPULoop)
    args = loop_args(layer, packed=packed)
    fwd_p, bwd_p = run_loop(layer.compiled.torch_loop, *args)
    fwd_f, bwd_f = run_loop(fused, *args)
    # what the fused loop saves differently (Folding): summed step GEMM outputs added onto their
    # hoisted blocks in place (S = p + q; their own entry empty), folded vectors inside GEMM outputs
    first_step = 1 + len(fused.states) + len(fused.states) - (fused.output_state is not None)
    first_hoisted = first_step + len(fused.gemms) + len(fused.operand_names)
    H = layer.hidden_size
    vectors = {name: v.detach() for name, v in zip(fused.vectors, args[2][2], strict=True)}
    for name, (kind, gi, block) in fused.folding.biases.items():
        at = (first_hoisted if kind == "hoisted" else first_step) + gi
        fwd_p[at] = fwd_p[at].clone()
        fwd_p[at][:, block * H : (block + 1) * H] += vectors[name]
    for gi, (hi, first) in fused.summed.items():
        P, hoisted = fwd_p[first_step + gi], fwd_p[first_hoisted + hi].clone()
        hoisted[:, first * H : first * H + P.shape[1]] += P
        fwd_p[first_step + gi], fwd_p[first_hoisted + hi] = P[:0], hoisted
    assert rel_err(fwd_p, fwd_f) < 1e-12
    assert rel_err(bwd_p, bwd_f) < 1e-12
    assert all(torch.isfinite(t).all() for t in fwd_f + bwd_f)


@needs_cc
@pytest.mark.parametrize("stem", ["lstm", "mut1", "kitchen"])
def test_needs_dx_false_keeps_parameter_gradients(stem):
    layer = make_layer(stem)
    fused = cpu_loop(layer.compiled)
    args = loop_args(layer)
    _, full = run_loop(fused, *args)
    _, nodx = run_loop(fused, *args, needs_dx=False)
    assert nodx[0] is None and full[0].abs().max() > 0
    assert max_err(full[1:], nodx[1:]) == 0.0


@needs_cc
@pytest.mark.parametrize("stem", CELLS)
def test_fused_float32_as_accurate_as_plain(stem):
    layer64 = make_layer(stem)
    layer32 = make_layer(stem, dtype=torch.float32)
    layer32.load_state_dict(layer64.state_dict())
    args64 = loop_args(layer64)
    args32 = (args64[0].float(), [s.float() for s in args64[1]], split_params(
        layer32.compiled.torch_loop, layer32._weights(0, 0)), None)
    n = 1 + len(layer64.compiled.states)  # out and final states (the saved tensors are the loops' own)
    truth_fwd, truth_bwd = run_loop(layer64.compiled.torch_loop, *args64)
    truth_fwd, truth_bwd = [t.float() for t in truth_fwd[:n]], [t.float() for t in truth_bwd]
    plain = run_loop(layer32.compiled.torch_loop, *args32)
    fused = run_loop(cpu_loop(layer32.compiled), *args32)
    for truth, p, f in ((truth_fwd, plain[0][:n], fused[0][:n]), (truth_bwd, plain[1], fused[1])):
        scale = max(float(t.abs().max()) for t in truth)
        assert max_err(truth, f) <= 4 * max_err(truth, p) + 1e-6 * scale


@needs_cc
@pytest.mark.parametrize("stem", ["lstm", "greff_fgr", "mut3", "slstm", "sru"])
def test_fused_layer_matches_reference(stem):
    """Independent check: the layer on the fused loop against the hand-written per-gate reference."""
    torch.manual_seed(0)
    layer = make_layer(stem, hidden=6)
    use_loop(layer, cpu_loop(layer.compiled))
    T, N = 5, 3
    x = torch.randn(T, N, layer.input_size, dtype=torch.float64, requires_grad=True)
    states = tuple((torch.randn(1, N, 6, dtype=torch.float64) * 0.5).requires_grad_()
                   for _ in layer.compiled.states)
    out, final = layer(x, states[0] if len(states) == 1 else states)
    final = final if isinstance(final, tuple) else (final,)
    p = {name: layer.cell_parameter(name) for name in layer.compiled.ir.params}
    ref_out, ref_final = REFERENCES[stem](p, x, tuple(s[0] for s in states))
    assert (out - ref_out).abs().max() < 1e-10
    for a, b in zip(final, ref_final, strict=True):
        assert (a[0] - b).abs().max() < 1e-10
    g = torch.randn_like(out)
    wrt = [x, *states, *layer.parameters()]
    ours = torch.autograd.grad((out * g).sum() + sum(f.sum() for f in final), wrt)
    theirs = torch.autograd.grad((ref_out * g).sum() + sum(f.sum() for f in ref_final), wrt)
    assert max_err(list(ours), list(theirs)) < 1e-10


@needs_cc
@pytest.mark.parametrize("stem", ["lstm", "mut1", "kitchen"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_fused_layer(stem, packed):
    torch.manual_seed(0)
    layer = make_layer(stem, hidden=3, tag="gradcheck")
    use_loop(layer, cpu_loop(layer.compiled))
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(3, 2, layer.input_size, dtype=torch.float64, requires_grad=True)
    states = [(torch.randn(1, 2, 3, dtype=torch.float64) * 0.5).requires_grad_()
              for _ in layer.compiled.states]
    n = len(states)

    def f(x, *rest):
        inp = pack_padded_sequence(x, torch.tensor([3, 2]), enforce_sorted=False) if packed else x
        out, final = functional_call(layer, dict(zip(names, rest[n:], strict=True)), (inp, tuple(rest[:n])))
        out = out.data if packed else out
        return (out, *(final if isinstance(final, tuple) else (final,)))

    assert torch.autograd.gradcheck(f, (x, *states, *params))


@needs_cc
@pytest.mark.parametrize("stem", ["slstm", "mut1", "kitchen", "ln_lstm", "ln_gru"])
def test_two_threads_equal_one(stem, monkeypatch):
    """The kernels split columns over OpenMP threads (H = 37: an uneven split) for any size here;
    the kernels with means over a row (ln_*) split rows instead (N = 3: two rows and one), with the
    vector gradients of each thread summed apart and added."""
    monkeypatch.setattr(cpu_fused, "MIN_PARALLEL", 0)
    layer = make_layer(stem, hidden=37)
    args = loop_args(layer, N=3 if stem.startswith("ln_") else 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_loop(cpu_loop(layer.compiled), *args)
        torch.set_num_threads(2)
        two = run_loop(cpu_loop(layer.compiled), *args)
    finally:
        torch.set_num_threads(before)
    assert rel_err(one[0], two[0]) < 1e-12 and rel_err(one[1], two[1]) < 1e-12


@needs_cc
def test_other_dtypes_run_the_plain_loop():
    layer = make_layer("lstm", dtype=torch.bfloat16)
    fused = cpu_loop(layer.compiled)
    assert isinstance(fused, FusedCPULoop)
    args = loop_args(layer)
    assert not fused.fused(args[0], args[1], *args[2])
    plain_fwd, plain_bwd = run_loop(layer.compiled.torch_loop, *args)
    fused_fwd, fused_bwd = run_loop(fused, *args)
    assert max_err(plain_fwd, fused_fwd) == 0.0 and max_err(plain_bwd, fused_bwd) == 0.0


@needs_cc
def test_library_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path))
    layer = make_layer("gru", tag="cache")
    lib, reason = build_library(layer.compiled)
    assert lib is not None, reason
    built = list(tmp_path.glob(f"{layer.compiled.key}/cpu_kernels_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    lib2, _ = build_library(layer.compiled)
    assert lib2 is not None and built[0].stat().st_mtime_ns == stamp


def test_schedule_shares_the_lstm_gradient_buffers():
    """torch's LSTM: d(W_ii@x) = d(W_hi@h) block by block, and b_ii, b_hi share one accumulator."""
    cell = compile_cell("lstm")
    schedule = backward_schedule(cell.plan)
    assert schedule.hoisted_alias == {0: 0}
    modes = schedule.modes["stage1"]
    assert modes["b_hi"] == "same:b_ii" or modes["b_ii"] == "same:b_hi"
    assert "#pragma omp simd" in c_source(cell.plan)


@pytest.mark.parametrize("how", ["missing", "failing", "disabled"])
def test_fallback_without_a_compiler(how, tmp_path, monkeypatch):
    """No compiler, a compiler that fails, or CELLDSL_CPU_FUSED=0: the plain loop, and it works."""
    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_fused, "_warned", set())
    if how == "missing":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    elif how == "failing":
        false = shutil.which("false")
        if false is None:
            pytest.skip("no `false` program to stand in for a failing compiler")
        monkeypatch.setenv("CC", false)
    else:
        monkeypatch.setenv("CELLDSL_CPU_FUSED", "0")
    layer = make_layer("mut1", tag=f"fallback-{how}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop = cpu_loop(layer.compiled)
    assert type(loop) is TorchLoop
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if how == "disabled":
        assert messages == []
    else:
        assert len(messages) == 1 and ("no C compiler" in messages[0]) == (how == "missing")
        assert ("failed" in messages[0]) == (how == "failing")
    assert not list(tmp_path.glob("**/*.so"))
    use_loop(layer, loop)
    x = torch.randn(4, 2, layer.input_size, dtype=torch.float64)
    out, h = layer(x)
    p = {name: layer.cell_parameter(name) for name in layer.compiled.ir.params}
    ref_out, (ref_h,) = REFERENCES["mut1"](p, x, (torch.zeros(2, layer.hidden_size, dtype=torch.float64),))
    assert (out - ref_out).abs().max() < 1e-10 and (h[0] - ref_h).abs().max() < 1e-10


def test_compiler_respects_cc(monkeypatch, tmp_path):
    monkeypatch.delenv("CELLDSL_CPU_FUSED", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "nope"))
    assert cpu_fused.compiler() is None
    if HAVE_CC:
        monkeypatch.delenv("CC")
        assert os.path.exists(cpu_fused.compiler())


@needs_cc
def test_file_names_cannot_end_the_c_comments(tmp_path):
    """The C header names the cell's file; a path containing */ must not close that comment."""
    folder = tmp_path / "a*"
    folder.mkdir()
    path = folder / "evil.cell"  # .../a*/evil.cell
    path.write_text(cell_text("rnn_tanh").replace("cell rnn_tanh", "cell evil"))
    cell = compile_cell(str(path))
    source = c_source(cell.plan)
    assert "*/evil" not in source and source.count("/*") == source.count("*/")
    lib, reason = build_library(cell)
    assert lib is not None, reason


@pytest.mark.parametrize("stem", ["ln_lstm", "ln_gru"])
def test_kernels_with_row_reductions_compute_each_temp_once(stem):
    """A kernel with means over a row runs one loop over the columns per mean, then its body; a temp
    several loops need (a gate, its sigmoid) is computed by the first and read back from the scratch
    row by the others (c_source.RowPlan), not computed again in each. ln_lstm's backward has 20 such
    loops; computing everything again in each made it 5x slower than the textbook loop."""
    source = c_source(compile_cell(stem).plan)
    functions = re.findall(r"static void (\w+_cols)\(.*?\n}\n", source, flags=re.S)
    bodies = {name: body for name, body in zip(functions, re.split(r"static void \w+_cols\(", source)[1:],
                                                strict=True)}
    kept_somewhere = False
    for name, body in bodies.items():
        body = body.split("\n}\n")[0]
        computed = re.findall(r"const \w+ (v_\w+) = (?!a\d+\[|cd_kept\[)", body)
        twice = sorted(c for c in computed if computed.count(c) > 1)
        assert not twice, (name, twice)
        if "cd_kept[" in body:
            kept_somewhere = True
            stored = set(re.findall(r"cd_kept\[(\d+) \* \(j1 - j0\) \+ j - j0\] = ", body))
            loaded = set(re.findall(r"= cd_kept\[(\d+) \*", body))
            assert stored == loaded and stored, name  # every kept temp is written once and read again
            assert "cd_scratch(" in body and "free(cd_kept);" in body
    assert kept_somewhere


@pytest.mark.parametrize("stem", ["ln_lstm", "ln_gru"])
def test_reductions_of_one_level_share_a_loop(stem):
    """Means that read no other mean (a layer norm's four gate means) are summed in one loop over the
    columns, those that read them (the variances) in the next: one loop per level, each level
    reading only earlier ones."""
    plan = compile_cell(stem).plan
    for pw in plan.pointwise:
        for temps, results in ((pw.forward_temps, pw.forward_results),
                               (pw.backward_temps, pw.backward_results)):
            results = dict(enumerate(results))
            temps, _, passes, groups = c_source_module._reduction_passes(temps, results)
            if not passes:
                continue
            assert sorted(k for g in groups for k in g) == list(range(len(passes)))
            assert len(groups) < len(passes)  # some share a loop
            defined, level_of = dict(temps), {passes[k][0]: n for n, g in enumerate(groups) for k in g}
            for n, group in enumerate(groups):
                for k in group:
                    seen, todo = set(), list(passes[k][2].free_symbols)
                    while todo:
                        sym = todo.pop()
                        if sym in level_of:
                            assert level_of[sym] < n, (stem, passes[k][0], sym)
                        elif sym in defined and sym not in seen:
                            seen.add(sym)
                            todo.extend(defined[sym].free_symbols)
    source = c_source(plan)
    for body in re.split(r"static void \w+_cols\(", source)[1:]:
        body = body.split("\n}\n")[0]
        loops = len(re.findall(r"double m_\w+ = 0;", body))
        assert loops == 0 or body.count("#pragma omp simd reduction(+:m_") < loops


@needs_cc
def test_bad_shapes_raise_instead_of_reading_out_of_bounds():
    layer = make_layer("lstm", tag="shapes")
    fused = cpu_loop(layer.compiled)
    x, states, (hw, sw, vec, sc), _ = loop_args(layer)
    bad = [
        (x, [states[0], states[1][:, :-1]], hw, sw, vec, sc, "state 'c' must be"),
        (x, states, hw, sw, [vec[0][:-1], *vec[1:]], sc, "vector 'b_ii' must have shape"),
        (x, states, hw, [sw[0][:-1]], vec, sc, "must have 4 * H = 20 rows"),
        (x[:, :2], states, hw, sw, vec, sc, "batch_sizes must be"),
    ]
    for x_, st, h, s, v, c, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            fused.forward(x_, st, h, s, v, c)
        with pytest.raises(ValueError, match=re.escape(message)):  # a failed check is not remembered
            fused.forward(x_, st, h, s, v, c)
    out, _, _ = fused.forward(x, states, hw, sw, vec, sc)  # the good shapes still run
    assert out.shape == (x.shape[0], x.shape[1], layer.hidden_size)


@needs_cc
def test_call_plan_is_made_once_per_signature(monkeypatch):
    """A call plan (the checks, sizes and the forward's loop and GEMM choices) is made at a
    signature's first call and reused; a new shape, thread count, forced backend or GEMM measurement
    makes a new one, and a reused plan gives bitwise the results of a new one."""
    layer = make_layer("lstm", tag="plans")
    fused = cpu_loop(layer.compiled)
    made = []
    make = fused._make_call_plan
    monkeypatch.setattr(fused, "_make_call_plan", lambda *a: made.append(a[0].shape) or make(*a))
    x, states, params, _ = loop_args(layer, T=3, N=2)
    for _ in range(2):  # the first call measures the GEMMs of its shapes (the plan after it is kept)
        run_loop(fused, x, states, params, None)
    assert made, "no call plan was made"
    made.clear()
    first = run_loop(fused, x, states, params, None)
    again = run_loop(fused, x, states, params, None)  # forward and backward share the plan
    assert made == []
    assert max_err(first[0], again[0]) == 0.0 and max_err(first[1], again[1]) == 0.0
    fused.forward(loop_args(layer, T=5, N=2)[0], states, *params)  # another length: another plan
    assert len(made) == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        fused.forward(x, states, *params)
    finally:
        torch.set_num_threads(before)
    assert len(made) == 2
    monkeypatch.setattr(fused, "gemm", "mm")  # a forced backend: the Python loop
    fused.forward(x, states, *params)
    assert len(made) == 3 and fused.ran["forward"] == ("mm",)
    monkeypatch.setattr(fused, "gemm", None)
    cpu_gemm.reset()  # the choices may change: plans made before are not used
    fused.forward(x, states, *params)
    assert len(made) == 4


@needs_cc
def test_call_plans_are_bounded():
    layer = make_layer("gru", tag="plan bound")
    fused = cpu_loop(layer.compiled)
    _, states, params, _ = loop_args(layer, N=1)
    for T in range(1, cpu_fused.CALL_PLANS + 10):
        fused.forward(torch.randn(T, 1, layer.input_size, dtype=torch.float64), states, *params)
    assert 0 < len(fused._plans) <= cpu_fused.CALL_PLANS
