"""The Triton backend on Triton's CPU interpreter: every zoo cell against the torch backend, the
standard cells against torch.nn, gradcheck in float64, every function spelling at extreme inputs.

TRITON_INTERPRET=1 is set per test (the `interpret` fixture), not for the session: the generated
modules are imported once per mode at call time (targets/triton/module.py), so these tests need no
subprocess, and other test files still see the variable unset (backend="triton" on CPU is an error
there). The torch backend (targets/loop.py + targets/torch/emit.py) is the reference; it is
itself checked against the hand-written references in tests/test_references.py.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from zoo import GENERIC

import celldsl
from celldsl.compiler import ZOO, compile_cell

ZOO_CELLS = GENERIC  # the others: tests/test_language2.py
T, N = 4, 3
HIDDEN = (5, 16, 33)  # below, at and above a power of two: the masks matter


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def pair(cell, input_size, hidden, dtype=torch.float32, **kwargs):
    """The same cell on both backends with the same weights."""
    torch.manual_seed(0)
    ref = celldsl.Recurrent(cell, input_size, hidden, backend="torch", dtype=dtype, **kwargs)
    tri = celldsl.Recurrent(cell, input_size, hidden, backend="triton", dtype=dtype, **kwargs)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def input_size_for(cell, hidden):
    """I != H where the cell allows it, so a mix-up of the two sizes shows."""
    return hidden if compile_cell(cell).ir.needs_hidden_size else hidden + 2


def run_with_grads(module, x, states):
    """(output, final states, gradients of x, of each initial state and of each parameter) for a loss
    that weights every output and final state differently (so each gradient path is exercised)."""
    x = x.detach().clone().requires_grad_()
    states = tuple(s.detach().clone().requires_grad_() for s in states)
    out, final = module(x, states if len(states) > 1 else states[0])
    final = final if isinstance(final, tuple) else (final,)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for f in final:
        loss = loss + (f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum()
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [x, *states, *params], allow_unused=True)
    return out.detach(), [f.detach() for f in final], grads


def initial_states(cell, layers, hidden, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return tuple(
        0.5 * torch.randn(layers, N, hidden, generator=g, dtype=dtype) for _ in compile_cell(cell).states
    )


def assert_close_lists(a, b, atol, what, rtol=0.0):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        if u is None or v is None:
            assert u is None and v is None, f"{what}[{i}]: one gradient is None"
            continue
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("cell", ZOO_CELLS)
def test_zoo_cell_triton_matches_torch_backend(cell, hidden):
    """Outputs, final states and all gradients (input, initial states, every parameter) within
    1e-4 + 1e-5 * |value| (sLSTM's normaliser state n grows to ~100: fp32 rounding is relative)."""
    input_size = input_size_for(cell, hidden)
    ref, tri = pair(cell, input_size, hidden)
    x = torch.randn(T, N, input_size, generator=torch.Generator().manual_seed(3))
    states = initial_states(cell, 1, hidden)
    out_r, fin_r, g_r = run_with_grads(ref, x, states)
    out_t, fin_t, g_t = run_with_grads(tri, x, states)
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=1e-5)
    assert_close_lists(fin_t, fin_r, 1e-4, "final state", rtol=1e-5)
    assert_close_lists(g_t, g_r, 1e-4, "gradient", rtol=1e-5)
    assert all(g is not None for g in g_t[:1]), "the input gets a gradient"


@pytest.mark.parametrize("shape", [(1, 3), (4, 1), (1, 1)], ids=["T1", "N1", "T1_N1"])
@pytest.mark.parametrize("cell", ["lstm", "greff_fgr", "slstm"])
def test_one_step_and_one_sequence(cell, shape):
    """T = 1 and N = 1 (a single row per step) give the torch backend's outputs and gradients."""
    steps, batch = shape
    hidden = 7
    input_size = input_size_for(cell, hidden)
    ref, tri = pair(cell, input_size, hidden)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(steps, batch, input_size, generator=g)
    states = tuple(0.5 * torch.randn(1, batch, hidden, generator=g) for _ in compile_cell(cell).states)
    out_r, fin_r, g_r = run_with_grads(ref, x, states)
    out_t, fin_t, g_t = run_with_grads(tri, x, states)
    assert out_t.shape == (steps, batch, hidden)
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=1e-5)
    assert_close_lists(fin_t, fin_r, 1e-4, "final state", rtol=1e-5)
    assert_close_lists(g_t, g_r, 1e-4, "gradient", rtol=1e-5)


TORCH_NN = {
    "lstm": (torch.nn.LSTM, celldsl.LSTM, {}),
    "gru": (torch.nn.GRU, celldsl.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, celldsl.RNN, {"nonlinearity": "tanh"}),
}


@pytest.mark.parametrize("kind", sorted(TORCH_NN))
def test_triton_matches_torch_nn(kind):
    """Two layers, bidirectional, H=5: the Triton backend against torch.nn itself."""
    torch_cls, ours_cls, extra = TORCH_NN[kind]
    torch.manual_seed(0)
    ref = torch_cls(4, 5, num_layers=2, bidirectional=True, **extra)
    ours = ours_cls(4, 5, num_layers=2, bidirectional=True, **extra, backend="triton")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, 4, generator=torch.Generator().manual_seed(3))
    states = initial_states(kind, 4, 5)
    out_r, fin_r, g_r = run_with_grads(ref, x, states)
    out_t, fin_t, g_t = run_with_grads(ours, x, states)
    torch.testing.assert_close(out_t, out_r, atol=1e-5, rtol=0)
    assert_close_lists(fin_t, fin_r, 1e-5, "final state")
    assert_close_lists(g_t, g_r, 1e-5, "gradient")


def test_packed_sequence_matches_torch_backend():
    """Steps with fewer rows than the batch (PackedSequence): the kernels see row slices."""
    ref, tri = pair("slstm", 4, 5)
    x = torch.randn(T, N, 4, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([4, 2, 1])

    def run(m):
        xx = x.clone().requires_grad_()
        out, (h, c, n, mm) = m(pack_padded_sequence(xx, lengths))
        loss = out.data.square().sum() + h.sum() + c.square().sum() + n.sum() + mm.sum()
        return [out.data, h, c, n, mm, *torch.autograd.grad(loss, [xx, *m.parameters()])]

    assert_close_lists(run(tri), run(ref), 1e-4, "packed")


@pytest.mark.parametrize("cell", ["lstm", "mut1", "slstm"])
def test_gradcheck_float64(cell):
    """Analytic (generated backward kernels) vs finite differences of the forward kernels in float64,
    with respect to the input, the initial states and every parameter."""
    hidden = 3
    input_size = input_size_for(cell, hidden)
    torch.manual_seed(0)
    m = celldsl.Recurrent(cell, input_size, hidden, backend="triton", dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(3, 2, input_size, dtype=torch.float64, requires_grad=True)
    states = tuple(
        (0.5 * torch.randn(1, 2, hidden, dtype=torch.float64)).requires_grad_() for _ in m.compiled.states
    )
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

    def f(x, *rest):
        st, ps = rest[: len(states)], rest[len(states) :]
        out, final = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, st))
        final = final if isinstance(final, tuple) else (final,)
        return (out, *final)

    assert torch.autograd.gradcheck(f, (x, *states, *params), fast_mode=True)


# ---- cells outside the zoo: hoisted pointwise, scalars, every function spelling ---------------------

HOISTED_CELL = """
cell hoisted_operand
input x
state h
output h
param W, U, b, v
param k : scalar
h' = tanh(W @ (k * tanh(x) + v) + U @ h + b)
"""

SPELLINGS_CELL = """
cell spellings
input x
state a, b, c, d, e, f, g, q
output a
param s : scalar
param v
a' = tanh(s * x + a)
b' = sigmoid(s * x + b)
c' = softplus(s * x + c)
d' = logsigmoid(s * x + d)
e' = max(x, e) - min(x, v) + abs(x) + relu(x - e)
f' = sqrt(abs(x) + 1) + exp(-abs(x)) * log(abs(x) + 1 + f * f)
g' = (x + g) ^ 3 + (abs(x) + 1) ^ -2 + (abs(x) + 1) ^ 2.5 + x ^ 7 + tanh(x) ^ 20 + tanh(x) ^ 21
q' = x / (abs(q) + 2) - 1
"""


def test_hoisted_operand_and_scalar_match_torch_backend():
    """`W @ (k * tanh(x) + v)` runs in hoist_forward/hoist_backward over all steps at once."""
    compiled = compile_cell(HOISTED_CELL)
    assert compiled.plan.hoist_pointwise
    ref, tri = pair(HOISTED_CELL, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for m in (ref, tri):
            m.cell_parameter("k").fill_(1.7)
    x = torch.randn(T, N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    states = initial_states(HOISTED_CELL, 1, 5, torch.float64)
    out_r, fin_r, g_r = run_with_grads(ref, x, states)
    out_t, fin_t, g_t = run_with_grads(tri, x, states)
    torch.testing.assert_close(out_t, out_r, atol=1e-12, rtol=0)
    assert_close_lists(g_t, g_r, 1e-12, "gradient")


def _call_both(cell, args):
    """Run every stage function of the cell's single pointwise on both modules."""
    from celldsl.targets.triton.module import load_triton_module

    compiled = compile_cell(cell)
    (pw,) = compiled.plan.pointwise
    k = pw.stage
    tmod = load_triton_module(compiled)
    fwd_t = getattr(tmod, f"stage{k}_forward")(*args)
    fwd_r = getattr(compiled.torch_module, f"stage{k}_forward")(*args)
    grads = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape) for t in fwd_t]
    bwd_t = getattr(tmod, f"stage{k}_backward")(*args, *grads)
    bwd_r = getattr(compiled.torch_module, f"stage{k}_backward")(*args, *grads)
    return pw, fwd_t, fwd_r, bwd_t, bwd_r


EXTREMES = [-1e4, -100.0, -30.0, -15.0, -1.0, -0.06, -1e-3, -1e-7, 0.0]
EXTREMES += [-v for v in reversed(EXTREMES[:-1])]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(0): wanted
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_function_spelling_at_extreme_inputs(dtype):
    """tanh/sigmoid/softplus/logsigmoid written from tl.exp stay finite and accurate for large |x|
    (no overflow, no cancellation near 0); max/min/abs/relu/sqrt/exp/log, integer and fractional
    powers (multiplied out, through exp/log, odd and even) and division agree with torch."""
    compiled = compile_cell(SPELLINGS_CELL)
    (pw,) = compiled.plan.pointwise
    x = torch.tensor(EXTREMES, dtype=dtype)
    rows = torch.stack([x, x.flip(0) * 0.5, x * 0.01])  # [3, H]
    H = rows.shape[1]
    values = {"x": rows, "s": torch.tensor(1.0, dtype=dtype), "v": torch.linspace(-2, 2, H, dtype=dtype)}
    for name in "abcdefgq":
        values[name] = torch.zeros(3, H, dtype=dtype) if name not in "eq" else 0.3 * rows.flip(1)
    args = [values[s.name] for s in pw.inputs]
    pw, fwd_t, fwd_r, bwd_t, bwd_r = _call_both(SPELLINGS_CELL, args)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name_out, t, r in zip([n for n, _ in pw.outputs], fwd_t, fwd_r, strict=True):
        assert torch.isfinite(t).all(), f"{name_out}: {t}"
        torch.testing.assert_close(t, r, atol=tol, rtol=tol, msg=lambda m, n=name_out: f"{n}: {m}")
    for sym, t, r in zip(pw.grad_inputs, bwd_t, bwd_r, strict=True):
        if r is None:
            assert t is None
            continue
        if t.dim() < r.dim() or t.shape != r.shape:
            r = r.expand_as(t)
        torch.testing.assert_close(t, r, atol=tol, rtol=tol, msg=lambda m, n=sym.name: f"d {n}: {m}")


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(0): wanted
def test_small_results_are_relatively_accurate():
    """Where a result is tiny, its relative error stays at rounding level: tanh near 0 (the odd
    series: tanh(1e-20) is 1e-20, 1 - exp(-2|x|) would cancel), sigmoid and softplus far left,
    logsigmoid far right (log1p, not log(1 + u))."""
    compiled = compile_cell(SPELLINGS_CELL)
    (pw,) = compiled.plan.pointwise
    x = torch.tensor([[1e-20, -3e-9, 0.05, 0.0625, 0.07, -30.0, -50.0, 30.0, 50.0]], dtype=torch.float64)
    values = {"x": x, "s": torch.tensor(1.0, dtype=torch.float64), "v": torch.zeros(9, dtype=torch.float64)}
    for name in "abcdefgq":
        values[name] = torch.zeros_like(x)
    _, fwd_t, _, _, _ = _call_both(SPELLINGS_CELL, [values[s.name] for s in pw.inputs])
    got = dict(zip([n for n, _ in pw.outputs], fwd_t, strict=True))
    fns = {"a'": torch.tanh, "b'": torch.sigmoid, "c'": torch.nn.functional.softplus,
           "d'": torch.nn.functional.logsigmoid}
    for name, fn in fns.items():
        torch.testing.assert_close(got[name], fn(x), rtol=1e-13, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_gradcheck_float64_spellings_and_hoist():
    """Finite differences of the forward kernels vs the backward kernels, for every spelling."""
    for cell, hidden in ((SPELLINGS_CELL, 4), (HOISTED_CELL, 3)):
        torch.manual_seed(0)
        m = celldsl.Recurrent(cell, hidden, hidden, backend="triton", dtype=torch.float64)
        names = [n for n, _ in m.named_parameters()]
        x = (torch.randn(2, 2, hidden, dtype=torch.float64) + 0.3).requires_grad_()
        params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())

        def f(x, *ps, m=m, names=names):
            out, final = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))
            return (out, *(final if isinstance(final, tuple) else (final,)))

        assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_computes_in_fp32(dtype):
    """bf16/fp16 tensors in and out, fp32 math inside: within the storage dtype's rounding of the
    float32 result (the torch backend in float32 on the same rounded weights)."""
    ref, tri = pair("lstm", 6, 16)
    tri = tri.to(dtype)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in tri.state_dict().items()})
    x = torch.randn(T, N, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    out_t, (h_t, c_t) = tri(x)
    out_r, (h_r, c_r) = ref(x.float())
    assert out_t.dtype == dtype
    eps = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out_t.float(), out_r, atol=4 * eps, rtol=0)
    torch.testing.assert_close(c_t.float(), c_r, atol=4 * eps, rtol=0)


def test_strided_and_expanded_arguments():
    """Column blocks of a GEMM output (row stride 4H), an expanded (stride-0) gradient and a
    transposed state go through the same host wrappers as contiguous tensors."""
    compiled = compile_cell("lstm")
    (pw,) = compiled.plan.pointwise
    H = 7
    g = torch.Generator().manual_seed(0)
    gemm = torch.randn(N, 4 * H, generator=g)
    blocks = list(gemm.chunk(4, dim=1))
    hoisted = list(torch.randn(N, 4 * H, generator=g).chunk(4, dim=1))
    args = []
    for s in pw.inputs:
        role = compiled.plan.role(s)
        if role == "product":
            args.append(blocks.pop(0))
        elif role == "hoisted":
            args.append(hoisted.pop(0))
        elif role == "vector":
            args.append(torch.randn(2 * H, generator=g)[::2])  # stride 2
        else:
            args.append(torch.randn(H, N, generator=g).t())  # transposed state
    assert any(not a.is_contiguous() for a in args)
    _, fwd_t, fwd_r, _, _ = _call_both("lstm", args)
    for t, r in zip(fwd_t, fwd_r, strict=True):
        torch.testing.assert_close(t, r, atol=1e-6, rtol=0)
    from celldsl.targets.triton.module import load_triton_module

    grads = [torch.ones(1, 1).expand(N, H), torch.arange(float(H)).expand(N, H)]
    bwd_t = load_triton_module(compiled).stage1_backward(*args, *grads)
    bwd_r = compiled.torch_module.stage1_backward(*args, *grads)
    for t, r in zip(bwd_t, bwd_r, strict=True):
        torch.testing.assert_close(t, r.expand_as(t), atol=1e-6, rtol=0)


def test_zero_gradient_is_none_and_constant_output_is_filled(tmp_path):
    """Results the language cannot produce today but the emitter must handle as the torch module
    does: a gradient that is identically zero is None, a constant output is a filled tensor."""
    import dataclasses

    import sympy as sp

    from celldsl.lang.functions import step
    from celldsl.lang.ir import symbol
    from celldsl.plan import make_pointwise
    from celldsl.targets.torch.emit import torch_module_source
    from celldsl.targets.triton.emit import triton_module_source
    from celldsl.targets.triton.module import _import, import_module

    compiled = compile_cell("indrnn")
    plan = compiled.plan
    h, wx = symbol("h"), symbol("W@")
    new = make_pointwise(0, [("h'", h * 2 + step(wx)), ("h2", sp.Integer(3))], lambda s: True)
    plan = dataclasses.replace(plan, pointwise=[new])
    triton_file, torch_file = tmp_path / "synthetic.py", tmp_path / "synthetic_torch.py"
    triton_file.write_text(triton_module_source(plan))
    torch_file.write_text(torch_module_source(plan))
    tmod = import_module(triton_file, "synthetic", True)
    rmod = _import(torch_file, "celldsl_test_synthetic_torch")
    args = [torch.randn(N, 5) for _ in new.inputs]
    for a, b in zip(tmod.stage0_forward(*args), rmod.stage0_forward(*args), strict=True):
        torch.testing.assert_close(a, b)
    grads = [torch.randn(N, 5), torch.randn(N, 5)]
    bwd_t, bwd_r = tmod.stage0_backward(*args, *grads), rmod.stage0_backward(*args, *grads)
    assert [r is None for r in bwd_t] == [r is None for r in bwd_r] == [True, False]  # d W@ = 0, d h
    torch.testing.assert_close(bwd_t[1], bwd_r[1])


def test_module_choice_kernels_dir_for_zoo_cells_cache_for_others(tmp_path, monkeypatch):
    """A zoo cell loads kernels/<stem>.py (current); a changed cell of the same name gets a
    content-addressed file under the cache directory, and its kernels run."""
    from celldsl.targets.triton import module as triton_module
    from celldsl.targets.triton.emit import triton_module_source
    from celldsl.targets.triton.module import load_triton_module, module_path

    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path / "cache"))
    kernels = tmp_path / "kernels"  # a current kernels/ (whether the real one is: test_kernels_fresh.py)
    kernels.mkdir()
    (kernels / "lstm.py").write_text(triton_module_source(compile_cell("lstm").plan))
    monkeypatch.setattr(triton_module, "KERNELS", kernels)
    assert module_path(compile_cell("lstm")) == kernels / "lstm.py"
    changed = tmp_path / "lstm.cell"
    changed.write_text((ZOO / "lstm.cell").read_text().replace("h' = o * tanh(c')", "h' = o * sigmoid(c')"))
    compiled = compile_cell(changed)
    path = module_path(compiled)
    assert path.is_relative_to(tmp_path / "cache") and path.name == "lstm.py"
    assert load_triton_module(compiled).module().__file__ == str(path)
    ref, tri = pair(changed, 3, 4)
    x = torch.randn(2, 2, 3)
    torch.testing.assert_close(tri(x)[0], ref(x)[0], atol=1e-5, rtol=0)


def test_runs_in_the_mode_of_the_call(monkeypatch):
    """The module imported while TRITON_INTERPRET=1 holds interpreter functions; with the variable
    unset the same file is imported again as compiled kernels (never the interpreted ones)."""
    from triton.runtime.jit import JITFunction

    from celldsl.targets.triton.module import load_triton_module

    tmod = load_triton_module(compile_cell("gru"))
    assert not isinstance(tmod.module().stage1_forward_kernel, JITFunction)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert isinstance(tmod.module().stage1_forward_kernel, JITFunction)
