"""The matrix path's time loop as one torch.library op, so torch.export, torch.compile, torch.jit.trace
and TorchScript see a matrix-memory cell (lang/tensors.py) as one call, as ops/op.py does for the
elementwise cells:

    celldsl::matrix_sequence(str key, str backend, Tensor x, Tensor[] states, Tensor[] params,
                             str sizes, Tensor? lengths) -> Tensor[]   ([out, *final_states])
    celldsl::matrix_sequence_backward(key, backend, x, states, params, sizes, lengths, grad_out,
                                      grad_finals) -> Tensor[]        ([dx, *d_states, *d_params])

One layer and one direction: x [T, N, I] time-major and padded; states [N, *ir.state_shape(s, sizes)];
params in ir.params order as MatrixRecurrent stores them; `sizes` the layer's sizes ("heads", the
widths and the first input's name) as "name=value" pairs sorted by name and joined by "," (see
`encode_sizes`); lengths [N] (int64) or None for padded input. out [T, N, heads * output width].

The implementation is the backend's loop (`loop.run`: "torch", "cpu", "auto", "triton"). The backward
op runs that loop again under autograd and takes its gradients (the loops are differentiable once).
The layers (nn/matrix.py) call `loop.run` directly where `ops.op.plain_eager` says nothing but
autograd could see the call, and this op otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lang.errors import CellTensorError
from .function import cell_for, unaliased

_LOOPS: dict = {}  # (key, backend) -> the cell's loop on that backend
_SIZES: dict = {}  # encoded sizes -> decoded


def encode_sizes(sizes: dict) -> str:
    """{"x": 3, "heads": 2, "K": 4} -> "K=4,heads=2,x=3": the op's `sizes` argument."""
    parts = []
    for name, value in sorted(sizes.items()):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a size's name must be an identifier, got {name!r}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"size {name!r} must be an int, got {value!r}")
        parts.append(f"{name}={value}")
    return ",".join(parts)


def decode_sizes(text: str) -> dict[str, int]:
    """The inverse of `encode_sizes` (split and int(): the text is data)."""
    sizes = _SIZES.get(text)
    if sizes is None:
        sizes = {}
        for part in text.split(",") if text else ():
            name, eq, value = part.partition("=")
            if not eq or not name.isidentifier() or not value.lstrip("-").isdigit():
                raise ValueError(f"sizes must be 'name=int' pairs joined by ',', got {text!r}")
            sizes[name] = int(value)
        _SIZES[text] = sizes
    return dict(sizes)


def loop_of(key: str, backend: str):
    """The loop of the matrix-path cell with this key on `backend`, made once per process."""
    loop = _LOOPS.get((key, backend))
    if loop is None:
        from ..compiler import CompiledMatrixCell

        compiled = cell_for(key)
        if not isinstance(compiled, CompiledMatrixCell):
            raise ValueError(f"cell {compiled.name!r} (key {key!r}) has no matrix state; "
                             "celldsl::matrix_sequence runs matrix-path cells (use celldsl::cell_sequence)")
        loop = _LOOPS[(key, backend)] = compiled.loop(backend)
    return loop


def output_width(ir, sizes: dict[str, int]) -> int:
    """The width of one step's output: heads x the output value's rows x cols (without "1" axes)."""
    kind = ir.nodes[ir.output_node].kind
    width = sizes["heads"]
    for axis in (kind.rows, kind.cols):
        if axis != "1":
            width *= sizes[axis]
    return width


def check_dtypes(x: Tensor, states, params) -> None:
    """One floating dtype and one device for x, the states and the parameters, as torch.nn's layers ask
    (the loops would raise torch's bare "expected scalar type" or, on a mixed buffer, refuse late)."""
    if not x.is_floating_point():
        raise CellTensorError(f"celldsl::matrix_sequence: x must be a floating-point tensor, got {x.dtype}")
    for what, tensors in (("state", states), ("parameter", params)):
        for i, t in enumerate(tensors):
            if t.dtype != x.dtype or t.device != x.device:
                raise CellTensorError(f"celldsl::matrix_sequence: {what} {i} is {t.dtype} on {t.device} "
                                      f"but x is {x.dtype} on {x.device}; give them one dtype and device")


def _run(key, backend, x, states, params, sizes, lengths):
    check_dtypes(x, states, params)
    # autocast off: the op computes in its inputs' dtype (autocast has no rule for it, and would otherwise
    # cast the loop's own GEMMs and hand bfloat16 buffers to a float32 C loop)
    with torch.autocast(x.device.type, enabled=False):
        out, finals = loop_of(key, backend).run(x, list(states), list(params), decode_sizes(sizes), lengths)
    return [out, *finals]


@torch.library.custom_op("celldsl::matrix_sequence", mutates_args=())
def matrix_sequence(key: str, backend: str, x: Tensor, states: list[Tensor], params: list[Tensor], sizes: str,
                    lengths: Tensor | None) -> list[Tensor]:
    with torch.no_grad():
        result = _run(key, backend, x, states, params, sizes, lengths)
    return unaliased([t.contiguous() for t in result], [x, *states, *params])


@matrix_sequence.register_fake
def _matrix_sequence_fake(key, backend, x, states, params, sizes, lengths):
    width = output_width(cell_for(key).ir, decode_sizes(sizes))
    return [x.new_empty(x.shape[0], x.shape[1], width), *(s.new_empty(s.shape) for s in states)]


class _WithAutograd:
    """Autograd back on inside an op's implementation (the dispatcher runs it below autograd)."""

    KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
            torch._C.DispatchKey.AutogradNestedTensor)

    def __enter__(self):
        exclude = torch._C._dispatch_tls_local_exclude_set()
        for k in self.KEYS:
            exclude = exclude.remove(k)
        self.guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self.grad = torch.enable_grad()
        self.guard.__enter__()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.guard.__exit__(*exc)


@torch.library.custom_op("celldsl::matrix_sequence_backward", mutates_args=())
def matrix_sequence_backward(key: str, backend: str, x: Tensor, states: list[Tensor], params: list[Tensor],
                             sizes: str, lengths: Tensor | None, grad_out: Tensor | None,
                             grad_finals: list[Tensor | None]) -> list[Tensor]:
    inputs = [t.detach().requires_grad_() for t in (x, *states, *params)]
    n = len(states)
    with _WithAutograd():
        result = _run(key, backend, inputs[0], inputs[1:1 + n], inputs[1 + n:], sizes, lengths)
        given = [(r, g) for r, g in zip(result, [grad_out, *grad_finals], strict=True) if g is not None]
        if given and not any(r.requires_grad for r, _ in given):  # never zeros in place of gradients
            raise RuntimeError("celldsl::matrix_sequence_backward: autograd did not record the loop "
                               "inside the op (this torch's dispatcher no longer lets _WithAutograd turn it "
                               "back on), so no gradient could be taken")
        pairs = [(r, g) for r, g in given if r.requires_grad]
        grads = [None] * len(inputs)
        if pairs:
            grads = torch.autograd.grad([r for r, _ in pairs], inputs, [g for _, g in pairs],
                                        allow_unused=True)
    flat = [torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, inputs, strict=True)]
    return unaliased(flat, [x, *states, *params, grad_out, *grad_finals])


@matrix_sequence_backward.register_fake
def _matrix_sequence_backward_fake(key, backend, x, states, params, sizes, lengths, grad_out, grad_finals):
    return [torch.empty_like(t) for t in (x, *states, *params)]


def _setup_context(ctx, inputs, output):
    key, backend, x, states, params, sizes, lengths = inputs
    ctx.key, ctx.backend, ctx.sizes, ctx.n = key, backend, sizes, len(states)
    ctx.has_lengths = lengths is not None
    ctx.save_for_backward(x, *states, *params, *([lengths] if lengths is not None else []))


def _backward(ctx, grads):
    saved = list(ctx.saved_tensors)
    lengths = saved.pop() if ctx.has_lengths else None
    x, states, params = saved[0], saved[1:1 + ctx.n], saved[1 + ctx.n:]
    d = matrix_sequence_backward(ctx.key, ctx.backend, x, states, params, ctx.sizes, lengths, grads[0],
                                 list(grads[1:]))
    return None, None, d[0], d[1:1 + ctx.n], d[1 + ctx.n:], None, None


matrix_sequence.register_autograd(_backward, setup_context=_setup_context)


def call(key: str, backend: str, x: Tensor, states: list[Tensor], params: list[Tensor], sizes: str,
         lengths: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """(out, final states) through the op."""
    result = matrix_sequence(key, backend, x, list(states), list(params), sizes, lengths)
    return result[0], list(result[1:])
