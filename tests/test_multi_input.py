"""Cells with more than one input (`input x, ctx`): the layer against hand-written per-step references.

The first input is the layer's sequence input; every further input (here an attention context) is fed
to every layer and direction as is. Two cells: tests/lstm_context.cell (Show, Attend and Tell's LSTM,
the context read through its own weights: hoisted GEMMs only) and GATE below (the context also read
elementwise and through an expression of it, so it needs C == H: the pointwise kernels read it and
write its gradient). References: EXTRA_INPUT_REFERENCES in reference_cells.py and ref_gate here.
"""

from pathlib import Path

import pytest
import torch
from reference_cells import EXTRA_INPUT_REFERENCES, lin
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl
from celldsl.compiler import compile_cell
from celldsl.lang.errors import CellError
from celldsl.targets.c.fused import FusedCPULoop, compiler

CONTEXT = str(Path(__file__).resolve().parent / "lstm_context.cell")
GATE = """cell ctx_gate
input x, m
state h
param W, U, V, b
h' = tanh(W @ x + U @ h + V @ tanh(m) + b) * sigmoid(m) + (1 - sigmoid(m)) * h
"""
T, N, I, H = 4, 3, 3, 4
C = {"lstm_context": 5, "ctx_gate": H}  # ctx_gate reads its extra input elementwise: C == H
EXTRA = {"lstm_context": "ctx", "ctx_gate": "m"}
BACKENDS = ["torch", "cpu"]


def ref_gate(p, x, state, m):
    """GATE by hand: h' = tanh(W x + U h + V tanh(m) + b) * sigmoid(m) + (1 - sigmoid(m)) * h."""
    (h,) = state
    outputs = []
    for x_t, m_t in zip(x, m, strict=True):
        z = torch.sigmoid(m_t)
        a = lin(p["W"], x_t) + lin(p["U"], h) + lin(p["V"], torch.tanh(m_t)) + p["b"]
        h = torch.tanh(a) * z + (1 - z) * h
        outputs.append(h)
    return torch.stack(outputs), (h,)


CELLS = {"lstm_context": (CONTEXT, EXTRA_INPUT_REFERENCES["lstm_context"]), "ctx_gate": (GATE, ref_gate)}


def make(name, backend, **kwargs):
    torch.manual_seed(0)
    cell, _ = CELLS[name]
    return celldsl.Recurrent(cell, I, H, backend=backend, dtype=torch.float64,
                             input_sizes={EXTRA[name]: C[name]}, **kwargs)


def reference(layer, name, x, extra, state):
    """Every layer and direction by the per-step reference: x [T, N, I], extra [T, N, C], state a
    tuple of [L*D, N, H] -> (out [T, N, D*H], final states [L*D, N, H])."""
    ref = CELLS[name][1]
    names = [m for s in layer.stores for m in s.members]
    D = layer.num_directions
    seq, finals = x, [[] for _ in state]
    for lay in range(layer.num_layers):
        outs = []
        for d in range(D):
            p = {n: layer.cell_parameter(n, lay, d) for n in names}
            flip = (lambda t: t.flip(0)) if d else (lambda t: t)
            out, fin = ref(p, flip(seq), tuple(s[lay * D + d] for s in state), flip(extra))
            outs.append(flip(out))
            for f, v in zip(finals, fin, strict=True):
                f.append(v)
        seq = torch.cat(outs, dim=-1)
    return seq, tuple(torch.stack(f) for f in finals)


def data(name, layers, D):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, N, I, generator=g, dtype=torch.float64)
    extra = torch.randn(T, N, C[name], generator=g, dtype=torch.float64)
    n_states = len(compile_cell(CELLS[name][0]).states)
    state = tuple(0.5 * torch.randn(layers * D, N, H, generator=g, dtype=torch.float64)
                  for _ in range(n_states))
    return x, extra, state


def loss_of(out, finals):
    g = torch.Generator().manual_seed(4)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)).sum()
    for f in finals:
        loss = loss + (f * torch.randn(f.shape, generator=g, dtype=f.dtype).to(f.device)).sum()
    return loss


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def assert_same(a, b):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def check(layer, name, x, extra, state, call, reshape_ref=lambda t: t):
    """Run `call(x, extra, state) -> (out [T, N, D*H], finals tuple)` and the reference on the same
    leaves; compare outputs, final states and the gradients of x, extra, states and every parameter."""
    x, extra, *state = leaves(x, extra, *state)
    params = list(layer.parameters())
    out, finals = call(x, extra, tuple(state))
    ref_out, ref_finals = reference(layer, name, x, reshape_ref(extra), tuple(state))
    assert_same(out, ref_out)
    for f, r in zip(finals, ref_finals, strict=True):
        assert_same(f, r)
    wrt = [x, extra, *state, *params]
    got = torch.autograd.grad(loss_of(out, finals), wrt)
    want = torch.autograd.grad(loss_of(ref_out, ref_finals), wrt)
    for gv, wv in zip(got, want, strict=True):
        assert_same(gv, wv)


def as_tuple(final):
    return final if isinstance(final, tuple) else (final,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, False), (1, True), (2, True)])
@pytest.mark.parametrize("name", list(CELLS))
def test_outputs_states_and_gradients_match_reference(name, layers, bidirectional, backend):
    layer = make(name, backend, num_layers=layers, bidirectional=bidirectional)
    x, extra, state = data(name, layers, layer.num_directions)
    key = EXTRA[name]

    def call(x, e, s):
        out, final = layer(x, s if len(s) > 1 else s[0], **{key: e})
        return out, as_tuple(final)

    check(layer, name, x, extra, state, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CELLS))
def test_batch_first(name, backend):
    layer = make(name, backend, batch_first=True, bidirectional=True)
    x, extra, state = data(name, 1, 2)
    key = EXTRA[name]

    def call(x, e, s):
        out, final = layer(x.transpose(0, 1), s if len(s) > 1 else s[0], **{key: e.transpose(0, 1)})
        return out.transpose(0, 1), as_tuple(final)

    check(layer, name, x, extra, state, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CELLS))
def test_unbatched(name, backend):
    layer = make(name, backend, num_layers=2)
    x, extra, state = data(name, 2, 1)
    x, extra, state = x[:, :1], extra[:, :1], tuple(s[:, :1] for s in state)
    key = EXTRA[name]

    def call(x, e, s):
        s = tuple(t[:, 0] for t in s)
        out, final = layer(x[:, 0], s if len(s) > 1 else s[0], **{key: e[:, 0]})
        return out.unsqueeze(1), tuple(f.unsqueeze(1) for f in as_tuple(final))

    check(layer, name, x, extra, state, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CELLS))
def test_one_value_per_sequence_is_broadcast_over_time(name, backend):
    """extra [N, C]: the same context at every step (the reference gets it expanded to [T, N, C])."""
    layer = make(name, backend, num_layers=2, bidirectional=True)
    x, extra, state = data(name, 2, 2)
    extra = extra[0]
    key = EXTRA[name]

    def call(x, e, s):
        out, final = layer(x, s if len(s) > 1 else s[0], **{key: e})
        return out, as_tuple(final)

    check(layer, name, x, extra, state, call, reshape_ref=lambda e: e.expand(T, N, C[name]))


def test_unbatched_one_value_for_the_sequence():
    layer = make("lstm_context", "cpu")
    x, extra, state = data("lstm_context", 1, 1)
    x, extra, state = x[:, :1], extra[0, :1], tuple(s[:, :1] for s in state)

    def call(x, e, s):
        out, final = layer(x[:, 0], tuple(t[:, 0] for t in s), ctx=e[0])
        return out.unsqueeze(1), tuple(f.unsqueeze(1) for f in final)

    check(layer, "lstm_context", x, extra, state, call,
          reshape_ref=lambda e: e.expand(T, 1, C["lstm_context"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("name", list(CELLS))
def test_packed_sequence(name, per_sequence, backend):
    """Packed input, unsorted lengths, bidirectional: extra given padded [T, N, C] (in the unpacked
    order) or [N, C]; each sequence against the reference run over its own length only."""
    layer = make(name, backend, bidirectional=True)
    x, extra, state = data(name, 1, 2)
    if per_sequence:
        extra = extra[0]
    lengths = [T - 1, T, 2]
    key = EXTRA[name]
    x, extra, *state = leaves(x, extra, *state)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, final = layer(packed, tuple(state) if len(state) > 1 else state[0], **{key: extra})
    out, _ = pad_packed_sequence(out)
    final = as_tuple(final)
    full = extra.expand(T, N, C[name]) if per_sequence else extra
    for j, n in enumerate(lengths):
        ref_out, ref_final = reference(layer, name, x[:n, j : j + 1], full[:n, j : j + 1],
                                       tuple(s[:, j : j + 1] for s in state))
        assert_same(out[:n, j : j + 1], ref_out)
        for f, r in zip(final, ref_final, strict=True):
            assert_same(f[:, j : j + 1], r)
    loss = sum((out[:n, j] * (j + 1)).sum() for j, n in enumerate(lengths)) + sum(f.sum() for f in final)
    got = torch.autograd.grad(loss, [x, extra, *state])
    ref_loss = 0
    for j, n in enumerate(lengths):
        ref_out, ref_final = reference(layer, name, x[:n, j : j + 1], full[:n, j : j + 1],
                                       tuple(s[:, j : j + 1] for s in state))
        ref_loss = ref_loss + (ref_out * (j + 1)).sum() + sum(f.sum() for f in ref_final)
    want = torch.autograd.grad(ref_loss, [x, extra, *state])
    for gv, wv in zip(got, want, strict=True):
        assert_same(gv, wv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_gradient_when_the_input_needs_none(backend):
    """Only ctx requires a gradient: the concatenated x then needs one, and ctx's columns are right."""
    layer = make("lstm_context", backend)
    x, extra, state = data("lstm_context", 1, 1)
    extra = extra.clone().requires_grad_()
    out, _ = layer(x, state, ctx=extra)
    (got,) = torch.autograd.grad(out.sum(), [extra])
    ref_out, _ = reference(layer, "lstm_context", x, extra, state)
    (want,) = torch.autograd.grad(ref_out.sum(), [extra])
    assert_same(got, want)


@pytest.mark.skipif(compiler() is None, reason="no C compiler: backend 'cpu' runs the torch loop")
@pytest.mark.parametrize("name", list(CELLS))
def test_cpu_backend_runs_the_fused_kernels(name):
    """The compiled C kernels take multi-input cells (no fallback to the plain loop)."""
    layer = make(name, "cpu")
    loop = layer.compiled.cpu_loop
    assert isinstance(loop, FusedCPULoop)
    x, extra, state = data(name, 1, 1)
    xx = torch.cat([x, extra], dim=-1).reshape(T * N, -1)
    assert loop.fused(xx, [s[0] for s in state], *loop_params(layer, loop))


def loop_params(layer, loop):
    from celldsl.ops.function import split_params

    return split_params(loop, layer._weights(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CELLS))
def test_gradcheck(name, backend):
    torch.manual_seed(0)
    cell, _ = CELLS[name]
    h = 2
    c = h if name == "ctx_gate" else 3
    layer = celldsl.Recurrent(cell, 2, h, backend=backend, dtype=torch.float64, input_sizes={EXTRA[name]: c},
                              bidirectional=True)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, 2, c, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())

    def f(x, e, *_params):
        out, final = layer(x, **{EXTRA[name]: e})
        return out, *as_tuple(final)

    assert torch.autograd.gradcheck(f, (x, e, *params), eps=1e-6, atol=1e-8)


def test_triton_interpreter_matches_reference(monkeypatch):
    """backend='triton' on Triton's CPU interpreter (TRITON_INTERPRET=1, set per test: the generated
    modules are imported per mode at call time), both cells, bidirectional, float64."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in CELLS:
        layer = make(name, "triton", bidirectional=True)
        x, extra, state = data(name, 1, 2)
        key = EXTRA[name]

        def call(x, e, s, layer=layer, key=key):
            out, final = layer(x, s if len(s) > 1 else s[0], **{key: e})
            return out, as_tuple(final)

        check(layer, name, x, extra, state, call)


# ---- errors ---------------------------------------------------------------------------------------


def test_input_sizes_must_name_every_extra_input():
    with pytest.raises(ValueError, match=r"input_sizes must give the size of each after the first \(ctx\); "
                                         r"missing: ctx"):
        celldsl.Recurrent(CONTEXT, I, H)
    with pytest.raises(ValueError, match=r"unknown: cxt"):
        celldsl.Recurrent(CONTEXT, I, H, input_sizes={"ctx": 2, "cxt": 2})
    with pytest.raises(ValueError, match=r"unknown: ctx"):
        celldsl.Recurrent("lstm", I, H, input_sizes={"ctx": 2})
    with pytest.raises(ValueError, match=r"input_sizes\['ctx'\] must be a positive int, got 0"):
        celldsl.Recurrent(CONTEXT, I, H, input_sizes={"ctx": 0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"takes the extra inputs \(ctx=\) as keywords; missing: ctx"),
        ({"ctx": "z", "cxt": 1}, r"unknown: cxt"),
        ({"ctx": [1.0]}, r"extra input 'ctx' must be a tensor, got list"),
        ({"ctx": torch.zeros(T, N, 4, dtype=torch.float64)},
         r"extra input 'ctx' must be \[T, N, ctx size\] or \[N, ctx size\] = \(4, 3, 5\) or \(3, 5\), "
         r"got shape \(4, 3, 4\)"),
        ({"ctx": torch.zeros(T + 1, N, 5, dtype=torch.float64)}, r"got shape \(5, 3, 5\)"),
        ({"ctx": torch.zeros(T, N - 1, 5, dtype=torch.float64)}, r"got shape \(4, 2, 5\)"),
        ({"ctx": torch.zeros(5, dtype=torch.float64)}, r"got shape \(5,\)"),
        ({"ctx": torch.zeros(T, N, 5)},
         r"extra input 'ctx' is torch.float32 on cpu but input is torch.float64"),
    ],
)
def test_bad_extra_inputs_raise(kwargs, message):
    layer = make("lstm_context", "torch")
    x = torch.zeros(T, N, I, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        layer(x, **kwargs)


def test_one_input_cell_rejects_extra_keywords():
    layer = celldsl.Recurrent("lstm", I, H)
    with pytest.raises(ValueError, match=r"takes the extra inputs \(none\) as keywords; unknown: ctx"):
        layer(torch.zeros(T, N, I), ctx=torch.zeros(T, N, 2))


def test_elementwise_extra_input_needs_hidden_size(tmp_path):
    path = tmp_path / "gate.cell"
    path.write_text(GATE)
    with pytest.raises(CellError, match=r"gate\.cell:5:54: error: input 'm' is used elementwise with H-wide "
                                        r"values here, so this cell needs input_sizes\['m'\] == hidden_size "
                                        r"\(got input_sizes\['m'\]=5, hidden_size=4\)"):
        celldsl.Recurrent(str(path), I, H, input_sizes={"m": 5})


def test_explain_and_parameters_name_the_context():
    compiled = compile_cell(CONTEXT)
    text = compiled.explain()
    assert "  ctx  [C_ctx]" in text
    assert "weight_z = [Z_i, Z_f, Z_g, Z_o]  4H x C_ctx  (matrix, applied to input ctx)" in text
    assert "hoisted (once over all T steps): [Z_i, Z_f, Z_g, Z_o] (4H x C_ctx) @ ctx" in text
    layer = make("lstm_context", "torch", num_layers=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes["weight_z_l0"] == shapes["weight_z_l1"] == (4 * H, 5)
    assert shapes["weight_x_l0"] == (4 * H, I) and shapes["weight_x_l1"] == (4 * H, H)
    assert tuple(layer.cell_parameter("Z_f", 1).shape) == (H, 5)
    assert "input_sizes={'ctx': 5}" in repr(layer)


def test_unused_extra_input_is_warned_and_left_out():
    """An extra input the equations never read: a warning, its size and value still checked."""
    text = "cell t\ninput x, u\nstate h\nparam W, U, b\nh' = tanh(W @ x + U @ h + b)\n"
    with pytest.warns(Warning, match="input 'u' is never used"):
        compiled = compile_cell(text, use_cache=False)
    torch.manual_seed(0)
    layer = celldsl.Recurrent(compiled, I, H, input_sizes={"u": 7}, dtype=torch.float64, backend="cpu")
    x = torch.randn(T, N, I, dtype=torch.float64)
    out, h = layer(x, u=torch.randn(N, 7, dtype=torch.float64))
    p = {n: layer.cell_parameter(n) for n in ("W", "U", "b")}
    ref_h, ref = torch.zeros(N, H, dtype=torch.float64), []
    for x_t in x:
        ref_h = torch.tanh(lin(p["W"], x_t) + lin(p["U"], ref_h) + p["b"])
        ref.append(ref_h)
    assert_same(out, torch.stack(ref))
    with pytest.raises(ValueError, match=r"extra input 'u' must be"):
        layer(x, u=torch.randn(N, 6, dtype=torch.float64))


def test_opcheck_with_concatenated_inputs():
    """The one registered op takes [x | ctx] as its x: schema, autograd and fake kernel check out."""
    from celldsl.ops import op as ops

    layer = make("ctx_gate", "cpu")
    x, extra, state = data("ctx_gate", 1, 1)
    xx = torch.cat([x, extra], dim=-1).requires_grad_()
    params = [p.detach().requires_grad_() for p in layer._weights(0, 0)]
    args = (layer.compiled.key, "cpu", xx, [s[0].requires_grad_() for s in state], params, None)
    torch.library.opcheck(ops.cell_sequence, args)


def test_language_doc_example_is_the_test_cell():
    """docs/language.md's multi-input example has the equations of tests/lstm_context.cell."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text()
    block = doc.split("## More than one input")[1].split("```")[1]
    shown, cell = compile_cell(block, use_cache=False).ir, compile_cell(CONTEXT).ir
    assert shown.inputs == cell.inputs == ["x", "ctx"]
    assert shown.new_states == cell.new_states


def test_packed_batch_first_extra_padded_longer_than_the_longest_sequence():
    """batch_first PackedSequence, the extra given [N, T', C] with T' > the longest length (as
    pad_packed_sequence(total_length=T') gives it): the extra steps are never read."""
    layer = make("lstm_context", "cpu", batch_first=True)
    x, extra, state = data("lstm_context", 1, 1)
    lengths = [2, T - 1, 3]
    packed = pack_padded_sequence(x.transpose(0, 1), lengths, batch_first=True, enforce_sorted=False)
    longer = torch.cat([extra, torch.full((2, N, 5), float("nan"), dtype=torch.float64)]).transpose(0, 1)
    out, (h, c) = layer(packed, state, ctx=longer)
    out, _ = pad_packed_sequence(out, batch_first=True)
    for j, n in enumerate(lengths):
        ref_out, (ref_h, ref_c) = reference(layer, "lstm_context", x[:n, j : j + 1], extra[:n, j : j + 1],
                                            tuple(s[:, j : j + 1] for s in state))
        assert_same(out[j, :n], ref_out[:, 0])
        assert_same(h[:, j], ref_h[:, 0])
        assert_same(c[:, j], ref_c[:, 0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("name", list(CELLS))
def test_cuda_matches_reference(name, backend, monkeypatch):
    """The compiled Triton kernels (and the CUDA-graph replay of the loop) on a GPU, float64, 2 layers,
    bidirectional, per-step and per-sequence extra input, against the per-step reference on the GPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = make(name, backend, num_layers=2, bidirectional=True).cuda()
    x, extra, state = data(name, 2, 2)
    x, extra, state = x.cuda(), extra.cuda(), tuple(s.cuda() for s in state)
    key = EXTRA[name]

    def call(x, e, s):
        out, final = layer(x, s if len(s) > 1 else s[0], **{key: e})
        return out, as_tuple(final)

    for _ in range(2):  # the second call replays the captured graph
        check(layer, name, x, extra, state, call)
    check(layer, name, x, extra[0], state, call, reshape_ref=lambda e: e.expand(T, N, C[name]))
