"""The registered ops (celldsl/ops/op.py) under torch.library.opcheck, torch.compile and DDP.

- opcheck: schema, autograd registration, fake (meta) kernels and AOT dispatch with dynamic shapes,
  for padded and packed input and for cells whose output is a state or an intermediate.
- torch.compile(layer) (fullgraph: the op is one node) equals eager, forward and backward. Dynamo
  refuses every nn.RNN/GRU/LSTM module unless torch._dynamo.config.allow_rnn is set, celldsl.LSTM
  (a torch.nn.LSTM) included, as torch.nn.LSTM itself; Recurrent compiles without the flag.
- DistributedDataParallel, two CPU processes with gloo: after backward each rank holds the mean of the
  two ranks' single-process gradients.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils.rnn import pack_padded_sequence

import celldsl
from celldsl.ops import op as ops
from celldsl.ops.function import register

T, N, H = 4, 3, 5


def op_args(stem, packed, requires_grad=True):
    cell = celldsl.compile_cell(stem)
    register(cell)
    i_size = H if cell.ir.needs_hidden_size else 3
    layer = celldsl.Recurrent(cell, i_size, H, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    params = [p.detach().clone().requires_grad_(requires_grad) for p in layer._weights(0, 0)]
    states = [(torch.randn(N, H, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(requires_grad)
              for _ in cell.states]
    if packed:
        batch_sizes = torch.tensor([3, 2, 2, 1])
        x = torch.randn(int(batch_sizes.sum()), i_size, generator=gen, dtype=torch.float64)
    else:
        batch_sizes, x = None, torch.randn(T, N, i_size, generator=gen, dtype=torch.float64)
    return cell.key, "torch", x.requires_grad_(requires_grad), states, params, batch_sizes


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("stem", ["lstm", "sru", "mut3"])  # output a state / an intermediate; stage operands
def test_opcheck_forward_op(stem, packed):
    torch.library.opcheck(ops.cell_sequence, op_args(stem, packed))


@pytest.mark.parametrize("needs_dx", [True, False], ids=["dx", "no_dx"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck_backward_op(packed, needs_dx):
    key, backend, x, states, params, batch_sizes = op_args("slstm", packed, requires_grad=False)
    result = ops.cell_sequence(key, backend, x, states, params, batch_sizes)
    out, saved = result[0], result[1 + len(states) :]
    grad_out = torch.randn_like(out)
    grad_finals = [torch.randn_like(states[0]), None, torch.randn_like(states[0]), None]
    args = (key, backend, x, states, params, batch_sizes, out, saved, grad_out, grad_finals, needs_dx)
    torch.library.opcheck(ops.cell_sequence_backward, args)
    grads = ops.cell_sequence_backward(*args)
    full = ops.cell_sequence_backward(*args[:-1], True)
    # without dx: an empty one (no pass over [T, N, I] to zero it), the other gradients the same
    assert grads[0].shape == ((0,) if not needs_dx else x.shape)
    assert all(torch.equal(a, b) for a, b in zip(grads[1:], full[1:], strict=True))


def compare_compiled(layer, shape, backend):
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    results = []
    for module in (layer, compiled):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out, (h, c) = module(x)
        out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h.square().sum() + c.sum()
        grads = torch.autograd.grad(loss, [x, *layer.parameters()])
        results.append((out, h, c, grads))
    for a, b in zip(results[0][:3], results[1][:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(results[0][3], results[1][3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_torch_compile_aot_eager_matches_eager():
    """aot_eager traces the fake kernels and the registered autograd: the parts torch.compile needs."""
    torch.manual_seed(0)
    layer = celldsl.LSTM(3, H, num_layers=2, bidirectional=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        compare_compiled(layer, (T, N, 3), "aot_eager")


def test_torch_compile_recurrent_needs_no_flag():
    torch.manual_seed(0)
    layer = celldsl.Recurrent("lstm", 3, H, num_layers=2, bidirectional=True)
    compare_compiled(layer, (T, N, 3), "aot_eager")


@pytest.mark.parametrize("cls", [torch.nn.LSTM, celldsl.LSTM])
def test_dynamo_refuses_lstm_modules_without_allow_rnn(cls):
    """The cost of celldsl.LSTM being a torch.nn.LSTM: Dynamo's RNN rule applies to it as to torch's."""
    torch._dynamo.reset()
    compiled = torch.compile(cls(3, H), backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Attempted to wrap RNN, GRU, or LSTM"):
        compiled(torch.randn(T, N, 3))


def test_torch_compile_packed_input_matches_eager():
    """A PackedSequence's batch sizes are data: the graph breaks there (as for torch.nn.GRU), and the
    compiled layer still equals eager, for several lengths."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = celldsl.GRU(3, H, bidirectional=True)
    compiled = torch.compile(layer, backend="aot_eager")  # without allow_rnn: eager behind a graph break
    for t in (4, 6):
        x = torch.randn(t, N, 3)
        packed = pack_padded_sequence(x, torch.tensor([2, t, 3]), enforce_sorted=False)
        (out, h), (out_c, h_c) = layer(packed), compiled(packed)
        torch.testing.assert_close(out_c.data, out.data, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(h_c, h, atol=1e-6, rtol=1e-6)


def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    layer = celldsl.LSTM(3, H, batch_first=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        compare_compiled(layer, (N, T, 3), "inductor")


# --- DistributedDataParallel --------------------------------------------------------------------

WORLD = 2


def ddp_batch(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(T, N, 3, generator=gen), torch.randn(T, N, H, generator=gen)


def ddp_model():
    torch.manual_seed(0)
    return celldsl.Recurrent("mut3", 3, H, num_layers=2, bidirectional=True, dropout=0.0)


def ddp_loss(model, rank):
    x, target = ddp_batch(rank)
    out, _ = model(x)
    return (out[..., :H] - target).square().mean()


def ddp_worker(rank, init_file, result_dir):
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(ddp_model())
        ddp_loss(model, rank).backward()
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save(grads, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_averages_gradients_over_two_cpu_processes(tmp_path):
    init_file = str(tmp_path / "rendezvous")  # gloo's FileStore creates it
    ctx = mp.start_processes(ddp_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the DDP workers did not finish within 120 s")
    expected = {}
    for rank in range(WORLD):  # each rank's gradient, computed alone in this process
        model = ddp_model()
        ddp_loss(model, rank).backward()
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad / WORLD
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert sorted(got) == sorted(expected)
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5, msg=f"rank {rank}: {n}")
