"""Every way the CPU loop can run a sequence computes what the torch backend computes.

FusedCPULoop runs a sequence as one native call (targets/c/emit_loop.py, on celldsl's GEMM: "native"; at
N <= 4 this is the small-batch path, matrix-vector products and the pointwise step in the same C
loop) or as a Python loop over the steps with a torch GEMM per step product ("mm", "onednn",
"onednn_packed"; targets/c/gemm.py chooses by measurement, these tests force each one). Against
the generated torch code (TorchLoop, the executable meaning of a cell), in float64 to 1e-12:

- loop level: outputs, final states and every gradient, padded and packed sequences, batch 1 and 3
  (one tile of rows; N <= 4 is the small batch: matrix-vector products from the rows of W, not
  packed) and 7 (a full tile of 6 rows and one more), hidden sizes 5 (a partial panel), 16 (whole
  panels: the small batch's backward reads W in place) and 37 (several panels), for cells with one
  and two GEMM stages, a GEMM operand computed in the step, folded biases on hoisted and step GEMMs,
  no state GEMM (elementwise and linear), scalars and a hoisted pointwise; the backend that ran is
  the one forced;
- either backward takes either forward (they save the same tensors);
- 2 threads (each owning a part of the hidden units, a barrier per GEMM stage) equal 1 thread;
- float32: every backend is as close to the float64 result as the torch backend;
- layers: bidirectional, packed sequences, every backend, against backend="torch", with gradients;
- torch.autograd.gradcheck in float64 through the native loop and the Python loop;
- every zoo cell, on the native loop and on the Python loop, against backend="torch" (the cells the
  native loop cannot express, with its reason: widths other than H, reductions over a row, one
  value per row, heads, run the Python loop or TorchLoop's).
"""

import pytest
import torch
from test_cpu_fused import cell_text, make_layer, max_err, rel_err, run_loop, use_loop
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence
from zoo import ELEMENTWISE, LAYER_ARGS

from celldsl import Recurrent, compile_cell
from celldsl.ops.function import split_params
from celldsl.targets.c import fused as cpu_fused
from celldsl.targets.c import gemm as cpu_gemm
from celldsl.targets.c.fused import FusedCPULoop, cpu_loop

HAVE_CC = cpu_fused.compiler() is not None
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler ($CC, cc or gcc) for the kernels")

BACKENDS = ["native", "mm", "onednn", "onednn_packed"]
# lstm: summed products, biases folded into the hoisted GEMM; gru: a bias folded into the step GEMM;
# mut1: two GEMM stages, the second on an operand of the step; mut3: a stage-0 pointwise; slstm:
# four states; indrnn: elementwise, no state GEMM; mingru: linear in the state; kitchen: scalars,
# every function, a hoisted pointwise, an output that is not a state.
CELLS = ["lstm", "gru", "mut1", "mut3", "slstm", "indrnn", "mingru", "kitchen"]
# every test sets loop.gemm itself: the layers of one stem share a cell (tag "native"), built once


def fused_loop(layer) -> FusedCPULoop:
    loop = cpu_loop(layer.compiled)
    assert isinstance(loop, FusedCPULoop) and loop.lib is not None, "the native GEMM library did not build"
    return loop


def args_for(layer, T=4, N=3, packed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(layer.parameters()).dtype
    compiled = layer.compiled
    params = split_params(compiled.torch_loop, layer._weights(0, 0))
    states = [torch.randn(N, layer.hidden_size, generator=gen, dtype=dtype) for _ in compiled.states]
    if packed:
        lengths = sorted(torch.randint(1, T + 1, (N,), generator=gen).tolist(), reverse=True)
        lengths[0] = T
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
        x = torch.randn(int(batch_sizes.sum()), layer.input_size, generator=gen, dtype=dtype)
    else:
        batch_sizes = None
        x = torch.randn(T, N, layer.input_size, generator=gen, dtype=dtype)
    return x, states, params, batch_sizes


def expected_path(backend: str, dtype: torch.dtype):
    """What FusedCPULoop.ran must say after a forced run."""
    if backend == "native":
        return "native"
    if backend.startswith("onednn") and not (dtype == torch.float32 and cpu_gemm.onednn_available()):
        return None  # not available for this dtype: the measured torch backend runs
    return backend


def check_ran(loop, backend, dtype):
    want = expected_path(backend, dtype)
    for direction in ("forward", "backward"):
        ran = loop.ran[direction]
        if not loop.gemms and backend != "native":  # no step products: the Python loop, no GEMM
            assert ran == (), ran
        elif want == "native":
            assert ran == "native", ran
        elif want is None:
            assert ran != "native" and all(b == "mm" for b in ran), ran
        else:
            assert ran == (want,) * len(loop.gemms), ran


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stem", CELLS)
def test_every_backend_equals_the_torch_backend_float64(stem, backend):
    # H = 16: whole panels, so the small batch (N <= 4) reads W's rows as they are, forward and back
    for hidden, N, packed in ((5, 3, False), (5, 1, True), (16, 2, True), (37, 7, True)):
        torch.manual_seed(hidden + N)  # the layer's initial weights
        layer = make_layer(stem, hidden=hidden, tag="native")
        loop = fused_loop(layer)
        loop.gemm = backend
        args = args_for(layer, N=N, packed=packed, seed=hidden + N)
        n = 1 + len(loop.states)  # out and final states: the saved tensors differ by design
        fwd_t, bwd_t = run_loop(layer.compiled.torch_loop, *args)
        fwd_f, bwd_f = run_loop(loop, *args)
        check_ran(loop, backend, torch.float64)
        # other summation orders (GEMM tiles, column sums of folded biases); sLSTM's exponentials
        # amplify them to ~1e-12 at H = 37
        assert rel_err(fwd_t[:n], fwd_f[:n]) < 1e-11, (hidden, N, packed)
        assert rel_err(bwd_t, bwd_f) < 1e-11, (hidden, N, packed)


@pytest.mark.parametrize("stem", ["lstm", "mut1", "indrnn"])
def test_either_backward_takes_either_forward(stem):
    layer = make_layer(stem, hidden=37, tag="native")
    loop = fused_loop(layer)
    args = args_for(layer, N=5, packed=True)
    results = {}
    for forward in ("native", "mm"):
        for backward in ("native", "mm"):
            with torch.no_grad():
                loop.gemm = forward
                out, finals, saved = loop.forward(args[0], args[1], *args[2], args[3])
                loop.gemm = backward
                g = torch.ones_like(out)
                results[forward, backward] = loop.backward(args[0], args[1], *args[2], out, saved, g,
                                                           [None] * len(finals), args[3])
    flat = {k: [v[0], *v[1], *(t for group in v[2:] for t in group)] for k, v in results.items()}
    first = flat["native", "native"]
    for key, grads in flat.items():
        assert rel_err(first, grads) < 1e-12, key


@pytest.mark.parametrize("stem", ["lstm", "mut1", "slstm", "kitchen", "mingru"])
def test_native_two_threads_equal_one(stem, monkeypatch):
    """Each thread owns whole panels of hidden units (H = 37: five float64 panels of 8, the last one
    partial, split 2 + 3); the scalar gradients add up per thread."""
    from celldsl.targets.c import native as cpu_native

    monkeypatch.setattr(cpu_native, "MIN_STEP_WORK", 0)
    monkeypatch.setattr(cpu_native, "MIN_ELEMENTWISE_WORK", 0)
    layer = make_layer(stem, hidden=37, tag="native")
    loop = fused_loop(layer)
    loop.gemm = "native"
    args = args_for(layer, N=7, packed=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_loop(loop, *args)
        torch.set_num_threads(2)
        native = loop.native(torch.float64)
        assert native.threads(7, 37, 1, 100) == (2 if native.openmp else 1)
        two = run_loop(loop, *args)
    finally:
        torch.set_num_threads(before)
    assert rel_err(one[0], two[0]) < 1e-12 and rel_err(one[1], two[1]) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stem", ["lstm", "gru", "mut1", "mingru"])
def test_float32_every_backend_as_accurate_as_the_torch_backend(stem, backend):
    layer64 = make_layer(stem, hidden=37, tag="native")
    layer32 = make_layer(stem, hidden=37, dtype=torch.float32, tag="native")
    layer32.load_state_dict(layer64.state_dict())
    args64 = args_for(layer64, N=5)
    args32 = (args64[0].float(), [s.float() for s in args64[1]],
              split_params(layer32.compiled.torch_loop, layer32._weights(0, 0)), None)
    n = 1 + len(layer64.compiled.states)
    truth_fwd, truth_bwd = run_loop(layer64.compiled.torch_loop, *args64)
    truth_fwd, truth_bwd = [t.float() for t in truth_fwd[:n]], [t.float() for t in truth_bwd]
    plain = run_loop(layer32.compiled.torch_loop, *args32)
    loop = fused_loop(layer32)
    loop.gemm = backend
    fused = run_loop(loop, *args32)
    check_ran(loop, backend, torch.float32)
    for truth, p, f in ((truth_fwd, plain[0][:n], fused[0][:n]), (truth_bwd, plain[1], fused[1])):
        scale = max(float(t.abs().max()) for t in truth)
        assert max_err(truth, f) <= 4 * max_err(truth, p) + 1e-6 * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stem", ["lstm", "gru", "sru"])
def test_bidirectional_packed_layers_every_backend(stem, backend, monkeypatch):
    """A 2-layer bidirectional layer on packed sequences, backend="cpu" with the GEMM forced through
    CELLDSL_CPU_GEMM, against the same layer on backend="torch": outputs and all gradients."""
    torch.manual_seed(0)
    hidden = 6
    text = cell_text(stem) + "\n# test_cpu_native bidirectional\n"
    input_size = hidden if stem == "sru" else 4
    kwargs = {"num_layers": 1 if stem == "sru" else 2, "bidirectional": True, "dtype": torch.float64}
    cpu = Recurrent(text, input_size, hidden, backend="cpu", **kwargs)
    ref = Recurrent(text, input_size, hidden, backend="torch", **kwargs)
    ref.load_state_dict(cpu.state_dict())
    x = torch.randn(5, 3, input_size, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    monkeypatch.setenv("CELLDSL_CPU_GEMM", backend)
    results = []
    for layer in (cpu, ref):
        xg = x.clone().requires_grad_()
        out, final = layer(pack_padded_sequence(xg, lengths, enforce_sorted=False))
        final = final if isinstance(final, tuple) else (final,)
        weights = torch.linspace(-1, 1, out.data.numel(), dtype=torch.float64).view_as(out.data)
        loss = (out.data * weights).sum()
        loss = loss + sum((f * f).sum() for f in final)
        grads = torch.autograd.grad(loss, [xg, *layer.parameters()])
        results.append([t.detach() for t in (out.data, *final, *grads)])
    assert max_err(results[0], results[1]) < 1e-10


@pytest.mark.parametrize("backend", ["native", "mm"])
@pytest.mark.parametrize("stem", ["lstm", "gru", "indrnn", "mingru"])
def test_gradcheck_through_each_loop(stem, backend):
    torch.manual_seed(0)
    layer = make_layer(stem, hidden=3, tag="native")
    loop = fused_loop(layer)
    loop.gemm = backend
    use_loop(layer, loop)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(3, 2, layer.input_size, dtype=torch.float64, requires_grad=True)
    states = [(torch.randn(1, 2, 3, dtype=torch.float64) * 0.5).requires_grad_()
              for _ in layer.compiled.states]
    n = len(states)

    def f(x, *rest):
        inp = pack_padded_sequence(x, torch.tensor([3, 1]), enforce_sorted=False)
        out, final = functional_call(layer, dict(zip(names, rest[n:], strict=True)), (inp, tuple(rest[:n])))
        return (out.data, *(final if isinstance(final, tuple) else (final,)))

    assert torch.autograd.gradcheck(f, (x, *states, *params))
    want = "native" if backend == "native" else ("mm",) * len(loop.gemms)
    assert loop.ran["forward"] == want and loop.ran["backward"] == want


# ---- the whole zoo on both loops ----------------------------------------------------------------

# the cells the native loop cannot express run the Python loop (or, with heads, TorchLoop's plain
# loop), each with its reason (targets/c/emit_loop.native_blocker)
NOT_NATIVE = {"ln_gru": "mean or sum over a row", "ln_lstm": "mean or sum over a row",
              "lstm_proj": "width P", "lru": "width P", "phased_lstm": "one value per row",
              "slstm_heads": "heads"}
ZOO_LAYERS = {"slstm_heads": (8, {})}  # stem -> (H, layer args); LAYER_ARGS: the sizes some cells need
ZOO = ELEMENTWISE  # the matrix cells' C loop against torch's: tests/test_matrix_cpu.py


@pytest.mark.parametrize("stem", ZOO)
def test_explain_names_the_cpu_loop_and_why(stem):
    """`celldsl explain` says which CPU loop runs the cell and, when it is not the native one, why."""
    section = compile_cell(stem).explain().split("CPU loop")[1].split("\nschedules")[0]
    if stem == "slstm_heads":
        assert "the generic torch loop" in section and "heads" in section
    elif stem in NOT_NATIVE:
        assert "the Python loop" in section and NOT_NATIVE[stem] in section, section
    else:
        assert "the native loop" in section and "not the native loop" not in section, section


@pytest.mark.parametrize("stem", ZOO)
def test_every_zoo_cell_on_either_loop_equals_the_torch_backend(stem, monkeypatch):
    """backend="cpu" with the native loop and with the Python loop forced (CELLDSL_CPU_GEMM), against
    backend="torch": packed sequences of three lengths, outputs, final states and every gradient, in
    float64. What ran is checked: the native loop where the cell allows it, else the Python loop, and
    the reason the native loop was refused is the expected one; forcing "native" on a cell the native
    loop cannot express runs the Python loop on the native GEMM."""
    from celldsl.ops.function import cell_for

    hidden, kwargs = ZOO_LAYERS.get(stem, (5 if stem != "lstm_proj" else 6, LAYER_ARGS.get(stem, {})))
    input_size = hidden if compile_cell(stem).ir.needs_hidden_size else 4
    torch.manual_seed(0)
    ref = Recurrent(stem, input_size, hidden, backend="torch", dtype=torch.float64, **kwargs)
    cpu = Recurrent(stem, input_size, hidden, backend="cpu", dtype=torch.float64, **kwargs)
    cpu.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, input_size, generator=gen, dtype=torch.float64)
    t = torch.rand(5, 3, 1, generator=gen, dtype=torch.float64) * 30  # phased_lstm's time stamps
    extra = {"t": t} if stem == "phased_lstm" else {}
    lengths = torch.tensor([5, 2, 4])

    def run(layer):
        xg = x.clone().requires_grad_()
        out, final = layer(pack_padded_sequence(xg, lengths, enforce_sorted=False), **extra)
        final = final if isinstance(final, tuple) else (final,)
        weights = torch.linspace(-1, 1, out.data.numel(), dtype=torch.float64).view_as(out.data)
        loss = (out.data * weights).sum() + sum((f * f).sum() for f in final)
        grads = torch.autograd.grad(loss, [xg, *layer.parameters()])
        return [t.detach() for t in (out.data, *final, *grads)]

    want = run(ref)
    loop = cell_for(cpu.compiled.key).loop("cpu")
    assert isinstance(loop, FusedCPULoop)
    assert (stem in NOT_NATIVE) == bool(loop.native_blocker), loop.native_blocker
    if stem in NOT_NATIVE:
        assert NOT_NATIVE[stem] in loop.native_blocker
    for path in ("native", "mm"):
        monkeypatch.setenv("CELLDSL_CPU_GEMM", path)
        loop.ran = {}
        assert max_err(run(cpu), want) < 1e-10, path
        if stem == "slstm_heads":  # block-diagonal GEMMs: TorchLoop's plain loop, no kernels ran
            assert loop.ran == {}, loop.ran
        elif path == "native" and stem not in NOT_NATIVE:
            assert loop.ran["forward"] == loop.ran["backward"] == "native", loop.ran
        elif path == "native":  # the Python loop, with the native GEMM called once per step product
            assert loop.ran["forward"] == loop.ran["backward"] == ("native",) * len(loop.gemms), loop.ran
        else:
            assert loop.ran["forward"] != "native" and loop.ran["backward"] != "native", loop.ran


def test_the_native_loop_is_chosen_unless_torch_gemms_win_by_more_than_a_python_step(monkeypatch):
    # the choice the micro-benchmark makes for one LSTM step product, with its timings replaced:
    # at a tie (38.1 against 37.3 us, measured at N = 1) the Python loop would cost a step of its
    # own on top, so the native loop runs; so at N=128 H=512 (1.33 against oneDNN's 1.21 ms, where
    # the Python loop took 295-315 ms a call against the native loop's 231-250); a torch GEMM
    # faster by more than PYTHON_STEP_FACTOR and a Python step wins
    layer = make_layer("lstm", torch.float32, 16, "choice")
    loop = fused_loop(layer)
    monkeypatch.setattr(loop, "gemm", None)
    monkeypatch.delenv("CELLDSL_CPU_GEMM", raising=False)
    step_w = [torch.zeros(64, 16)]
    factor, extra = cpu_fused.PYTHON_STEP_FACTOR, cpu_fused.PYTHON_STEP_SECONDS
    for native, mm, want in ((38.1e-6, 37.3e-6, True), (300e-6, 290e-6, True), (1.327e-3, 1.206e-3, True),
                             (factor * 300e-6 + extra, 300e-6, True),
                             (factor * 300e-6 + 2 * extra, 300e-6, False)):
        monkeypatch.setattr(cpu_gemm, "timings", lambda s, lib, n=native, m=mm: {"native": n, "mm": m})
        assert loop.runs_native("step", torch.float32, 1, step_w) is want, (native, mm)
