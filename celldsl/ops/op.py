"""The time loop as torch.library custom ops, so autograd, torch.compile and opcheck see one op.

One generic pair for every cell (not one op per cell): the cell is a string argument, its cache key,
so a compiled graph names the cell it runs and no op is registered at run time.

    celldsl::cell_sequence(key, backend, x, states, params, batch_sizes)
        -> [out, *final_states, *saved]
    celldsl::cell_sequence_backward(key, backend, x, states, params, batch_sizes, out, saved,
                                    grad_out, grad_finals, needs_dx) -> [dx, *d_states, *d_params]
        (dx empty, shape [0], when needs_dx is False: a first layer's input needs none)

x [T, N, I] with batch_sizes None (out [T, N, H]), or packed x [rows, I] with batch_sizes [T]
(int64, CPU; out [rows, H]). states [N, H] each; params as in function.split_params. `saved` are
the loop's intermediates for the backward (TorchLoop.saved_shapes); users never see them. An empty
batch (N = 0) or zero-width states (H = 0, as torch's cells allow) run nothing: empty results, zero
gradients.

Autograd: ops/autograd.py (first order fused, higher orders through the generated torch code);
vmap: ops/batching.py. The layers call `run`, which goes through autograd.CellSequence so that
torch.func transforms work too.

`infer` runs the loop without keeping the backward's intermediates where no gradient can follow.

`call` runs an op's implementation without the dispatcher when nothing but autograd could see the
op (`plain_eager`): the dispatcher's path to a Python custom op costs ~0.05-0.1 ms a call, most of
a step's arithmetic at batch 1 (a decoder stepping token by token pays it every token).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .function import loop_for, split_params, unaliased


def plain_eager(tensors) -> bool:
    """Whether an op called on `tensors` here would go straight to its CPU or CUDA implementation:
    no torch.compile or jit tracing, no torch.func transform, no dispatch or function mode (fake
    tensors, tools built on TorchDispatchMode), no autocast, no profiler, and plain tensors
    (torch.Tensor or nn.Parameter: no subclass, no meta tensor). Only then may `call` skip it."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if forward_ad._current_level >= 0:  # a dual level is open: the op's own path refuses tangents
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled() or torch._C._is_any_autocast_enabled() or \
            torch.autograd.profiler._is_profiler_enabled:
        return False
    return all(t is None or (type(t) is Tensor or type(t) is torch.nn.Parameter) and t.device.type != "meta"
               for t in tensors)


def refuse_tangents(tensors, what: str) -> None:
    """torch's error for an op without a forward-mode AD rule, where an input carries a tangent
    (torch.autograd.forward_ad): a custom op called without autograd drops it without a word, and
    the result would have none where torch.nn's has one."""
    if forward_ad._current_level < 0:
        return
    if any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{what} has no forward-mode AD rule (torch.autograd.forward_ad): "
                                  "differentiate in reverse mode (torch.autograd.grad, torch.func.vjp, "
                                  "jacrev)")


def call(op, *args):
    """op(*args): its implementation directly where `plain_eager` (the tensor arguments and lists of
    tensors are checked), else through the dispatcher. Autograd needs no dispatcher here: the ops
    are called inside autograd.CellSequence, or with nothing to differentiate."""
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a])
               if t is None or isinstance(t, Tensor)]
    return IMPLEMENTATIONS[op](*args) if plain_eager(tensors) else op(*args)


def infer(key, backend, x, states, params, batch_sizes) -> list[Tensor]:
    """[out, *final states] of cell_sequence, for a call no gradient can follow (ops.run: grad mode
    off, or nothing requires grad). Where `plain_eager`, the loop's `infer` runs: the same numbers
    without the intermediates only the backward reads. Elsewhere (compile, tracing, vmap, fake
    tensors) the op runs as ever. The loop's class is asked for `infer`, not the loop: a wrapper
    that hands its other attributes on (targets/triton) would skip its own forward."""
    if plain_eager([x, *states, *params, batch_sizes]) and states and states[0].numel():
        loop = loop_for(key, backend)
        if getattr(type(loop), "infer", None) is not None:
            out, finals = loop.infer(x, list(states), *split_params(loop, params), batch_sizes)
            return unaliased([out, *finals], [x, *states, *params])
    return call(cell_sequence, key, backend, x, list(states), list(params), batch_sizes)[: 1 + len(states)]


def _cell_sequence(key, backend, x, states, params, batch_sizes) -> list[Tensor]:
    loop = loop_for(key, backend)
    if states[0].numel() == 0:  # an empty batch (N = 0) or zero-width states (H = 0): nothing to run
        return _outputs(loop, x, states, params, batch_sizes, x.new_zeros)
    out, finals, saved = loop.forward(x, states, *split_params(loop, params), batch_sizes)
    return unaliased([out, *finals, *saved], [x, *states, *params])


@torch.library.custom_op("celldsl::cell_sequence", mutates_args=())
def cell_sequence(
    key: str, backend: str, x: Tensor, states: list[Tensor], params: list[Tensor], batch_sizes: Tensor | None
) -> list[Tensor]:
    return _cell_sequence(key, backend, x, states, params, batch_sizes)


def _outputs(loop, x, states, params, batch_sizes, new):
    """Tensors shaped like the op's results, made by `new(*shape)`."""
    hoisted_w, step_w, vectors, _scalars = split_params(loop, params)
    sizes = loop.sizes(states, vectors, hoisted_w, step_w)
    width = loop.output_width(sizes)
    if batch_sizes is None:
        rows, out = x.shape[0] * x.shape[1], new(x.shape[0], x.shape[1], width)
    else:
        rows, out = x.shape[0], new(x.shape[0], width)
    finals = [new(*s.shape) for s in states]
    saved = [new(*shape) for shape in loop.saved_shapes(rows, sizes, hoisted_w, step_w)]
    return [out, *finals, *saved]


@cell_sequence.register_fake
def _cell_sequence_fake(key, backend, x, states, params, batch_sizes):
    return _outputs(loop_for(key, backend), x, states, params, batch_sizes, x.new_empty)


def _cell_sequence_backward(key, backend, x, states, params, batch_sizes, out, saved, grad_out, grad_finals,
                            needs_dx=True) -> list[Tensor]:
    if states[0].numel() == 0:  # an empty batch or zero-width states: every gradient is zero
        dx = torch.zeros_like(x) if needs_dx else None  # x is not empty when only the states are
        return [_dx(x, dx, needs_dx), *(torch.zeros_like(t) for t in (*states, *params))]
    loop = loop_for(key, backend)
    dx, dstates, *dparams = loop.backward(
        x, states, *split_params(loop, params), out, saved, grad_out, list(grad_finals), batch_sizes,
        needs_dx=needs_dx,
    )
    dx = _dx(x, dx, needs_dx)
    flat = [dx, *dstates, *(d for group in dparams for d in group)]
    inputs = [x, *states, *params, out, *saved, grad_out, *grad_finals]
    return unaliased(flat, inputs)


@torch.library.custom_op("celldsl::cell_sequence_backward", mutates_args=())
def cell_sequence_backward(
    key: str,
    backend: str,
    x: Tensor,
    states: list[Tensor],
    params: list[Tensor],
    batch_sizes: Tensor | None,
    out: Tensor,
    saved: list[Tensor],
    grad_out: Tensor | None,
    grad_finals: list[Tensor | None],
    needs_dx: bool = True,
) -> list[Tensor]:
    return _cell_sequence_backward(key, backend, x, states, params, batch_sizes, out, saved, grad_out,
                                   grad_finals, needs_dx)


IMPLEMENTATIONS = {cell_sequence: _cell_sequence, cell_sequence_backward: _cell_sequence_backward}


def _dx(x: Tensor, dx: Tensor | None, needs_dx: bool) -> Tensor:
    """The op's dx: an empty tensor when none was asked for (what the loop computed is not it)."""
    return dx if needs_dx else x.new_empty(0)


@cell_sequence_backward.register_fake
def _cell_sequence_backward_fake(key, backend, x, states, params, batch_sizes, out, saved, grad_out,
                                 grad_finals, needs_dx=True):
    return [_dx(x, torch.empty_like(x), needs_dx), *(torch.empty_like(t) for t in (*states, *params))]
