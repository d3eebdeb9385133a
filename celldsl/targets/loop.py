"""The time loop of any cell on torch: hoisted GEMMs, then per step GEMMs + generated pointwise code.

The backward runs the same loop in reverse with the SymPy-derived pointwise backward (not autograd
through the forward). Weight gradients are one GEMM over all time steps per GEMM group.

Sequences are time-major and flat: step t owns the rows [offset_t, offset_t + b_t) of x [rows, I],
where b_t = batch_sizes[t] (torch's PackedSequence order: sequences sorted by decreasing length, so
the sequences still running at step t are the first b_t). A padded batch x [T, N, I] is the case
b_t = N. Step t computes only its b_t rows; the other rows keep their state, so a sequence's final
state is the one of its own last step. Shapes: state s [N, width of s] (H unless the cell declares
another), hoisted weights [rows, I], step weights [rows, K] (or [G, NH, dh, dh] with heads, see
gemm.py), vectors [their width], scalars [] (0-dim). The sizes of the widths (widths.py) are read
off the tensors at every call (`sizes`).

A cell with several inputs (`input x, ctx`) takes them as one x, concatenated along the features in
the order declared: [x | ctx | ...]. `input_columns` recovers each input's columns (an extra input
read by a matrix has that matrix's width, one declared `: 1` has 1, one read elementwise has the
width it meets; one the cell never reads is not in x), so the ops keep one x tensor and only the
layer knows the sizes. `prev(x)` (x of the step before, zero at the first step of each sequence) is
a shifted copy of x's rows, made once per call (`shifted_rows`): hoisted GEMMs read it like x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Plan, Pointwise
from . import gemm


@dataclass(frozen=True)
class Slot:
    """Where a pointwise argument comes from: (kind, index, block)."""

    kind: str  # input | state | vector | scalar | hoisted | product | operand
    index: int | str
    block: int = 0


@dataclass(frozen=True)
class Step:
    """One pointwise function of the plan with the generated functions that run it and its arguments."""

    pw: Pointwise
    forward: object
    backward: object
    slots: list[Slot]


def steps_of(x: torch.Tensor, batch_sizes, n: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """(x as [rows, I], b_t per step, row offset of each step) for x [T, N, I] or packed x [rows, I]."""
    if batch_sizes is None:
        if x.dim() != 3:
            raise ValueError(f"x must be [T, N, I] without batch_sizes, got shape {tuple(x.shape)}")
        steps = [x.shape[1]] * x.shape[0]
    else:
        steps = batch_sizes.tolist() if isinstance(batch_sizes, torch.Tensor) else list(batch_sizes)
        if x.dim() != 2 or sum(steps) != x.shape[0]:
            raise ValueError(
                f"packed x must be [sum(batch_sizes), I] = [{sum(steps)}, I], got shape {tuple(x.shape)}"
            )
    increasing = any(b < c for b, c in zip(steps, steps[1:], strict=False))
    if not steps or steps[0] != n or increasing or steps[-1] <= 0:
        raise ValueError(
            f"batch_sizes must be positive, non-increasing and start at the state's batch size {n}; "
            f"got {steps[:8]}{'...' if len(steps) > 8 else ''}"
        )
    offsets = [0]
    for b in steps[:-1]:
        offsets.append(offsets[-1] + b)
    return x.reshape(-1, x.shape[-1]), steps, offsets


def shifted_rows(steps: list[int], offsets: list[int], k: int, device) -> torch.Tensor:
    """For every row of step t, the row of the same sequence at step t - k, or -1 when t < k: [rows].
    (Packed order keeps sequence r at position r of every step it runs in.)"""
    index = []
    for t, (b, _off) in enumerate(zip(steps, offsets, strict=True)):
        index.append(torch.arange(b) + offsets[t - k] if t >= k else torch.full((b,), -1))
    return torch.cat(index).to(device)


def input_columns(plan: Plan, width: int, sizes: dict[str, int], hoisted_w) -> dict[str, slice]:
    """Columns of the first input and of each extra input the plan reads inside the concatenated x
    [rows, width]: an extra input's width is that of the hoisted weight applied to it, 1 for one
    declared `: 1`, else the size of the width it meets; the first input has the rest. Raises
    ValueError when x is too narrow for them."""
    ir = plan.ir
    first, read = ir.inputs[0], plan.inputs_read()
    widths = {}
    for name in read:
        if name == first:
            continue
        by_matrix = [w.shape[1] if w.dim() == 2 else w.shape[1] * w.shape[3]
                     for g, w in zip(plan.hoisted, hoisted_w, strict=True) if g.operand_size == name]
        if by_matrix:
            widths[name] = by_matrix[0]
        elif ir.width(name) == "row":
            widths[name] = 1
        else:
            met = [b if a == name else a for a, b in ir.same_widths if name in (a, b)]
            widths[name] = next((sizes[w] for w in met if w in sizes), sizes["H"])
    rest = width - sum(widths.values())
    if rest < 0:
        raise ValueError(
            f"x must hold the extra inputs {', '.join(widths)} ({sum(widths.values())} columns) after "
            f"the first input '{first}', got {width} columns"
        )
    columns, start = {first: slice(0, rest)}, rest
    for name, w in widths.items():
        columns[name] = slice(start, start + w)
        start += w
    return columns


class TorchLoop:
    """Runs one compiled cell forward and backward over a whole sequence with a module of pointwise
    functions (targets/torch/emit.py; the Triton backend passes a module of kernels with the same
    signatures: `<name>_forward(*args) -> tuple`, `<name>_backward(*args, *grads) -> tuple` with
    None for a zero gradient, one pair per Pointwise of the plan)."""

    def __init__(self, plan: Plan, module):
        self.plan = plan
        ir = plan.ir
        self.states = list(ir.states)
        self.inputs = list(ir.inputs)
        self.shifted = dict(ir.shifted)  # "prev(x)" -> ("x", 1)
        self.vectors = [n for n, p in ir.params.items() if p.kind == "vector"]
        self.scalars = [n for n, p in ir.params.items() if p.kind == "scalar"]
        self.hoisted = plan.hoisted
        self.gemms = plan.gemms
        where: dict[str, Slot] = {}
        for i, s in enumerate(self.states):
            where[s] = Slot("state", i)
        for name in [*ir.inputs, *self.shifted]:
            where[name] = Slot("input", name)
        for i, v in enumerate(self.vectors):
            where[v] = Slot("vector", i)
        for i, v in enumerate(self.scalars):
            where[v] = Slot("scalar", i)
        for gi, g in enumerate(self.hoisted):
            for j, p in enumerate(g.products):
                where[p.name] = Slot("hoisted", gi, j)
        for gi, g in enumerate(self.gemms):
            for j, p in enumerate(g.products):
                where[p.name] = Slot("product", gi, j)
            if plan.role(g.operand) == "operand":
                where[g.operand.name] = Slot("operand", g.operand.name)
        self.where = where
        self.output_state = self.states.index(ir.output) if ir.output in self.states else None
        self.operand_names = [name for name, slot in where.items() if slot.kind == "operand"]
        self._good_shapes: set = set()  # argument shapes check_shapes passed

        def step(pw: Pointwise) -> Step:
            fwd, bwd = getattr(module, f"{pw.name}_forward"), getattr(module, f"{pw.name}_backward")
            return Step(pw, fwd, bwd, [where[s.name] for s in pw.inputs])

        # per stage k = 0..S: (indices of its GEMMs, its pointwise functions: one per output width)
        self.stages = [([i for i, g in enumerate(self.gemms) if g.stage == k], [step(pw) for pw in
                        plan.pointwise_of_stage(k)]) for k in range(plan.num_stages + 1)]
        self.hoist = [step(pw) for pw in plan.hoist_pointwise]
        self.operand_of_hoisted = [g.operand.name for g in self.hoisted]
        # the width (a name, widths.py) of everything a pointwise function outputs, and of operands
        self.width_of = {s + "'": ir.width(s) for s in self.states} | {ir.output: ir.width(ir.output)}
        self.width_of |= {g.operand.name: g.operand_size for g in [*self.gemms, *self.hoisted]}

    def check_shapes(self, x, states, hoisted_w, step_w, vectors, scalars) -> None:
        """Refuse tensors whose shapes disagree with the cell (ValueError, naming what was expected). The
        op can be called with any tensors (torch.ops.celldsl.cell_sequence), and the torch loop would
        broadcast a [1] bias, or a [1, H] state over N rows, into numbers; the native loop would read
        out of bounds. A signature that passed is remembered (a failed one is not)."""
        signature = (tuple(tuple(t.shape) for t in (x, *states, *hoisted_w, *step_w, *vectors, *scalars)),
                     len(states), len(hoisted_w), len(step_w), len(vectors))
        if signature in self._good_shapes:
            return
        self._check_shapes(x, states, hoisted_w, step_w, vectors, scalars)
        if len(self._good_shapes) >= 64:
            self._good_shapes.clear()
        self._good_shapes.add(signature)

    def _check_shapes(self, x, states, hoisted_w, step_w, vectors, scalars) -> None:
        if len(states) != len(self.states) or len(vectors) != len(self.vectors) or \
                len(scalars) != len(self.scalars) or len(step_w) != len(self.gemms) or \
                len(hoisted_w) != len(self.hoisted):
            raise ValueError(
                f"cell {self.plan.ir.name!r} takes {len(self.states)} states, {len(self.hoisted)} hoisted "
                f"and {len(self.gemms)} step weights, {len(self.vectors)} vectors, {len(self.scalars)} "
                f"scalars; got {len(states)}, {len(hoisted_w)}, {len(step_w)}, {len(vectors)}, "
                f"{len(scalars)}")
        ir = self.plan.ir
        if states[0].dim() != 2:
            raise ValueError(f"state {self.states[0]!r} must be [N, width], got {tuple(states[0].shape)}")
        sizes = self.sizes(states, vectors, hoisted_w, step_w, x)
        N = states[0].shape[0]
        for name, s in zip(self.states, states, strict=True):
            if tuple(s.shape) != (N, sizes[ir.width(name)]):
                raise ValueError(f"state {name!r} must be [N, {ir.width(name)}] = "
                                 f"{(N, sizes[ir.width(name)])}, got {tuple(s.shape)}")
        for name, v in zip(self.vectors, vectors, strict=True):
            if tuple(v.shape) != (sizes[ir.width(name)],):
                raise ValueError(f"vector {name!r} must have shape ({sizes[ir.width(name)]},), "
                                 f"got {tuple(v.shape)}")
        for name, v in zip(self.scalars, scalars, strict=True):
            if v.numel() != 1:
                raise ValueError(f"scalar {name!r} must have one element, got shape {tuple(v.shape)}")
        for kind, ws, gemms in (("hoisted", hoisted_w, self.hoisted), ("step", step_w, self.gemms)):
            for w, g in zip(ws, gemms, strict=True):
                rows = sum(sizes[b] for b in g.widths)
                if w.dim() not in (2, 4) or gemm.rows_of(w) != rows:
                    counts = {w: g.widths.count(w) for w in dict.fromkeys(g.widths)}
                    widths = " + ".join(f"{n} * {w}" if n > 1 else w for w, n in counts.items())
                    raise ValueError(f"{kind} weight [{', '.join(g.params)}] must have "
                                     f"{widths} = {rows} rows, got {tuple(w.shape)}")
        for w, g in zip(step_w, self.gemms, strict=True):
            k = sizes.get(g.operand_size)
            cols = w.shape[1] if w.dim() == 2 else w.shape[1] * w.shape[3]
            if k is not None and cols != k:
                raise ValueError(f"step weight [{', '.join(g.params)}] must have "
                                 f"{g.operand_size} = {k} columns, got {tuple(w.shape)}")
        if len(self.inputs) > 1:
            cols = input_columns(self.plan, x.shape[-1], sizes, hoisted_w)
            widths = {name: c.stop - c.start for name, c in cols.items()}
        else:
            widths = {self.inputs[0]: x.shape[-1]}
        for pw in self.plan.pointwise:
            for sym in pw.inputs:
                name = self.shifted.get(sym.name, (sym.name,))[0]
                if self.where[sym.name].kind != "input" or ir.width(name) == "row":
                    continue
                if widths[name] != sizes[pw.width]:
                    raise ValueError(f"this cell uses its input {name!r} elementwise with "
                                     f"{pw.width}-wide values: it must have {pw.width} = {sizes[pw.width]} "
                                     f"features, got {widths[name]}")

    # ---- sizes -------------------------------------------------------------------------------------

    def sizes(self, states, vectors, hoisted_w, step_w, x=None) -> dict[str, int]:
        """The size of every width of the cell, read off the tensors of one call (with x, the
        concatenated input, also the widths only an input has: see input_sizes)."""
        ir = self.plan.ir
        sizes = {"row": 1}
        for name, s in zip(self.states, states, strict=True):
            sizes.setdefault(ir.width(name), s.shape[-1])
        for name, v in zip(self.vectors, vectors, strict=True):
            sizes.setdefault(ir.width(name), v.shape[-1])
        for g, w in [*zip(self.gemms, step_w, strict=True), *zip(self.hoisted, hoisted_w, strict=True)]:
            unknown = [x for x in g.widths if x not in sizes]
            if unknown and len(set(unknown)) == 1:
                known = sum(sizes[x] for x in g.widths if x in sizes)
                sizes[unknown[0]] = (gemm.rows_of(w) - known) // len(unknown)
        sizes.setdefault("H", states[0].shape[-1])
        if x is not None:
            if len(self.inputs) == 1:
                sizes.setdefault(ir.width(self.inputs[0]), x.shape[-1])
            else:
                for name, c in input_columns(self.plan, x.shape[-1], sizes, hoisted_w).items():
                    sizes.setdefault(ir.width(name), c.stop - c.start)
        return sizes

    def input_sizes(self, sizes: dict[str, int], X: dict[str, torch.Tensor]) -> dict[str, int]:
        """Add the widths only an input has (a mean over x where x meets no other value) to `sizes`."""
        for name in self.inputs:
            if name in X:
                sizes.setdefault(self.plan.ir.width(name), X[name].shape[-1])
        return sizes

    def _blocks(self, t: torch.Tensor, g, sizes) -> list[torch.Tensor]:
        """A GEMM's output [rows, sum of its blocks' widths] -> one view per block."""
        if len(g.products) == 1:
            return [t]
        return list(t.split([sizes[w] for w in g.widths], dim=-1))

    def saved_shapes(self, rows: int, sizes: dict[str, int], hoisted_w, step_w) -> list[tuple[int, int]]:
        """Shapes of the tensors `forward` returns as `saved`, in order (for fake/meta kernels):
        new states [rows, width] (all but the output state, which is `out`), per-step GEMM outputs
        [rows, rows of W], per-step GEMM operands [rows, width], hoisted GEMM outputs [rows, rows of W]."""
        ir = self.plan.ir
        return (
            [(rows, sizes[ir.width(s)]) for i, s in enumerate(self.states) if i != self.output_state]
            + [(rows, gemm.rows_of(w)) for w in step_w]
            + [(rows, sizes[self.width_of[n]]) for n in self.operand_names]
            + [(rows, gemm.rows_of(w)) for w in hoisted_w]
        )

    def output_width(self, sizes: dict[str, int]) -> int:
        return sizes[self.plan.ir.width(self.plan.ir.output)]

    def _unpack_saved(self, saved, out, sizes):
        saved = list(saved)
        news = []
        for i in range(len(self.states)):
            news.append(out.reshape(-1, self.output_width(sizes)) if i == self.output_state else saved.pop(0))
        step_all = [saved.pop(0) for _ in self.gemms]
        operands = {name: saved.pop(0) for name in self.operand_names}
        hoisted_out = [saved.pop(0) for _ in self.hoisted]
        return news, step_all, operands, hoisted_out

    # ---- inputs ----------------------------------------------------------------------------------

    def split_inputs(self, X, sizes, hoisted_w, steps, offsets) -> dict[str, torch.Tensor]:
        """The concatenated x [rows, I] -> {input name: [rows, its width]} (contiguous copies of the
        columns, so every backend reads plain rows), and each prev(x, k) the cell reads."""
        if len(self.inputs) == 1:
            parts = {self.inputs[0]: X}
        else:
            cols = input_columns(self.plan, X.shape[1], sizes, hoisted_w)
            parts = {name: X[:, c].contiguous() for name, c in cols.items()}
        for name, (source, k) in self.shifted.items():
            src = shifted_rows(steps, offsets, k, X.device)
            value = parts[source]
            parts[name] = torch.where((src >= 0)[:, None], value[src.clamp(min=0)], value.new_zeros(()))
        return parts

    def join_input_grads(self, parts: dict, X, sizes, hoisted_w, steps, offsets):
        """{input name: gradient [rows, its width] or None} -> the gradient of the concatenated x
        [rows, I] (zero columns where an input got none), or None when no input got one. The
        gradient of prev(x, k) goes back k steps, to the rows of x it read."""
        parts = dict(parts)
        for name, (source, k) in self.shifted.items():
            d = parts.pop(name, None)
            if d is None:
                continue
            src = shifted_rows(steps, offsets, k, X.device)
            keep = src >= 0
            base = parts.get(source)
            base = torch.zeros_like(d) if base is None else base.clone()
            parts[source] = base.index_add_(0, src[keep], d[keep])
        if len(self.inputs) == 1:
            return parts.get(self.inputs[0])
        if all(parts.get(n) is None for n in self.inputs):
            return None
        cols = input_columns(self.plan, X.shape[1], sizes, hoisted_w)
        return torch.cat([parts[n] if parts.get(n) is not None else X.new_zeros(X.shape[0], c.stop - c.start)
                          for n, c in cols.items()], dim=1)

    def _hoisted_operands(self, x, vectors, scalars):
        """Operand values of the hoisted GEMMs over the whole sequence: [rows, K] each (x: the
        inputs by name, see split_inputs)."""
        values = {}
        for st in self.hoist:
            args = [self._static(s, x, vectors, scalars) for s in st.slots]
            for (name, _), r in zip(st.pw.outputs, st.forward(*args), strict=True):
                values[name] = r
        return [values[n] if n in values else self._static(self.where[n], x, vectors, scalars)
                for n in self.operand_of_hoisted]

    @staticmethod
    def _static(slot: Slot, x, vectors, scalars):
        if slot.kind == "input":
            return x[slot.index]
        if slot.kind == "vector":
            return vectors[slot.index]
        if slot.kind == "scalar":
            return scalars[slot.index]
        raise AssertionError(slot)

    def _arg(self, slot, rows, x, cur, vectors, scalars, hoisted_blocks, products, env_ops):
        """The value of one pointwise argument at the step owning `rows` (a slice of the flat rows)."""
        kind = slot.kind
        if kind == "state":
            return cur[slot.index]
        if kind == "product":
            return products[slot.index][slot.block]
        if kind == "hoisted":
            return hoisted_blocks[slot.index][slot.block][rows]
        if kind == "vector":
            return vectors[slot.index]
        if kind == "scalar":
            return scalars[slot.index]
        if kind == "input":
            return x[slot.index][rows]
        return env_ops[slot.index]

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        """-> (out, final states [N, width] each, saved: list of tensors, see saved_shapes).

        x [T, N, I] -> out [T, N, width of the output]; packed x [rows, I] with batch_sizes -> out
        [rows, width of the output].
        """
        self.check_shapes(x, states, hoisted_w, step_w, vectors, scalars)
        Xf, steps, offsets = steps_of(x, batch_sizes, states[0].shape[0])
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        X = self.split_inputs(Xf, sizes, hoisted_w, steps, offsets)
        self.input_sizes(sizes, X)
        hoisted_ops = self._hoisted_operands(X, vectors, scalars)
        hoisted_out = [gemm.matmul(op, w) for op, w in zip(hoisted_ops, hoisted_w, strict=True)]
        hoisted_blocks = [self._blocks(h, g, sizes) for h, g in zip(hoisted_out, self.hoisted, strict=True)]
        cur = list(states)
        news = [[] for _ in self.states]
        step_out = [[] for _ in self.gemms]
        operand_seq = {name: [] for name in self.operand_names}
        outputs = []
        for b, off in zip(steps, offsets, strict=True):
            rows = slice(off, off + b)
            if b < cur[0].shape[0]:  # sequences that ended keep their state; only the first b run on
                cur = [s[:b] for s in cur]
            env_ops: dict[str, torch.Tensor] = {}
            products: dict[int, list[torch.Tensor]] = {}
            for gemm_ids, steps_of_stage in self.stages:
                for gi in gemm_ids:
                    g = self.gemms[gi]
                    slot = self.where[g.operand.name]
                    opnd = cur[slot.index] if slot.kind == "state" else env_ops[g.operand.name]
                    out = gemm.matmul(opnd, step_w[gi])
                    step_out[gi].append(out)
                    products[gi] = self._blocks(out, g, sizes)
                for st in steps_of_stage:
                    args = [self._arg(s, rows, X, cur, vectors, scalars, hoisted_blocks, products, env_ops)
                            for s in st.slots]
                    for (name, _), r in zip(st.pw.outputs, st.forward(*args), strict=True):
                        env_ops[name] = r
            for name, seq in operand_seq.items():
                seq.append(env_ops[name])
            cur = [env_ops[s + "'"] for s in self.states]
            for seq, value in zip(news, cur, strict=True):
                seq.append(value)
            if self.output_state is None:
                outputs.append(env_ops[self.plan.ir.output])
        # the final state of the sequences that end at step t is rows [b_{t+1}, b_t) of its new state
        ends = [*steps[1:], 0]
        finals = [
            torch.cat([seq[t][ends[t] : steps[t]] for t in reversed(range(len(steps))) if ends[t] < steps[t]])
            for seq in news
        ]
        news_all = [torch.cat(seq) for seq in news]  # [rows, width]
        out = news_all[self.output_state] if self.output_state is not None else torch.cat(outputs)
        saved = (
            [s for i, s in enumerate(news_all) if i != self.output_state]
            + [torch.cat(s) for s in step_out]
            + [torch.cat(operand_seq[name]) for name in self.operand_names]
            + hoisted_out
        )
        if batch_sizes is None:
            out = out.view(x.shape[0], x.shape[1], -1)
        return out, finals, saved

    def infer(self, x, states, hoisted_w, step_w, vectors, scalars, batch_sizes=None):
        """(out, final states) of `forward`, for a call no backward follows (ops.op.infer): a loop that
        can skip what only the backward reads overrides it (targets/c/fused.py)."""
        out, finals, _saved = self.forward(x, states, hoisted_w, step_w, vectors, scalars, batch_sizes)
        return out, finals

    # ---- backward ----------------------------------------------------------------------------

    def backward(self, x, states, hoisted_w, step_w, vectors, scalars, out, saved, grad_out, grad_states,
                 batch_sizes=None, needs_dx: bool = True):
        """Gradients of everything `forward` took: (dx, d states, d hoisted_w, d step_w, d vectors,
        d scalars). `grad_out` (shaped like out) and entries of `grad_states` may be None (zero).
        needs_dx=False skips the input's projection GEMM over all steps (dx is then not meaningful)."""
        self.check_shapes(x, states, hoisted_w, step_w, vectors, scalars)
        N = states[0].shape[0]
        Xf, steps, offsets = steps_of(x, batch_sizes, N)
        sizes = self.sizes(states, vectors, hoisted_w, step_w)
        X = self.split_inputs(Xf, sizes, hoisted_w, steps, offsets)  # input name -> [rows, its width]
        self.input_sizes(sizes, X)
        news, step_all, operands, hoisted_out = self._unpack_saved(saved, out, sizes)
        hoisted_blocks = [self._blocks(h, g, sizes) for h, g in zip(hoisted_out, self.hoisted, strict=True)]
        zero_rows: dict[int, torch.Tensor] = {}

        def zeros(b: int, width: str) -> torch.Tensor:
            """[b, size of width] zeros (views of one buffer per size)."""
            n = sizes[width]
            if n not in zero_rows:
                zero_rows[n] = Xf.new_zeros(N, n)
            return zero_rows[n][:b]

        g_out = grad_out.reshape(-1, self.output_width(sizes)) if grad_out is not None else None
        dstate = [g if g is not None else zeros(N, self.plan.ir.width(s))  # d loss / d running state
                  for g, s in zip(grad_states, self.states, strict=True)]
        d_step = [[] for _ in self.gemms]  # per step, last step first
        d_hoisted = [[] for _ in self.hoisted]
        d_vec = [[] for _ in self.vectors]
        d_scal = [Xf.new_zeros(()) for _ in self.scalars]
        dx_steps = []
        for t in reversed(range(len(steps))):
            b, off = steps[t], offsets[t]
            rows = slice(off, off + b)
            cur = [self._previous(i, t, states, news, steps, offsets) for i in range(len(self.states))]
            products = {gi: self._blocks(step_all[gi][rows], g, sizes) for gi, g in enumerate(self.gemms)}
            env_ops = {k: v[rows] for k, v in operands.items()}
            dprev: list = [None] * len(self.states)
            dprod: dict[tuple[int, int], torch.Tensor] = {}
            dhoist: dict[tuple[int, int], torch.Tensor] = {}
            dops: dict[str, torch.Tensor] = {}
            dx_t: dict[str, torch.Tensor] = {}  # input name -> its gradient at this step
            final_grads = {s + "'": dstate[i][:b] for i, s in enumerate(self.states)}
            if g_out is not None:
                if self.output_state is not None:
                    s = self.states[self.output_state] + "'"
                    final_grads[s] = final_grads[s] + g_out[rows]
                else:
                    final_grads[self.plan.ir.output] = g_out[rows]
            for gemm_ids, steps_of_stage in reversed(self.stages):
                for st in steps_of_stage:
                    args = [self._arg(s, rows, X, cur, vectors, scalars, hoisted_blocks, products, env_ops)
                            for s in st.slots]
                    grads = [final_grads[n] if n in final_grads else dops.pop(n, None)
                             for n, _ in st.pw.outputs]
                    grads = [g if g is not None else zeros(b, self.width_of[n])
                             for g, (n, _) in zip(grads, st.pw.outputs, strict=True)]
                    width = sizes[st.pw.width]
                    for sym, r in zip(st.pw.grad_inputs, st.backward(*args, *grads), strict=True):
                        if r is None:
                            continue
                        r = fit_gradient(r, st.pw.kinds[sym.name], b, width)
                        slot = self.where[sym.name]
                        if slot.kind == "state":
                            dprev[slot.index] = _add(dprev[slot.index], r)
                        elif slot.kind == "product":
                            dprod[(slot.index, slot.block)] = _add(dprod.get((slot.index, slot.block)), r)
                        elif slot.kind == "hoisted":
                            dhoist[(slot.index, slot.block)] = _add(dhoist.get((slot.index, slot.block)), r)
                        elif slot.kind == "vector":
                            d_vec[slot.index].append(r.reshape(-1, r.shape[-1]))
                        elif slot.kind == "scalar":
                            d_scal[slot.index] = d_scal[slot.index] + r.sum()
                        elif slot.kind == "input":
                            dx_t[slot.index] = _add(dx_t.get(slot.index), to_width(r, X[slot.index]))
                for gi in gemm_ids:
                    g = self.gemms[gi]
                    blocks = [dprod.get((gi, j), zeros(b, g.widths[j])) for j in range(len(g.products))]
                    dP = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
                    d_step[gi].append(dP)
                    d_op = gemm.input_grad(dP, step_w[gi])
                    slot = self.where[g.operand.name]
                    if slot.kind == "state":
                        dprev[slot.index] = _add(dprev[slot.index], d_op)
                    else:
                        dops[g.operand.name] = _add(dops.get(g.operand.name), d_op)
            for gi, g in enumerate(self.hoisted):
                blocks = [dhoist.get((gi, j), zeros(b, g.widths[j])) for j in range(len(g.products))]
                d_hoisted[gi].append(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
            dx_steps.append(dx_t)
            # rows past b did not run at step t: their gradient passes through unchanged
            dprev = [d if d is not None else zeros(b, self.plan.ir.width(s))
                     for d, s in zip(dprev, self.states, strict=True)]
            dstate = [d if b == N else torch.cat([d, ds[b:]]) for d, ds in zip(dprev, dstate, strict=True)]

        # weight gradients: one GEMM over all time steps per group
        d_step_w = []
        for gi, g in enumerate(self.gemms):
            dP = torch.cat(d_step[gi][::-1])  # [rows, rows of W]
            slot = self.where[g.operand.name]
            if slot.kind == "state":
                opnd = self._previous_all(slot.index, states, news, steps, offsets)
            else:
                opnd = operands[g.operand.name]
            d_step_w.append(gemm.weight_grad(dP, opnd, step_w[gi]))
        dx = {}  # input name -> [rows, its width]
        for name in {n for d in dx_steps for n in d}:
            dx[name] = torch.cat([d[name] if name in d else Xf.new_zeros(b, X[name].shape[1])
                                  for d, b in zip(dx_steps[::-1], steps, strict=True)])
        d_hoisted_w = []
        d_hoist_ops: dict[str, torch.Tensor] = {}
        hoisted_ops = self._hoisted_operands(X, vectors, scalars)
        for gi, g in enumerate(self.hoisted):
            dP = torch.cat(d_hoisted[gi][::-1])
            d_hoisted_w.append(gemm.weight_grad(dP, hoisted_ops[gi], hoisted_w[gi]))
            name = g.operand.name
            if needs_dx or self.where[name].kind != "input":
                d_hoist_ops[name] = _add(d_hoist_ops.get(name), gemm.input_grad(dP, hoisted_w[gi]))
        d_vectors = [torch.cat(v).sum(0) if v else torch.zeros_like(vectors[i]) for i, v in enumerate(d_vec)]
        for st in self.hoist:
            args = [self._static(s, X, vectors, scalars) for s in st.slots]
            grads = [d_hoist_ops.pop(n, None) for n, _ in st.pw.outputs]
            grads = [g if g is not None else Xf.new_zeros(Xf.shape[0], sizes[self.width_of[n]])
                     for g, (n, _) in zip(grads, st.pw.outputs, strict=True)]
            for sym, r in zip(st.pw.grad_inputs, st.backward(*args, *grads), strict=True):
                if r is None:
                    continue
                r = fit_gradient(r, st.pw.kinds[sym.name], Xf.shape[0], sizes[st.pw.width])
                slot = self.where[sym.name]
                if slot.kind == "input":
                    dx[slot.index] = _add(dx.get(slot.index), to_width(r, X[slot.index]))
                elif slot.kind == "vector":
                    d_vectors[slot.index] = d_vectors[slot.index] + r.reshape(-1, r.shape[-1]).sum(0)
                elif slot.kind == "scalar":
                    d_scal[slot.index] = d_scal[slot.index] + r.sum()
        for name, d_op in d_hoist_ops.items():
            if self.where[name].kind == "input":
                dx[name] = _add(dx.get(name), d_op)
        dx = self.join_input_grads(dx, Xf, sizes, hoisted_w, steps, offsets)
        dx = torch.zeros_like(x) if dx is None else dx.reshape(x.shape)
        return dx, dstate, d_hoisted_w, d_step_w, d_vectors, d_scal

    @staticmethod
    def _previous(i, t, states, news, steps, offsets) -> torch.Tensor:
        """State i as step t read it: [b_t, width]."""
        b = steps[t]
        if t == 0:
            return states[i][:b]
        return news[i][offsets[t - 1] : offsets[t - 1] + b]

    def _previous_all(self, i, states, news, steps, offsets) -> torch.Tensor:
        """State i as every step read it, flat like x: [rows, width]."""
        if steps[-1] == steps[0]:  # padded: the initial state, then every new state but the last
            return torch.cat([states[i], news[i][: -steps[0]]])
        return torch.cat([self._previous(i, t, states, news, steps, offsets) for t in range(len(steps))])


def _add(a, b):
    return b if a is None else a + b


def fit_gradient(grad: torch.Tensor, kind: str, rows: int, width: int) -> torch.Tensor:
    """A gradient a pointwise backward returned, as its input takes it. The backward of a function
    that runs over [rows, width] (plan.Pointwise) computes the gradient of each input per element,
    where a value that does not vary along a row may come back as [rows, 1] or a number (the torch
    module broadcasts lazily): it counts once in every column. An input of one value per row
    (kind "row") broadcast over the columns gets their sum (the backward of a broadcast); the
    others get [rows, width] (vectors and scalars are summed by the loop)."""
    if grad.dim() != 2 or grad.shape[0] != rows or grad.shape[1] != width:
        grad = torch.broadcast_to(grad, (rows, width))
    if kind == "row" and width != 1:
        grad = grad.sum(-1, keepdim=True)
    return grad
def to_width(grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The gradient of an input from its elementwise one: summed over the columns for an input of one
    value per sequence ([rows, 1], broadcast over the step's width)."""
    if value.shape[-1] == 1 and grad.shape[-1] != 1:
        return grad.sum(-1, keepdim=True)
    return grad
