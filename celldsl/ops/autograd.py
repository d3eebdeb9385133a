"""The gradients of the time-loop op, first order and higher.

First order runs celldsl::cell_sequence_backward: the SymPy-derived backward, fused. When autograd
records the backward itself (`create_graph=True`, torch.func.grad, gradgradcheck), the same derived
backward runs as the generated torch code instead, after the forward is recomputed the same way
(also under torch's older vmap, which batches `is_grads_batched` and gradcheck's batched checks):
every operation is then an ordinary differentiable torch op, so autograd differentiates it again,
to any order. The fused loops' saved tensors are not functions autograd can see, hence the recompute.

`CellSequence` is the autograd.Function the layers call. Custom ops' own autograd registration
does not support torch.func transforms (torch 2.13 asks for a `setup_context`-style Function), so
the Function wraps the op; vmap reaches the op's batching rules (ops/batching.py) through
`generate_vmap_rule`.
"""

from __future__ import annotations

import torch

from .function import loop_for, split_params
from .op import call, cell_sequence, cell_sequence_backward


def gradients(key, backend, x, states, params, batch_sizes, out, saved, grad_out, grad_finals, needs_dx):
    """(dx, [d states], [d params]) of one op call; dx is None when not needed."""
    grad_finals = list(grad_finals)
    recorded = torch.is_grad_enabled() and _records(x, *states, *params, grad_out, *grad_finals)
    if recorded or _legacy_batched(grad_out, *grad_finals):
        dx, dstates, dparams = differentiable_gradients(key, x, states, params, batch_sizes, grad_out,
                                                        grad_finals)
    else:
        flat = call(cell_sequence_backward, key, backend, x, list(states), list(params), batch_sizes, out,
                    list(saved), grad_out, grad_finals, needs_dx)
        n = len(states)
        dx, dstates, dparams = flat[0], flat[1 : 1 + n], flat[1 + n :]
    return (dx if needs_dx else None), list(dstates), list(dparams)


def differentiable_gradients(key, x, states, params, batch_sizes, grad_out, grad_finals):
    """The derived backward as differentiable torch code: the generated torch loop's forward
    recomputed under autograd, then its backward on the recomputed intermediates."""
    if states[0].numel() == 0:  # an empty batch or zero-width states: every gradient is zero
        zeros = [torch.zeros_like(t) for t in (x, *states, *params)]
        return zeros[0], zeros[1 : 1 + len(states)], zeros[1 + len(states) :]
    loop = loop_for(key, "torch")
    split = split_params(loop, params)
    out, _finals, saved = loop.forward(x, list(states), *split, batch_sizes)
    dx, dstates, *dparams = loop.backward(x, list(states), *split, out, saved, grad_out, list(grad_finals),
                                          batch_sizes)
    return dx, list(dstates), [d for group in dparams for d in group]


def _records(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _legacy_batched(*tensors) -> bool:
    """Gradients batched by torch's older vmap (`is_grads_batched`, gradcheck's check_batched_grad):
    it has no per-op batching rules for ops taking tensor lists, so the plain torch code runs."""
    if torch.compiler.is_compiling():  # traced graphs never see the older vmap's tensors
        return False
    return any(t is not None and torch._C._functorch.is_legacy_batchedtensor(t) for t in tensors)


class CellSequence(torch.autograd.Function):
    """apply(key, backend, n_states, batch_sizes, x, *states, *params) -> (out, *finals, *saved,
    history): celldsl::cell_sequence with its tensor lists flattened (autograd.Function tracks tensors
    only when they are direct arguments). `history` is a copy of out that the backward reads (out is
    the output state's history), so the caller may write in place into out, as into torch.nn's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(key, backend, n_states, batch_sizes, x, *states_and_params):
        states, params = states_and_params[:n_states], states_and_params[n_states:]
        result = call(cell_sequence, key, backend, x, list(states), list(params), batch_sizes)
        return (*result, result[0].clone())

    @staticmethod
    def setup_context(ctx, inputs, output):
        key, backend, n_states, batch_sizes, x, *states_and_params = inputs
        ctx.key, ctx.backend, ctx.n_states = key, backend, n_states
        ctx.n_params = len(states_and_params) - n_states
        ctx.has_batch_sizes = batch_sizes is not None
        *saved, history = output[1 + n_states :]
        ctx.mark_non_differentiable(*saved, history)
        ctx.set_materialize_grads(False)
        extra = [batch_sizes] if batch_sizes is not None else []
        ctx.save_for_backward(x, *states_and_params, history, *saved, *extra)

    @staticmethod
    def backward(ctx, grad_out, *grads):  # grads: the finals', then None for saved and history
        n_states, n_params = ctx.n_states, ctx.n_params
        grad_finals = list(grads[:n_states])
        nothing = (None,) * (5 + n_states + n_params)
        if grad_out is None and all(g is None for g in grad_finals):
            return nothing
        tensors = list(ctx.saved_tensors)
        batch_sizes = tensors.pop() if ctx.has_batch_sizes else None
        x, states = tensors[0], tensors[1 : 1 + n_states]
        params = tensors[1 + n_states : 1 + n_states + n_params]
        out, saved = tensors[1 + n_states + n_params], tensors[2 + n_states + n_params :]
        dx, dstates, dparams = gradients(ctx.key, ctx.backend, x, states, params, batch_sizes, out, saved,
                                         grad_out, grad_finals, needs_dx=ctx.needs_input_grad[4])
        return (None, None, None, None, dx, *dstates, *dparams)


# ---- the op's own autograd formula (first order; the layers go through CellSequence) ----------


def _setup_context(ctx, inputs, output):
    key, backend, x, states, params, batch_sizes = inputs
    n_finals = len(states)
    ctx.key, ctx.backend, ctx.counts = key, backend, (len(states), len(params))
    ctx.has_batch_sizes = batch_sizes is not None
    ctx.mark_non_differentiable(*output[1 + n_finals :])
    ctx.set_materialize_grads(False)
    extra = [batch_sizes] if batch_sizes is not None else []
    history = output[0].clone()  # the backward's own copy of out: the caller may write into out
    ctx.save_for_backward(x, *states, *params, history, *output[1 + n_finals :], *extra)


def _backward(ctx, grads):
    n_states, n_params = ctx.counts
    tensors = list(ctx.saved_tensors)
    batch_sizes = tensors.pop() if ctx.has_batch_sizes else None
    x, tensors = tensors[0], tensors[1:]
    states, tensors = tensors[:n_states], tensors[n_states:]
    params, tensors = tensors[:n_params], tensors[n_params:]
    out, saved = tensors[0], tensors[1:]
    grad_out, grad_finals = grads[0], list(grads[1 : 1 + n_states])
    if grad_out is None and all(g is None for g in grad_finals):
        return None, None, None, [None] * n_states, [None] * n_params, None
    needs_dx = ctx.needs_input_grad[2]  # a first layer's input usually needs no gradient
    dx, dstates, dparams = gradients(ctx.key, ctx.backend, x, states, params, batch_sizes, out, saved,
                                     grad_out, grad_finals, needs_dx)
    return None, None, dx, dstates, dparams, None


torch.library.register_autograd("celldsl::cell_sequence", _backward, setup_context=_setup_context)
