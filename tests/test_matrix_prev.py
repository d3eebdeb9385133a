"""prev() in a matrix-memory cell on the cpu and triton backends (issue 26, item 4): mamba (causal conv
taps on prev(u_in, k), then SiLU, the low-rank Δ, B, C) and rwkv6 (the token shift prev(x) - x and the
data-dependent lerps). What depends on a prev() but on no state is computed by torch before the loop
(targets/matrix_hoist.py); the loops read it per step and send its gradient back.

Against the einsum references written from the papers (tests/matrix_references.py) and against
backend="torch", float64: outputs, final states, the gradients of the input, the initial states and
every parameter; T = 1, T < the conv's 3 steps back, T past a checkpoint; packed sequences (prev never
reaches another sequence or the padding), bidirectional, two layers; gradcheck of the cpu path; what
is still refused (prev of a matrix per step), located. The triton tests run on the interpreter
(TRITON_INTERPRET=1) and are kept small: it is slow."""

from __future__ import annotations

import warnings

import pytest
import torch
from matrix_layers import matrix_layer, random_states, ref_params, weighted_grads
from matrix_references import ref_mamba, ref_rwkv6
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from celldsl.lang.errors import CellError, CellWarning
from celldsl.nn.matrix import MatrixRecurrent

I = 5
SIZES = {
    "rwkv6": {"heads": 2, "K": 3, "V": 4, "R": 2, "R_d": 3},  # heads != K != V != I
    "mamba": {"heads": 1, "D": 4, "N_s": 3, "R": 2, "O": 2},
}
CELLS = sorted(SIZES)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _pair(cell, backend, **kw):
    """The cell on `backend` (Triton: segments of 2 steps, so T = 5 ends in a segment of one step) and
    its torch twin with the same parameters."""
    layer = matrix_layer(cell, backend, sizes=SIZES[cell], inputs=I, checkpoint=2, **kw)
    twin = matrix_layer(cell, "torch", sizes=SIZES[cell], inputs=I, **kw)
    twin.load_state_dict(layer.state_dict())
    want = {"cpu": "CMatrixLoop", "triton": "TritonMatrixLoop"}[backend]
    assert type(layer.loop).__name__ == want
    return layer, twin


def _reference(cell, layer, x, s0):
    p = ref_params(layer)
    if cell == "rwkv6":
        out, (S, _x_prev) = ref_rwkv6(p, x, (s0, torch.zeros_like(x[0])), heads=SIZES[cell]["heads"])
        return out, S
    p["W_in"] = torch.cat([p.pop("W_in_u"), p.pop("W_in_z")])  # the block's one in_proj
    p["conv_w"] = torch.stack([p.pop(f"conv_w{j}") for j in range(4)], -1)  # taps, oldest first
    h0 = s0.reshape(x.shape[1], *p["A_log"].shape)  # heads = 1
    out, (h, _window) = ref_mamba(p, x, (h0, x.new_zeros(x.shape[1], p["A_log"].shape[0], 3)))
    return out, h.reshape(s0.shape)


def _check(backend, cell, steps, n):
    layer, twin = _pair(cell, backend)
    x = torch.randn(steps, n, I, dtype=torch.float64, requires_grad=True)
    (s0,) = random_states(layer, n)
    out, (final,) = layer(x, (s0,))
    twin_out, (twin_final,) = twin(x, (s0,))
    ref_out, ref_final = _reference(cell, layer, x, s0[0])
    for want, want_final in ((ref_out, ref_final), (twin_out, twin_final[0])):
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final[0], want_final, rtol=1e-10, atol=1e-10)
    got = weighted_grads(out, [final[0]], [x, s0, *layer.parameters()])
    want = weighted_grads(ref_out, [ref_final], [x, s0, *layer.parameters()])
    twin_got = weighted_grads(twin_out, [twin_final[0]], [x, s0, *twin.parameters()])
    for a, b, c in zip(got, want, twin_got, strict=True):
        assert steps < 4 or a.abs().sum() > 0  # all reach the loss (the taps 3 back from T = 4 on)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("steps", [1, 2, 40])  # 2 < mamba's 3 taps back; 40 > a checkpoint segment (32)
def test_cpu_matches_reference_and_torch(cell, steps):
    _check("cpu", cell, steps, 3)


@pytest.mark.parametrize("cell,steps", [("mamba", 1), ("mamba", 2), ("mamba", 5), ("rwkv6", 1), ("rwkv6", 5)])
def test_triton_matches_reference_and_torch(cell, steps, interpreter):
    """2 < mamba's 3 taps back; 5: checkpoint segments of 2, 2, 1."""
    _check("triton", cell, steps, 2)


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_gradcheck(cell):
    layer, _ = _pair(cell, "cpu", seed=1)
    x = torch.randn(4, 2, I, dtype=torch.float64, requires_grad=True)
    s0 = random_states(layer, 2)[0][0].detach().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, s, *ps):
        out, finals = layer.loop.run(x, [s], list(ps), layer.layer_sizes[0])
        return (out, *finals)

    assert torch.autograd.gradcheck(f, (x, s0, *params))


def _packed(layer, twin, lengths):
    seqs = [torch.randn(t, I, dtype=torch.float64, requires_grad=True) for t in lengths]
    results = []
    for m in (layer, twin):
        out, finals = m(pack_sequence(seqs, enforce_sorted=False))
        out = pad_packed_sequence(out)[0]
        results.append((out, finals, weighted_grads(out, finals, [*seqs, *m.parameters()])))
    (a, fa, ga), (b, fb, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for u, v in zip([*fa, *ga], [*fb, *gb], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    return seqs, a, fa


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_packed_bidirectional_two_layers(cell):
    """A packed batch (lengths 4, 1, 2: two shorter than mamba's 3 taps back), both directions, two
    layers: as backend="torch", and each sequence as it runs alone (prev() reaches neither another
    sequence nor the padding; the reverse direction shifts within each sequence too)."""
    layer, twin = _pair(cell, "cpu", num_layers=2, bidirectional=True)
    seqs, out, finals = _packed(layer, twin, (4, 1, 2))
    for n, s in enumerate(seqs):
        alone, alone_finals = layer(s[:, None])
        torch.testing.assert_close(out[: len(s), n], alone[:, 0], rtol=1e-10, atol=1e-10)
        assert out[len(s):, n].abs().sum() == 0
        for f, g in zip(finals, alone_finals, strict=True):
            torch.testing.assert_close(f[:, n], g[:, 0], rtol=1e-10, atol=1e-10)


def test_triton_packed_bidirectional(interpreter):
    """The same on the interpreter, kept small (one layer, mamba): the kernels read the hoisted values
    of each sequence's own rows, and the lengths."""
    layer, twin = _pair("mamba", "triton", bidirectional=True)
    _packed(layer, twin, (3, 1, 2))


def test_cpu_float32_and_no_grad():
    """float32 on the C loop, without autograd (no checkpoints), close to the float64 torch loop."""
    layer, twin = _pair("rwkv6", "cpu")
    x = torch.randn(6, 2, I, dtype=torch.float64)
    want, _ = twin(x)
    with torch.no_grad():
        out, _ = layer.float()(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


SHIFTED_MATRIX = """cell shifted_outer
input x
state S : (K, V) per head
output o
param W_k, W_q : (K, x) per head
param W_v : (V, x) per head
k = W_k @ x
v = W_v @ x
q = W_q @ x
S' = S + prev(k @ vᵀ)
o = qᵀ @ S'
"""


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_prev_of_a_matrix_per_step_is_refused_located(tmp_path, backend):
    """Still refused: prev() of a value that is a matrix per step (hoisted it would be T matrices);
    located at the prev(, naming backend='torch'; the torch backend and "auto" run it."""
    path = tmp_path / "shifted.cell"
    path.write_text(SHIFTED_MATRIX, encoding="utf-8")
    sizes = {"heads": 2, "K": 2, "V": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        with pytest.raises(CellError) as err:
            MatrixRecurrent(str(path), 3, sizes, backend=backend)
        text = str(err.value)
        assert text.startswith(f"{path}:10:10: error: "), text
        assert "prev() of a value that is, or reads, a matrix per step" in text and "backend='torch'" in text
        torch.manual_seed(0)
        auto = MatrixRecurrent(str(path), 3, sizes, dtype=torch.float64)
        ref = MatrixRecurrent(str(path), 3, sizes, dtype=torch.float64, backend="torch")
        ref.load_state_dict(auto.state_dict())
        x = torch.randn(4, 2, 3, dtype=torch.float64)
        torch.testing.assert_close(auto(x)[0], ref(x)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels' numbers")
@pytest.mark.parametrize("cell", CELLS)
def test_triton_gpu_matches_torch(cell, monkeypatch):
    """On a lent GPU (compiled kernels, not the interpreter): float64 against the torch loop, forward,
    final states and gradients, packed, with a checkpoint interval that does not divide T."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer, twin = _pair(cell, "triton")
    layer.loop.checkpoint = 4
    layer, twin = layer.cuda(), twin.cuda()
    seqs = [torch.randn(t, I, dtype=torch.float64, device="cuda", requires_grad=True) for t in (9, 2, 5)]
    results = []
    for m in (layer, twin):
        out, finals = m(pack_sequence(seqs, enforce_sorted=False))
        out = pad_packed_sequence(out)[0]
        grads = weighted_grads(out.cpu(), [f.cpu() for f in finals], [*seqs, *m.parameters()])
        results.append((out, finals, grads))
    (a, fa, ga), (b, fb, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for u, v in zip([*fa, *ga], [*fb, *gb], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
