"""The layers' fast path past the dispatcher (ops/op.py `call`, `plain_eager`).

- in plain eager mode the layers run the ops' implementations directly, forward and backward;
- whatever could see the op (a dispatch mode, a function mode, torch.func, autocast, the profiler, a
  tensor subclass, meta tensors) gets the op through the dispatcher: a mode sees it by name;
- both paths give bitwise the same outputs and gradients.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import celldsl
from celldsl.ops import op as ops
from celldsl.ops.function import loop_for


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class Tagged(torch.Tensor):
    """A tensor subclass with nothing of its own."""


def counting(monkeypatch):
    calls = {"forward": 0, "backward": 0}
    impls = dict(ops.IMPLEMENTATIONS)
    for op, name in ((ops.cell_sequence, "forward"), (ops.cell_sequence_backward, "backward")):
        def wrapped(*args, _impl=impls[op], _name=name):
            calls[_name] += 1
            return _impl(*args)
        monkeypatch.setitem(ops.IMPLEMENTATIONS, op, wrapped)
    return calls


def run_layer(layer, x):
    out, (h, c) = layer(x)
    (out.sum() + h.sum() + c.sum()).backward()
    return [out.detach(), h.detach(), c.detach(), x.grad, *(p.grad for p in layer.parameters())]


def test_plain_eager_calls_the_implementations_and_a_mode_sees_the_op(monkeypatch):
    from celldsl.targets.c import fused

    monkeypatch.setattr(fused, "SEQUENCE_ELEMENTS", 0)  # the op's path, not a prepared training sequence
    torch.manual_seed(0)
    layer = celldsl.LSTM(5, 7)
    x = torch.randn(4, 3, 5, requires_grad=True)
    calls = counting(monkeypatch)
    direct = run_layer(layer, x)
    assert calls == {"forward": 1, "backward": 1}
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with OpLog() as log:
        through_op = run_layer(layer, x)
    assert "celldsl.cell_sequence.default" in log.names
    assert "celldsl.cell_sequence_backward.default" in log.names
    assert calls == {"forward": 1, "backward": 1}  # the mode's run went through the dispatcher
    for a, b in zip(direct, through_op, strict=True):
        assert torch.equal(a, b)


def test_no_grad_forward_takes_the_fast_path(monkeypatch):
    """Without the dispatcher, and without the backward's intermediates: the loop's `infer`."""
    layer = celldsl.GRU(4, 6)
    calls, ran = counting(monkeypatch), inferring(monkeypatch, layer)
    with torch.no_grad():
        layer(torch.randn(3, 2, 4))
    assert ran == [1] and calls["forward"] == 0


def inferring(monkeypatch, layer) -> list:
    """A list that gets an entry at each call of the layer's CPU loop's `infer` (the op's path: not
    the prepared sequence a call this small replays, tests/test_prepared_sequence.py)."""
    from celldsl.targets.c import fused

    monkeypatch.setattr(fused, "SEQUENCE_ELEMENTS", 0)
    loop = loop_for(layer.compiled.key, "cpu")
    infer, ran = type(loop).infer, []
    monkeypatch.setattr(type(loop), "infer", lambda self, *a: ran.append(1) or infer(self, *a))
    return ran


@pytest.mark.parametrize("context", ["dispatch_mode", "function_mode", "autocast", "profiler", "vmap"])
def test_anything_that_could_see_the_op_gets_the_op(context):
    x = torch.randn(2, 3)
    if context == "vmap":
        seen = []
        torch.func.vmap(lambda row: seen.append(ops.plain_eager([row])) or row)(x)
        assert seen == [False]
        return
    managers = {
        "dispatch_mode": OpLog,
        "function_mode": torch.overrides.TorchFunctionMode,
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "profiler": torch.profiler.profile,
    }
    assert ops.plain_eager([x])
    with managers[context]():
        assert not ops.plain_eager([x])
    assert ops.plain_eager([x])


def test_subclasses_and_meta_tensors_get_the_op():
    x = torch.randn(2, 3)
    assert ops.plain_eager([x, torch.nn.Parameter(torch.randn(3)), None])
    assert not ops.plain_eager([x, x.as_subclass(Tagged)])
    assert not ops.plain_eager([x, torch.empty(2, device="meta")])


def test_inference_mode_takes_the_fast_path_and_matches_torch(monkeypatch):
    torch.manual_seed(1)
    layer = celldsl.LSTM(4, 5)
    reference = torch.nn.LSTM(4, 5)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 2, 4)
    calls, ran = counting(monkeypatch), inferring(monkeypatch, layer)
    with torch.inference_mode():
        out, (h, c) = layer(x)
        want, (h_want, c_want) = reference(x)
    assert ran == [1] and calls["forward"] == 0 and out.is_inference()
    for got, expected in ((out, want), (h, h_want), (c, c_want)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
