"""The CPU loop's forward without the backward's intermediates (FusedCPULoop.infer, reached by
ops.run through ops.op.infer when no gradient can follow) gives the saving forward's numbers bit for
bit, and a forward with gradients after it still trains as torch.nn does.

- loop level: infer == forward's out and final states (torch.equal), float32 and float64, padded
  and packed sequences, odd sizes, the native loop (1 and 2 threads) and the Python loop, for cells
  with a state kept in place (lstm, slstm's three, qrnn's c under an output that is not a state), a
  step product of its own (gru), an operand of the step (mut1), and a hoisted pointwise (kitchen);
- which states stay in place: no output state, no GEMM operand, none a later kernel reads;
- layers: under torch.no_grad() (and with nothing requiring grad) celldsl.LSTM / GRU run `infer`,
  2 layers bidirectional, padded and packed, equal to the same call with gradients, bit for bit;
- a no_grad forward, then a forward with gradients: outputs and gradients vs torch.nn.LSTM.
"""

import pytest
import torch
from test_cpu_fused import make_layer
from test_cpu_native import args_for, fused_loop
from torch.nn.utils.rnn import pack_padded_sequence

import celldsl
from celldsl.targets.c import fused as cpu_fused
from celldsl.targets.c.fused import FusedCPULoop

pytestmark = pytest.mark.skipif(cpu_fused.compiler() is None, reason="needs a C compiler for the kernels")

CELLS = ["lstm", "gru", "slstm", "qrnn", "mut1", "kitchen"]


def same(a, b) -> bool:
    return len(a) == len(b) and all(u.shape == v.shape and torch.equal(u, v)
                                    for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("backend", ["native", "mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stem", CELLS)
def test_infer_equals_forward_bit_for_bit(stem, dtype, backend):
    for hidden, N, packed in ((5, 3, False), (13, 1, True), (37, 7, True), (37, 7, False)):
        torch.manual_seed(hidden + N)
        layer = make_layer(stem, dtype=dtype, hidden=hidden, tag=f"infer {dtype}")
        loop = fused_loop(layer)
        loop.gemm = backend
        x, states, params, batch_sizes = args_for(layer, T=5, N=N, packed=packed, seed=hidden)
        with torch.no_grad():
            out, finals, _saved = loop.forward(x, states, *params, batch_sizes)
            ran = loop.ran.get("forward")
            inferred = loop.infer(x, states, *params, batch_sizes)
        assert loop.ran.get("forward") == ran  # the same loop ran
        assert same([out, *finals], [inferred[0], *inferred[1]]), (hidden, N, packed)


@pytest.mark.parametrize("stem", ["lstm", "slstm", "gru"])
def test_infer_two_threads_equal_one(stem, monkeypatch):
    """In place over threads: each thread's kernel reads and writes its own columns of a state."""
    from celldsl.targets.c import native as cpu_native

    monkeypatch.setattr(cpu_native, "MIN_STEP_WORK", 0)
    monkeypatch.setattr(cpu_native, "MIN_ELEMENTWISE_WORK", 0)
    layer = make_layer(stem, hidden=37, tag="infer threads")
    loop = fused_loop(layer)
    loop.gemm = "native"
    x, states, params, batch_sizes = args_for(layer, T=6, N=7, packed=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            out, finals, _ = loop.forward(x, states, *params, batch_sizes)
            inferred = loop.infer(x, states, *params, batch_sizes)
    finally:
        torch.set_num_threads(before)
    assert same([out, *finals], [inferred[0], *inferred[1]])


def test_which_states_stay_in_place():
    def in_place(stem):
        loop = fused_loop(make_layer(stem, hidden=5, tag="infer"))
        return [loop.states[i] for i in loop.in_place]

    assert in_place("lstm") == ["c"]  # h is the output and the GEMM's operand
    assert in_place("gru") == []
    assert in_place("slstm") == ["c", "n", "m"]
    assert in_place("qrnn") == ["c"]  # the output h is not a state
    assert in_place("greff_fgr") == ["c"]  # prev(i), prev(f), prev(o) are GEMM operands
    assert in_place("ln_lstm") == []  # reductions over a row (native_blocker): every state keeps its rows


def _lstm_pair(dtype, layers=2, bidirectional=True, I=7, H=11):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, num_layers=layers, bidirectional=bidirectional, dtype=dtype)
    mine = celldsl.LSTM(I, H, num_layers=layers, bidirectional=bidirectional, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _flat(result):
    out, state = result
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    return [out, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_layers_run_infer_without_grad_bit_for_bit(kind, dtype, packed, monkeypatch):
    torch.manual_seed(1)
    layer = getattr(celldsl, kind)(7, 11, num_layers=2, bidirectional=True, dtype=dtype)
    x = torch.randn(9, 5, 7, dtype=dtype)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([9, 8, 8, 3, 1]))
    calls = []
    infer = FusedCPULoop.infer
    monkeypatch.setattr(FusedCPULoop, "infer", lambda self, *a: calls.append(1) or infer(self, *a))
    monkeypatch.setattr(cpu_fused, "SEQUENCE_ELEMENTS", 0)  # the op's infer, not the prepared sequences
    trained = _flat(layer(x))  # parameters require grad: the saving forward
    assert not calls
    with torch.no_grad():
        inferred = _flat(layer(x))
    assert len(calls) == 4  # 2 layers x 2 directions
    for p in layer.parameters():
        p.requires_grad_(False)
    frozen = _flat(layer(x))  # grad mode on, nothing to differentiate
    assert len(calls) == 8
    assert same([t.detach() for t in trained], inferred) and same(inferred, frozen)


@pytest.mark.parametrize("packed", [False, True])
def test_no_grad_forward_then_training_forward_matches_torch_nn(packed):
    ref, mine = _lstm_pair(torch.float64)
    x = torch.randn(6, 4, 7, dtype=torch.float64)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([6, 5, 3, 2]))
    with torch.no_grad():
        for a, b in zip(_flat(ref(x)), _flat(mine(x)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    outs = [_flat(m(x)) for m in (ref, mine)]
    for flat in outs:
        sum((t * (i + 1) * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).sum()
            for i, t in enumerate(flat)).backward()
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(ref.named_parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
