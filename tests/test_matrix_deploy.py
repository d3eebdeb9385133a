"""Matrix-path cells (tests/zoo.py MATRIX and SHAPED) deploy as the elementwise ones do: torch.export
(strict and not, dynamic T and N), torch.jit.trace (its default check) and torch.jit.script, through
the op celldsl::matrix_sequence (celldsl/ops/matrix_op.py), whose programs and scripted modules load
in a fresh process. The reference is the eager layer (its own loop, not the op)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matrix_layers import matrix_layer
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from zoo import MATRIX, SHAPED

import celldsl
from celldsl.compiler import compile_cell
from celldsl.export.programs import cell_keys, torchscript_cell_keys
from celldsl.nn.matrix import MatrixCell
from celldsl.ops import matrix_op
from celldsl.ops.matrix_op import decode_sizes, encode_sizes, matrix_sequence

ROOT = Path(__file__).resolve().parents[1]
I = 4
TOL = {"rtol": 1e-10, "atol": 1e-12}


def sizes_of(cell: str) -> dict:
    """Small, distinct sizes for every width the cell declares (2 heads where it has heads)."""
    ir = compile_cell(cell).ir
    names = sorted(set(ir.widths) | set(ir.init_sizes))
    sizes = {w: 2 + i % 3 for i, w in enumerate(names)}
    if ir.heads:
        sizes["heads"] = 2
    return sizes


def layer_of(cell: str, backend: str = "auto", seed: int = 0, **kw) -> celldsl.MatrixRecurrent:
    return matrix_layer(cell, backend, sizes=sizes_of(cell), inputs=I, seed=seed, **kw)


class Model(torch.nn.Module):
    """A model around a layer, returning its output and states as a flat tuple."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out, states = self.layer(x)
        return (out, *(states if isinstance(states, tuple) else (states,)))


def flat(result):
    out, states = result
    return (out, *(states if isinstance(states, tuple) else (states,)))


def ops_in(program) -> list:
    return [n.target for n in program.graph.nodes if n.op == "call_function" and "celldsl" in str(n.target)]


def test_sizes_encode_sorted_and_decode_without_eval():
    assert encode_sizes({"x": 3, "heads": 2, "V": 4, "K": 4}) == "K=4,V=4,heads=2,x=3"
    assert decode_sizes("K=4,V=4,heads=2,x=3") == {"K": 4, "V": 4, "heads": 2, "x": 3}
    for bad in ("K=4,V", "K=4,V=x", "__import__('os').getcwd()=1", "K=4;V=2"):
        with pytest.raises(ValueError, match="name=int"):
            decode_sizes(bad)
    with pytest.raises(ValueError, match="identifier"):
        encode_sizes({"K=1,V": 2})


def test_the_op_on_an_elementwise_cell_is_refused():
    key = celldsl.Recurrent("lstm", 3, 4).compiled.key
    with pytest.raises(ValueError, match="no matrix state"):
        matrix_sequence(key, "torch", torch.zeros(1, 1, 3), [torch.zeros(1, 4)], [], "x=3", None)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("cell", MATRIX + SHAPED)
def test_export_of_every_cell_runs_at_other_lengths_and_batches(cell, strict):
    model = Model(layer_of(cell))
    x = torch.randn(3, 2, I, dtype=torch.float64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("T"), 1: Dim("N")},), strict=strict)
    assert torch.ops.celldsl.matrix_sequence.default in ops_in(program)
    x2 = torch.randn(5, 3, I, dtype=torch.float64)
    torch.testing.assert_close(program.module()(x2), model(x2), **TOL)


@pytest.mark.parametrize("cell", MATRIX + SHAPED)
def test_trace_and_script_of_every_cell_give_the_eager_numbers(cell):
    layer = layer_of(cell)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    traced = torch.jit.trace(Model(layer), (x,))  # check_trace=True: the trace is run again and compared
    torch.testing.assert_close(traced(x), Model(layer)(x), **TOL)
    scripted = torch.jit.script(layer)
    x2 = torch.randn(5, 3, I, dtype=torch.float64)
    torch.testing.assert_close(flat(scripted(x2)), flat(layer(x2)), **TOL)
    state = tuple(torch.randn_like(s) for s in flat(layer(x2))[1:])
    given = state if isinstance(layer(x2)[1], tuple) else state[0]
    torch.testing.assert_close(flat(scripted(x2, given)), flat(layer(x2, given)), **TOL)


@pytest.mark.parametrize("cell", ["mlstm", "flstm"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_layer_options_export_trace_and_script(cell, backend):
    """2 layers, bidirectional, batch_first, an initial state; mlstm has 3 states, flstm no heads."""
    layer = layer_of(cell, backend, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 3, I, dtype=torch.float64)
    s0 = tuple(torch.randn_like(s) for s in flat(layer(x))[1:])
    state = s0 if isinstance(layer(x)[1], tuple) else s0[0]

    class WithState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, state):
            return flat(self.layer(x, state))

    model = WithState()
    batch = {1: Dim("N")}
    dyn = ({0: Dim("N"), 1: Dim("T")}, tuple(batch for _ in s0) if isinstance(state, tuple) else batch)
    x2 = torch.randn(4, 6, I, dtype=torch.float64)
    s2 = tuple(torch.randn(s.shape[0], 4, *s.shape[2:], dtype=torch.float64) for s in s0)
    s2 = s2 if isinstance(state, tuple) else s2[0]
    want = model(x2, s2)
    for strict in (True, False):
        program = torch.export.export(model, (x, state), dynamic_shapes=dyn, strict=strict)
        torch.testing.assert_close(program.module()(x2, s2), want, **TOL)
    traced = torch.jit.trace(model, (x, state))
    torch.testing.assert_close(traced(x, state), model(x, state), **TOL)
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(flat(scripted(x2, s2)), want, **TOL)


@pytest.mark.parametrize("cell", ["gla", "flstm"])
def test_a_matrix_cell_step_exports_traces_and_scripts(cell):
    ir = compile_cell(cell).ir
    sizes = sizes_of(cell)
    torch.manual_seed(0)
    if ir.heads:
        hidden = sizes["heads"] * sizes["V"]
        step = celldsl.Cell(cell, I, hidden, sizes=sizes, dtype=torch.float64)
    else:
        widths = {k: v for k, v in sizes.items() if k != "H"}
        step = celldsl.Cell(cell, I, 3, sizes=widths, dtype=torch.float64)
    assert isinstance(step, MatrixCell)
    x = torch.randn(2, I, dtype=torch.float64)
    program = torch.export.export(Model(step), (x,), dynamic_shapes=({0: Dim("N")},))
    x2 = torch.randn(5, I, dtype=torch.float64)
    torch.testing.assert_close(program.module()(x2), Model(step)(x2), **TOL)
    traced = torch.jit.trace(Model(step), (x,))
    torch.testing.assert_close(traced(x), Model(step)(x), **TOL)
    scripted = torch.jit.script(step)
    out, states = step(x2)
    assert isinstance(states, tuple)
    torch.testing.assert_close(flat(scripted(x2, states)), flat(step(x2, states)), **TOL)
    torch.testing.assert_close(flat(scripted(x2[0])), flat(step(x2[0])), **TOL)  # unbatched


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("cell", ["mlstm", "gated_deltanet"])
def test_gradcheck_through_the_op(cell, backend):
    layer = layer_of(cell, backend)
    sizes = layer.layer_sizes[0]
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(2, *layer.ir.state_shape(s, sizes), dtype=torch.float64, requires_grad=True)
              for s in layer.ir.states]
    params = [getattr(layer, layer.param_name(n, 0, 0)) for n in layer.ir.params]
    n = len(states)
    for lengths in (None, torch.tensor([3, 1])):
        def run(x, *rest, lengths=lengths):
            return tuple(matrix_sequence(layer.compiled.key, backend, x, list(rest[:n]), list(rest[n:]),
                                         encode_sizes(sizes), lengths))

        assert torch.autograd.gradcheck(run, (x, *states, *params))
        args = (layer.compiled.key, backend, x, states, params, encode_sizes(sizes), lengths)
        torch.library.opcheck(matrix_sequence, args)  # schema, fake kernel, autograd registration


def test_gradients_through_a_scripted_layer_match_eager():
    layer = layer_of("gla", num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    scripted = torch.jit.script(layer)
    out = scripted(x)[0]
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x, *layer.parameters()])
    want = torch.autograd.grad((layer(x)[0] * g).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(got, want, **TOL)


def test_eager_calls_run_the_loop_not_the_op(monkeypatch):
    """Eager training keeps the loop's own speed: the op is for what a tracer sees."""
    layer = layer_of("gla")

    def refuse(*args, **kw):
        raise AssertionError("the op was called eagerly")

    monkeypatch.setattr(matrix_op, "call", refuse)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    layer(x)[0].sum().backward()
    with pytest.raises(AssertionError, match="called eagerly"):
        torch.export.export(Model(layer), (x.detach(),), strict=False)


def test_scripting_the_same_class_twice_and_the_parent_still_runs_eagerly():
    a, b = layer_of("gla", seed=0), layer_of("gla", seed=1, num_layers=2)
    parent = torch.nn.Sequential()
    parent.add_module("a", a)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    sa, sb = torch.jit.script(a), torch.jit.script(b)
    torch.testing.assert_close(flat(sa(x)), flat(a(x)), **TOL)
    torch.testing.assert_close(flat(sb(x)), flat(b(x)), **TOL)

    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = a

        def forward(self, x):
            return self.a(x)[0]

    p = Parent()
    torch.jit.script(p)  # puts the scriptable copy in p's place; p's eager forward then calls it
    torch.testing.assert_close(p(x), a(x)[0], **TOL)
    assert type(p.a).__name__.startswith("Scripted") and p.a.__class__ is celldsl.MatrixRecurrent


def test_a_packed_sequence_under_export_is_refused_with_the_reason():
    """strict=False (strict=True stops earlier: dynamo does not trace torch's pack_padded_sequence)."""
    layer = layer_of("gla")

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, lengths):
            return self.layer(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]

    x, lengths = torch.randn(3, 2, I, dtype=torch.float64), torch.tensor([3, 2])
    with pytest.raises(RuntimeError, match="PackedSequence is not exported"):
        torch.export.export(Packed(), (x, lengths), strict=False)


def test_a_packed_sequence_traces_and_runs_other_lengths():
    """A trace keeps the lengths as data: the op takes them (its `lengths` argument)."""
    layer = layer_of("mlstm", bidirectional=True)

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, lengths):
            out, states = self.layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
            return (pad_packed_sequence(out, total_length=x.shape[0])[0], *states)

    x = torch.randn(5, 3, I, dtype=torch.float64)
    traced = torch.jit.trace(Packed(), (x, torch.tensor([5, 2, 4])))
    assert len(traced.layer.graph.findAllNodes("celldsl::matrix_sequence")) == 2
    lengths = torch.tensor([3, 5, 1])
    torch.testing.assert_close(traced(x, lengths), Packed()(x, lengths), **TOL)


def _fresh(script: str, tmp_path, *paths) -> None:
    """Run `script` in a fresh process with an empty cache: the cells come from the saved file's text."""
    env = {**os.environ, "CELLDSL_CACHE": str(tmp_path / "empty_cache")}
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("same")


FRESH = """
import sys, torch, celldsl
data = torch.load(sys.argv[2])
module = celldsl.{load}(sys.argv[1]){module}
got = module(data["x"])
assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(got, data["want"], strict=True))
print("same")
"""


def test_a_saved_program_loads_and_runs_in_a_fresh_process(tmp_path):
    model = Model(layer_of("mlstm", num_layers=2, bidirectional=True))
    x = torch.randn(3, 2, I, dtype=torch.float64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("T"), 1: Dim("N")},), strict=False)
    assert cell_keys(program) == [model.layer.compiled.key]
    celldsl.save_program(program, tmp_path / "m.pt2")
    x2 = torch.randn(5, 3, I, dtype=torch.float64)
    torch.save({"x": x2, "want": model(x2)}, tmp_path / "data.pt")
    _fresh(FRESH.format(load="load_program", module=".module()"), tmp_path, tmp_path / "m.pt2",
           tmp_path / "data.pt")


def test_a_saved_torchscript_module_loads_and_runs_in_a_fresh_process(tmp_path):
    layer = layer_of("flstm", batch_first=True)
    scripted = torch.jit.script(Model(layer))
    assert torchscript_cell_keys(scripted) == [layer.compiled.key]
    celldsl.save_torchscript(scripted, tmp_path / "m.pt")
    x2 = torch.randn(3, 5, I, dtype=torch.float64)
    torch.save({"x": x2, "want": Model(layer)(x2)}, tmp_path / "data.pt")
    _fresh(FRESH.format(load="load_torchscript", module=""), tmp_path, tmp_path / "m.pt",
           tmp_path / "data.pt")


def test_a_traced_module_names_its_cell():
    layer = layer_of("hgrn2")
    traced = torch.jit.trace(Model(layer), (torch.randn(3, 2, I, dtype=torch.float64),))
    assert torchscript_cell_keys(traced) == [layer.compiled.key]



def test_torch_compile_fullgraph_trains_through_the_op_and_its_backward():
    layer = layer_of("mlstm", num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, I, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda x: layer(x)[0], backend="aot_eager", fullgraph=True)
    g = torch.randn(5, 3, layer.output_size * 2, dtype=torch.float64)
    got = torch.autograd.grad((compiled(x) * g).sum(), [x, *layer.parameters()])
    want = torch.autograd.grad((layer(x)[0] * g).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(got, want, **TOL)


def test_the_backward_op_refuses_rather_than_return_zero_gradients(monkeypatch):
    """If a torch release stops _WithAutograd from turning autograd back on inside the op, the backward
    raises instead of returning zeros as the gradients (simulated: autograd left off)."""
    from celldsl.ops import matrix_op

    monkeypatch.setattr(matrix_op, "_WithAutograd", torch.no_grad)
    layer = layer_of("gla", "cpu")
    sizes = layer.layer_sizes[0]
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    states = [torch.zeros(2, *layer.ir.state_shape(s, sizes), dtype=torch.float64) for s in layer.ir.states]
    params = [getattr(layer, layer.param_name(n, 0, 0)) for n in layer.ir.params]
    out = matrix_sequence(layer.compiled.key, "cpu", x, states, params, encode_sizes(sizes), None)[0]
    with pytest.raises(RuntimeError, match="autograd did not record the loop"):
        out.sum().backward()


@pytest.mark.parametrize("cell", ["gla", "mlstm", "flstm"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_an_unbatched_call_is_the_batched_call_of_one_sequence(cell, batch_first, backend):
    """x [T, I] and states without their batch axis, as torch.nn's layers take them (was refused):
    the batched call on N = 1, squeezed, eagerly (values and gradients) and scripted. Two layers,
    bidirectional, given states."""
    layer = layer_of(cell, backend, num_layers=2, bidirectional=True, batch_first=batch_first)
    layer = layer.double()
    x = torch.randn(3, I, dtype=torch.float64, requires_grad=True)
    zeros = flat(layer(x.detach().unsqueeze(0 if batch_first else 1)))[1:]
    states = [torch.randn_like(s[:, 0]).requires_grad_() for s in zeros]
    given = tuple(states) if isinstance(layer(x)[1], tuple) else states[0]
    got = flat(layer(x, given))
    batched = tuple(s.unsqueeze(1) for s in states) if isinstance(given, tuple) else states[0].unsqueeze(1)
    want = flat(layer(x.unsqueeze(0 if batch_first else 1), batched))
    want = (want[0].squeeze(0 if batch_first else 1), *(s.squeeze(1) for s in want[1:]))
    assert [t.shape for t in got] == [t.shape for t in want] and got[0].shape == (3, layer.output_size * 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gs = [torch.randn_like(t) for t in got]
    grads = torch.autograd.grad(got, [x, *states], gs)
    torch.testing.assert_close(grads, torch.autograd.grad(want, [x, *states], gs), **TOL)
    torch.testing.assert_close(flat(torch.jit.script(layer)(x, given)), got, **TOL)
    with pytest.raises(RuntimeError, match="For unbatched 2-D input, the states should have no batch axis"):
        layer(x, batched)  # an unbatched x takes states without the batch axis, as torch.nn's
