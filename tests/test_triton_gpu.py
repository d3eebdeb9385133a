"""The compiled Triton kernels on a CUDA GPU: every zoo cell in float32, bfloat16 and float16 against
the torch backend (cuBLAS GEMMs + torch pointwise code) on the same device and dtype.

Both backends run the same GEMMs and differ only in the pointwise code: float32 results agree within
2e-4; in bf16/fp16 the kernels compute in fp32 while torch's ops round after each op, so there the
test bounds each backend's error against a float32 run. Skipped, with the reason, without CUDA.
"""

import pytest
import torch
from zoo import ELEMENTWISE, LAYER_ARGS

import celldsl
from celldsl.compiler import compile_cell

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)"),
]

ZOO_CELLS = ELEMENTWISE  # the matrix cells' Triton schedule: tests/test_triton_matrix.py


@pytest.fixture(autouse=True)
def compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _run(module, x, states):
    x = x.detach().clone().requires_grad_()
    states = tuple(s.detach().clone().requires_grad_() for s in states)
    out, final = module(x, states if len(states) > 1 else states[0])
    final = final if isinstance(final, tuple) else (final,)
    g = torch.Generator(device=x.device).manual_seed(1)
    loss = (out.float() * torch.randn(out.shape, generator=g, device=x.device)).sum()
    for f in final:
        loss = loss + (f.float() * torch.randn(f.shape, generator=g, device=x.device)).sum()
    grads = torch.autograd.grad(loss, [x, *states, *module.parameters()], allow_unused=True)
    return [out, *final, *grads]


def _pair(cell, dtype):
    H = 48
    I = H if compile_cell(cell).ir.needs_hidden_size else 40
    torch.manual_seed(0)
    args = LAYER_ARGS.get(cell, {})
    ref = celldsl.Recurrent(cell, I, H, backend="torch", device="cuda", dtype=dtype, **args)
    tri = celldsl.Recurrent(cell, I, H, backend="triton", device="cuda", dtype=dtype, **args)
    tri.load_state_dict(ref.state_dict())
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(6, 5, I, generator=g, device="cuda").to(dtype)
    states = tuple(
        (0.5 * torch.randn(1, 5, H, generator=g, device="cuda")).to(dtype) for _ in tri.compiled.states
    )
    return ref, tri, x, states


@pytest.mark.parametrize("cell", ZOO_CELLS)
def test_zoo_cell_gpu_float32_matches_torch_backend(cell):
    """Outputs, final states and every gradient within 2e-4 (absolute and relative)."""
    ref, tri, x, states = _pair(cell, torch.float32)
    for i, (a, b) in enumerate(zip(_run(tri, x, states), _run(ref, x, states), strict=True)):
        assert (a is None) == (b is None), f"result {i}: one is None"
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, i=i: f"result {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cell", ZOO_CELLS)
def test_zoo_cell_gpu_half_no_worse_than_torch_backend(cell, dtype):
    """In bf16/fp16 both backends round; each result's error against the float32 run (same rounded
    weights and inputs) must be at most twice the torch backend's own error plus one rounding of
    the result's scale: fp32 math inside the kernels should make it smaller, never much larger."""
    ref, tri, x, states = _pair(cell, dtype)
    exact = _pair(cell, torch.float32)[0]
    exact.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    want = _run(exact, x.float(), tuple(s.float() for s in states))
    eps = torch.finfo(dtype).eps
    for i, (a, b, w) in enumerate(zip(_run(tri, x, states), _run(ref, x, states), want, strict=True)):
        assert (a is None) == (b is None) == (w is None), f"result {i}: None mismatch"
        if a is None:
            continue
        assert a.dtype == dtype
        scale = w.abs().max().item() + 1e-3
        err_tri = (a.float() - w).abs().max().item()
        err_torch = (b.float() - w).abs().max().item()
        assert err_tri <= 2 * err_torch + 2 * eps * scale, (
            f"result {i}: triton error {err_tri:.3g} vs torch backend {err_torch:.3g} (scale {scale:.3g})"
        )


def test_gpu_lstm_matches_cudnn(monkeypatch):
    """celldsl.LSTM on the Triton backend against torch.nn.LSTM (cuDNN), float32 without TF32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(24, 32, num_layers=2, device="cuda")
    ours = celldsl.LSTM(24, 32, num_layers=2, device="cuda", backend="triton")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 4, 24, device="cuda")
    with torch.no_grad():
        out_r, (h_r, c_r) = ref(x)
        out_t, (h_t, c_t) = ours(x)
    torch.testing.assert_close(out_t, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_t, c_r, atol=1e-5, rtol=1e-5)


def test_compiled_kernels_not_interpreted():
    """With TRITON_INTERPRET unset the loop runs JIT-compiled kernels."""
    from triton.runtime.jit import JITFunction

    from celldsl.targets.triton.module import load_triton_module

    layer = celldsl.Recurrent("gru", 8, 8, device="cuda", backend="triton")
    layer(torch.randn(2, 2, 8, device="cuda"))
    assert isinstance(load_triton_module(layer.compiled).module().stage1_forward_kernel, JITFunction)


# ---- CUDA graphs (targets/triton/cuda_graph.py) ------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cuda_graph_replay_equals_the_eager_loop(monkeypatch, packed):
    """Graph replays give the eager loop's outputs and gradients, and fresh data gives fresh results
    (the arguments are copied into the graph, not baked in)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    def results(layer, x):
        inp = pack_padded_sequence(x, torch.tensor([4, 6, 1]), enforce_sorted=False) if packed else x
        out, (h, c) = layer(inp)
        out = out.data if packed else out
        loss = (out * torch.linspace(-1, 1, out.numel(), device="cuda").view(out.shape)).sum() + h.sum()
        return [out, h, c, *torch.autograd.grad(loss, [x, *layer.parameters()])]

    torch.manual_seed(0)
    from celldsl.ops.function import cell_for

    layer = celldsl.LSTM(8, 24, num_layers=2, backend="triton", device="cuda")
    loop = cell_for(layer.compiled.key).triton_loop  # the cell object the registered ops run
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(6, 3, 8, generator=g, device="cuda", requires_grad=True)
        graphed = results(layer, x)
        monkeypatch.setenv("CELLDSL_CUDA_GRAPHS", "0")
        eager = results(layer, x)
        monkeypatch.delenv("CELLDSL_CUDA_GRAPHS")
        for a, b in zip(graphed, eager, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(loop._graphs) >= 2 and not loop._eager  # a forward and a backward graph at least
