"""The torch.autograd.Function around a cell's time loop (forward and SymPy-derived backward)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class CellSequence(torch.autograd.Function):
    """out, *final_states = CellSequence.apply(loop, counts, x, *states, *hoisted_w, *step_w, *vectors, *scalars)

    `counts` = (states, hoisted weights, step weights, vectors, scalars): how to split the flat tail.
    """

    @staticmethod
    def forward(ctx, loop, counts, x, *flat):
        states, hw, sw, vecs, scal = _split(flat, counts)
        out, finals, saved = loop.forward(x, states, hw, sw, vecs, scal)
        tensors, layout = _flatten_saved(saved)
        ctx.loop, ctx.counts, ctx.layout = loop, counts, layout
        ctx.save_for_backward(x, *hw, *sw, *vecs, *scal, *tensors)
        return (out, *finals)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *grad_finals):
        n_s, n_hw, n_sw, n_v, n_sc = ctx.counts
        x, *rest = ctx.saved_tensors
        hw, rest = rest[:n_hw], rest[n_hw:]
        sw, rest = rest[:n_sw], rest[n_sw:]
        vecs, rest = rest[:n_v], rest[n_v:]
        scal, rest = rest[:n_sc], rest[n_sc:]
        saved = _unflatten_saved(rest, ctx.layout)
        dx, dstates, dhw, dsw, dvec, dscal = ctx.loop.backward(
            x, hw, sw, vecs, scal, saved, grad_out, list(grad_finals)
        )
        return (None, None, dx, *dstates, *dhw, *dsw, *dvec, *dscal)


def _split(flat, counts):
    out, i = [], 0
    for n in counts:
        out.append(list(flat[i : i + n]))
        i += n
    return out


def _flatten_saved(saved: dict):
    tensors, layout = [], {}
    for key, value in saved.items():
        if isinstance(value, dict):
            layout[key] = ("dict", list(value))
            tensors.extend(value.values())
        else:
            layout[key] = ("list", len(value))
            tensors.extend(value)
    return tensors, layout


def _unflatten_saved(tensors, layout) -> dict:
    saved, i = {}, 0
    for key, (kind, spec) in layout.items():
        if kind == "dict":
            saved[key] = dict(zip(spec, tensors[i : i + len(spec)], strict=True))
            i += len(spec)
        else:
            saved[key] = list(tensors[i : i + spec])
            i += spec
    return saved
