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
