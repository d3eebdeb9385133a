"""celldsl.LSTM / GRU / RNN against torch.nn's, in random combinations of the layer's options.

torch's own RNN tests (tests/torch_rnn/) try each option mostly alone; a silent wrong number hides
in a combination (packed and bidirectional with a projection and a given state, say). Hypothesis
draws the layer's options, sizes, lengths and the call (padded or packed, sorted or not, batch_first,
unbatched, with or without hx), and the test compares, in float64, the output, the final states and
the gradients of the input, of hx and of every parameter, and the output and final states again under
torch.no_grad() (the inference path), with torch.nn's on the same weights (eval mode), on the
cpu backend (the C kernels) and the torch one. Drawn with a fixed seed (derandomize) and a small
count: the same calls in CI every time; CELLDSL_DIFFERENTIAL_EXAMPLES raises the count for a longer
search.
"""

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl
from celldsl.targets.c import fused as cpu_fused

F64 = torch.float64
EXAMPLES = int(os.environ.get("CELLDSL_DIFFERENTIAL_EXAMPLES", "25"))
BACKENDS = ["torch", "cpu"] if cpu_fused.compiler() else ["torch"]


@st.composite
def layers(draw):
    mode = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    H = draw(st.integers(1, 6) | st.sampled_from([16, 17, 33]))  # and the C kernels' vector edges
    options = {
        "input_size": draw(st.integers(1, 5) | st.just(17)),
        "hidden_size": H,
        "num_layers": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bidirectional": draw(st.booleans()),
        "dropout": draw(st.sampled_from([0.0, 0.5])),  # run in eval(): no dropout, as torch.nn
    }
    if mode == "LSTM" and H > 1 and draw(st.booleans()):
        options["proj_size"] = draw(st.integers(1, H - 1))
    if mode.startswith("RNN"):
        options["nonlinearity"] = "tanh" if mode == "RNN_TANH" else "relu"
    call = {
        "T": draw(st.integers(1, 5)),
        "N": draw(st.integers(1, 4)),
        "packed": draw(st.sampled_from([None, "sorted", "unsorted"])),
        "unbatched": draw(st.booleans()),
        "hx": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }
    if call["packed"]:
        call["unbatched"] = False
        call["lengths"] = draw(st.lists(st.integers(1, call["T"]), min_size=call["N"], max_size=call["N"]))
        if call["packed"] == "sorted":
            call["lengths"] = sorted(call["lengths"], reverse=True)
    if call["unbatched"]:
        call["N"] = 1
    return mode, options, call


def build(mode: str, options: dict, backend: str):
    torch_cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}.get(mode, torch.nn.RNN)
    ours_cls = {"LSTM": celldsl.LSTM, "GRU": celldsl.GRU}.get(mode, celldsl.RNN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn: "dropout ... expects num_layers greater than 1"
        ref = torch_cls(**options, dtype=F64)
        ours = ours_cls(**options, dtype=F64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def arguments(mode, options, call):
    """(input, hx) as torch.nn takes them, both fresh leaves that require grad."""
    g = torch.Generator().manual_seed(call["seed"])
    T, N, I, H = call["T"], call["N"], options["input_size"], options["hidden_size"]
    D = 2 if options["bidirectional"] else 1
    L = options["num_layers"] * D
    out_h = options.get("proj_size", 0) or H
    x = torch.randn(T, N, I, generator=g, dtype=F64)
    shapes = [(L, N, out_h)] + ([(L, N, H)] if mode == "LSTM" else [])
    hx = [torch.randn(*s, generator=g, dtype=F64) for s in shapes] if call["hx"] else None
    if call["unbatched"]:
        x = x[:, 0]
        hx = hx and [h[:, 0] for h in hx]
    elif options["batch_first"]:
        x = x.transpose(0, 1)
    x = x.detach().requires_grad_(True)
    hx = hx and [h.detach().requires_grad_(True) for h in hx]
    return x, hx


def run(module, mode, options, call, x, hx):
    """(output as a padded tensor, [final states]) of one call."""
    inp = x
    if call["packed"]:
        inp = pack_padded_sequence(x, torch.tensor(call["lengths"]), batch_first=options["batch_first"],
                                   enforce_sorted=call["packed"] == "sorted")
    state = None if hx is None else (tuple(hx) if mode == "LSTM" else hx[0])
    out, final = module(inp, state)
    if call["packed"]:
        out, _ = pad_packed_sequence(out, batch_first=options["batch_first"], total_length=call["T"])
    return out, list(final) if mode == "LSTM" else [final]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=layers())
def test_layers_match_torch_nn_in_random_option_combinations(backend, drawn):
    mode, options, call = drawn
    ref, ours = build(mode, options, backend)
    results = {}
    for name, module in (("torch.nn", ref), ("celldsl", ours)):
        x, hx = arguments(mode, options, call)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn: "LSTM with projections is not supported with oneDNN"
            out, finals = run(module, mode, options, call, x, hx)
        g = torch.Generator().manual_seed(call["seed"] + 1)
        weights = [torch.randn(t.shape, generator=g, dtype=F64) for t in (out, *finals)]
        loss = sum((t * w).sum() for t, w in zip((out, *finals), weights, strict=True))
        params = [p for _n, p in module.named_parameters()]
        grads = torch.autograd.grad(loss, [x, *(hx or []), *params], allow_unused=True)
        with torch.no_grad():  # the inference path (FusedCPULoop.infer, the streaming step at T=1)
            x, hx = arguments(mode, options, call)
            out_ng, finals_ng = run(module, mode, options, call, x, hx)
        results[name] = [out, *finals, *grads, out_ng, *finals_ng]
    what = f"{mode} {options} {call} on backend={backend}"
    expected, got = results["torch.nn"], results["celldsl"]
    assert len(expected) == len(got), what
    for i, (e, o) in enumerate(zip(expected, got, strict=True)):
        if e is None or o is None:  # a parameter no output depends on: both must say so
            assert e is None or not e.any(), f"{what}: result {i}"
            assert o is None or not o.any(), f"{what}: result {i}"
            continue
        torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-10, msg=lambda m, i=i: f"{what}: result {i}: {m}")


@st.composite
def cells(draw):
    mode = draw(st.sampled_from(["LSTMCell", "GRUCell", "RNNCell"]))
    options = {"input_size": draw(st.integers(1, 5) | st.just(17)),
               "hidden_size": draw(st.integers(1, 6) | st.sampled_from([16, 17, 33])),
               "bias": draw(st.booleans())}
    if mode == "RNNCell":
        options["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    call = {"N": draw(st.integers(1, 9)), "unbatched": draw(st.booleans()), "hx": draw(st.booleans()),
            "calls": draw(st.integers(1, 3)), "seed": draw(st.integers(0, 2**16))}
    return mode, options, call


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=cells())
def test_cells_match_torch_nn_over_repeated_calls(backend, drawn):
    """LSTMCell / GRUCell / RNNCell, called 1-3 times in a row on new inputs (the prepared step
    replays its bound buffers from the second call on), with and without autograd."""
    mode, options, call = drawn
    ref = getattr(torch.nn, mode)(**options, dtype=F64)
    ours = getattr(celldsl, mode)(**options, dtype=F64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(call["seed"])
    H, N = options["hidden_size"], call["N"]
    lead = () if call["unbatched"] else (N,)
    what = f"{mode} {options} {call} on backend={backend}"
    for k in range(call["calls"]):
        x = torch.randn(*lead, options["input_size"], generator=g, dtype=F64)
        hx = [torch.randn(*lead, H, generator=g, dtype=F64) for _ in range(2 if mode == "LSTMCell" else 1)]
        weights = [torch.randn(*lead, H, generator=g, dtype=F64) for _ in range(2)]
        results = {}
        for name, module in (("torch.nn", ref), ("celldsl", ours)):
            xs = x.clone().requires_grad_(True)
            hs = [h.clone().requires_grad_(True) for h in hx]
            state = (tuple(hs) if mode == "LSTMCell" else hs[0]) if call["hx"] else None
            out = module(xs, state)
            outs = list(out) if mode == "LSTMCell" else [out]
            loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=False))
            inputs = [xs, *(hs if call["hx"] else []), *module.parameters()]
            grads = torch.autograd.grad(loss, inputs)
            with torch.no_grad():
                plain = module(x, (tuple(hx) if mode == "LSTMCell" else hx[0]) if call["hx"] else None)
            results[name] = [*outs, *grads, *(plain if mode == "LSTMCell" else [plain])]
        for i, (e, o) in enumerate(zip(results["torch.nn"], results["celldsl"], strict=True)):
            torch.testing.assert_close(o, e, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, i=i, k=k: f"{what}: call {k}, result {i}: {m}")
