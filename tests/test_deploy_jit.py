"""TorchScript: torch.jit.trace and torch.jit.script of models holding celldsl layers (issue 27, item 3).

trace failed its own check ("Graphs differed across invocations"): with parameters that need
gradients the layers called the op through an autograd.Function, which the tracer records
differently from one invocation to the next. Traced, the layers now call the registered op itself
(its own autograd). The traced model runs other sizes, gives torch.nn's numbers and gradients with
the same weights, and saves and loads with torch.jit.save/load.

script failed on the layers' Python forward and properties ("Unknown type name 'CompiledCell'", and
"Can't redefine method: __compiled_getter" the second time). LSTM/GRU/RNN and their cells now have a
forward whose `torch.jit.is_scripting()` branch TorchScript compiles (celldsl/nn/scripting.py): checked
against torch.nn in float64, values and gradients, and scripted twice in one process.
"""

import io

import pytest
import torch
from torch import nn

import celldsl


class Model(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.rnn = mod.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = mod.GRU(10, 3)
        self.cell = mod.GRUCell(3, 3)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        y, g = self.gru(out.transpose(0, 1))
        return out, h, c, y, g, self.cell(y[-1], g[0])


def _pair():
    torch.manual_seed(0)
    ref, ours = Model(nn), Model(celldsl)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_passes_its_check_and_matches_torch_nn():
    ref, ours = _pair()
    traced = torch.jit.trace(ours, (torch.randn(3, 6, 4),))  # check_trace=True: the default
    for shape in [(3, 6, 4), (5, 8, 4)]:  # other batch and sequence sizes than the traced ones
        x = torch.randn(shape)
        grads = []
        for module in (ref, traced):
            module.zero_grad()
            xs = x.clone().requires_grad_()
            results = module(xs)
            sum((r * r).sum() for r in results).backward()
            grads.append([r.detach() for r in results] + [xs.grad] + [p.grad for p in module.parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_model_saves_and_loads():
    ref, ours = _pair()
    x = torch.randn(3, 6, 4)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(ours, (x,)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for a, b in zip(ref(x), loaded(x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


SCRIPTED = {  # name: (torch.nn class, celldsl class, kwargs)
    "lstm_2layer_bidir_batch_first": (nn.LSTM, celldsl.LSTM, {"num_layers": 2, "bidirectional": True,
                                                              "batch_first": True}),
    "lstm_proj": (nn.LSTM, celldsl.LSTM, {"proj_size": 3}),
    "gru_no_bias": (nn.GRU, celldsl.GRU, {"bias": False}),
    "gru_2layer": (nn.GRU, celldsl.GRU, {"num_layers": 2}),
    "rnn_relu_bidir": (nn.RNN, celldsl.RNN, {"nonlinearity": "relu", "bidirectional": True}),
}


def _flat(result):
    out = []
    for r in result if isinstance(result, tuple) else (result,):
        out.extend(_flat(r) if isinstance(r, tuple) else [r])
    return out


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", SCRIPTED)
def test_script_matches_torch_nn(name, with_state, unbatched):
    """torch.jit.script of the layer itself: outputs, final states and every gradient as torch.nn's."""
    torch_cls, ours_cls, kwargs = SCRIPTED[name]
    torch.manual_seed(0)
    ref, ours = torch_cls(4, 5, **kwargs, dtype=torch.float64), ours_cls(4, 5, **kwargs, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    scripted = torch.jit.script(ours)
    L = ref.num_layers * (2 if ref.bidirectional else 1)
    x = torch.randn((6, 4) if unbatched else (3, 6, 4) if ref.batch_first else (6, 3, 4), dtype=torch.float64)
    widths = [ref.proj_size or 5, 5] if torch_cls is nn.LSTM else [5]
    states = [torch.randn((L, w) if unbatched else (L, 3, w), dtype=torch.float64) for w in widths]
    results = []
    for module in (ref, scripted):
        xs = x.clone().requires_grad_()
        hs = [s.clone().requires_grad_() for s in states]
        hx = (tuple(hs) if len(hs) == 2 else hs[0]) if with_state else None
        got = _flat(module(xs, hx))
        sum((g * g).sum() for g in got).backward()
        grads = [xs.grad] + ([h.grad for h in hs] if with_state else [])
        results.append([g.detach() for g in got] + grads + [p.grad for p in module.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_script_a_model_twice_and_save_it():
    """PyG scripts models holding these layers, the same class twice in one process; the scripted
    model saves and loads with torch.jit.save/load."""
    ref, ours = _pair()
    x = torch.randn(3, 6, 4)
    first, second = torch.jit.script(ours), torch.jit.script(Model(celldsl))
    for a, b in zip(ref(x), second(x), strict=True):
        assert a.shape == b.shape
    buffer = io.BytesIO()
    torch.jit.save(first, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for a, b in zip(ref(x), loaded(x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


CELLS = {"lstm": (nn.LSTMCell, celldsl.LSTMCell, {}),
         "gru_no_bias": (nn.GRUCell, celldsl.GRUCell, {"bias": False}),
         "rnn_relu": (nn.RNNCell, celldsl.RNNCell, {"nonlinearity": "relu"})}


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", CELLS)
def test_scripted_cells_match_torch_nn(name, with_state, unbatched):
    torch_cls, ours_cls, kwargs = CELLS[name]
    torch.manual_seed(0)
    ref, ours = torch_cls(4, 5, **kwargs, dtype=torch.float64), ours_cls(4, 5, **kwargs, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    scripted = torch.jit.script(ours)
    x = torch.randn((4,) if unbatched else (3, 4), dtype=torch.float64)
    states = [torch.randn((5,) if unbatched else (3, 5), dtype=torch.float64)
              for _ in range(2 if torch_cls is nn.LSTMCell else 1)]
    results = []
    for module in (ref, scripted):
        xs = x.clone().requires_grad_()
        hs = [s.clone().requires_grad_() for s in states]
        hx = (tuple(hs) if len(hs) == 2 else hs[0]) if with_state else None
        got = _flat(module(xs, hx))
        sum((g * g).sum() for g in got).backward()
        grads = [xs.grad] + ([h.grad for h in hs] if with_state else [])
        results.append([g.detach() for g in got] + grads + [p.grad for p in module.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


class GatedGraphLike(nn.Module):
    """PyG's GatedGraphConv's shape: a GRUCell applied num_layers times inside a scripted forward."""

    def __init__(self, mod, channels: int = 4, num_layers: int = 3):
        super().__init__()
        self.num_layers = num_layers
        self.weight = nn.Parameter(torch.randn(num_layers, channels, channels) * 0.3)
        self.rnn = mod.GRUCell(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.num_layers):
            m = x @ self.weight[i]
            x = self.rnn(m, x)
        return x


def test_gated_graph_like_module_scripted_twice():
    torch.manual_seed(0)
    ref, ours = GatedGraphLike(nn), GatedGraphLike(celldsl)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 4)
    for scripted in (torch.jit.script(ours), torch.jit.script(ours)):
        torch.testing.assert_close(scripted(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_any_cell():
    """Recurrent and Cell over a cell torch.nn lacks trace too, against their own eager runs."""
    torch.manual_seed(0)
    layer, step = celldsl.Recurrent("mut1", 4, 4, num_layers=2), celldsl.Cell("mut1", 4, 4)
    traced_layer = torch.jit.trace(layer, (torch.randn(5, 2, 4),))
    traced_step = torch.jit.trace(step, (torch.randn(2, 4),))
    x = torch.randn(7, 3, 4)
    for a, b in zip(_flat(layer(x)) + _flat(step(x[0])), _flat(traced_layer(x)) + _flat(traced_step(x[0])),
                    strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_saved_script_and_trace_load_in_a_fresh_process(tmp_path):
    """torch.jit.load finds celldsl's op after `import celldsl` alone, in another process."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    ref, ours = _pair()
    x = torch.randn(3, 6, 4)
    torch.jit.save(torch.jit.script(ours), tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.trace(ours, (x,)), tmp_path / "traced.pt")
    torch.save({"x": x, "expected": ref(x)}, tmp_path / "io.pt")
    code = textwrap.dedent("""
        import torch
        import celldsl
        io = torch.load("io.pt")
        ok = []
        for name in ("scripted.pt", "traced.pt"):
            got = torch.jit.load(name)(io["x"])
            ok.append(all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, io["expected"])))
        print(ok)
    """)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[True, True]"


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_save_torchscript_carries_its_cells(tmp_path):
    """save_torchscript/load_torchscript: scripted and traced models (a Recurrent over a cell
    torch.nn lacks among them) run where the cache has never seen their cells."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from celldsl.export.programs import save_torchscript

    ref, ours = _pair()
    torch.manual_seed(1)
    any_cell = celldsl.Recurrent("mut1", 4, 4)
    x = torch.randn(3, 6, 4)
    save_torchscript(torch.jit.script(ours), tmp_path / "scripted.pt")
    save_torchscript(torch.jit.trace(ours, (x,)), tmp_path / "traced.pt")
    save_torchscript(torch.jit.trace(any_cell, (x,)), tmp_path / "any.pt")
    torch.save({"x": x, "expected": ref(x), "any": any_cell(x)}, tmp_path / "io.pt")
    code = textwrap.dedent("""
        import torch
        import celldsl
        io = torch.load("io.pt")
        ok = []
        for name, key in (("scripted.pt", "expected"), ("traced.pt", "expected"), ("any.pt", "any")):
            got = celldsl.load_torchscript(name)(io["x"])
            ok.append(all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, io[key])))
        print(ok)
    """)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "CELLDSL_CACHE": str(tmp_path / "empty_cache")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[True, True, True]"



def test_scripted_layer_output_takes_inplace_writes():
    """Scripted, the layer runs the op with its own autograd, which keeps its own copy of out too."""
    torch.manual_seed(0)
    ref, ours = nn.GRU(3, 4, dtype=torch.float64), celldsl.GRU(3, 4, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for module in (ref, torch.jit.script(ours)):
        xs = x.clone().requires_grad_()
        out, _ = module(xs)
        out[-1].zero_()
        (out * out).sum().backward()
        grads.append([xs.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_scripted_parameters_change_in_place_as_torch_nn_and_a_new_parameter_is_not_seen_as_torch_nn():
    """docs/deploy.md: a scripted model sees in-place changes of its parameters, and keeps the Parameter
    objects it was scripted with when a new one is assigned; torch.nn.LSTM's scripted copy does both."""
    x = torch.randn(2, 3, 4)
    seen = {}
    for kind, module in zip(("torch.nn", "celldsl"), _pair(), strict=True):
        scripted = torch.jit.script(module)
        before = scripted(x)[0]
        with torch.no_grad():
            scripted.rnn.weight_hh_l0.mul_(0.5)
        halved = scripted(x)[0]
        scripted.rnn.weight_hh_l0 = nn.Parameter(torch.zeros(20, 5))
        replaced = scripted(x)[0]
        seen[kind] = (torch.equal(before, halved), torch.equal(halved, replaced))
    assert seen["celldsl"] == seen["torch.nn"] == (False, True)


# ---- Recurrent and Cell over any cell (celldsl/nn/script_any.py) ---------------------------------------

from celldsl.compiler import compile_cell  # noqa: E402
from celldsl.resources import zoo_names  # noqa: E402

ELEMENTWISE_ZOO = [n for n in zoo_names() if getattr(compile_cell(n), "plan", None) is not None]
MATRIX_ZOO = [n for n in zoo_names() if n not in ELEMENTWISE_ZOO]
ONE_LAYER = {"mut1", "mut2", "sru"}  # x read elementwise with H: layer 1's 2H-wide input does not fit
OPTIONS = {"phased_lstm": {"input_sizes": {"t": 1}}, "lstm_proj": {"sizes": {"P": 3}},
           "lru": {"sizes": {"P": 3}}, "chrono_lstm": {"sizes": {"T_max": 10}}}
F64 = torch.float64


def _layer(name, backend="torch", **kwargs):
    torch.manual_seed(0)
    layers = 1 if name in ONE_LAYER else 2
    options = {"num_layers": layers, "bidirectional": True, "batch_first": True, **kwargs}
    return celldsl.Recurrent(name, 4, 4, backend=backend, dtype=F64, **OPTIONS.get(name, {}), **options)


def _extras(module, x_time_major, step=False):
    """The extra inputs of the module's cell (phased_lstm's time stamp), eager keywords."""
    names = module.compiled.ir.inputs[1:]
    T, N = x_time_major.shape[:2]
    return {n: torch.rand((N, 1) if step else (N, T, 1), dtype=F64).cumsum(0) for n in names}


def _run_and_grad(module, args, kwargs, tensors):
    for p in module.parameters():
        p.grad = None
    got = _flat(module(*args, **kwargs))
    sum((g * g).sum() for g in got).backward()
    return [g.detach() for g in got] + [t.grad for t in tensors] + [p.grad for p in module.parameters()]


def _states(module, N, layered=True):
    sizes = module._sizes(0) if layered else module._sizes()
    L = module.num_layers * module.num_directions if layered else None
    widths = [sizes[module.compiled.ir.width(s)] for s in module.compiled.states]
    shapes = [((L, N) if layered else (N,)) + (w,) for w in widths]
    return [torch.randn(s, dtype=F64) * 0.5 for s in shapes]


@pytest.mark.parametrize("name", ELEMENTWISE_ZOO)
def test_scripted_recurrent_and_cell_match_eager_for_every_zoo_cell(name):
    """torch.jit.script of Recurrent (2 layers, bidirectional, batch_first, states given) and of Cell:
    outputs, final states and every gradient as the eager module's, float64. Before: a RuntimeError
    from TorchScript ("Compiled functions can't take variable number of arguments")."""
    layer = _layer(name)
    scripted = torch.jit.script(layer)
    x = torch.randn(3, 5, 4, dtype=F64)  # [N, T, I]
    extra = _extras(layer, x.transpose(0, 1))
    states = _states(layer, 3)  # every state the cell carries (prev(...) states included)
    results = []
    for module, kwargs in ((layer, extra), (scripted, {"extra": extra} if extra else {})):
        xs, hs = x.clone().requires_grad_(), [s.clone().requires_grad_() for s in states]
        state = hs[0] if len(hs) == 1 else tuple(hs)
        results.append(_run_and_grad(module, (xs, state), kwargs, [xs, *hs]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)

    torch.manual_seed(1)
    if compile_cell(name).ir.shifted:  # prev(x): a one-step Cell refuses it (test_backward_reliability.py)
        with pytest.raises(celldsl.CellError, match="one-step Cell cannot run prev"):
            celldsl.Cell(name, 4, 4, backend="torch", dtype=F64, **OPTIONS.get(name, {}))
        return
    step = celldsl.Cell(name, 4, 4, backend="torch", dtype=F64, **OPTIONS.get(name, {}))
    scripted_step = torch.jit.script(step)
    x = torch.randn(3, 4, dtype=F64)
    extra = _extras(step, x[None], step=True)
    states = _states(step, 3, layered=False)
    results = []
    for module, kwargs in ((step, extra), (scripted_step, {"extra": extra} if extra else {})):
        xs, hs = x.clone().requires_grad_(), [s.clone().requires_grad_() for s in states]
        state = hs[0] if len(hs) == 1 else tuple(hs)
        results.append(_run_and_grad(module, (xs, state), kwargs, [xs, *hs]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ELEMENTWISE_ZOO)
def test_parameter_program_replays_op_params(name):
    """The scripted layer's parameter program (script_programs.py) gives op_params' list exactly,
    bias=False (zeros) included."""
    from celldsl.nn.script_programs import run_program

    for bias in (True, False):
        layer = _layer(name, bias=bias)
        copy = layer.__prepare_scriptable__()
        x = torch.randn(2, 3, 4, dtype=F64)
        for idx, (lay, d) in enumerate(layer._positions()):
            want = layer._weights(lay, d, like=x)
            got = run_program(copy._script_programs[idx], copy._script_floats[idx], copy._script_stored, x)
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape and torch.equal(a, b)


class AnyCellModel(nn.Module):
    """A model a user scripts: a Recurrent over a zoo cell torch.nn lacks, unbatched and batched, and a
    Cell with an extra input (phased_lstm's time stamp) called from the scripted forward."""

    def __init__(self):
        super().__init__()
        self.rnn = celldsl.Recurrent("greff_fgr", 4, 5, num_layers=2, bidirectional=True, dtype=F64)
        self.step = celldsl.Cell("phased_lstm", 10, 3, input_sizes={"t": 1}, dtype=F64)

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        out, (c, y, pi, pf, po) = self.rnn(x)
        h, (c2, h2) = self.step(out[-1], None, {"t": t})
        return out, c, y, h, c2, h2, self.rnn(x[:, 0])[0]


def _any_model_inputs():
    torch.manual_seed(2)
    return torch.randn(6, 3, 4, dtype=F64), torch.rand(3, 1, dtype=F64)


def test_script_a_model_holding_recurrent_and_cell_twice():
    """Scripted twice in one process (the second model another instance of the same class), on the
    default backend (the C kernels on CPU); values and gradients as eager. The eager model still runs
    after scripting (torch.jit.script puts its scriptable copy of each layer in the parent), with the
    eager keywords, and pickles as celldsl's own classes."""
    import pickle

    torch.manual_seed(0)
    eager = AnyCellModel()
    x, t = _any_model_inputs()
    want = _run_and_grad(eager, (x, t), {}, [])
    first = torch.jit.script(eager)
    assert "ops.celldsl.cell_sequence" in first.rnn.script_layers.code  # the registered op itself
    assert "ops.celldsl.cell_sequence" in first.step.script_call.code
    second = torch.jit.script(AnyCellModel())
    second.load_state_dict(eager.state_dict())
    for scripted in (first, second, torch.jit.script(eager)):
        got = _run_and_grad(scripted, (x, t), {}, [])
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    again = _run_and_grad(eager, (x, t), {}, [])
    for a, b in zip(want, again, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    out, _ = eager.step(x[0, :, :].repeat(1, 3)[:, :10], t=t)  # the eager keyword still works
    assert out.shape == (3, 3)
    copy = pickle.loads(pickle.dumps(eager))
    assert type(copy.rnn) is celldsl.Recurrent and type(copy.step) is celldsl.Cell
    assert torch.equal(copy(x, t)[0], eager(x, t)[0])


def test_scripted_any_cell_saves_and_loads_in_a_fresh_process(tmp_path):
    """celldsl.save_torchscript / load_torchscript of the scripted model: a fresh process with an
    empty cache gives the eager numbers and gradients (float64)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from celldsl.export.programs import save_torchscript

    torch.manual_seed(0)
    eager = AnyCellModel()
    x, t = _any_model_inputs()
    want = _run_and_grad(eager, (x, t), {}, [])
    save_torchscript(torch.jit.script(eager), tmp_path / "model.pt")
    torch.save({"x": x, "t": t, "want": want}, tmp_path / "io.pt")
    code = textwrap.dedent("""
        import torch
        import celldsl
        io = torch.load("io.pt")
        model = celldsl.load_torchscript("model.pt")
        got = list(model(io["x"], io["t"]))
        sum((g * g).sum() for g in got).backward()
        got = [g.detach() for g in got] + [p.grad for p in model.parameters()]
        print(len(got) == len(io["want"]) and all(torch.allclose(a, b, rtol=1e-9, atol=1e-10)
                                                  for a, b in zip(got, io["want"])))
    """)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "CELLDSL_CACHE": str(tmp_path / "empty_cache")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_scripted_recurrent_refuses_bad_input_with_torch_messages():
    """Scripted, the checks raise as TorchScript raises (torch.jit.Error, the Python type named in it)
    with torch.nn's wording."""
    scripted = torch.jit.script(celldsl.Recurrent("mut3", 4, 4, backend="torch"))
    wrong_size = "RuntimeError: input.size\\(-1\\) must be equal to input_size. Expected 4, got 3"
    with pytest.raises(torch.jit.Error, match=wrong_size):
        scripted(torch.randn(5, 2, 3))
    wrong_state = "RuntimeError: Expected hidden\\[0\\] size \\[1, 2, 4\\], got \\[1, 3, 4\\]"
    with pytest.raises(torch.jit.Error, match=wrong_state):
        scripted(torch.randn(5, 2, 4), torch.randn(1, 3, 4))
    step = torch.jit.script(celldsl.Cell("phased_lstm", 4, 4, input_sizes={"t": 1}, backend="torch"))
    with pytest.raises(torch.jit.Error, match="ValueError: cell 'phased_lstm' takes the extra input 't'"):
        step(torch.randn(2, 4))


@pytest.mark.parametrize("name", MATRIX_ZOO)
def test_scripting_a_matrix_memory_cell_gives_the_eager_numbers(name):
    """A matrix-memory (or shaped) cell's layer scripts through the op celldsl::matrix_sequence
    (nn/script_matrix.py; it was refused when torch.jit.script started). Its Cell (MatrixCell) too."""
    ir = compile_cell(name).ir
    sizes = {"heads": 1, **{w: 2 for w in (*ir.widths, *ir.init_sizes)}}
    layer = celldsl.MatrixRecurrent(name, 4, sizes)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)[0]

    x = torch.randn(3, 2, 4)
    want = Holder()(x)
    torch.testing.assert_close(torch.jit.script(Holder())(x), want)
    nodes = compile_cell(name).ir.nodes
    nodes = nodes.values() if isinstance(nodes, dict) else nodes
    if not any(n.op == "shift" for n in nodes):  # prev(): no one-step Cell (refused when built)
        step = layer.cell(0)
        torch.testing.assert_close(torch.jit.script(step)(x[0])[0], step(x[0])[0])


SEVEN_STATES = """cell seven
input x
state a, b, c, d, e, f, g
output a
param weight_ih = [W]
a' = tanh(W @ x + b)
b' = a + c
c' = b
d' = c
e' = d
f' = e
g' = f
"""


def test_scripting_a_cell_with_more_states_than_a_typed_tuple_says_so():
    with pytest.raises(RuntimeError, match="carries 7 states; a scripted layer takes at most 6"):
        torch.jit.script(celldsl.Recurrent(SEVEN_STATES, 4, 4, backend="torch"))


def test_the_scripted_layers_eager_copy_runs_packed_sequences():
    """After scripting a parent, its attribute is the scriptable copy: eagerly it is still the layer
    (a PackedSequence runs)."""
    torch.manual_seed(0)
    holder = nn.ModuleDict({"rnn": celldsl.Recurrent("mut3", 4, 4, backend="torch")})
    x = torch.randn(5, 2, 4)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    want = holder["rnn"](packed)[0].data

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = holder["rnn"]

        def forward(self, x):
            return self.rnn(x)[0]

    parent = Parent()
    torch.jit.script(parent)
    assert type(parent.rnn) is not celldsl.Recurrent and isinstance(parent.rnn, celldsl.Recurrent)
    torch.testing.assert_close(parent.rnn(packed)[0].data, want)
