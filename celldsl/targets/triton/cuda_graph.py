"""Replay a time loop's forward and backward from CUDA graphs.

Per step the loop launches only a few kernels (a cuBLAS GEMM and one fused Triton kernel per stage)
that run for microseconds each, while Python and the launches cost about a hundred: the host, not
the GPU, sets the pace. A CUDA graph records the whole T-step loop once per argument signature
(shapes, dtypes, device, packed batch sizes, which gradients are None) and replays it with one launch.

The loop's arguments are copied into the graph's static inputs before each replay and its results
are copied out after (the next replay overwrites the graph's memory), so callers see the plain
loop's semantics. A signature whose capture fails (a host synchronisation inside the loop, say)
runs eagerly from then on. CELLDSL_CUDA_GRAPHS=0 turns graphs off.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import torch

MAX_GRAPHS = 16  # per loop; the least recently used graph (and its memory pool) goes first


def _flatten(tree, leaves: list) -> object:
    """Nested lists/tuples of tensors and None -> a spec with leaf indices; leaves collected in order."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_flatten(t, leaves) for t in tree)
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return len(leaves) - 1
    return tree  # None, numbers, flags: part of the spec


def _unflatten(spec, leaves: list):
    if isinstance(spec, (list, tuple)):
        return type(spec)(_unflatten(s, leaves) for s in spec)
    if isinstance(spec, int) and not isinstance(spec, bool):
        return leaves[spec]
    return spec


def _signature(spec, leaves, extra) -> tuple:
    return (repr(spec), extra, tuple((t.shape, t.dtype, t.device, t.stride()) for t in leaves))


def enabled() -> bool:
    return os.environ.get("CELLDSL_CUDA_GRAPHS", "1") != "0"


class GraphedLoop:
    """`loop` (a TorchLoop) with forward/backward replayed from CUDA graphs on CUDA tensors; every
    other attribute is the loop's own."""

    def __init__(self, loop):
        self.loop = loop
        self._graphs: OrderedDict = OrderedDict()  # signature -> (static inputs, graph, static outputs)
        self._eager: set = set()  # signatures whose capture failed

    def __getattr__(self, name):
        return getattr(self.loop, name)

    def forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        args = (x, list(states), list(hoisted_w), list(step_w), list(vectors), list(scalars))
        sizes = None if batch_sizes is None else tuple(batch_sizes.tolist())

        def run(x, states, hoisted_w, step_w, vectors, scalars):
            return self.loop.forward(x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)

        return self._call(("forward", sizes), run, args, x)

    def backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                 batch_sizes=None, needs_dx: bool = True):
        args = (x, list(states), list(hoisted_w), list(step_w), list(vectors), list(scalars), out,
                list(saved), grad_out, list(grad_states))
        sizes = None if batch_sizes is None else tuple(batch_sizes.tolist())

        def run(*a):
            return self.loop.backward(*a, batch_sizes, needs_dx=needs_dx)

        return self._call(("backward", sizes, needs_dx), run, args, x)

    def _call(self, extra, run, args, x):
        if not (x.is_cuda and enabled()) or torch.cuda.is_current_stream_capturing():
            return run(*args)
        leaves: list = []
        spec = _flatten(args, leaves)
        key = _signature(spec, leaves, extra)
        if key in self._eager:
            return run(*args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(run, spec, leaves, key)
            if entry is None:
                return run(*args)
        self._graphs.move_to_end(key)
        static_in, graph, out_spec, static_out = entry
        for s, t in zip(static_in, leaves, strict=True):
            s.copy_(t)
        graph.replay()
        return _unflatten(out_spec, [t.clone() for t in static_out])

    def _capture(self, run, spec, leaves, key):
        static_in = [t.clone() for t in leaves]
        static_args = _unflatten(spec, static_in)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # warm-up: compiles the Triton kernels, sizes cuBLAS workspaces
                run(*static_args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = run(*static_args)
        except RuntimeError as err:  # e.g. an operation that synchronises with the host
            torch.cuda.synchronize()
            self._eager.add(key)
            warnings.warn(f"celldsl: CUDA graph capture failed, running this shape eagerly ({err})",
                          RuntimeWarning, stacklevel=4)
            return None
        out_leaves: list = []
        out_spec = _flatten(result, out_leaves)
        entry = (static_in, graph, out_spec, out_leaves)
        self._graphs[key] = entry
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return entry
