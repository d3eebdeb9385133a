"""celldsl's layers under torch.autocast("cpu", dtype=torch.bfloat16), as torch.nn's (issue 27, item 4).

torch.nn.LSTM runs in bfloat16 under CPU autocast; celldsl's raised "input dtype does not match
weight dtype". Each class runs beside torch.nn's with the same float32 weights: the results have
torch.nn's dtype (bfloat16, or float32 where torch.nn's class returns it), the values and the float32
parameters' gradients agree within bfloat16's precision, and a float32 reference on bfloat16-rounded
weights and input agrees closely (celldsl computes what autocast asks: the same op in bfloat16).
"""

import pytest
import torch

import celldsl

T, N, I, H = 6, 3, 8, 16
AC = {"device_type": "cpu", "dtype": torch.bfloat16}

PAIRS = {
    "lstm": (torch.nn.LSTM, celldsl.LSTM, {}),
    "lstm_2layer_bidir": (torch.nn.LSTM, celldsl.LSTM, {"num_layers": 2, "bidirectional": True}),
    "gru": (torch.nn.GRU, celldsl.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, celldsl.RNN, {}),
    "rnn_relu": (torch.nn.RNN, celldsl.RNN, {"nonlinearity": "relu"}),
    "lstm_cell": (torch.nn.LSTMCell, celldsl.LSTMCell, {}),
    "gru_cell": (torch.nn.GRUCell, celldsl.GRUCell, {}),
    "rnn_cell": (torch.nn.RNNCell, celldsl.RNNCell, {}),
}


def _flat(result):
    out = []
    for r in result if isinstance(result, tuple) else (result,):
        out.extend(_flat(r) if isinstance(r, tuple) else [r])
    return out


def _pair(name):
    torch_cls, ours_cls, kwargs = PAIRS[name]
    torch.manual_seed(0)
    ref = torch_cls(I, H, **kwargs)
    ours = ours_cls(I, H, **kwargs)
    ours.load_state_dict(ref.state_dict())
    is_cell = "cell" in name
    x = torch.randn((N, I) if is_cell else (T, N, I))
    return ref, ours, x


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", PAIRS)
def test_autocast_matches_torch_nn(name, input_dtype):
    ref, ours, x = _pair(name)
    results = []
    for module in (ref, ours):
        with torch.autocast(**AC):
            got = _flat(module(x.to(input_dtype)))
        sum(g.float().sum() for g in got).backward()
        results.append((got, [p.grad for p in module.parameters()]))
    (ref_out, ref_grads), (our_out, our_grads) = results
    assert [t.dtype for t in our_out] == [t.dtype for t in ref_out]
    for a, b in zip(ref_out, our_out, strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05)
    for a, b in zip(ref_grads, our_grads, strict=True):
        assert b.dtype == torch.float32
        scale = a.abs().max().clamp(min=1.0)
        assert (b - a).abs().max() <= 0.05 * scale, (b - a).abs().max()


@pytest.mark.parametrize("name", ["lstm", "gru_cell"])
def test_autocast_computes_the_op_in_bfloat16(name):
    """Against float32 arithmetic on the bfloat16-rounded input and weights: only the op's own
    bfloat16 roundings differ."""
    ref, ours, x = _pair(name)
    rounded = type(ours)(I, H)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in ours.state_dict().items()})
    expected = _flat(rounded(x.bfloat16().float()))
    with torch.autocast(**AC):
        got = _flat(ours(x))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b.float(), a, rtol=0.02, atol=0.02)


def test_recurrent_and_cell_under_autocast():
    """Any cell: Recurrent returns autocast's dtype (as torch.nn.LSTM), Cell the input's (as
    LSTMCell on the CPU); float64 input is left alone, as autocast leaves it."""
    torch.manual_seed(0)
    layer, step = celldsl.Recurrent("mut1", H, H), celldsl.Cell("mut1", H, H)
    x = torch.randn(T, N, H)
    with torch.autocast(**AC):
        out, h = layer(x)
        y, h1 = step(x[0])
    assert (out.dtype, h.dtype, y.dtype, h1.dtype) == (torch.bfloat16,) * 2 + (torch.float32,) * 2
    torch.testing.assert_close(out.float(), layer(x)[0], rtol=0.05, atol=0.05)
    layer64 = celldsl.Recurrent("mut1", H, H, dtype=torch.float64)
    with torch.autocast(**AC):
        out64, _ = layer64(x.double())
    assert out64.dtype == torch.float64


def test_autocast_states_from_a_previous_bfloat16_call():
    """A bfloat16 state from the last call goes back in with a float32 input, as with torch.nn."""
    ref, ours, x = _pair("lstm")
    with torch.autocast(**AC):
        _, state = ours(x)
        out, _ = ours(x, state)
        ref_out, _ = ref(x, ref(x)[1])
    assert out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["lstm", "lstm_2layer_bidir", "gru", "rnn_tanh"])
def test_autocast_packed_sequence_matches_torch_nn(name):
    """On a PackedSequence torch.nn.LSTM returns float32 under CPU autocast (bfloat16 on padded input)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, ours, x = _pair(name)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]))
    got = []
    for module in (ref, ours):
        with torch.autocast(**AC):
            out, state = module(packed)
        got.append([out.data, *(state if isinstance(state, tuple) else (state,))])
    assert [t.dtype for t in got[1]] == [t.dtype for t in got[0]]
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cell, sizes", [("mlstm", {"heads": 2}), ("flstm", {"R": 3})])
def test_matrix_path_layers_run_in_float32_under_autocast(cell, sizes):
    """Matrix-path layers (no torch.nn counterpart, and on no autocast list, as any custom op) run
    under CPU bf16 autocast in their inputs' float32, as autocast leaves an unlisted op: the same values
    and gradients as without autocast (docs/deploy.md)."""
    torch.manual_seed(0)
    layer = celldsl.Recurrent(cell, 6, 8, sizes=sizes)
    x = torch.randn(5, 3, 6, requires_grad=True)
    out, _ = layer(x)
    expected = torch.autograd.grad(out.sum(), [x, *layer.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, out)
    for a, b in zip(torch.autograd.grad(got.sum(), [x, *layer.parameters()]), expected, strict=True):
        torch.testing.assert_close(a, b)
