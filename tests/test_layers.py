"""celldsl.Recurrent as a layer: named parameter views, initialisation, input forms, input checks,
packed sequences computing only the live rows, pickling, and training a zoo cell.

Numerical agreement with torch.nn and the references lives in test_torch_nn_parity.py and
test_zoo_vs_reference.py; this file checks the layer's own behaviour.
"""

import copy
import io
import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl
from celldsl import CellTensorError, Recurrent, compile_cell
from celldsl.ops.function import split_params
from celldsl.targets.loop import TorchLoop

T, N, I, H = 5, 3, 4, 6


# --- named access -----------------------------------------------------------------------------

def test_cell_parameter_is_a_view_that_writes_through():
    layer = celldsl.LSTM(I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, N, I)
    before = layer(x)[0]
    view = layer.cell_parameter("b_if", layer=1, direction=1)  # forget-gate rows of bias_ih_l1_reverse
    assert view.shape == (H,)
    assert view.untyped_storage().data_ptr() == layer.bias_ih_l1_reverse.untyped_storage().data_ptr()
    with torch.no_grad():
        view.fill_(3.0)
    assert torch.equal(layer.bias_ih_l1_reverse[H : 2 * H], torch.full((H,), 3.0))
    assert torch.equal(layer.bias_ih_l1_reverse[:H], layer.cell_parameter("b_ii", 1, 1))
    assert not torch.allclose(layer(x)[0], before)
    w = layer.cell_parameter("W_hg")  # matrices in torch's (out, in) layout
    assert w.shape == (H, H) and torch.equal(w, layer.weight_hh_l0[2 * H : 3 * H])


def test_cell_parameter_rejects_unknown_names_and_positions():
    layer = Recurrent("mut1", H, H)
    with pytest.raises(ValueError, match="no parameter 'W_zz'.*W_xz"):
        layer.cell_parameter("W_zz")
    with pytest.raises(ValueError, match="layer must be in"):
        layer.cell_parameter("W_xz", layer=1)
    with pytest.raises(ValueError, match="direction"):
        layer.cell_parameter("W_xz", direction=1)


# --- initialisation ---------------------------------------------------------------------------

def test_default_init_is_torch_uniform():
    torch.manual_seed(0)
    layer = Recurrent("greff_vanilla", 8, 64, num_layers=2)  # no init lines in the file
    bound = 1 / math.sqrt(64)
    for name, p in layer.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.9 * bound, name  # spread over the whole interval
        assert p.mean().abs() < 0.2 * bound, name


def test_init_lines_of_the_cell_file_are_applied():
    text = """cell inits
input x
state h
output h
param W, U, V
param a, b, c, d
init W = uniform(0.01)
init U = orthogonal
init V = normal(0.5)
init a = 0.25
init b = zeros
init c = ones
z = tanh(W @ x + U @ h + a + b + d)
h' = c * z + V @ (z * d)
"""
    torch.manual_seed(0)
    layer = Recurrent(text, 32, 32, dtype=torch.float64)
    p = layer.cell_parameter
    assert p("W").abs().max() <= 0.01 and p("W").abs().max() > 0.009
    torch.testing.assert_close(p("U") @ p("U").T, torch.eye(32, dtype=torch.float64))
    assert 0.4 < p("V").std() < 0.6
    assert torch.equal(p("a"), torch.full((32,), 0.25, dtype=torch.float64))
    assert torch.equal(p("b"), torch.zeros(32, dtype=torch.float64))
    assert torch.equal(p("c"), torch.ones(32, dtype=torch.float64))
    bound = 1 / math.sqrt(32)
    assert p("d").abs().max() <= bound and p("d").abs().max() > 0.5 * bound  # no init line: default


def test_vanilla_rnn_file_init_uniform_01():
    torch.manual_seed(0)
    layer = Recurrent("vanilla_rnn", 16, 64)
    for name, p in layer.named_parameters():
        assert 0.09 < p.abs().max() <= 0.1, name


# --- input forms --------------------------------------------------------------------------------

def test_unbatched_input_equals_a_batch_of_one():
    torch.manual_seed(0)
    layer = Recurrent("slstm", I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, I, dtype=torch.float64)
    states = tuple(torch.randn(4, H, dtype=torch.float64) for _ in range(4))
    out, final = layer(x, states)
    out1, final1 = layer(x[:, None], tuple(s[:, None] for s in states))
    assert out.shape == (T, 2 * H) and all(f.shape == (4, H) for f in final)
    torch.testing.assert_close(out, out1[:, 0], atol=0, rtol=0)
    for a, b in zip(final, final1, strict=True):
        torch.testing.assert_close(a, b[:, 0], atol=0, rtol=0)


def test_non_contiguous_input_and_state():
    torch.manual_seed(0)
    layer = Recurrent("gru", I, H, batch_first=True, dtype=torch.float64)
    x = torch.randn(T, N, 2 * I, dtype=torch.float64)[:, :, ::2].transpose(0, 1)  # [N, T, I], strided
    h0 = torch.randn(1, N, H, 2, dtype=torch.float64)[..., 0]  # every other element
    assert not x.is_contiguous() and not h0.is_contiguous()
    out, h = layer(x, h0)
    out_c, h_c = layer(x.contiguous(), h0.contiguous())
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)
    torch.testing.assert_close(h, h_c, atol=0, rtol=0)


def test_prev_state_cells_take_the_declared_states_alone():
    torch.manual_seed(0)
    layer = Recurrent("greff_fgr", I, H, dtype=torch.float64)
    c0, y0 = torch.randn(1, N, H, dtype=torch.float64), torch.randn(1, N, H, dtype=torch.float64)
    out, final = layer(torch.randn(T, N, I, dtype=torch.float64), (c0, y0))
    assert len(final) == 5  # c, y, prev(i), prev(f), prev(o)
    zeros = torch.zeros(1, N, H, dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64)
    torch.testing.assert_close(layer(x, (c0, y0))[0], layer(x, (c0, y0, zeros, zeros, zeros))[0])


class RecordingModule:
    """Wraps a generated pointwise module and records the batch rows of every stage call."""

    def __init__(self, module, rows):
        self.module, self.rows = module, rows

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(*args):
            self.rows.append((name, max(a.shape[0] for a in args if a.dim() == 2)))
            return fn(*args)

        return call


def test_packed_steps_compute_only_the_live_rows():
    """Step t of a packed batch runs its pointwise stages on batch_sizes[t] rows, forward and backward,
    and each sequence's result equals running it alone."""
    cell = compile_cell("slstm")
    layer = Recurrent(cell, I, H, dtype=torch.float64)
    rows = []
    loop = TorchLoop(cell.plan, RecordingModule(cell.torch_module, rows))
    batch_sizes = [3, 3, 2, 1, 1]
    x = torch.randn(sum(batch_sizes), I, dtype=torch.float64)
    states = [torch.randn(3, H, dtype=torch.float64) for _ in cell.states]
    params = split_params(loop, layer._weights(0, 0))
    out, finals, saved = loop.forward(x, states, *params, batch_sizes)
    forward_rows = [r for name, r in rows if name.endswith("_forward")]
    assert forward_rows == batch_sizes  # slstm: one pointwise stage per step
    rows.clear()
    loop.backward(x, states, *params, out, saved, torch.ones_like(out), [None] * 4, batch_sizes)
    assert [r for name, r in rows if name.endswith("_backward")] == batch_sizes[::-1]
    lengths = [5, 3, 2]
    offsets = [0, 3, 6, 8, 9]
    for n, length in enumerate(lengths):  # sequence n alone, padded form with N = 1
        xs = torch.stack([x[offsets[t] + n] for t in range(length)])[:, None]
        out_n, finals_n, _ = cell.torch_loop.forward(xs, [s[n : n + 1] for s in states], *params)
        torch.testing.assert_close(out_n[:, 0], torch.stack([out[offsets[t] + n] for t in range(length)]))
        for f, f_n in zip(finals, finals_n, strict=True):
            torch.testing.assert_close(f[n], f_n[0])


def test_packed_output_keeps_the_input_order():
    torch.manual_seed(0)
    layer = celldsl.GRU(I, H, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64)
    lengths = torch.tensor([2, 5, 3])
    out, h = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
    padded, out_lengths = pad_packed_sequence(out)
    assert torch.equal(out_lengths, lengths)
    for n, length in enumerate(lengths.tolist()):
        alone, h_alone = layer(x[:length, n])  # unbatched, the sequence alone
        torch.testing.assert_close(padded[:length, n], alone)
        torch.testing.assert_close(h[:, n], h_alone)
        assert torch.equal(padded[length:, n], torch.zeros(T - length, 2 * H, dtype=torch.float64))


# --- bad input --------------------------------------------------------------------------------
# torch.nn's exception types and wording where torch.nn checks (tests/test_torch_nn_module_tests.py
# runs torch's own error tests); celldsl's messages elsewhere. CellTensorError is a RuntimeError (what
# torch raises) and a ValueError (what celldsl raised before).

def lstm():
    return celldsl.LSTM(I, H, num_layers=2)


@pytest.mark.parametrize(
    "make_call, error, message",
    [
        (lambda m: m(torch.randn(T, N, I + 1)), RuntimeError,
         r"input\.size\(-1\) must be equal to input_size\. Expected 4, got 5"),
        (lambda m: m(torch.randn(T, N, I, 2)), ValueError,
         r"LSTM: Expected input to be 2D or 3D, got 4D instead"),
        (lambda m: m(torch.randn(0, N, I)), RuntimeError,
         "Expected sequence length to be larger than 0 in RNN"),
        (lambda m: m(torch.ones(T, N, I, dtype=torch.int64)), ValueError,
         r"RNN input dtype \(torch\.int64\) does not match weight dtype \(torch\.float32\)"),
        (lambda m: m(torch.randn(T, N, I, dtype=torch.float64)), ValueError,
         r"Convert input: input\.to\(torch\.float32\), or convert model: model\.to\(torch\.float64\)"),
        (lambda m: m([[1.0] * I] * T), TypeError, "input must be a Tensor or a PackedSequence, got list"),
        (lambda m: m(torch.randn(T, N, I), (torch.zeros(2, N, H),)), RuntimeError,
         r"expected 2 state tensor\(s\), got 1"),
        (lambda m: m(torch.randn(T, N, I), torch.zeros(2, N, H)), RuntimeError,
         r"LSTM carries 2 states \(h, c\): give them as a tuple of 2 tensors, got one tensor"),
        (lambda m: m(torch.randn(T, N, I), (torch.zeros(1, N, H), torch.zeros(2, N, H))), RuntimeError,
         r"Expected hidden\[0\] size \(2, 3, 6\), got \[1, 3, 6\] \(state 'h'\)"),
        (lambda m: m(torch.randn(T, I), (torch.zeros(2, N, H), torch.zeros(2, N, H))), RuntimeError,
         r"For unbatched 2-D input, hx and cx should also be 2-D but got \(3-D, 3-D\) tensors"),
        (lambda m: m(torch.randn(T, N, I), (torch.zeros(2, H), torch.zeros(2, N, H))), RuntimeError,
         r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\) tensors"),
        (lambda m: m(torch.randn(T, N, I), (torch.zeros(2, N, H), torch.zeros(2, N, H, dtype=torch.float64))),
         RuntimeError, r"hidden\[1\] \(state 'c'\) is torch\.float64 but the input is torch\.float32"),
        (lambda m: m(torch.randn(T, N, I), (torch.zeros(2, N, H), torch.zeros(2, N, H, device="meta"))),
         RuntimeError, r"Input and hidden tensors are not at the same device, found input tensor at cpu and "
         r"hidden tensor at meta"),
        (lambda m: m(pack_padded_sequence(torch.randn(T, N, I + 1), torch.tensor([5, 2, 1]))), RuntimeError,
         r"input_size\. Expected 4, got 5"),
        (lambda m: m(pack_padded_sequence(torch.randn(T, N, I), torch.tensor([5, 2, 1])),
                     (torch.zeros(2, 2, H), torch.zeros(2, 2, H))), RuntimeError,
         r"Expected hidden\[0\] size \(2, 3, 6\), got \[2, 2, 6\]"),
    ],
    ids=["features", "dims", "empty", "int", "dtype_vs_params", "not_tensor", "state_count",
         "one_tensor_for_two_states", "state_shape", "unbatched_state_dims", "batched_state_dims",
         "state_dtype", "state_device", "packed_features", "packed_state_shape"],
)
def test_bad_input_raises_what_torch_raises(make_call, error, message):
    with pytest.raises(error, match=message) as info:
        make_call(lstm())
    if error is RuntimeError:  # celldsl's tensor errors are ValueErrors too, as before
        assert isinstance(info.value, CellTensorError) and isinstance(info.value, ValueError)


def test_parameters_of_mixed_dtype_are_reported():
    layer = lstm()
    layer.weight_hh_l1.data = layer.weight_hh_l1.data.double()
    with pytest.raises(RuntimeError, match="parameter weight_hh_l1 is torch.float64"):
        layer(torch.randn(T, N, I))


def test_bad_batch_sizes_reach_the_loop_as_value_errors():
    cell = compile_cell("gru")
    layer = Recurrent(cell, I, H)
    params = split_params(cell.torch_loop, layer._weights(0, 0))
    state = [torch.zeros(2, H)]
    with pytest.raises(ValueError, match="non-increasing"):
        cell.torch_loop.forward(torch.randn(3, I), state, *params, [1, 2])
    with pytest.raises(ValueError, match=r"sum\(batch_sizes\)"):
        cell.torch_loop.forward(torch.randn(4, I), state, *params, [2, 1])


def test_constructor_arguments_are_checked_as_torch_checks_them():
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        Recurrent("gru", I, 0)
    with pytest.raises(TypeError, match="input_size should be of type int, got: float"):
        Recurrent("gru", 3.0, H)
    with pytest.raises(TypeError, match="batch_first should be of type bool, got: str"):
        Recurrent("gru", I, H, batch_first="False")
    with pytest.raises(TypeError, match="num_layers should be of type int, got: float"):
        Recurrent("gru", I, H, num_layers=1.5)
    with pytest.raises(ValueError, match=r"dropout should be a number in range \[0, 1\]"):
        Recurrent("gru", I, H, dropout=1.5)
    with pytest.raises(ValueError, match="backend must be"):
        Recurrent("gru", I, H, backend="cuda")
    with pytest.warns(UserWarning, match="dropout option adds dropout after all but last recurrent layer"):
        Recurrent("gru", I, H, dropout=0.5)


# --- copies, pickling, training ---------------------------------------------------------------------

def test_deepcopy_and_torch_save_round_trip():
    torch.manual_seed(0)
    layer = Recurrent("mut3", I, H, num_layers=2)
    x = torch.randn(T, N, I)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copy.deepcopy(layer), loaded):
        torch.testing.assert_close(other(x)[0], layer(x)[0], atol=0, rtol=0)


def test_mut1_trains_in_a_plain_pytorch_loop():
    """Recurrent('cells/mut1.cell', 64, 64) learns to output the running mean of its input's first
    feature: the loss falls to under a third of its start in 30 Adam steps."""
    torch.manual_seed(0)
    layer = Recurrent("cells/mut1.cell", 64, 64)
    head = torch.nn.Linear(64, 1)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-3)
    x = torch.randn(8, 16, 64)
    target = x[..., :1].cumsum(0) / torch.arange(1, 9).view(8, 1, 1)
    losses = []
    for _ in range(30):
        out, _ = layer(x)
        loss = torch.nn.functional.mse_loss(head(out), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] / 3, (losses[0], losses[-1])


CLAMPED = """
cell clamped
input x
state h
param W, U, b
h' = max(tanh(W @ x + U @ h + b), 0.5 * h) - min(0.25, h)
"""


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_max_and_min_of_a_tensor_and_a_number(backend):
    """max/min with a constant argument (torch.maximum takes tensors only) against per-step torch."""
    text = CLAMPED.replace("0.5 * h", "0.5")
    torch.manual_seed(0)
    layer = Recurrent(text, I, H, backend=backend, dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    W, U, b = (layer.cell_parameter(n) for n in ("W", "U", "b"))
    h, outs = torch.zeros(N, H, dtype=torch.float64), []
    for t in range(T):
        h = torch.clamp(torch.tanh(x[t] @ W.T + h @ U.T + b), min=0.5) - torch.clamp(h, max=0.25)
        outs.append(h)
    out, final = layer(x)
    torch.testing.assert_close(out, torch.stack(outs), atol=1e-12, rtol=0)
    torch.testing.assert_close(final[0], h, atol=1e-12, rtol=0)
    g, g_ref = (torch.autograd.grad(o.square().sum(), x)[0] for o in (out, torch.stack(outs)))
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


def test_backend_names_are_checked_and_cpu_needs_cpu_tensors():
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch', 'cpu' or 'triton'"):
        Recurrent("gru", I, H, backend="c")
    layer = Recurrent("gru", I, H, backend="cpu", device="meta")
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        layer(torch.empty(T, N, I, device="meta"))
    assert Recurrent("gru", I, H)._resolve_backend(torch.empty(T, N, I)) == "cpu"


# --- torch.nn's API on any cell -------------------------------------------------------------------

def test_an_empty_batch_runs_forward_and_backward_like_torch():
    """N = 0: outputs [T, 0, D*H] and [L*D, 0, H], and zero parameter gradients, as torch.nn.LSTM's."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True)
    layers = [celldsl.LSTM(I, H, num_layers=2, bidirectional=True),
              Recurrent("slstm", I, H, num_layers=2, bidirectional=True, batch_first=True)]
    for layer in [ref, *layers]:
        x = torch.randn(0, T, I) if layer.batch_first else torch.randn(T, 0, I)
        x.requires_grad_()
        out, final = layer(x)
        assert out.shape == ((0, T, 2 * H) if layer.batch_first else (T, 0, 2 * H))
        assert all(f.shape == (4, 0, H) for f in final)
        (out.sum() + sum(f.sum() for f in final)).backward()
        assert x.grad.shape == x.shape
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.parameters())


def test_recurrent_repr_to_and_bias_false_follow_torch():
    layer = Recurrent("gru", I, H, num_layers=2, bias=False, batch_first=True, dropout=0.5,
                      bidirectional=True)
    assert repr(layer) == ("Recurrent('gru', 4, 6, num_layers=2, bias=False, batch_first=True, dropout=0.5, "
                           "bidirectional=True)")
    assert list(layer.buffers()) == [] and all("bias" not in n for n, _ in layer.named_parameters())
    assert layer.to(torch.float64) is layer and all(p.dtype == torch.float64 for p in layer.parameters())
    out, h = layer(torch.randn(N, T, I, dtype=torch.float64))  # runs in the new dtype
    assert out.dtype == torch.float64 and h.shape == (4, N, H)
    meta = Recurrent("gru", I, H, device="meta", dtype=torch.float16)
    assert all(p.is_meta and p.dtype == torch.float16 for p in meta.parameters())
    with pytest.raises(ValueError, match=r"bias=False: the layer has no parameter 'b_ir'"):
        layer.cell_parameter("b_ir")
