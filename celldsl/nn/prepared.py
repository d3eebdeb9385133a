"""Prepared calls under autograd: a prepared step or sequence (targets/c/fused.PreparedTrainStep,
PreparedTrainSequence) as an autograd.Function, so a decoder or a step-by-step training loop that
calls a Cell once per token, or a small layer's training call, pays one native call forward and one
backward instead of the op's full path (its checks, the parameter list, packing the weights, binding
every kernel argument, at every call).

The Function takes the module's own parameters (weight_ih, ...), not the op's views of them, so
autograd records one node per call; `Layout` makes each parameter's gradient from the op's
gradients. A backward that autograd records (create_graph=True) or whose gradients a vmap batches
(torch's older one, torch.func's) runs the module's full path again and differentiates it, so higher
orders are those of the full path.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor


class Layout:
    """Where each module parameter's gradient comes from: the op's parameters (op_params) are the
    parameters themselves or views of them (row blocks, vectors), each with its gradient: a hoisted
    or step weight's, or a run of a vector source's values (PreparedTrainStep.vector_sources).
    Adjacent runs of one source merge, so a bias whose vectors are one GEMM's blocks in order takes
    one slice of that GEMM gradient's column sums.

    `plan` says, per parameter, how a backward makes its gradient from the step's buffers, bound
    once (PreparedTrainStep.gemm_grad): a whole GEMM weight is one GEMM, d.T @ operand; a vector
    whose runs are GEMM columns is the column sums of those columns (one cat first if several);
    anything else (a weight in row blocks, a kernel's accumulator) goes the general way (`_general`)."""

    def __init__(self, stored: list[Tensor], runs: list[list[tuple]], plan: list[tuple | None]):
        self.stored, self.runs, self.plan = stored, runs, plan
        # what PreparedCall saves: the weights, as torch.nn's cells, and the vectors the backward's
        # kernels read (their gradient is a kernel's accumulator: indrnn's u, a peephole), as the full
        # path saves them; a bias folded into a GEMM is not read by the backward
        self.weights = [p for p, rs in zip(stored, runs, strict=True)
                        if p.dim() > 1 or any(source[0] == "vector" and source[1][0] == "acc"
                                              for _o, _n, source in rs)]

    @classmethod
    def of(cls, stored: list[Tensor], hoisted_w, step_w, vectors, vector_sources, step,
           blocks: dict[int, list[Tensor]] | None = None) -> Layout | None:
        """The layout, or None where the op's parameters are not plain views partitioning the stored
        tensors (a weight combination, tied weights, a non-contiguous parameter): the full path then.
        blocks (parameters.op_params'): a GEMM weight that is a copy made of row blocks (a cell's
        W_z, W_i, ... stored apart, one GEMM), by its index in the op's list: each block a plain view
        of a stored tensor, whose gradient is those rows of the weight's ("hoisted", gi, first, rows)."""
        runs: list[list[tuple]] = [[] for _ in stored]
        sources = [*[("hoisted", gi) for gi in range(len(hoisted_w))],
                   *[("step", gi) for gi in range(len(step_w))],
                   *[("vector", *vector_sources[i]) for i in range(len(vectors))]]
        parts = []  # (a plain view of a stored tensor, where its gradient comes from)
        for index, (q, source) in enumerate(zip([*hoisted_w, *step_w, *vectors], sources, strict=True)):
            made = (blocks or {}).get(index)
            if made is None:
                parts.append((q, source))
                continue
            first = 0
            for block in made:
                if block.dim() != 2:
                    return None
                parts.append((block, (*source, first, block.shape[0])))
                first += block.shape[0]
        for q, source in parts:
            base = q if q._base is None else q._base
            j = next((j for j, p in enumerate(stored) if p is base), None)
            if j is None:
                if q.requires_grad:
                    return None
                continue  # zeros for a parameter the module leaves out (bias=False)
            if not (base.is_contiguous() and q.is_contiguous()):
                return None
            runs[j].append((q.storage_offset() - base.storage_offset(), q.numel(), source))
        for j, p in enumerate(stored):
            rs, at = sorted(runs[j], key=lambda r: r[0]), 0
            for offset, n, _source in rs:
                if offset != at:
                    return None  # a gap or an overlap
                at += n
            if at != p.numel():
                return None
            runs[j] = cls._merged(rs)
        return cls(stored, runs, [cls._planned(p, rs, step) for p, rs in zip(stored, runs, strict=True)])

    @staticmethod
    def _merged(rs: list[tuple]) -> list[tuple]:
        out: list[tuple] = []
        for offset, n, source in rs:
            if out and source[0] == "vector" and out[-1][2][0] == "vector":
                o, m, last = out[-1]
                if last[1] == source[1] and last[2] + m == source[2]:
                    out[-1] = (o, m + n, last)
                    continue
            out.append((offset, n, source))
        return out

    @staticmethod
    def _planned(p: Tensor, rs: list[tuple], step) -> tuple | None:
        """(0, (d, operand), shape): a GEMM weight's gradient, step.weight_grad(d, operand) (d.T @
        operand); (1, [column views], shape): their column sums; shape: p's where the result's differs
        (else None); None: `_general`."""
        if len(rs) == 1 and rs[0][2][0] in ("hoisted", "step"):
            source = rs[0][2]
            d, operand = step.gemm_grad(*source[:2])
            if len(source) == 4:  # a block of the weight's rows
                d = d[:, source[2] : source[2] + source[3]]
            shape = (d.shape[1], operand.shape[1])
            return 0, (d, operand), None if p.shape == shape else p.shape
        if all(source[0] == "vector" and source[1][0] in ("hoisted", "step") for _o, _n, source in rs):
            views = [step.gemm_grad(*source[1])[0][:, source[2] : source[2] + n] for _o, n, source in rs]
            return 1, views, None if p.shape == (p.numel(),) else p.shape
        return None

    def grads(self, needs, step) -> list[Tensor | None]:
        """The stored tensors' gradients after step's backward (None where not needed): fresh
        tensors, which autograd may keep as .grad."""
        out: list[Tensor | None] = []
        general = None
        for j, (need, planned) in enumerate(zip(needs, self.plan, strict=True)):
            if not need:
                g = None
            elif planned is None:
                if general is None:
                    general = step.gradients()
                g = self._general(j, *general)
            else:
                kind, operands, shape = planned
                if kind == 0:
                    g = step.weight_grad(*operands)
                else:
                    g = (operands[0] if len(operands) == 1 else torch.cat(operands, 1)).sum(0)
                if shape is not None:
                    g = g.view(shape)
            out.append(g)
        return out

    def _general(self, j: int, d_hoisted: list[Tensor], d_step: list[Tensor], sums: dict) -> Tensor:
        """Stored tensor j's gradient from the op parameters' gradients (PreparedTrainStep.gradients)."""
        def value(source, n):
            if source[0] in ("hoisted", "step"):
                g = (d_hoisted if source[0] == "hoisted" else d_step)[source[1]]
                return g if len(source) == 2 else g[source[2] : source[2] + source[3]]
            whole = sums[source[1]]
            return whole if source[2] == 0 and n == whole.shape[0] else whole[source[2] : source[2] + n]

        p, rs = self.stored[j], self.runs[j]
        if len(rs) == 1:
            g = value(rs[0][2], rs[0][1])
            return g if g.shape == p.shape else g.view(p.shape)
        g = p.new_empty(p.shape)
        flat = g.view(-1)
        for offset, n, source in rs:
            flat[offset : offset + n].copy_(value(source, n).reshape(-1))
        return g


class PreparedCall(torch.autograd.Function):
    """apply(step, layout, full, n_given, distinct, (lead, out_lead), x, *given states, *stored) ->
    (*new states shaped lead + (width,), out shaped out_lead + (width,) if distinct): one call of a
    PreparedTrainStep (a step: the new states) or a PreparedTrainSequence (a layer and direction:
    the final states, out_lead (T, N)). `full(x, given, (lead, out_lead), stored)` runs the module's
    full path (the same outputs, the same shapes), for a backward that autograd records."""

    @staticmethod
    def forward(ctx, step, layout, full, n_given, distinct, leads, x, *tensors):
        given, stored = tensors[:n_given], tensors[n_given:]
        ctx.versions = _versions([x, *stored])  # what a recorded backward reads: unchanged then?
        ctx.saves_x = step.saves_input
        news, record = step.forward(x, given, leads[0])
        # the record is needed while autograd keeps this call's saved tensors: a sentinel among them
        # tells the step when they are freed (after a backward without retain_graph), so a later
        # call does not copy its buffers into a record no backward will read (no pack hook runs
        # here: `saved_tensor_hooks`)
        alive = torch.empty(0)
        record.alive = weakref.ref(alive)
        outs = (*news, step.output(leads[1])) if distinct else news
        ctx.step, ctx.layout, ctx.full, ctx.n_given, ctx.record = step, layout, full, n_given, record
        ctx.n_news, ctx.distinct, ctx.leads = len(news), distinct, leads
        ctx.x, ctx.stored = x, stored  # for a recorded backward only (x: the step keeps a copy)
        ctx.set_materialize_grads(False)
        # saved, so that a write into one of them before the backward is autograd's error: the
        # states, the weights (as torch.nn's cells save them) and the vectors the backward reads
        # (Layout.weights), and a layer's input (as torch.nn's layers; the prepared call keeps a copy,
        # so a step allows the write, as torch.nn's cells). The outputs and the folded biases are not:
        # writing into them after the call is allowed, as in torch.nn, before a first-order backward
        # (a recorded one reads x and the parameters again: `_check_unchanged`)
        ctx.save_for_backward(*given, *layout.weights, *([x] if ctx.saves_x else []), alive)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n_given, n_news = ctx.n_given, ctx.n_news
        if all(g is None for g in grads):
            return (None,) * len(ctx.needs_input_grad)
        given = ctx.saved_tensors[:n_given]  # unpacked: autograd checks their versions
        x = ctx.x
        needs = ctx.needs_input_grad[6:]
        if torch.is_grad_enabled() or any(g is not None and _batched(g) for g in grads):
            _check_unchanged([x, *ctx.stored], ctx.versions)
            return (None,) * 6 + _differentiated(ctx.full, x, given, ctx.leads, ctx.stored, needs, grads)
        grad_out = grads[n_news] if ctx.distinct else None
        needs_given = needs[1 : 1 + n_given]
        with ctx.step.lock:  # its buffers: another thread may be running the step (cells._replayed)
            dx, dstates = ctx.step.backward(ctx.record, given, grad_out, grads[:n_news], needs[0],
                                            needs_given)
            dparams = ctx.layout.grads(needs[1 + n_given :], ctx.step)
        if dx is not None:
            dx = dx.view(x.shape)
        dgiven = [d.view(s.shape) if d is not None else None for d, s in zip(dstates, given, strict=False)]
        return (None,) * 6 + (dx, *dgiven, *dparams)


# PreparedCall.apply without torch.autograd.Function.apply's Python layer (unwrapping functorch's dead
# wrappers, binding default arguments): its callers have checked that no torch.func transform is
# active and that every tensor is a plain one (ops/op.plain_eager). ~1.5 us of a ~50 us call.
apply_prepared = super(torch.autograd.Function, PreparedCall).apply


def training_layout(step, stored: list[Tensor], params: list[Tensor], split, blocks: dict[int, list[Tensor]],
                    copies: list[int]) -> Layout | None:
    """The Layout of a prepared training call (step: a PreparedTrainStep or PreparedTrainSequence made
    on the op parameters `params`, `split` by ops/function.split_params) over the module's `stored`
    parameters, or None where it cannot be made (a weight combination, scalars): the full path then.
    `copies`, the indices of the op weights made of blocks of several parameters (refilled before
    each call), are kept with each call's values, so an earlier call's backward reads its own."""
    layout = Layout.of(stored, *split[:3], step.vector_sources, step,
                       {i: blocks[i] for i in copies if i in blocks})
    if layout is None or split[3]:
        return None
    step.keep_also([params[i] for i in copies])
    return layout


def saved_tensor_hooks() -> bool:
    """Whether a saved-tensors pack hook is active (torch.utils.checkpoint without reentrance,
    offloading, torch.autograd.graph.saved_tensors_hooks): then a prepared training call is not made.
    Under such a hook autograd keeps what the hook made, not the call's tensors: a copying hook
    differentiates the weights as they were at the forward and checkpoint recomputes the forward
    with the weights as they are at the backward, while a prepared backward reads its own record
    and the live weights (after a write between the two, the gradient of neither)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _batched(g: Tensor) -> bool:
    """A gradient that torch's older vmap (is_grads_batched) or torch.func.vmap batches: the buffers
    of a prepared backward hold one sample, so the full path's backward runs (its batching rule)."""
    functorch = torch._C._functorch
    return functorch.is_legacy_batchedtensor(g) or functorch.is_functorch_wrapped_tensor(g)


def _versions(tensors: list[Tensor]) -> list[int | None]:
    """The tensors' version counters (None: an inference tensor, which has none)."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [None if t.is_inference() else t._version for t in tensors]


def _check_unchanged(tensors: list[Tensor], versions: list[int | None]) -> None:
    """A recorded backward runs the full path again on x and the parameters: one written in place since
    the forward would give the gradients of other numbers, so it is autograd's error, as for a saved
    tensor (the first-order backward reads the step's own copies and may run after such writes). An
    inference tensor has no version to compare: autograd's error for it, as torch.nn's forward gives."""
    for t, version in zip(tensors, versions, strict=True):
        if version is None:
            raise RuntimeError(
                "Inference tensors cannot be saved for backward. Please do not use Tensors created in "
                "inference mode in computation tracked by autograd. To work around this, you can make a "
                "clone to get a normal tensor and use it in autograd, or use `torch.no_grad()` instead of "
                "`torch.inference_mode()`. (celldsl: a backward that autograd records, create_graph=True, "
                "recomputes a streaming step from its input and parameters)")
        if t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{t.type()} {list(t.shape)}] is at version {t._version}; expected version "
                f"{version} instead. (celldsl: a backward that autograd records, create_graph=True, "
                "recomputes a streaming step from its input and parameters; write into them after it)")


def _differentiated(full, x, given, leads, stored, needs, grads) -> tuple:
    """The gradients by autograd through the module's full path, recorded (create_graph). The full path
    reads views of x, the states and the parameters, nodes of their own: autograd.grad then sums the
    paths through this step only, not those through the states' history (an earlier step reading the
    same x or weights, whose own backward adds its share), and higher orders still reach x and the rest."""
    with torch.enable_grad():
        views = [t.view_as(t) for t in (x, *given, *stored)]
        inputs = [v for v, need in zip(views, needs, strict=True) if need]
        n = 1 + len(given)
        outs = full(views[0], views[1:n], leads, views[n:])[: len(grads)]  # (new states..., out if returned)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        found = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], create_graph=True,
                                    allow_unused=True)
    found = iter(found)
    return tuple(next(found) if need else None for need in needs)
