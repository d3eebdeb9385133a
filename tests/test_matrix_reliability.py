"""Adversarial inputs on the matrix path (nn/matrix.py, ops/matrix_op.py, the torch/cpu loops): each is
refused with torch's exception type and a message that says what was expected, or runs as torch.nn
would, never a silently wrong number, a bare traceback or an out-of-bounds read by the C loop."""

from __future__ import annotations

import pytest
import torch
from every_backend import backend_fixture
from matrix_layers import COLUMN_SCALE, matrix_layer

import celldsl
from celldsl.lang.errors import CellTensorError
from celldsl.nn.matrix import MatrixRecurrent

I = 6
SIZES = {"gla": {"heads": 2, "K": 3, "V": 4, "R": 2}, "mlstm": {"heads": 2, "K": 3, "V": 4},
         "mamba": {"heads": 1, "D": 4, "N_s": 3, "R": 2, "O": 5},
         "rwkv6": {"heads": 2, "K": 3, "V": 4, "R": 2, "R_d": 2},
         "flstm": {"R": 3, "H": 4}}
BACKENDS = ["torch", "cpu"]


def _layer(cell, backend, **kw):
    return matrix_layer(f"cells/{cell}.cell", backend, sizes=SIZES[cell], inputs=I, **kw)


def _op_args(layer):
    """A valid call of celldsl::matrix_sequence for this one-layer layer: [x, states, params, sizes]."""
    sizes = layer.layer_sizes[0]
    x = torch.randn(5, 3, I, dtype=torch.float64)
    states = [torch.zeros(3, *layer.ir.state_shape(s, sizes), dtype=torch.float64) for s in layer.ir.states]
    params = [getattr(layer, layer.param_name(n, 0, 0)).detach() for n in layer.ir.params]
    return x, states, params, layer.size_codes[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_refuses_tensors_that_disagree_with_its_sizes(backend):
    """Before, the cpu loop read and wrote at the sizes' strides whatever the tensors' shapes (heads=3 with
    2-head states: 'free(): invalid size', the process aborted; a [1, ...] state for 3 sequences: heap
    corruption; a too-small state: NaN), and the torch loop broadcast a [1, K, I] W_q over the heads or
    gave bare einsum/zip errors. Now every such call is a CellTensorError naming what was expected."""
    layer = _layer("gla", backend)
    key, op = layer.compiled.key, torch.ops.celldsl.matrix_sequence
    x, states, params, sizes = _op_args(layer)
    S, W_q = states[0], params[0]
    bad = {
        "heads too many": (x, states, params, sizes.replace("heads=2", "heads=3"),
                           r"state S must be \[3, 3, 3, 4\]"),
        "V too small": (x, states, params, sizes.replace("V=4", "V=2"), r"state S must be \[3, 2, 3, 2\]"),
        "a size missing": (x, states, params, sizes.replace("V=4,", ""), "sizes must give"),
        "a size negative": (x, states, params, sizes.replace("K=3", "K=-3"), "sizes must give"),
        "x's width": (x[..., :4], states, params, sizes, r"x must be \[T, N, 6\]"),
        "x 2-D": (x[0], states, params, sizes, r"x must be \[T, N, 6\]"),
        "state of 1 sequence": (x, [S[:1]], params, sizes, r"state S must be \[3, 2, 3, 4\]"),
        "state too small": (x, [S[:, :, :2]], params, sizes, r"state S must be \[3, 2, 3, 4\]"),
        "two states": (x, [S, S], params, sizes, r"takes 1 state\(s\) \(S\), got 2"),
        "no state": (x, [], params, sizes, r"takes 1 state\(s\) \(S\), got 0"),
        "a parameter missing": (x, states, params[:-1], sizes, r"takes 6 parameter\(s\)"),
        "W_q of one head": (x, states, [W_q[:1], *params[1:]], sizes, r"parameter W_q must be \[2, 3, 6\]"),
        "parameters reversed": (x, states, params[::-1], sizes, r"parameter W_q must be"),
    }
    for xx, ss, pp, code, message in bad.values():
        with pytest.raises(CellTensorError, match=message):
            op(key, backend, xx, ss, pp, code, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_refuses_lengths_it_cannot_mean(backend):
    """Before, lengths beyond T made the cpu loop read past the input (NaN states) while the torch loop
    ran to T; bool or float lengths were taken as numbers (True = 1); a length per other batch crashed."""
    layer = _layer("gla", backend)
    key, op = layer.compiled.key, torch.ops.celldsl.matrix_sequence
    x, states, params, sizes = _op_args(layer)
    for lengths, message in (([5, 9, 2], r"in \[0, T = 5\]"), ([5, -1, 2], r"in \[0, T = 5\]"),
                             ([5.0, 3.0, 2.0], "3 integers"), ([True, True, False], "3 integers"),
                             ([5, 3], "3 integers"), ([[5, 3, 2]], "3 integers")):
        with pytest.raises(CellTensorError, match=message):
            op(key, backend, x, states, params, sizes, torch.tensor(lengths))
    out, _ = op(key, backend, x, states, params, sizes, torch.tensor([5, 0, 2], dtype=torch.int32))
    ref, _ = op(key, "torch", x, states, params, sizes, torch.tensor([5, 0, 2]))
    torch.testing.assert_close(out, ref)
    assert not out[:, 1].any()  # a sequence of length 0 has no outputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_refuses_mixed_dtypes_with_a_message(backend):
    """Before, the op gave torch's bare "expected scalar type Float but found Double" (or, through a
    scripted layer fed float64, "expected m1 and m2 to have the same dtype")."""
    layer = _layer("gla", backend)
    key, op = layer.compiled.key, torch.ops.celldsl.matrix_sequence
    x, states, params, sizes = _op_args(layer)
    with pytest.raises(CellTensorError, match="parameter 0 is torch.float32 on cpu but x is torch.float64"):
        op(key, backend, x, states, [params[0].float(), *params[1:]], sizes, None)
    with pytest.raises(CellTensorError, match="floating-point"):
        op(key, backend, x.long(), states, params, sizes, None)
    scripted = torch.jit.script(_layer("gla", backend).float())
    with pytest.raises(RuntimeError, match="parameter 0 is torch.float32 on cpu but x is torch.float64"):
        scripted(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["gla", "mamba", "flstm"])
def test_an_empty_sequence_is_refused_as_torch_nn_does(cell, backend):
    """torch.nn.LSTM refuses T = 0 ("Expected sequence length to be larger than 0 in RNN"); before, the
    torch loop gave a bare "stack expects a non-empty TensorList" and the cpu loop returned the initial
    states, then failed in backward with a gradient of the wrong shape."""
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        torch.nn.LSTM(I, 4)(torch.randn(0, 2, I))
    layer = _layer(cell, backend)
    with pytest.raises(CellTensorError, match="Expected sequence length to be larger than 0 in RNN"):
        layer(torch.randn(0, 2, I, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        torch.jit.script(layer)(torch.randn(0, 2, I, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["gla", "mlstm", "mamba", "rwkv6", "flstm"])
def test_an_empty_batch_runs_as_torch_nn_does(cell, backend):
    """torch.nn.LSTM runs N = 0 to [T, 0, H]; before, the torch loop (every cell) and the cpu loop of a
    cell with an output projection (mamba) failed with "cannot reshape tensor of 0 elements"."""
    layer = _layer(cell, backend, bidirectional=True)
    x = torch.randn(4, 0, I, dtype=torch.float64, requires_grad=True)
    out, finals = layer(x)
    finals = finals if isinstance(finals, tuple) else (finals,)
    want, _ = _layer(cell, backend, bidirectional=True)(torch.randn(4, 2, I, dtype=torch.float64))
    assert out.shape == (4, 0, want.shape[-1])
    assert all(f.shape[:2] == (2, 0) for f in finals)
    grads = torch.autograd.grad(out.sum() + sum(f.sum() for f in finals), [x, *layer.parameters()])
    assert grads[0].shape == x.shape and all(not g.any() for g in grads[1:])
    step = None
    if cell == "gla":
        step = celldsl.Cell(f"cells/{cell}.cell", I, 8, sizes=SIZES["gla"], backend=backend)
    if step is not None:
        o, s = step(torch.randn(0, I))
        assert o.shape == (0, 8) and s[0].shape == (0, 2, 3, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["gla", "mamba", "rwkv6", "flstm"])
def test_a_parameter_of_the_wrong_shape_is_refused_not_broadcast(cell, backend):
    """`layer.W_q_l0.data = W[:1]` (a one-head matrix where the cell has two heads): before, both loops
    broadcast it over the heads and gave numbers; the elementwise layers refuse it, and so do these."""
    layer = _layer(cell, backend)
    name, p = next((n, p) for n, p in layer.named_parameters() if p.shape[0] > 1)
    p.data = p.data[:1].clone()
    with pytest.raises(CellTensorError, match=f"parameter {name.removesuffix('_l0')} must be"):
        layer(torch.randn(5, 3, I, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["gla", "mlstm", "flstm"])
def test_an_initial_state_edited_in_place_before_backward_never_changes_the_gradients(cell, backend):
    """torch.nn.LSTM saves hx, so `out, _ = lstm(x, (h0, c0)); h0.add_(1); out.sum().backward()` fails
    autograd's version check. Before, the torch loop kept the caller's state tensor unversioned and its
    backward recomputed step 0 from the edited one: other parameter gradients, silently. Now it raises as
    torch.nn does; the cpu loop keeps its own copy, so its gradients stay those of the forward."""
    h0 = torch.zeros(1, 2, 4, requires_grad=False)
    lstm = torch.nn.LSTM(I, 4)
    out, _ = lstm(torch.randn(3, 2, I), (h0, h0.clone()))
    h0.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    layer = _layer(cell, backend)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    _, finals = layer(x)
    s0 = tuple(torch.randn_like(s) for s in (finals if isinstance(finals, tuple) else (finals,)))
    if cell == "mlstm":
        s0 = (*s0[:2], s0[2].abs())
    out, _ = layer(x, s0)
    clean = torch.autograd.grad(out.sum(), list(layer.parameters()))
    edited = tuple(s.clone() for s in s0)
    out, _ = layer(x, edited)
    for s in edited:
        s.add_(1.0)
    try:
        got = torch.autograd.grad(out.sum(), list(layer.parameters()))
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        assert backend == "torch"
        return
    for a, b in zip(got, clean, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_of_another_dtype_is_refused_whichever_it_is(backend):
    """Before, only the first parameter's dtype was compared with the input's: a float64 bias in a float32
    flstm Cell promoted the step to float64 on the torch loop (a float64 output from a float32 input, where
    torch.nn.LSTMCell raises); the layer gave a bare "expected scalar type". Now both say what to convert."""
    for module in (celldsl.Cell("cells/flstm.cell", I, 4, sizes={"R": 3}, backend=backend),
                   MatrixRecurrent("cells/flstm.cell", I, SIZES["flstm"], backend=backend)):
        last = list(module.parameters())[-1]
        last.data = last.data.double()
        x = torch.randn(2, I) if isinstance(module, celldsl.nn.matrix.MatrixCell) else torch.randn(3, 2, I)
        with pytest.raises(CellTensorError, match="torch.float64"):
            module(x)


@pytest.mark.parametrize("state", [(None, None), 3, {"h": 1}])
def test_a_state_that_is_not_tensors_is_a_type_error(state):
    """Before: AttributeError "'NoneType' object has no attribute 'shape'"; celldsl.LSTM says TypeError."""
    layer = _layer("flstm", "torch")
    with pytest.raises(TypeError, match=r"a tuple of 2 tensors \(h, c\)"):
        layer(torch.randn(3, 2, I, dtype=torch.float64), state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["gla", "mlstm", "rwkv6"])
def test_the_padding_past_the_lengths_is_never_read(cell, backend):
    """celldsl::matrix_sequence with lengths: the steps past a sequence's length are padding, as a
    PackedSequence's. Before, a NaN or inf there left the outputs alone but turned every parameter's
    gradient into NaN (the hoisted projections' backward multiplied the padding by a zero gradient)."""
    layer = _layer(cell, backend)
    key, op = layer.compiled.key, torch.ops.celldsl.matrix_sequence
    x, states, _, sizes = _op_args(layer)
    params = [getattr(layer, layer.param_name(n, 0, 0)) for n in layer.ir.params]
    lengths = torch.tensor([5, 2, 3])
    garbage = x.clone()
    garbage[2:, 1], garbage[3:, 2] = float("nan"), float("inf")
    results = []
    for xx in (x, garbage):
        xx = xx.clone().requires_grad_()
        out, *finals = op(key, backend, xx, states, params, sizes, lengths)
        grads = torch.autograd.grad(out.sum() + sum(f.sum() for f in finals), [xx, *params])
        results.append([out, *finals, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not results[1][len(finals) + 1][2:, 1].any()  # dx of the padding: 0


def test_the_standalone_onnx_model_says_what_is_wrong_with_its_arguments(tmp_path):
    """export/onnx_matrix.write_matrix_onnx: before, a missing parameter or size was a bare KeyError, an
    unknown dtype KeyError: 'f16', a bfloat16 model numpy's "Got unsupported ScalarType BFloat16"."""
    import onnxruntime

    from celldsl.export.model import ExportError
    from celldsl.export.onnx_matrix import write_matrix_onnx

    layer = MatrixRecurrent("cells/gla.cell", I, SIZES["gla"])
    sizes = layer.layer_sizes[0]
    params = {n: getattr(layer, layer.param_name(n, 0, 0)) for n in layer.ir.params}
    path = tmp_path / "gla.onnx"
    for bad_sizes, bad_params, dtype, message in (
            (sizes, {k: v for k, v in params.items() if k != "W_q"}, "f32", "missing or not a tensor: W_q"),
            ({k: v for k, v in sizes.items() if k != "V"}, params, "f32", r"\{'V': None\}"),
            ({**sizes, "K": 0}, params, "f32", r"\{'K': 0\}"),
            (sizes, params, "f16", "'f32' or 'f64', got 'f16'")):
        with pytest.raises(ExportError, match=message):
            write_matrix_onnx(layer.ir, bad_sizes, bad_params, path, dtype)
    write_matrix_onnx(layer.ir, sizes, {k: v.bfloat16() for k, v in params.items()}, path)
    x = torch.randn(4, 2, I)
    state = torch.zeros(2, *layer.ir.state_shape("S", sizes))
    got = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy(), "state_in_0": state.numpy()})
    rounded = MatrixRecurrent("cells/gla.cell", I, SIZES["gla"])
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in layer.state_dict().items()})
    want, _ = rounded(x)
    torch.testing.assert_close(torch.from_numpy(got[-1]), want.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_are_refused_with_a_reason(backend):
    """Before, torch.func.grad through a matrix layer failed inside the loop with torch's "an
    autograd.Function ... must override the setup_context staticmethod" (about a private class) and vmap
    with "Batching rule not implemented for celldsl::matrix_sequence"; functional_call alone works."""
    from torch.func import functional_call, grad, vmap

    layer = _layer("gla", backend)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    params = dict(layer.named_parameters())
    with pytest.raises(RuntimeError, match="cell 'gla': torch.func transforms .* do not run matrix-path"):
        grad(lambda p: functional_call(layer, p, (x,))[0].sum())(params)
    with pytest.raises(RuntimeError, match="cell 'gla': torch.func transforms .* do not run matrix-path"):
        vmap(lambda xx: layer(xx)[0])(x[None].expand(2, -1, -1, -1))
    out, _ = functional_call(layer, {k: v * 2 for k, v in params.items()}, (x,))
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(2)
    torch.testing.assert_close(out, layer(x)[0])




def _column_scale_reference(layer, x, S):
    """COLUMN_SCALE's equations as an einsum loop: S_t = S_{t-1} Diag(a_t) + k_t v_tᵀ, o_t = k_tᵀ S_t."""
    Wk, Wv, Wa = (getattr(layer, layer.param_name(n, 0, 0)) for n in ("W_k", "W_v", "W_a"))
    outs = []
    for x_t in x:
        k, v = torch.einsum("hki,ni->nhk", Wk, x_t), torch.einsum("hvi,ni->nhv", Wv, x_t)
        a = torch.sigmoid(torch.einsum("hvi,ni->nhv", Wa, x_t))
        S = S * a[..., None, :] + k[..., None] * v[..., None, :]
        outs.append(torch.einsum("nhk,nhkv->nhv", k, S).flatten(1))
    return torch.stack(outs), S


any_backend = backend_fixture()  # torch, cpu and triton (its interpreter)


def test_diag_keeps_an_inf_of_the_state_in_its_row(any_backend):
    """gla's S' = diag(alpha) @ S + k @ vᵀ: an inf in S stays in its row, as the paper's Diag(alpha) S
    (the einsum reference) has it. Before, the torch loop and the Triton kernels ran diag(alpha) @ S as a
    product, which added 0 * inf = NaN to every other row of that column: finite numbers became NaN."""
    from matrix_references import ref_gla

    layer = _layer("gla", any_backend)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    S0 = torch.randn(2, *layer.ir.state_shape("S", layer.layer_sizes[0]), dtype=torch.float64)
    S0[0, 0, 0, 0] = float("inf")
    with torch.no_grad():
        out, (S,) = layer(x, S0[None])
        params = {n: getattr(layer, layer.param_name(n, 0, 0)) for n in layer.ir.params}
        params = {"W_q": params["W_q"].flatten(0, 1), "W_k": params["W_k"].flatten(0, 1),
                  "W_v": params["W_v"].flatten(0, 1), "W_a1": params["W_a1"],
                  "W_a2": params["W_a2"].flatten(0, 1), "b_a": params["b_a"].flatten()}
        want, (S_want,) = ref_gla(params, x, (S0,), heads=SIZES["gla"]["heads"])
    assert torch.isinf(S_want).sum() == 1 and not torch.isnan(S_want).any()
    torch.testing.assert_close(S[0], S_want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_a_product_with_a_diag_on_the_right_scales_columns(any_backend):
    """S @ diag(a): the same through the other operand (the columns), forward, inf, and gradcheck."""
    torch.manual_seed(0)
    layer = MatrixRecurrent(COLUMN_SCALE, I, {"heads": 2, "K": 3, "V": 4}, backend=any_backend,
                            dtype=torch.float64)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    S0 = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    out, (S,) = layer(x, S0[None])
    want, S_want = _column_scale_reference(layer, x, S0)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S[0], S_want, rtol=1e-10, atol=1e-10)
    S0[1, 1, 2, 3] = float("-inf")
    with torch.no_grad():
        out, (S,) = layer(x, S0[None])
        want, S_want = _column_scale_reference(layer, x, S0)
    assert torch.isinf(S_want).sum() == 1 and not torch.isnan(S_want).any()
    torch.testing.assert_close(S[0], S_want, rtol=1e-10, atol=1e-10)
    x = x[:3].requires_grad_()
    S0 = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    out, (S,) = layer(x, S0[None])
    want, S_want = _column_scale_reference(layer, x, S0)
    g, gS = torch.randn_like(out), torch.randn_like(S_want)
    wrt = [x, S0, *layer.parameters()]
    got = torch.autograd.grad((out * g).sum() + (S[0] * gS).sum(), wrt)
    for a, b in zip(got, torch.autograd.grad((want * g).sum() + (S_want * gS).sum(), wrt), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if any_backend == "triton":
        return  # gradcheck through the interpreter takes minutes; the gradients above are the reference's
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, S0, *ps):
        out, finals = layer.loop.run(x, [S0], list(ps), layer.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, S0, *params))
