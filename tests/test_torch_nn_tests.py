"""PyTorch's RNN module tests from test/test_nn.py, ported to celldsl's LSTM/GRU/RNN and cells.

Each test names the torch test it comes from and keeps its assertions and tolerances (torch's
TestCase.assertEqual is torch.testing.assert_close with the dtype's defaults; tests/torch_testing.py).
Where a test only checks a behaviour (an error, a shape, a smoke run) it also runs torch's class as
the control, or compares the numbers with torch's class loaded with the same state_dict.

Not ported, GPU-only (they compare CUDA or cuDNN with the CPU, or need several GPUs):
test_RNN_cpu_vs_cudnn_no_dropout, test_RNN_cpu_vs_cudnn_with_dropout, test_RNN_cudnn_weight_norm
(its CPU half is in test_rnn_weight_norm_keeps_the_output below), test_partial_flat_weights,
test_cudnn_weight_format, test_cudnn_weight_tying, test_cudnn_rnn_dropout_states_device,
test_rnn_check_device, test_projections_lstm_check_device, test_rnn_fused,
test_pack_sequence_batch_sizes_throw. The CUDA halves of test_RNN_dropout, test_RNN_dropout_state,
test_RNN_change_dropout and test_error_RNN_seq_len_zero (their CPU halves are below).
Not ported: test/nn/test_packed_sequence.py tests torch.nn.utils.rnn (pack, pad), not the modules;
test_variable_sequence below runs packed sequences through the modules.
proj_size: torch's cases of the tests above are ported with them (cells/lstm_proj.cell).
"""

import io
from copy import deepcopy
from itertools import product

import pytest
import torch
import torch.nn.utils.rnn as rnn_utils
from torch import nn
from torch_testing import CELLS, LAYERS, assert_equal, assert_not_equal, grads, pair

import celldsl

# ---- TestNN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell"])
@pytest.mark.parametrize("bias", [True, False])
def test_RNN_cell(kind, bias):
    """TestNN.test_RNN_cell (a smoke test there): six steps and a backward, equal to torch's cell."""
    torch.manual_seed(0)
    ref, ours = pair(kind, 10, 20, bias=bias)
    input = torch.randn(3, 10)
    hx0 = torch.randn(3, 20)
    results = []
    for cell in (ref, ours):
        hx = hx0
        for _ in range(6):
            hx = cell(input, hx)
        hx.sum().backward()
        results.append((hx, grads(cell)))
    assert_equal(results[1][0], results[0][0])
    assert_equal(results[1][1], results[0][1])


def test_RNN_cell_forward_zero_hidden_size():
    """TestNN.test_RNN_cell_forward_zero_hidden_size."""
    input = torch.randn(3, 10)
    hx = torch.randn(3, 0)
    for cell in (celldsl.RNNCell(10, 0, nonlinearity="relu"), celldsl.RNNCell(10, 0, nonlinearity="tanh"),
                 celldsl.GRUCell(10, 0)):
        assert cell(input, hx).shape == torch.Size([3, 0])


@pytest.mark.parametrize("impl", [0, 1], ids=["torch", "celldsl"])
def test_RNN_cell_no_broadcasting(impl):
    """TestNN.test_RNN_cell_no_broadcasting: mismatched batch or sizes are errors, not broadcasts."""
    def test(kind, input, hx, input_size, hidden_size):
        cell = CELLS[kind][impl](input_size, hidden_size)
        with pytest.raises(RuntimeError):
            cell(input, hx)

    def test_all(hidden_size, bad_hx, good_hx, input_size, input):
        test("RNNCell", input, bad_hx, input_size, hidden_size)
        test("GRUCell", input, bad_hx, input_size, hidden_size)
        test("LSTMCell", input, (bad_hx, good_hx), input_size, hidden_size)
        test("LSTMCell", input, (good_hx, bad_hx), input_size, hidden_size)

    hidden_size, input_size = 20, 10
    input = torch.randn(3, input_size)
    bad_hx, good_hx = torch.randn(1, hidden_size), torch.randn(3, hidden_size)
    test_all(hidden_size, bad_hx, good_hx, input_size, input)  # hidden/input batch size broadcasting
    bad_hx = torch.randn(3, 1)
    test_all(hidden_size, bad_hx, good_hx, input_size, input)  # hx's hidden_size vs the module's
    bad_input = torch.randn(3, 1)
    test_all(hidden_size, good_hx, good_hx, input_size, bad_input)  # input's input_size vs the module's


@pytest.mark.parametrize("bias", [True, False])
def test_LSTM_cell(bias):
    """TestNN.test_LSTM_cell (a smoke test there): six steps and a backward, equal to torch's."""
    torch.manual_seed(0)
    ref, ours = pair("LSTMCell", 10, 20, bias=bias)
    input, hx0, cx0 = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 20)
    results = []
    for lstm in (ref, ours):
        hx, cx = hx0, cx0
        for _ in range(6):
            hx, cx = lstm(input, (hx, cx))
        (hx + cx).sum().backward()
        results.append((hx, cx, grads(lstm)))
    assert_equal(results[1][:2], results[0][:2])
    assert_equal(results[1][2], results[0][2])


def test_LSTM_cell_forward_input_size():
    """TestNN.test_LSTM_cell_forward_input_size."""
    input, hx, cx = torch.randn(3, 11), torch.randn(3, 20), torch.randn(3, 20)
    lstm = celldsl.LSTMCell(10, 20)
    with pytest.raises(Exception):  # noqa: B017 - torch's assertion
        lstm(input, (hx, cx))


def test_LSTM_cell_forward_hidden_size():
    """TestNN.test_LSTM_cell_forward_hidden_size."""
    input, hx, cx = torch.randn(3, 10), torch.randn(3, 21), torch.randn(3, 20)
    lstm = celldsl.LSTMCell(10, 20)
    with pytest.raises(Exception):  # noqa: B017 - torch's assertion
        lstm(input, (hx, cx))
    with pytest.raises(Exception):  # noqa: B017
        lstm(input, (cx, hx))


def test_RNN_nonlinearity():
    """TestNN.test_RNN_nonlinearity."""
    assert celldsl.RNN(1, 10).nonlinearity == "tanh"
    assert celldsl.RNN(1, 10, nonlinearity="relu").nonlinearity == "relu"
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        celldsl.RNN(1, 10, nonlinearity="garbage")


def test_RNN_nonlinearity_passed_as_arg():
    """TestNN.test_RNN_nonlinearity_passed_as_arg."""
    assert celldsl.RNN(2, 3, 1, "relu").nonlinearity == "relu"


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_rnn_weight_norm():
    """TestNN.test_rnn_weight_norm, with its proj_size=16 case."""
    def check_weight_norm(m, name, num_params):
        m = torch.nn.utils.weight_norm(m, name=name)
        assert sum(isinstance(p, torch.nn.Parameter) for p in m._flat_weights) == num_params - 1
        m = torch.nn.utils.remove_weight_norm(m, name=name)
        assert sum(isinstance(p, torch.nn.Parameter) for p in m._flat_weights) == num_params
        assert name in m._parameters and m._parameters[name] is not None
        assert name + "_v" not in m._parameters and name + "_g" not in m._parameters
        assert name in dict(m.named_parameters()) and dict(m.named_parameters())[name] is not None
        assert name + "_v" not in dict(m.named_parameters())
        assert name + "_g" not in dict(m.named_parameters())

    check_weight_norm(celldsl.LSTM(32, 32), "weight_ih_l0", 4)
    check_weight_norm(celldsl.LSTM(32, 32, proj_size=16), "weight_hr_l0", 5)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["weight_hh_l0", "weight_ih_l1"])
def test_rnn_weight_norm_keeps_the_output(name):
    """TestNN.test_RNN_cudnn_weight_norm without the move to CUDA: weight_norm and its removal keep
    the output (the forward reads the reparametrized weight); also with the parametrizations API."""
    torch.manual_seed(0)
    m = celldsl.LSTM(10, 6, 2)
    input = torch.randn(7, 6, 10)
    expected_output = m(input)
    m = torch.nn.utils.weight_norm(m, name=name)
    assert_equal(m(input), expected_output)
    m = torch.nn.utils.remove_weight_norm(m, name=name)
    assert_equal(m(input), expected_output)
    m = torch.nn.utils.parametrizations.weight_norm(m, name=name)
    assert isinstance(m, celldsl.LSTM)  # parametrize swaps in a subclass
    assert_equal(m(input), expected_output)
    torch.nn.utils.parametrize.remove_parametrizations(m, name)
    assert_equal(m(input), expected_output)


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_rnn_args_check(mode):
    """TestNN.test_rnn_args_check."""
    input_size, hidden_size, num_layers, batch_size, seq_len, num_directions = 3, 5, 2, 4, 6, 1
    bad_size = 7  # prime number so that no size can divide it
    correct_input_shape = (seq_len, batch_size, input_size)
    correct_hidden_shape = (num_layers * num_directions, batch_size, hidden_size)

    def update_shape(shape, dim, new_dim_size):
        shape = list(shape)
        shape[dim] = new_dim_size
        return tuple(shape)

    def get_inputs(input_shape, hidden_shape):
        input, hidden = torch.randn(input_shape), torch.randn(hidden_shape)
        if mode != "LSTM":
            return [(input, hidden)]
        if hidden_shape == correct_hidden_shape:
            return [(input, (hidden, hidden))]
        good_hidden = torch.randn(correct_hidden_shape)
        return [(input, (hidden, good_hidden)), (input, (good_hidden, hidden))]

    def test(input_shape, hidden_shape):
        for input, hidden in get_inputs(input_shape, hidden_shape):
            model = LAYERS[mode][1](input_size, hidden_size, num_layers)
            with pytest.raises(RuntimeError):
                model(input, hidden)

    test(update_shape(correct_input_shape, 1, bad_size), correct_hidden_shape)  # input batch size
    test(correct_input_shape, update_shape(correct_hidden_shape, 1, bad_size))  # hidden batch size
    test(update_shape(correct_input_shape, 2, bad_size), correct_hidden_shape)  # input size
    test(correct_input_shape, update_shape(correct_hidden_shape, 2, bad_size))  # hidden size
    test(correct_input_shape, update_shape(correct_hidden_shape, 0, bad_size))  # hidden[0]


def test_projections_lstm_args_check():
    """TestNN.test_projections_lstm_args_check: wrong sizes of h (proj_size wide) or c raise, as
    torch's class raises (the control)."""
    input_size, hidden_size, proj_size, num_layers, batch_size, seq_len = 3, 5, 2, 2, 4, 6
    bad_size = 7
    inp = (seq_len, batch_size, input_size)
    h = (num_layers, batch_size, proj_size)
    c = (num_layers, batch_size, hidden_size)

    def update_shape(shape, dim, new_dim_size):
        shape = list(shape)
        shape[dim] = new_dim_size
        return tuple(shape)

    cases = [
        (update_shape(inp, 1, bad_size), h, c),  # input batch size
        (update_shape(inp, 2, bad_size), h, c),  # input size
        (inp, update_shape(h, 1, bad_size), c),  # h batch size
        (inp, update_shape(h, 2, bad_size), c),  # h size (proj_size)
        (inp, update_shape(h, 0, bad_size), c),  # h layers
        (inp, h, update_shape(c, 1, bad_size)),  # c batch size
        (inp, h, update_shape(c, 2, bad_size)),  # c size
        (inp, h, update_shape(c, 0, bad_size)),  # c layers
        (inp, c, c),  # h given hidden_size wide
    ]
    for input_shape, h_shape, c_shape in cases:
        args = torch.randn(input_shape), (torch.randn(h_shape), torch.randn(c_shape))
        for cls in (celldsl.LSTM, nn.LSTM):
            with pytest.raises(RuntimeError):
                cls(input_size, hidden_size, num_layers, proj_size=proj_size)(*args)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_projections_lstm_initial_hidden_state(bidirectional):
    """TestNN.test_projections_lstm_initial_hidden_state: zeros given equal zeros by default."""
    rnn = celldsl.LSTM(30, 20, 2, bidirectional=bidirectional, proj_size=10)
    num_dirs = 2 if bidirectional else 1
    input = torch.randn(10, 32, 30)
    hidden = (torch.zeros(2 * num_dirs, 32, 10), torch.zeros(2 * num_dirs, 32, 20))
    output1, hidden1 = rnn(input, hidden)
    output2, hidden2 = rnn(input)
    assert output1.shape == (10, 32, 10 * num_dirs) and hidden1[0].shape == (2 * num_dirs, 32, 10)
    assert_equal(output1, output2)
    assert_equal(hidden1, hidden2)


def test_cudnn_forward_exception():
    """TestNN.test_cudnn_forward_exception (runs on the CPU too), with its proj_size=10 LSTM."""
    rnns = [
        (celldsl.LSTM(10, 20, batch_first=True), (torch.zeros(1, 2, 19), torch.zeros(1, 2, 19))),
        (
            celldsl.LSTM(10, 20, batch_first=True, proj_size=10),
            (torch.zeros(1, 2, 19), torch.zeros(1, 2, 19)),
        ),
        (celldsl.GRU(10, 20, batch_first=True), torch.zeros(1, 2, 19)),
        (celldsl.RNN(10, 20, batch_first=True), torch.zeros(1, 2, 19)),
    ]
    x_wrong, x_right = torch.randn(2, 3, 3), torch.randn(2, 3, 10)
    for rnn, hidden in rnns:
        with pytest.raises(RuntimeError, match="Expected hidden.*size.*got"):
            rnn(x_right, hidden)
        with pytest.raises(RuntimeError, match=r"input\.size\(-1\) must be equal to input_size"):
            rnn(x_wrong)


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_rnn_initial_hidden_state(mode):
    """TestNN.test_rnn_initial_hidden_state."""
    rnn = LAYERS[mode][1](30, 20, 2)
    input = torch.randn(10, 32, 30)
    hidden = torch.zeros(2, 32, 20)
    if mode == "LSTM":
        hidden = (hidden, hidden)
    output1, hidden1 = rnn(input, hidden)
    output2, hidden2 = rnn(input)
    assert_equal(output1, output2)
    assert_equal(hidden1, hidden2)


@pytest.mark.parametrize("mode", ["RNN", "GRU"])
def test_projections_errors_on_gru_and_rnn(mode):
    """TestNN.test_projections_errors_on_gru_and_rnn (torch's own check, by construction)."""
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
        LAYERS[mode][1](30, 20, 2, proj_size=10)


@pytest.mark.parametrize("p, train", list(product((0, 0.276, 0.731, 1), (True, False))))
def test_RNN_dropout(p, train):
    """TestNN.test_RNN_dropout, its CPU half: dropout sits between the layers, scaled by 1/(1-p)."""
    rnn = celldsl.RNN(10, 1000, 2, bias=False, dropout=p, nonlinearity="relu", dtype=torch.double)
    rnn.train(train)
    with torch.no_grad():
        for w in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.weight_ih_l1, rnn.weight_hh_l1):
            w.fill_(1)
    input = torch.ones(1, 1, 10, dtype=torch.double)
    hx = torch.zeros(2, 1, 1000, dtype=torch.double)
    output, hy = rnn(input, hx)
    assert_equal(output.data.min(), output.data.max())
    output_val = output.data[0][0][0]
    if p == 0 or not train:
        assert_equal(output_val, torch.tensor(10000.0, dtype=torch.double))
    elif p == 1:
        assert_equal(output_val, torch.tensor(0.0, dtype=torch.double))
    else:
        assert 8000 < output_val < 12000
        denorm_mod = (output_val * (1 - p)) % 10
        assert min(denorm_mod, 10 - denorm_mod) < 1e-2
    assert_equal(hy[0].data.min(), hy[0].data.max())
    assert_equal(hy[1].data.min(), hy[1].data.max())
    assert_equal(hy.data[0][0][0], torch.tensor(10.0, dtype=torch.double))
    assert_equal(hy.data[1][0][0], output_val)


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_error_RNN_seq_len_zero(mode, bidirectional):
    """TestNN.test_error_RNN_seq_len_zero, its CPU half."""
    input = torch.ones(0, 10, 5, dtype=torch.double)
    rnn = LAYERS[mode][1](5, 6, bidirectional=bidirectional, dtype=torch.double)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        rnn(input)


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_RNN_input_size_zero(mode):
    """TestNN.test_RNN_input_size_zero: a batch of size 0 runs, forward and backward."""
    input = torch.zeros((5, 0, 3))
    rnn = LAYERS[mode][1](input_size=3, hidden_size=4)
    outs = rnn(input)
    assert outs[0].shape == torch.Size([5, 0, 4])
    outs[0].sum().backward()  # no hard error


@pytest.mark.parametrize("p, train", list(product((0, 0.1234), (True, False))))
def test_RNN_dropout_state(p, train):
    """TestNN.test_RNN_dropout_state, its CPU half: dropout draws anew each call, also after a
    torch.save round trip."""
    rnn = celldsl.RNN(100, 100, 2, bias=False, dropout=p, nonlinearity="relu")
    rnn.train(train)
    input, hx = torch.rand(1, 1, 100), torch.rand(2, 1, 100)
    output1, hy1 = rnn(input, hx)
    output2, hy2 = rnn(input, hx)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    rnn2 = torch.load(buf, weights_only=False)  # as torch's test: a whole module needs the full unpickler
    rnn2.flatten_parameters()
    output3, hy3 = rnn2(input, hx)
    if p == 0 or not train:
        assert_equal(output1, output2)
        assert_equal(output1, output3)
        assert_equal(hy1, hy2)
        assert_equal(hy1, hy3)
    else:
        assert_not_equal(output1, output2)
        assert_not_equal(output1, output3)
        assert_not_equal(hy1, hy2)
        assert_not_equal(hy1, hy3)


@pytest.mark.parametrize("train", [True, False])
def test_RNN_change_dropout(train):
    """TestNN.test_RNN_change_dropout, its CPU half: setting rnn.dropout takes effect."""
    rnn = celldsl.RNN(100, 100, 2, dropout=0, nonlinearity="relu", dtype=torch.double)
    input = torch.rand(3, 2, 100, dtype=torch.double)
    rnn.train(train)
    prev_output = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        rnn.dropout = p
        output1, hy1 = rnn(input)
        output2, hy2 = rnn(input)
        if p == 0 or p == 1 or not train:
            assert_equal(output1, output2)
            assert_equal(hy1, hy2)
        else:
            assert_not_equal(output1, output2)
            assert_not_equal(hy1, hy2)
        if prev_output is not None:
            if not train:
                assert_equal(output1.data, prev_output)
                assert_equal(output2.data, prev_output)
            else:
                assert_not_equal(output1.data, prev_output)
                assert_not_equal(output2.data, prev_output)
        prev_output = output1.data


# ---- TestNNDeviceType (device: CPU) ---------------------------------------------------------------


def test_rnn_retain_variables():
    """TestNNDeviceType.test_rnn_retain_variables (float64): repeated backward with retain_graph gives
    the same gradients."""
    rnns = [celldsl.LSTM(10, 20, num_layers=2).double(), celldsl.GRU(10, 20, num_layers=2).double(),
            celldsl.RNN(10, 20, num_layers=2).double()]
    for rnn in rnns:
        input = torch.randn(5, 6, 10, dtype=torch.double, requires_grad=True)
        output = rnn(input)
        output[0].sum().backward(retain_graph=True)
        first = [input.grad.data.clone()] + [p.grad.data.clone() for p in rnn.parameters()]
        for _ in range(4):
            rnn.zero_grad()
            input.grad.data.zero_()
            output[0].sum().backward(retain_graph=True)
            again = [input.grad.data] + [p.grad.data for p in rnn.parameters()]
            assert_equal(first, again)


def test_lstmcell_backward_only_one_output_grad():
    """TestNNDeviceType.test_lstmcell_backward_only_one_output_grad (onlyCUDA in torch, though
    nothing in it needs CUDA): a gradient for h alone, or c alone, reaches the input."""
    l = celldsl.LSTMCell(2, 3).to(dtype=torch.double)  # noqa: E741 - torch's name
    s = torch.randn(1, 2, dtype=torch.double, requires_grad=True)
    for i in range(2):
        out = l(s)[i]
        out.sum().backward()
        assert not (s.grad is None or s.grad.abs().sum().item() == 0)


def _test_rnn_mod(mod, inp):
    """torch's _test_rnn_mod: gradcheck and gradgradcheck of every output (batched checks off, as
    there; tests/test_functorch.py runs them on)."""
    def flatten_out(inp):
        out = mod(inp)
        return tuple([t if isinstance(t, torch.Tensor) else tt for t in out for tt in t])

    assert torch.autograd.gradcheck(flatten_out, inp, check_batched_grad=False)
    assert torch.autograd.gradgradcheck(flatten_out, inp, check_batched_grad=False)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_LSTM_and_GRU_grad_and_gradgrad(mode):
    """TestNNDeviceType.test_LSTM_grad_and_gradgrad and test_GRU_grad_and_gradgrad (float64)."""
    hsize = 4
    inp = torch.rand(1, 3, hsize, dtype=torch.double, requires_grad=True)
    for bias in [True, False]:
        mod = LAYERS[mode][1](hsize, hsize, bias=bias).to(dtype=torch.double)
        _test_rnn_mod(mod, inp)


def test_LSTM_differentiable_backward():
    """TestNNDeviceType.test_LSTM_differentiable_backward_using_oneDNN, float32, with torch's LSTM
    in place of the oneDNN-off run: a gradient taken with create_graph=True is itself
    differentiable, through 20 layers, and both results match torch's. (Its bfloat16 case compares
    two bfloat16 runs of one implementation at float32 tolerances; celldsl rounds differently from
    oneDNN, so it is left out.)"""
    torch.manual_seed(0)
    batch, seq_len, input = 10, 12, 3
    ref, ours = pair("LSTM", input, 3, 20, batch_first=True)
    x = torch.rand(batch, seq_len, input)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    der = []
    for net, xi in ((ref, x1), (ours, x2)):
        out, _ = net(xi)
        der_out = torch.autograd.grad(out, xi, grad_outputs=torch.ones_like(out), retain_graph=True,
                                      create_graph=True)[0]
        der_out.sum().backward(retain_graph=True)
        der.append(der_out)
    assert torch.allclose(der[0], der[1])
    assert torch.allclose(x1.grad, x2.grad)


def test_variable_sequence():
    """TestNNDeviceType.test_variable_sequence (float32, with its proj_size=2 cases): a packed batch
    equals each sequence run alone, forward and backward."""
    dtype, prec = torch.float, 1e-5  # torch's dtype2prec_DONTUSE[torch.float]

    def pad(var, length):
        if var.size(0) == length:
            return var
        return torch.cat([var, var.new_zeros(length - var.size(0), *var.size()[1:])])

    def maybe_index_tuple(maybe_tuple_of_tensors, index):
        if maybe_tuple_of_tensors is None:
            return None
        return tuple(maybe_tuple_of_tensors[j][:, index:index + 1, :].contiguous() for j in range(2))

    def check_lengths(lengths, enforce_sorted, use_default_hiddens, proj_size):
        input_size, hidden_size, num_layers, bidirectional = 3, 4, 2, True
        max_length = max(lengths)
        x_leaf = torch.randn(max_length, len(lengths), input_size, dtype=dtype, requires_grad=True)
        num_directions = 2 if bidirectional else 1
        lstm = celldsl.LSTM(
            input_size, hidden_size, bidirectional=bidirectional, num_layers=num_layers, proj_size=proj_size
        )
        lstm2 = deepcopy(lstm)
        x = x_leaf
        hidden0 = None
        if not use_default_hiddens:
            h_out = proj_size if proj_size > 0 else hidden_size
            hidden0 = (torch.randn(num_directions * num_layers, len(lengths), h_out, dtype=dtype),
                       torch.randn(num_directions * num_layers, len(lengths), hidden_size, dtype=dtype))
        seq_outs, seq_hiddens = [], []  # each sequence alone
        for i, length in enumerate(lengths):
            out, hid = lstm2(x[:length, i:i + 1], maybe_index_tuple(hidden0, i))
            seq_outs.append(pad(out, max_length))
            seq_hiddens.append(hid)
        seq_out = torch.cat(seq_outs, 1)
        seq_hidden = tuple(torch.cat(hids, 1) for hids in zip(*seq_hiddens, strict=True))
        packed = rnn_utils.pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        packed_out, packed_hidden = lstm(packed, hidden0)
        unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)
        assert_equal(packed_hidden, seq_hidden, atol=prec, rtol=0)
        assert_equal(unpacked, seq_out, atol=prec, rtol=0)
        assert unpacked_len.tolist() == list(lengths)
        seq_out.sum().backward()
        grad_x = x_leaf.grad.data.clone()
        x_leaf.grad.data.zero_()
        unpacked.sum().backward()
        assert_equal(x_leaf.grad, grad_x, atol=prec, rtol=0)
        for p1, p2 in zip(lstm.parameters(), lstm2.parameters(), strict=True):
            assert_equal(p1.grad, p2.grad, atol=2e-4, rtol=0)  # torch's float32 prec for parameters

    tests = [[True, [5]], [False, [5]], [True, [10, 10, 6, 2, 2, 1, 1]], [False, [10, 10, 6, 2, 2, 1, 1]],
             [False, [2, 1, 3, 2, 10, 5, 3]]]
    torch.manual_seed(0)
    for enforce_sorted, seq_lens in tests:
        for use_default_hiddens in (True, False):
            for proj_size in (0, 2):
                check_lengths(seq_lens, enforce_sorted, use_default_hiddens, proj_size)


def test_save_lstm_compatibility():
    """TestNNDeviceType.test_save_lstm_compatibility: an LSTM pickled before proj_size existed loads."""
    model = celldsl.LSTM(2, 3)
    x = torch.randn(32, 5, 2)
    expected = model(x)
    assert model.proj_size == 0
    state_dict = model.__dict__
    del state_dict["proj_size"]
    loaded_model = celldsl.LSTM(2, 3)
    loaded_model.__setstate__(state_dict)
    assert_equal(loaded_model(x), expected)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layers_are_torch_classes(kind):
    """Not a torch test: what the ported tests rely on. celldsl's classes are torch's (isinstance),
    keep torch's parameters, repr and attributes, and compute what torch computes."""
    torch_cls, ours_cls = LAYERS[kind]
    torch.manual_seed(0)
    ref, ours = pair(kind, 3, 4, 2, bias=False, batch_first=True, bidirectional=True)
    assert isinstance(ours, torch_cls) and isinstance(ours, nn.RNNBase)
    assert repr(ours) == repr(ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.buffers()) == [] and ours._flat_weights_names == ref._flat_weights_names
    assert [[tuple(w.shape) for w in ws] for ws in ours.all_weights] == \
        [[tuple(w.shape) for w in ws] for ws in ref.all_weights]
    x = torch.randn(2, 5, 3)
    assert_equal(ours(x), ref(x))
