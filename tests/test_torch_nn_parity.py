"""celldsl.LSTM / GRU / RNN against torch.nn.LSTM / GRU / RNN with the same state_dict.

Outputs, final states and every gradient (input, initial states, each weight) agree within 1e-5 in
float32 and 1e-10 in float64: one and two layers, bidirectional, batch_first, PackedSequence
(unsorted lengths), unbatched input, bias=False. The constructors take torch's positional order.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl

T, N, I, H = 5, 3, 4, 6
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
KINDS = {
    "lstm": (torch.nn.LSTM, celldsl.LSTM, {}),
    "gru": (torch.nn.GRU, celldsl.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, celldsl.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, celldsl.RNN, {"nonlinearity": "relu"}),
}
CONFIGS = {  # name: (constructor kwargs, input form)
    "1layer": ({}, "padded"),
    "2layer_bidir": ({"num_layers": 2, "bidirectional": True}, "padded"),
    "2layer_bidir_batch_first": ({"num_layers": 2, "bidirectional": True, "batch_first": True}, "padded"),
    "2layer_bidir_packed": ({"num_layers": 2, "bidirectional": True}, "packed"),
    "1layer_batch_first_packed": ({"batch_first": True}, "packed"),
    "2layer_bidir_unbatched": ({"num_layers": 2, "bidirectional": True}, "unbatched"),
    "no_bias": ({"bias": False}, "padded"),
}
LENGTHS = torch.tensor([3, 5, 1])  # unsorted, so sorted_indices / unsorted_indices are exercised


def make_pair(kind, dtype, backend="auto", **kwargs):
    torch_cls, ours_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    ref = torch_cls(I, H, **extra, **kwargs, dtype=dtype)
    ours = ours_cls(I, H, **extra, **kwargs, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def shapes(module):
    return {k: v.shape for k, v in module.state_dict().items()}


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def run(module, x, hx, form, batch_first):
    """-> (padded output, final states tuple) for one input form; x is [T, N, I] or [N, T, I]."""
    if form == "packed":
        lengths = LENGTHS
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, state = module(packed, hx)
        out = pad_packed_sequence(out, batch_first=batch_first, total_length=T)[0]
    elif form == "unbatched":
        out, state = module(x[:, 0], tuple(h[:, 0] for h in hx) if isinstance(hx, tuple) else hx[:, 0])
    else:
        out, state = module(x, hx)
    return out, as_tuple(state)


@pytest.mark.parametrize("backend", ["cpu", "torch"])  # fused C kernels (auto on CPU); generated torch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_matches_torch_nn(kind, config, dtype, backend):
    kwargs, form = CONFIGS[config]
    ref, ours = make_pair(kind, dtype, backend, **kwargs)
    ref.eval(), ours.eval()
    batch_first = kwargs.get("batch_first", False)
    L = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((N, T, I) if batch_first else (T, N, I), generator=gen, dtype=dtype, requires_grad=True)
    n_states = 2 if kind == "lstm" else 1
    h0 = [(torch.randn(L, N, H, generator=gen, dtype=dtype) * 0.5).requires_grad_() for _ in range(n_states)]
    hx = tuple(h0) if kind == "lstm" else h0[0]
    results = {}
    for name, module in (("ref", ref), ("ours", ours)):
        out, state = run(module, x, hx, form, batch_first)
        weights = torch.Generator().manual_seed(2)  # the same random loss for both
        loss = (out * torch.randn(out.shape, generator=weights, dtype=dtype)).sum()
        for s in state:
            loss = loss + (s * torch.randn(s.shape, generator=weights, dtype=dtype)).sum()
        params = dict(module.named_parameters())
        grads = torch.autograd.grad(loss, [x, *h0, *params.values()])
        results[name] = (
            out,
            state,
            dict(zip(["x", *(f"h0[{i}]" for i in range(n_states)), *params], grads, strict=True)),
        )
    (r_out, r_state, r_grads), (o_out, o_state, o_grads) = results["ref"], results["ours"]
    tol = TOL[dtype]
    torch.testing.assert_close(o_out, r_out, atol=tol, rtol=0)
    assert len(o_state) == len(r_state)
    for a, b in zip(o_state, r_state, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    assert sorted(o_grads) == sorted(r_grads)
    for name in r_grads:
        torch.testing.assert_close(o_grads[name], r_grads[name], atol=tol, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict_loads_in_both_directions(kind):
    _torch_cls, ours_cls, extra = KINDS[kind]
    ref, ours = make_pair(kind, torch.float64, num_layers=2, bidirectional=True)
    assert shapes(ours) == shapes(ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    # ours -> torch: a fresh celldsl layer's weights drive a fresh torch layer to the same outputs
    torch.manual_seed(5)
    fresh = ours_cls(I, H, **extra, num_layers=2, bidirectional=True, dtype=torch.float64).eval()
    ref.load_state_dict(fresh.state_dict())
    ref.eval()
    x = torch.randn(T, N, I, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], ref(x)[0], atol=1e-12, rtol=0)


def test_positional_arguments_follow_torch():
    args = (I, H, 2, "relu", False, True, 0.0, True)  # RNN: nonlinearity is the 4th positional argument
    ours, ref = celldsl.RNN(*args), torch.nn.RNN(*args)
    for attr in ("nonlinearity", "num_layers", "bias", "batch_first", "bidirectional", "mode", "dropout"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert shapes(ours) == shapes(ref)
    lstm_args = (I, H, 1, True, True, 0.0, False, 0)  # LSTM: proj_size is the 8th
    assert celldsl.LSTM(*lstm_args).batch_first and torch.nn.LSTM(*lstm_args).batch_first
    assert celldsl.GRU(I, H, 1, False).state_dict().keys() == torch.nn.GRU(I, H, 1, False).state_dict().keys()


def test_nonlinearity_and_proj_size_are_checked_as_torch_does():
    with pytest.raises(ValueError, match="nonlinearity"):
        celldsl.RNN(I, H, nonlinearity="sigmoid")
    for bad in (-1, H, H + 1):  # torch's own checks: 0 <= proj_size < hidden_size
        with pytest.raises(ValueError, match="proj_size"):
            celldsl.LSTM(I, H, proj_size=bad)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(("layers", "bidirectional", "batch_first"), [(1, False, False), (2, True, True)])
def test_lstm_with_proj_size_matches_torch(backend, layers, bidirectional, batch_first):
    """torch.nn.LSTM(proj_size=P) and celldsl.LSTM(proj_size=P) with one state_dict (h is P wide, c H
    wide, weight_hr_l{k} P x H): outputs, final states and every gradient, float64; packed too."""
    P = 3
    torch.manual_seed(0)
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, proj_size=P)
    ref = torch.nn.LSTM(I, H, **kw).double()
    ours = celldsl.LSTM(I, H, backend=backend, **kw).double()
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    D = 2 if bidirectional else 1
    x = torch.randn((N, T, I) if batch_first else (T, N, I), dtype=torch.float64, requires_grad=True)
    state = (
        torch.randn(layers * D, N, P, dtype=torch.float64),
        torch.randn(layers * D, N, H, dtype=torch.float64),
    )
    for packed in (False, True):
        results = []
        for m in (ref, ours):
            inp = (
                pack_padded_sequence(x, [2, T, 1], batch_first=batch_first, enforce_sorted=False)
                if packed
                else x
            )
            out, (h, c) = m(inp, state)
            out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
            loss = (
                (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum()
                + h.sum()
                + (c * 2).sum()
            )
            results.append([out, h, c, *torch.autograd.grad(loss, [x, *m.parameters()])])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


def test_dropout_between_layers_matches_torch_rng():
    """torch.nn applies dropout to each layer's output but the last: same RNG draws, same result."""
    ref, ours = make_pair("lstm", torch.float64, num_layers=3, dropout=0.5, bidirectional=True)
    x = torch.randn(T, N, I, dtype=torch.float64)
    torch.manual_seed(7)
    out_ref = ref(x)[0]
    torch.manual_seed(7)
    out_ours = ours(x)[0]
    torch.testing.assert_close(out_ours, out_ref, atol=1e-12, rtol=0)
    ours.eval()
    torch.manual_seed(7)
    assert not torch.allclose(ours(x)[0], out_ours)  # eval: no dropout, so a different result
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-12, rtol=0)
