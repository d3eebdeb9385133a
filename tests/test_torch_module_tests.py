"""PyTorch's generic module tests (test/test_modules.py) over module_db's RNN, GRU, LSTM, RNNCell,
GRUCell and LSTMCell entries (torch/testing/_internal/common_modules.py), ported to celldsl's classes.

SAMPLES below rewrites module_db's sample inputs (module_inputs_torch_nn_RNN_GRU, _LSTM,
_RNN_GRU_Cell, _LSTMCell: every combination of bias, batch_first, bidirectional and nonlinearity,
2 layers, sizes 2-3, unbatched input, with and without hx) and ERRORS its error inputs
(module_error_inputs_torch_nn_RNN_GRU, _RNN_GRU_Cell, _LSTMCell). The tests keep torch's assertions
and tolerances; dtypes float32 and float64 (float64 alone for the gradient checks), train and eval
mode for the layers (module_db's train_and_eval_differ), train mode for the cells. The samples have
dropout 0, so eval runs the same code: the two slowest tests (test_non_contiguous_tensors,
test_memory_format) run in train mode only. Where a test only checks that something runs, torch's
class with the same state_dict is the control.

Within CI's time: test_grad and test_gradgrad run on GRADIENT_SAMPLES (a covering subset: each class,
bias on and off, batch_first on and off, with and without hx, unidirectional); test_grad's total
derivative with full Jacobians as torch's, its partial derivatives and all of test_gradgrad in
gradcheck's fast mode (a random projection v^T J u instead of the full Jacobian, same tolerances).
tests/test_torch_nn_tests.py runs full-Jacobian gradgradchecks of LSTM and GRU (torch's
test_LSTM_grad_and_gradgrad).
Not ported: test_check_inplace (no module here has `inplace`); test_if_train_and_eval_modes_differ
(it checks module_db's train_and_eval_differ flag, not the module). GPU-only:
test_multiple_device_transfer, test_cpu_gpu_parity.
"""

import io
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from itertools import product

import pytest
import torch
from torch.testing import make_tensor
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch_testing import CELLS, LAYERS, assert_equal

DTYPES = [torch.float32, torch.float64]


@dataclass
class Sample:
    """One module_db ModuleInput: constructor arguments and a function making the forward inputs."""

    kind: str
    kwargs: dict
    make_inputs: object  # (make: make_tensor bound to dtype/requires_grad) -> tuple of forward args
    args: tuple = ()
    with_hx: bool = True

    @property
    def is_layer(self) -> bool:
        return self.kind in LAYERS

    @property
    def desc(self) -> str:
        words = [*map(str, self.args), *(f"{k}={v}" for k, v in self.kwargs.items())]
        return f"{self.kind}({', '.join(words)}){'+hx' if self.with_hx else ''}"


def layer_samples() -> list[Sample]:
    """module_inputs_torch_nn_RNN_GRU (RNN: also nonlinearity) and module_inputs_torch_nn_LSTM (also
    proj_size=2)."""
    samples = []
    for kind in ("RNN", "GRU", "LSTM"):
        nonlinearities = ("relu", "tanh") if kind == "RNN" else (None,)
        flags = product(nonlinearities, (False, True), (False, True), (False, True))
        for nl, bias, batch_first, bidir in flags:
            extra = {"nonlinearity": nl} if nl else {}
            base = {"input_size": 2, "num_layers": 2, "batch_first": batch_first, "bias": bias,
                    "bidirectional": bidir, **extra}
            L = 4 if bidir else 2
            if kind == "LSTM":
                no_hx, hx = (2, 2), (lambda make, L=L: (make((3, 2)), (make((L, 3)), make((L, 3)))))
            else:
                no_hx, hx = (3, 2), (lambda make, L=L: (make((3, 2)), make((L, 3))))
            samples.append(Sample(kind, {**base, "hidden_size": 3 if kind == "LSTM" else 2},
                                  lambda make, shape=no_hx: (make(shape),), with_hx=False))
            samples.append(Sample(kind, {**base, "hidden_size": 3}, hx))
            if kind == "LSTM":  # proj_size=2: h is 2 wide, c 3
                proj = {**base, "hidden_size": 3, "proj_size": 2}
                samples.append(Sample(kind, proj, lambda make: (make((2, 2)),), with_hx=False))
                proj_hx = lambda make, L=L: (make((3, 2)), (make((L, 2)), make((L, 3))))  # noqa: E731
                samples.append(Sample(kind, proj, proj_hx))
    return samples


def cell_samples() -> list[Sample]:
    """module_inputs_torch_nn_RNN_GRU_Cell (RNNCell: also relu) and module_inputs_torch_nn_LSTMCell."""
    state = {"RNNCell": lambda make: (make(5), make(10)), "GRUCell": lambda make: (make(5), make(10)),
             "LSTMCell": lambda make: (make(5), (make(10), make(10)))}
    samples = []
    for kind in ("RNNCell", "GRUCell", "LSTMCell"):
        samples.append(Sample(kind, {}, state[kind], args=(5, 10)))
        samples.append(Sample(kind, {"bias": True}, state[kind], args=(5, 10)))
    samples.append(Sample("RNNCell", {"bias": True, "nonlinearity": "relu"}, state["RNNCell"], args=(5, 10)))
    return samples


SAMPLES = layer_samples() + cell_samples()
KINDS = sorted({s.kind for s in SAMPLES})


def samples_of(kind):
    return [s for s in SAMPLES if s.kind == kind]


def modes(kind):
    return [True, False] if kind in LAYERS else [True]  # module_db: train_and_eval_differ for layers


def cases(dtypes=DTYPES, train_only=False):
    return [pytest.param(k, d, t, id=f"{k}-{str(d)[6:]}-{'train' if t else 'eval'}")
            for k in KINDS for d in dtypes for t in modes(k) if t or not train_only]


def construct(sample: Sample, impl=1, **factory):
    """celldsl's class (impl=1) or torch's (impl=0) from the sample's constructor arguments."""
    return {**LAYERS, **CELLS}[sample.kind][impl](*sample.args, **sample.kwargs, **factory)


def build(sample: Sample, dtype, training, impl=1):
    """As torch's tests build a module: constructed, then m.to(device).to(dtype), m.train(training)."""
    m = construct(sample, impl)
    m.to("cpu").to(dtype)
    m.train(training)
    return m


def inputs(sample, dtype, requires_grad=False):
    return sample.make_inputs(partial(make_tensor, device="cpu", dtype=dtype, requires_grad=requires_grad))


def no_batch_dim_reference(m, sample, *args):
    """module_db's no_batch_dim_reference_* functions: the unbatched input run as a batch of one."""
    if sample.is_layer:
        batch_dim = 0 if sample.kwargs["batch_first"] else 1
        inp, h = args[0], (args[1] if len(args) > 1 else None)
        if h is not None:
            h = tuple(t.unsqueeze(1) for t in h) if isinstance(h, tuple) else h.unsqueeze(1)
        out, hn = m(inp.unsqueeze(batch_dim), h)
        hn = tuple(t.squeeze(1) for t in hn) if isinstance(hn, tuple) else hn.squeeze(1)
        return out.squeeze(batch_dim), hn
    inp, h = args
    h = tuple(t.unsqueeze(0) for t in h) if isinstance(h, tuple) else h.unsqueeze(0)
    out = m(inp.unsqueeze(0), h)
    return tuple(t.squeeze(0) for t in out) if isinstance(out, tuple) else out.squeeze(0)


def assert_parameters_are(m, device, dtype):
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        assert t.device == torch.device(device), f"{name} is on {t.device} instead of {device}"
        if t.dtype.is_floating_point:
            assert t.dtype == dtype, f"{name} is of dtype {t.dtype} instead of {dtype}"


@pytest.mark.parametrize("kind, dtype, training", cases())
def test_forward(kind, dtype, training):
    """TestModule.test_forward: each sample against module_db's reference (the unbatched input as a
    batch of one), then .float()/.double() and a forward again; torch's class is the control."""
    for sample in samples_of(kind):
        args = inputs(sample, dtype)
        with torch.random.fork_rng():
            m = build(sample, dtype, training)
            outputs = m(*args)
            assert_equal(outputs, no_batch_dim_reference(m, sample, *args))
            ref = build(sample, dtype, training, impl=0)
            ref.load_state_dict(m.state_dict())
            assert_equal(outputs, ref(*args))
            (m.float() if dtype == torch.float32 else m.double())
            m(*args)
            assert_parameters_are(m, "cpu", dtype)


@pytest.mark.parametrize("kind, dtype, training", cases())
def test_factory_kwargs(kind, dtype, training):
    """TestModule.test_factory_kwargs: device and dtype reach every parameter and buffer."""
    for sample in samples_of(kind):
        assert_parameters_are(construct(sample, device="cpu", dtype=dtype).train(training), "cpu", dtype)
        assert_parameters_are(construct(sample, device="meta", dtype=dtype).train(training), "meta", dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_to(kind):
    """TestNN.test_to (there on nn.Linear): .to() returns the module itself, converts the parameters
    and refuses copy=True."""
    for sample in samples_of(kind):
        m = construct(sample)
        assert m.to("cpu") is m and m.to("cpu", dtype=torch.float32) is m
        assert m.double() is m.to(torch.float64) and all(p.dtype == torch.float64 for p in m.parameters())
        with pytest.raises(RuntimeError):
            m.to("cpu", copy=True)


@pytest.mark.parametrize("kind, dtype, training", cases([torch.float32]))
def test_repr(kind, dtype, training):
    """TestModule.test_repr: repr and str work (and equal torch's class's)."""
    for sample in samples_of(kind):
        m = build(sample, dtype, training)
        assert repr(m) == str(m) == repr(build(sample, dtype, training, impl=0))


@pytest.mark.parametrize("kind, dtype, training", cases())
def test_pickle(kind, dtype, training):
    """TestModule.test_pickle: a torch.save round trip gives the same output. (torch.load needs
    weights_only=False for a whole module, torch's classes too.)"""
    for sample in samples_of(kind):
        args = inputs(sample, dtype)
        with torch.random.fork_rng():
            m = build(sample, dtype, training)
            output = m(*args)
            f = io.BytesIO()
            torch.save(m, f)
            f.seek(0)
            m_copy = torch.load(f, weights_only=False)
            assert_equal(m_copy(*args), output)


def _traverse(obj, fn):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_traverse(o, fn) for o in obj)
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return obj


def _grads_of(obj):
    return _traverse(obj, lambda t: t.grad if t.requires_grad else None)


def _zero_grads(obj):
    def zero(t):
        t.grad = None
        return t
    _traverse(obj, zero)


def _non_contiguous(obj):
    def make(t):
        if t.dim() == 0:
            return t
        out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
        out.requires_grad = t.requires_grad
        return out
    return _traverse(obj, make)


def _backward(outputs, grads):
    flat_out, _ = tree_flatten(outputs)
    flat_grads, _ = tree_flatten(grads)
    for o, g in zip(flat_out, flat_grads, strict=True):
        if o.requires_grad:
            o.backward(g, retain_graph=True)


@pytest.mark.parametrize("kind, dtype, training", cases(train_only=True))
def test_non_contiguous_tensors(kind, dtype, training):
    """TestModule.test_non_contiguous_tensors: non-contiguous inputs and output gradients give the
    same outputs and gradients (input gradients within 1e-4, as torch's)."""
    for sample in samples_of(kind):
        args = inputs(sample, dtype, requires_grad=True)
        m = build(sample, dtype, training)
        _traverse(args, lambda t: t.retain_grad() or t)
        with torch.random.fork_rng():
            default_output = m(*args)
            grad_output = _traverse(default_output, lambda t: t.clone().detach_().normal_())
            _backward(default_output, grad_output)
        default_input_grad = deepcopy(_grads_of(args))
        default_param_grad = deepcopy([p.grad for p in m.parameters()])
        nc_args, nc_grad_output = _non_contiguous(args), _non_contiguous(grad_output)
        for in_args, g_out in product([args, nc_args], [grad_output, nc_grad_output]):
            _zero_grads(in_args)
            m.zero_grad()
            with torch.random.fork_rng():
                out = m(*in_args)
                _backward(out, deepcopy(g_out))
            assert_equal(out, default_output)
            assert_equal(_grads_of(in_args), default_input_grad, atol=1e-4, rtol=0)
            assert_equal([p.grad for p in m.parameters()], default_param_grad)


def _gradient_samples():
    """A covering subset for the gradient checks: per layer class one sample with bias, batch_first
    off, no hx and one without bias, batch_first on, with hx (RNN: tanh, then relu), unidirectional;
    per cell class one sample (bidirectional layers: test_gradcheck.py, test_functorch.py)."""
    picked = []
    for kind in KINDS:
        for s in samples_of(kind):
            kw = s.kwargs
            if s.is_layer:
                first = kw["bias"] and not kw["batch_first"] and not s.with_hx
                second = not kw["bias"] and kw["batch_first"] and s.with_hx
                nl_ok = kw.get("nonlinearity") in (None, "tanh" if first else "relu")
                if (first or second) and not kw["bidirectional"] and nl_ok:
                    picked.append(s)
            elif kw.get("bias") and (kind != "RNNCell" or kw.get("nonlinearity") == "relu"):
                picked.append(s)
    return picked


GRADIENT_SAMPLES = _gradient_samples()


def _gradients_helper(sample, training, check, total_kwargs, partial_kwargs):
    """torch's _test_gradients_helper: the total derivative over input and parameters, then each
    parameter's partial derivative with the others frozen."""
    m = build(sample, torch.float64, training)
    params = tuple(m.parameters())
    input_args = inputs(sample, torch.float64, requires_grad=True)

    def fn_to_gradcheck(*flat_input_and_params):
        input_and_params = tree_unflatten(list(flat_input_and_params), flat_spec)
        with torch.random.fork_rng():
            return tree_flatten(m(*input_and_params[: len(input_args)]))[0]

    flat_input, flat_spec = tree_flatten(input_args + params)
    assert check(fn_to_gradcheck, flat_input, **total_kwargs)
    for p in params:
        p.requires_grad = False
    for p in params:
        p.requires_grad = True
        flat_input, flat_spec = tree_flatten(input_args + params)
        assert check(fn_to_gradcheck, flat_input, **partial_kwargs)
        p.requires_grad = False


@pytest.mark.parametrize("sample", GRADIENT_SAMPLES, ids=lambda s: s.desc)
def test_grad(sample):
    """TestModule.test_grad (float64, train mode): the total derivative with full Jacobians, the
    partial ones in fast mode."""
    _gradients_helper(sample, True, torch.autograd.gradcheck, {}, {"fast_mode": True})


@pytest.mark.parametrize("sample", GRADIENT_SAMPLES, ids=lambda s: s.desc)
def test_gradgrad(sample):
    """TestModule.test_gradgrad (float64, train mode; module_db marks these modules
    supports_gradgrad), in fast mode."""
    fast = {"fast_mode": True}
    _gradients_helper(sample, True, torch.autograd.gradgradcheck, fast, fast)


@pytest.mark.parametrize("kind, dtype, training", cases(train_only=True))
def test_memory_format(kind, dtype, training):
    """TestModule.test_memory_format for inputs without channels (only the contiguous format applies):
    outputs and gradients after m.to(memory_format=...) equal the first run's and are contiguous."""
    for sample in samples_of(kind):
        args = inputs(sample, dtype, requires_grad=True)
        m = build(sample, dtype, training)
        desired = m(*args)
        diff_out = [t for t in tree_flatten(desired)[0] if t.requires_grad]
        diff_in = [t for t in tree_flatten((args, tuple(m.parameters())))[0] if t.requires_grad]
        grad_out = [torch.rand_like(t) for t in diff_out]
        ref_grads = torch.autograd.grad(diff_out, diff_in, grad_out)
        for memory_format in (torch.preserve_format, torch.contiguous_format):
            m.to(memory_format=memory_format)
            outputs = m(*args)
            assert_equal(outputs, desired)
            assert all(t.is_contiguous() for t in tree_flatten(outputs)[0])
            diff_out = [t for t in tree_flatten(outputs)[0] if t.requires_grad]
            diff_in = [t for t in tree_flatten((args, tuple(m.parameters())))[0] if t.requires_grad]
            grads = torch.autograd.grad(diff_out, diff_in, grad_out)
            assert_equal(grads, ref_grads)
            assert all(g.is_contiguous() for g in grads)


@pytest.mark.parametrize("kind, dtype, training", cases([torch.float32]))
def test_device_ctx_init(kind, dtype, training):
    """TestModule.test_device_ctx_init: built under torch.device('meta'), the parameters are meta
    tensors with the metadata of the CPU build."""
    for sample in samples_of(kind):
        m_cpu = construct(sample)
        with torch.device("meta"):
            m = construct(sample)
        for p_meta, p_cpu in zip(m.parameters(), m_cpu.parameters(), strict=True):
            assert p_meta.is_meta
            assert (p_meta.shape, p_meta.dtype, p_meta.stride(), p_meta.requires_grad) == \
                (p_cpu.shape, p_cpu.dtype, p_cpu.stride(), p_cpu.requires_grad)


def layer_errors(dtype):
    """module_error_inputs_torch_nn_RNN_GRU: (constructor args, kwargs, forward input or None,
    error type, regex)."""
    other = torch.float64 if dtype == torch.float32 else torch.float32
    return [
        ((10, 0, 1), {}, None, ValueError, "hidden_size must be greater than zero"),
        ((10, 10, 0), {}, None, ValueError, "num_layers must be greater than zero"),
        ((3, 5), {"dtype": dtype}, (make_tensor((2, 4, 3), device="cpu", dtype=other),), ValueError,
         r"RNN input dtype .* does not match weight dtype .* Convert input: input\.to\(.*\), or convert "
         r"model: model\.to\(.*\)"),
        ((3, 5), {"bias": 0}, None, TypeError, "bias should be of type bool, got: int"),
        ((3, 5), {"bias": 1}, None, TypeError, "bias should be of type bool, got: int"),
        ((3, 5), {"bias": "True"}, None, TypeError, "bias should be of type bool, got: str"),
        ((3, 5), {"batch_first": 0}, None, TypeError, "batch_first should be of type bool, got: int"),
        ((3, 5), {"batch_first": 1}, None, TypeError, "batch_first should be of type bool, got: int"),
        ((3, 5), {"batch_first": "False"}, None, TypeError, "batch_first should be of type bool, got: str"),
        ((3.0, 5), {}, None, TypeError, "input_size should be of type int, got: float"),
        (("10", 5), {}, None, TypeError, "input_size should be of type int, got: str"),
        ((0, 5), {}, None, ValueError, "input_size must be greater than zero"),
        ((-1, 5), {}, None, ValueError, "input_size must be greater than zero"),
        ((3, 5.0), {}, None, TypeError, "hidden_size should be of type int, got: float"),
    ]


def cell_errors(kind, dtype):
    """module_error_inputs_torch_nn_RNN_GRU_Cell and _LSTMCell."""
    make = partial(make_tensor, device="cpu", dtype=dtype)
    lstm = kind == "LSTMCell"

    def hx(*shape):
        return (make(shape), make(shape)) if lstm else make(shape)

    four_d = r"Expected hx\[0\] to be 1D or 2D, got 4D instead" if lstm else \
        "Expected hidden to be 1D or 2D, got 4D instead"
    cases = [
        ((10, 20), (make(3, 11), hx(3, 20)), RuntimeError,
         "input has inconsistent input_size: got 11 expected 10"),
        ((10, 20), (make(3, 10), hx(3, 21)), RuntimeError,
         "hidden0 has inconsistent hidden_size: got 21, expected 20"),
        ((10, 20), (make(3, 10), hx(5, 20)), RuntimeError,
         "Input batch size 3 doesn't match hidden0 batch size 5"),
        ((10, 20), (make(3, 10), hx(3, 1, 1, 20)), ValueError, four_d),
    ]
    if kind == "RNNCell":
        for nl in ("relu", "tanh"):
            cases.append(((10, 20, True, nl), (make(3, 10), make(3, 21)), RuntimeError,
                          "hidden0 has inconsistent hidden_size: got 21, expected 20"))
    return cases


@pytest.mark.parametrize("impl", [0, 1], ids=["torch", "celldsl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("kind", KINDS)
def test_errors(kind, dtype, impl):
    """TestModule.test_errors: module_db's error inputs raise the error type with the message (torch's
    class as the control: the same table passes on it)."""
    cls = {**LAYERS, **CELLS}[kind][impl]
    if kind in LAYERS:
        for args, kwargs, forward, error, regex in layer_errors(dtype):
            if forward is None:  # a construction error
                with pytest.raises(error, match=regex):
                    cls(*args, **kwargs)
                continue
            m = cls(*args, **kwargs)
            with pytest.raises(error, match=regex):
                m(*forward)
    else:
        for args, forward, error, regex in cell_errors(kind, dtype):
            m = cls(*args).to(dtype)
            with pytest.raises(error, match=regex):
                m(*forward)
