"""The Triton schedules on a CUDA GPU: every schedule of every zoo cell against the torch backend
(cuBLAS GEMMs and torch pointwise code) in float32, bfloat16 and float16, packed sequences, the
persistent kernel at FlashRNN's size, graph replay, and repeatability (a moving result is a race).

These are the checks the interpreter cannot make (tests/test_triton_schedules.py says which): the
grid barrier's memory ordering, co-resident programs under a cooperative launch, the weights on chip.
Every test runs under a watchdog (HANG_SECONDS): a kernel that spins forever kills the process with a
traceback instead of blocking the run. Skipped, with the reason, without CUDA. A schedule becomes the
CUDA default only after these pass on hardware, with the log committed under docs/results/gpu/.
"""

import faulthandler

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from zoo import ELEMENTWISE, LAYER_ARGS

import celldsl
from celldsl.compiler import compile_cell
from celldsl.targets.triton.applies import SCHEDULES, declines

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)"),
]

HANG_SECONDS = 600  # compiling a cell's kernels takes seconds; a step of these sizes microseconds
ZOO_CELLS = ELEMENTWISE  # the matrix cells' Triton schedule: tests/test_triton_matrix.py
PAIRS = [(c, s) for c in ZOO_CELLS for s in SCHEDULES
         if s != "graphed" and declines(compile_cell(c).plan)[s] is None]
IDS = [f"{c}-{s}" for c, s in PAIRS]


@pytest.fixture(autouse=True)
def compiled_mode_and_watchdog(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the reference's fp32 GEMMs
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _layers(cell, schedule, dtype, H=48, I=40):
    I = H if compile_cell(cell).ir.needs_hidden_size else I
    torch.manual_seed(0)
    args = LAYER_ARGS.get(cell, {})
    ref = celldsl.Recurrent(cell, I, H, backend="torch", device="cuda", dtype=dtype, **args)
    tri = celldsl.Recurrent(cell, I, H, backend="triton", schedule=schedule, device="cuda", dtype=dtype,
                            **args)
    tri.load_state_dict(ref.state_dict())
    return ref, tri, I


def _run(module, x, states, lengths=None):
    x = x.detach().clone().requires_grad_()
    states = tuple(s.detach().clone().requires_grad_() for s in states)
    inp = pack_padded_sequence(x, lengths) if lengths is not None else x
    out, final = module(inp, states if len(states) > 1 else states[0])
    out = out.data if lengths is not None else out
    final = final if isinstance(final, tuple) else (final,)
    g = torch.Generator(device="cuda").manual_seed(1)
    loss = (out.float() * torch.randn(out.shape, generator=g, device="cuda")).sum()
    for f in final:
        loss = loss + (f.float() * torch.randn(f.shape, generator=g, device="cuda")).sum()
    grads = torch.autograd.grad(loss, [x, *states, *module.parameters()], allow_unused=True)
    torch.cuda.synchronize()
    return [out, *final, *grads]


def _inputs(module, I, dtype, T=6, N=5):
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(T, N, I, generator=g, device="cuda").to(dtype)
    states = tuple((0.5 * torch.randn(1, N, module.hidden_size, generator=g, device="cuda")).to(dtype)
                   for _ in module.compiled.states)
    return x, states


@pytest.mark.parametrize(("cell", "schedule"), PAIRS, ids=IDS)
def test_schedule_float32_matches_torch_backend(cell, schedule):
    """Outputs, final states and every gradient within 2e-4 (absolute and relative); H = 48 is three
    slices of 16; padded, then packed (lengths 6, 4, 4, 2, 1)."""
    ref, tri, I = _layers(cell, schedule, torch.float32)
    x, states = _inputs(ref, I, torch.float32)
    for lengths in (None, torch.tensor([6, 4, 4, 2, 1])):
        pairs = zip(_run(tri, x, states, lengths), _run(ref, x, states, lengths), strict=True)
        for i, (a, b) in enumerate(pairs):
            assert (a is None) == (b is None), f"result {i}: one is None"
            if a is not None:
                assert torch.isfinite(a).all(), f"result {i} has NaN/inf"
                torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, i=i: f"result {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(("cell", "schedule"), PAIRS, ids=IDS)
def test_schedule_half_no_worse_than_torch_backend(cell, schedule, dtype):
    """Each result's error against a float32 run (same rounded weights and inputs) at most twice the
    torch backend's own plus one rounding of the result's scale: fp32 accumulation and pointwise math
    (and the fp32 cell state of the dense kernels) should make it smaller, never much larger."""
    ref, tri, I = _layers(cell, schedule, dtype)
    exact = celldsl.Recurrent(cell, I, ref.hidden_size, backend="torch", device="cuda",
                              **LAYER_ARGS.get(cell, {}))
    exact.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x, states = _inputs(ref, I, dtype)
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
            f"result {i}: {schedule} error {err_tri:.3g} vs torch backend {err_torch:.3g} (scale {scale:.3g})"
        )


@pytest.mark.parametrize(("cell", "schedule"), [("lstm", "persistent"), ("gru_cho", "persistent"),
                                                ("mingru", "scan"), ("sru", "time_loop")])
def test_repeated_runs_agree_bitwise(cell, schedule):
    """The same inputs twice give the same bits: a missing barrier or a read of memory nothing wrote
    shows as results that move between runs."""
    _, tri, I = _layers(cell, schedule, torch.bfloat16, H=160)
    x, states = _inputs(tri, I, torch.bfloat16, T=32, N=16)
    first, second = _run(tri, x, states), _run(tri, x, states)
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a is not None:
            assert torch.equal(a, b), f"result {i} differs between two runs of the same inputs"


def test_persistent_lstm_at_flashrnn_size():
    """N=16, H=768, bf16: the compiler picks persistent (48 programs, 128 KiB of weights each), the
    cooperative launch fits, and the result matches the graphed path's."""
    from celldsl.ops.function import loop_for
    from celldsl.targets.triton.schedules import DenseLoop

    torch.manual_seed(0)
    auto = celldsl.LSTM(768, 768, backend="triton", schedule="auto", device="cuda", dtype=torch.bfloat16)
    graphed = celldsl.LSTM(768, 768, backend="triton", device="cuda", dtype=torch.bfloat16)
    graphed.load_state_dict(auto.state_dict())
    x = torch.randn(64, 16, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out_a, (h_a, c_a) = auto(x)
        out_g, (h_g, c_g) = graphed(x)
    pick = loop_for(auto.compiled.key, "triton:auto").pick(x, [h_a[0]])
    assert pick == "persistent" and isinstance(loop_for(auto.compiled.key, "triton:persistent"), DenseLoop)
    torch.testing.assert_close(out_a.float(), out_g.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(c_a.float(), c_g.float(), atol=6e-2, rtol=0)


def test_persistent_that_cannot_be_resident_says_so():
    """N=256, H=1024: 8 batch tiles x 64 slices = 512 programs cannot all be resident; forcing
    persistent raises ValueError before any launch (the auto choice takes fused_step there)."""
    layer = celldsl.LSTM(64, 1024, backend="triton", schedule="persistent", device="cuda",
                         dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fused_step"):
        layer(torch.randn(2, 256, 64, device="cuda", dtype=torch.bfloat16))


def test_fused_step_graph_replay_equals_eager(monkeypatch):
    """fused_step replays its per-step launches from a CUDA graph; the replay equals the eager loop,
    and fresh inputs give fresh results."""
    ref, tri, I = _layers("gru_cho", "fused_step", torch.float32)
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(6, 5, I, generator=g, device="cuda")
        states = (torch.randn(1, 5, 48, generator=g, device="cuda"),)
        graphed = _run(tri, x, states)
        monkeypatch.setenv("CELLDSL_CUDA_GRAPHS", "0")
        eager = _run(tri, x, states)
        monkeypatch.delenv("CELLDSL_CUDA_GRAPHS")
        for a, b in zip(graphed, eager, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
