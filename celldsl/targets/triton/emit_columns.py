"""Plan -> the Triton kernels of the column schedules, for recurrences without a GEMM on the state.

`time_loop` (elementwise and linear recurrences): each program owns BLOCK (batch row, hidden unit)
columns of the flattened [N, H] state and loops over T with the states in registers, running the
plan's pointwise step (`stage0_step`, inlined); no column reads another, so there is no barrier. The
backward is the same loop in reverse time carrying the state gradients in registers; the vector and
scalar gradients accumulate per column and are reduced once at the end.

`scan` (linear recurrences s' = a * s + b, a and b free of every state): each program owns BLOCK
columns and walks T in chunks of CHUNK steps; inside a chunk `tl.associative_scan` composes the
affine maps s -> a s + b (fp32), and the state carries from one chunk to the next. The backward is
the same scan in reverse time on the state gradients, lambda_t = a_{t+1} lambda_{t+1} + c_t; the
rest of the backward is the plan's pointwise backward over all steps at once. The coefficients come
from the SymPy form of the new states (a = d s'/d s, b = s' at s = 0), never from the cell's name.
"""

from __future__ import annotations

import sympy as sp

from ...lang.functions import Reduction
from ...plan import Plan, cse
from ..printers import PYTHON_RESERVED, identifier
from .applies import coefficients, column_decline, scan_decline, states_plan, whole_rows
from .emit_dense import Arg, Code, parameter_pointers, signature, step_parameters
from .emit_pointwise import (
    KERNEL_LOCALS,
    KNOWN_GLOBALS,
    RESERVED,
    Function,
    TritonPrinter,
    module_names,
    pointwise_sections,
)
from .tiles import Config, cdiv, element_bytes, pow2

COLUMN_LOCALS = {
    "pid", "offs", "batch", "unit", "inside", "t", "tt", "t0", "ti", "steps", "in_t", "step_offset",
    "prev_offset", "rows_t", "live", "live_next", "at", "at_next", "prev_at", "n_chunks",
    "step_offset_ptr", "prev_offset_ptr", "step_rows_ptr", "grad_out_ptr", "out_ptr",
    "T", "N", "H", "BLOCK", "CHUNK", "COMPUTE", "HAS_GRAD_OUT", "last_row", "first_row",
    "scan_coefficients", "time_loop_forward_kernel", "time_loop_backward_kernel", "scan_forward_kernel",
    "scan_backward_kernel",
}  # fmt: skip


class ColumnLayout:
    """The time-loop kernels' names and arguments for one plan (elementwise or linear recurrence)."""

    decline = staticmethod(column_decline)

    def __init__(self, plan: Plan, direct: bool = False):
        reason = self.decline(plan)
        if reason:
            raise ValueError(reason)
        if plan.gemms:  # an output projection: the kernels are those of the states' plan
            plan, direct = states_plan(plan)[0], True
        self.plan = plan
        # direct: the backward also takes, per state, the gradient each new state gets from outside the
        # states' recurrence (an output projection's, computed after the loop: columns.py)
        self.direct = direct
        ir = plan.ir
        (self.pw,) = plan.pointwise
        self.states = list(ir.states)
        self.output_state = self.states.index(ir.output) if ir.output in self.states else None
        self.vectors = [n for n, p in ir.params.items() if p.kind == "vector"]
        self.scalars = [n for n, p in ir.params.items() if p.kind == "scalar"]
        self.hoisted_of = {p: (gi, j) for gi, g in enumerate(plan.hoisted) for j, p in enumerate(g.products)}
        self.elementwise_inputs = [n for n in ir.inputs if any(s.name == n for s in self.pw.inputs)]
        # inputs of one value per sequence (`: 1`): one load per row, broadcast over its units; their
        # gradient is stored per column ([rows, H]) and summed over the row by the host
        self.row_inputs = {n for n in self.elementwise_inputs if ir.width(n) == "row"}
        self.whole_rows = whole_rows(plan)  # a mean or sum over a row: one program per batch row
        self.reduces = {way: Function(self.pw.name, self.pw, plan, backward=way).reduces
                        for way in (False, True)}
        self.step_vectors, self.step_scalars = step_parameters([self.pw], self.vectors, self.scalars)
        taken = set(PYTHON_RESERVED) | RESERVED | KNOWN_GLOBALS | KERNEL_LOCALS | COLUMN_LOCALS
        taken |= set(module_names(plan))
        taken |= {f"hoisted{i}_ptr" for i in range(len(plan.hoisted))}
        taken |= {f"d_hoisted{i}_ptr" for i in range(len(plan.hoisted))}
        self.taken = taken
        pw = self.pw
        self.value = {s: identifier(s.name, taken) for s in [*pw.inputs, *pw.grad_outputs]}
        self.result = {name: identifier(name, taken) for name, _ in pw.outputs}
        self.grad_of = {s: identifier("d_" + s.name, taken) for s in pw.grad_inputs}
        self.carried = {s: identifier(s + "_carried", taken) for s in self.states}  # a state in registers
        self.d_carried = {s: identifier("d_" + s + "_carried", taken) for s in self.states}
        self.accumulated = {s: identifier("d_" + s.name + "_sum", taken) for s in pw.grad_inputs
                            if plan.role(s) in ("vector", "scalar")}
        self.ptr = parameter_pointers(self.elementwise_inputs, self.vectors, self.scalars, taken)
        for i, s in enumerate(self.states):
            for kind in ("init", "seq", "final", "d_final", "d_init", "direct", "lam"):
                self.ptr[(kind, i)] = identifier(s, taken, f"_{kind}_ptr")
        for gi, _ in enumerate(plan.hoisted):
            self.ptr[("hoisted", gi)] = f"hoisted{gi}_ptr"
            self.ptr[("d_hoisted", gi)] = f"d_hoisted{gi}_ptr"

    def hoisted_rows(self, gi: int) -> int:
        return len(self.plan.hoisted[gi].params)

    def _inputs(self) -> list[Arg]:
        a = [Arg(self.ptr[("x", n)], "x", n, "storage") for n in self.elementwise_inputs]
        a += [Arg(self.ptr[("hoisted", i)], "hoisted", i, "storage") for i in range(len(self.plan.hoisted))]
        a += [Arg(self.ptr[("vector", i)], "vector", i, "storage") for i in range(len(self.vectors))]
        a += [Arg(self.ptr[("scalar", i)], "scalar", i, "storage") for i in range(len(self.scalars))]
        return a

    def _steps(self) -> list[Arg]:
        return [Arg("step_offset_ptr", "step_offset", None, "int32"),
                Arg("prev_offset_ptr", "prev_offset", None, "int32"),
                Arg("step_rows_ptr", "step_rows", None, "int32"),
                Arg("T", "T", None, "i32"), Arg("N", "N", None, "i32"), Arg("H", "H", None, "i32")]

    def _per_state(self, kind: str, dtype: str = "storage") -> list[Arg]:
        return [Arg(self.ptr[(kind, i)], kind, i, dtype) for i in range(len(self.states))]

    def forward_args(self) -> list[Arg]:
        a = self._inputs() + self._per_state("init") + self._per_state("seq") + self._per_state("final")
        if self.output_state is None:
            a.append(Arg("out_ptr", "out", None, "storage"))
        return a + self._steps()

    def backward_args(self) -> list[Arg]:
        a = self._inputs() + self._per_state("init") + self._per_state("seq")
        a += [Arg("grad_out_ptr", "grad_out", None, "storage")] + self._per_state("d_final")
        a += [Arg(self.ptr[("d_hoisted", i)], "d_hoisted", i, "storage")
              for i in range(len(self.plan.hoisted))]
        a += [Arg(self.ptr[("d_x", n)], "d_x", n, "storage") for n in self.elementwise_inputs]
        a += [Arg(self.ptr[("d_vector", i)], "d_vector", i, "compute") for i in range(len(self.vectors))]
        a += [Arg(self.ptr[("d_scalar", i)], "d_scalar", i, "compute") for i in range(len(self.scalars))]
        a += self._per_state("direct") if self.direct else []
        return a + self._per_state("d_init") + self._steps()


class ScanLayout(ColumnLayout):
    """The scan kernels of a recurrence linear in each state alone: s' = a * s + b."""

    decline = staticmethod(scan_decline)

    def __init__(self, plan: Plan, direct: bool = False):
        reason = self.decline(plan)
        if reason:
            raise ValueError(reason)
        super().__init__(plan, direct)
        self.coef = coefficients(self.plan)  # state -> (a, b)
        leaves = set().union(*(a.free_symbols | b.free_symbols for a, b in self.coef.values()))
        self.coef_inputs = [s for s in self.pw.inputs if s in leaves]
        self.coef_reduces = any(e.atoms(Reduction) for pair in self.coef.values() for e in pair)
        self.coef_names = {s: (identifier("a_" + s, self.taken), identifier("b_" + s, self.taken))
                           for s in self.states}

    def forward_args(self) -> list[Arg]:
        return (self._inputs() + self._per_state("init") + self._per_state("seq") + self._per_state("final")
                + self._steps())

    def backward_args(self) -> list[Arg]:
        return (self._inputs() + self._per_state("direct") + self._per_state("d_final")
                + self._per_state("lam") + self._steps())


# ---- emission ----------------------------------------------------------------------------------


def _columns(code: Code, L: ColumnLayout) -> None:
    code(1, "pid = tl.program_id(0)")
    if L.whole_rows:  # the step reduces over a row: this program holds all H units of batch row pid
        code(1, "unit = tl.arange(0, BLOCK)  # BLOCK >= H: the whole row")
        code(1, "batch = pid + unit * 0")
        code(1, "inside = unit < H")
        code(1, "offs = batch * H + unit")
        return
    code(1, "offs = pid * BLOCK + tl.arange(0, BLOCK)  # columns of the flattened [N, H] state")
    code(1, "batch, unit = offs // H, offs % H")
    code(1, "inside = offs < N * H")


def _load(L: ColumnLayout, s: sp.Symbol, at: str, mask: str, unit: str = "unit") -> str:
    role = L.plan.role(s)
    if role == "hoisted":
        gi, j = L.hoisted_of[s]
        return (f"tl.load({L.ptr[('hoisted', gi)]} + {at} * {L.hoisted_rows(gi)} * H + {j} * H + {unit}, "
                f"mask={mask}, other=0.0).to(COMPUTE)")
    if role == "input" and s.name in L.row_inputs:  # [rows, 1]: the row's one value in each of its units
        return f"tl.load({L.ptr[('x', s.name)]} + {at}, mask={mask}, other=0.0).to(COMPUTE)"
    if role == "input":
        return f"tl.load({L.ptr[('x', s.name)]} + {at} * H + {unit}, mask={mask}, other=0.0).to(COMPUTE)"
    if role == "vector":
        ptr = L.ptr[("vector", L.vectors.index(s.name))]
        return f"tl.load({ptr} + {unit}, mask={mask}, other=0.0).to(COMPUTE)"
    if role == "scalar":
        return f"tl.load({L.ptr[('scalar', L.scalars.index(s.name))]}).to(COMPUTE)"
    raise AssertionError(role)


def _step_header(code: Code, depth: int) -> None:
    code(depth, "step_offset = tl.load(step_offset_ptr + t)")
    code(depth, "rows_t = tl.load(step_rows_ptr + t)  # sequences still running at step t (packed input)")
    code(depth, "live = inside & (batch < rows_t)")
    code(depth, "at = (step_offset + batch).to(tl.int64)")


def time_loop_forward(L: ColumnLayout) -> str:
    code, pw = Code(), L.pw
    signature(code, "time_loop_forward_kernel", L.forward_args(), ("BLOCK", "COMPUTE"))
    _columns(code, L)
    code(1, "# the states live in registers for all T steps")
    for i, s in enumerate(L.states):
        code(1, f"{L.carried[s]} = tl.load({L.ptr[('init', i)]} + offs, mask=inside, other=0.0).to(COMPUTE)")
    fixed = [s for s in pw.inputs if L.plan.role(s) in ("vector", "scalar")]
    if fixed:
        code(1, "# parameters of this program's hidden units, loaded once")
    for s in fixed:
        code(1, f"{L.value[s]} = {_load(L, s, 'at', 'inside')}")
    code(1, "for t in range(T):")
    _step_header(code, 2)
    for s in pw.inputs:
        role = L.plan.role(s)
        if role == "state":
            code(2, f"{L.value[s]} = {L.carried[s.name]}")
        elif role not in ("vector", "scalar"):
            code(2, f"{L.value[s]} = {_load(L, s, 'at', 'live')}")
    f = Function(pw.name, pw, L.plan, backward=False)
    outs = [L.result[pw.outputs[i][0]] for i in f.unique]
    row_args = ["live", "H"] if L.reduces[False] else []  # a mean or sum over the row's live units
    args = ", ".join([*(L.value[s] for s in pw.inputs), *row_args])
    code(2, f"({', '.join(outs)},) = {pw.name}_step({args})")
    for i, (name, _) in enumerate(pw.outputs):
        value = L.result[pw.outputs[f.unique[f.slot_of[i]]][0]]
        if name.endswith("'") and name[:-1] in L.states:
            si = L.states.index(name[:-1])
            code(2, f"tl.store({L.ptr[('seq', si)]} + at * H + unit, {value}.to({L.ptr[('seq', si)]}"
                    ".dtype.element_ty), mask=live)")
        else:
            code(2, f"tl.store(out_ptr + at * H + unit, {value}.to(out_ptr.dtype.element_ty), mask=live)")
    for s in L.states:  # a finished sequence keeps its state
        new = L.result[pw.outputs[f.unique[f.slot_of[[n for n, _ in pw.outputs].index(s + "'")]]][0]]
        code(2, f"{L.carried[s]} = tl.where(live, {new}, {L.carried[s]})")
    for i, s in enumerate(L.states):
        ptr = L.ptr[("final", i)]
        code(1, f"tl.store({ptr} + offs, {L.carried[s]}.to({ptr}.dtype.element_ty), mask=inside)")
    return code.text()


def time_loop_backward(L: ColumnLayout) -> str:
    code, pw, plan = Code(), L.pw, L.plan
    signature(code, "time_loop_backward_kernel", L.backward_args(), ("BLOCK", "COMPUTE", "HAS_GRAD_OUT"))
    _columns(code, L)
    code(1, "# the gradients of the states, in registers for all T steps (from the final states' gradients)")
    for i, s in enumerate(L.states):
        ptr = L.ptr[("d_final", i)]
        code(1, f"{L.d_carried[s]} = tl.load({ptr} + offs, mask=inside, other=0.0).to(COMPUTE)")
    for s, acc in L.accumulated.items():
        code(1, f"{acc} = tl.full((BLOCK,), 0.0, COMPUTE)  # this column's share of d {s.name}")
    fixed = [s for s in pw.inputs if plan.role(s) in ("vector", "scalar")]
    for s in fixed:
        code(1, f"{L.value[s]} = {_load(L, s, 'at', 'inside')}")
    code(1, "for tt in range(T):")
    code(2, "t = T - 1 - tt")
    _step_header(code, 2)
    code(2, "prev_at = (tl.load(prev_offset_ptr + t) + batch).to(tl.int64)")
    for s in pw.inputs:
        role = plan.role(s)
        if role == "state":
            i = L.states.index(s.name)
            code(2, f"{L.value[s]} = tl.load({L.ptr[('init', i)]} + offs, mask=live & (batch * 0 + t == 0), "
                    f"other=0.0).to(COMPUTE) + tl.load({L.ptr[('seq', i)]} + prev_at * H + unit, "
                    "mask=live & (batch * 0 + t > 0), other=0.0).to(COMPUTE)")
        elif role not in ("vector", "scalar"):
            code(2, f"{L.value[s]} = {_load(L, s, 'at', 'live')}")
    for (name, _), g in zip(pw.outputs, pw.grad_outputs, strict=True):
        local = L.value[g]
        if name.endswith("'") and name[:-1] in L.states:
            si = L.states.index(name[:-1])
            code(2, f"{local} = {L.d_carried[name[:-1]]}")
            if L.direct:
                ptr = L.ptr[("direct", si)]
                code(2, f"{local} += tl.load({ptr} + at * H + unit, mask=live, other=0.0).to(COMPUTE)")
            if si == L.output_state:
                code(2, "if HAS_GRAD_OUT:")
                code(3, f"{local} += tl.load(grad_out_ptr + at * H + unit, mask=live, other=0.0).to(COMPUTE)")
        else:
            code(2, "if HAS_GRAD_OUT:")
            code(3, f"{local} = tl.load(grad_out_ptr + at * H + unit, mask=live, other=0.0).to(COMPUTE)")
            code(2, "else:")
            code(3, f"{local} = tl.full((BLOCK,), 0.0, COMPUTE)")
    f = Function(pw.name, pw, plan, backward=True)
    new_grad = {}
    if f.unique:
        uniq = [L.grad_of[pw.grad_inputs[i]] for i in f.unique]
        row_args = ["live", "H"] if L.reduces[True] else []
        code(2, f"({', '.join(uniq)},) = {pw.name}_step_grad("
                f"{', '.join([*(L.value[s] for s in [*pw.inputs, *pw.grad_outputs]), *row_args])})")
        for i, s in enumerate(pw.grad_inputs):
            if i not in f.slot_of:
                continue
            value = uniq[f.slot_of[i]]
            role = plan.role(s)
            if role == "hoisted":
                gi, j = L.hoisted_of[s]
                ptr = L.ptr[("d_hoisted", gi)]
                code(2, f"tl.store({ptr} + at * {L.hoisted_rows(gi)} * H + {j} * H + unit, "
                        f"{value}.to({ptr}.dtype.element_ty), mask=live)")
            elif role == "input":
                ptr = L.ptr[("d_x", s.name)]
                code(2, f"tl.store({ptr} + at * H + unit, {value}.to({ptr}.dtype.element_ty), mask=live)")
            elif role in ("vector", "scalar"):
                code(2, f"{L.accumulated[s]} += tl.where(live, {value}, 0.0)")
            elif role == "state":
                new_grad[s.name] = value
    for s in L.states:  # rows that did not run at step t pass their gradient through
        value = new_grad.get(s, "0.0")
        code(2, f"{L.d_carried[s]} = tl.where(live, {value}, {L.d_carried[s]})")
    for s, acc in L.accumulated.items():
        kind = "d_vector" if plan.role(s) == "vector" else "d_scalar"
        index = (L.vectors if kind == "d_vector" else L.scalars).index(s.name)
        code(1, f"tl.store({L.ptr[(kind, index)]} + offs, {acc}, mask=inside)")
    for i, s in enumerate(L.states):
        ptr = L.ptr[("d_init", i)]
        code(1, f"tl.store({ptr} + offs, {L.d_carried[s]}.to({ptr}.dtype.element_ty), mask=inside)")
    return code.text()


def scan_coefficients_function(L: ScanLayout) -> str:
    """`scan_coefficients(inputs) -> (a, b) per state`: the affine map of one step, pure math."""
    exprs = [e for s in L.states for e in L.coef[s]]
    temps, results = cse(exprs, "t")
    names = dict(L.value)
    taken = set(L.taken)
    for t, _ in temps:
        names[t] = identifier(t.name, taken)
    printer = ChunkPrinter(names)
    code = Code()
    code(0, "@triton.jit")
    row_args = ["live", "H"] if L.coef_reduces else []
    code(0, f"def scan_coefficients({', '.join([*(L.value[s] for s in L.coef_inputs), *row_args])}):")
    pairs = ", ".join(f"{a} * {s} + {b}" for s, (a, b) in ((s, L.coef_names[s]) for s in L.states))
    code(1, f"# one step as s' = a * s + b for every state: {pairs}; (a, b) per state")
    for t, e in temps:
        code(1, f"{names[t]} = {printer.doprint(e)}")
    outs = []
    ref = next((L.value[s] for s in L.coef_inputs if L.plan.role(s) in ("hoisted", "input")), None)
    for r in results:
        if not r.free_symbols:
            outs.append(f"tl.full({ref}.shape, {float(r)!r}, {ref}.dtype)" if ref else f"{float(r)!r}")
        else:
            outs.append(printer.doprint(r))
    code(1, f"return ({', '.join(outs)},)")
    return code.text()


def _chunk_loads(code: Code, L: ScanLayout, depth: int, at: str, live: str) -> None:
    for s in L.coef_inputs:
        role = L.plan.role(s)
        if role == "scalar":
            code(depth, f"{L.value[s]} = {_load(L, s, at, live)}")
        elif role == "vector":
            code(depth, f"{L.value[s]} = {_load(L, s, at, 'inside', 'unit')}[None, :]")
        else:
            code(depth, f"{L.value[s]} = {_load(L, s, at, live, 'unit[None, :]')}")


def _coefficients_call(L: ScanLayout, live: str) -> str:
    pairs = ", ".join(f"{a}, {b}" for a, b in (L.coef_names[s] for s in L.states))
    row_args = [live, "H"] if L.coef_reduces else []  # the live units a mean or sum runs over
    return f"({pairs},) = scan_coefficients({', '.join([*(L.value[s] for s in L.coef_inputs), *row_args])})"


class ChunkPrinter(TritonPrinter):
    """The scan's coefficients run on [CHUNK, BLOCK] tiles whose rows are steps: a mean or sum over a
    batch row's units is over axis 1 (the program holds whole rows), kept as [CHUNK, 1]."""

    functions = {**TritonPrinter.functions,
                 "rowsum": "tl.reduce(tl.where(live, {}, 0.0), 1, lib.add)[:, None]",
                 "rowmean": "(tl.reduce(tl.where(live, {}, 0.0), 1, lib.add)[:, None] / H)"}


def scan_forward(L: ScanLayout) -> str:
    code = Code()
    signature(code, "scan_forward_kernel", L.forward_args(), ("BLOCK", "CHUNK", "COMPUTE"))
    _columns(code, L)
    code(1, "last_row = (tl.arange(0, CHUNK) == CHUNK - 1)[:, None]")
    code(1, "# the state entering the chunk, carried from one chunk to the next")
    for i, s in enumerate(L.states):
        code(1, f"{L.carried[s]} = tl.load({L.ptr[('init', i)]} + offs, mask=inside, other=0.0).to(COMPUTE)")
    code(1, "for t0 in range(0, T, CHUNK):")
    code(2, "steps = t0 + tl.arange(0, CHUNK)")
    code(2, "in_t = steps < T")
    code(2, "step_offset = tl.load(step_offset_ptr + steps, mask=in_t, other=0)")
    code(2, "rows_t = tl.load(step_rows_ptr + steps, mask=in_t, other=0)")
    code(2, "live = in_t[:, None] & (batch[None, :] < rows_t[:, None]) & inside[None, :]  # [CHUNK, BLOCK]")
    code(2, "at = (step_offset[:, None] + batch[None, :]).to(tl.int64)")
    _chunk_loads(code, L, 2, "at", "live")
    code(2, _coefficients_call(L, "live"))
    for i, s in enumerate(L.states):
        a, b = L.coef_names[s]
        code(2, f"# {s}_t = A_t * {s}_(t0 - 1) + B_t: the composition of this chunk's maps up to step t")
        code(2, f"{a} = tl.where(live, {a}, 1.0)  # a step that does not run keeps the state")
        code(2, f"{b} = tl.where(live, {b}, 0.0)")
        code(2, f"{a}, {b} = tl.associative_scan(({a}, {b}), 0, lib.compose_affine)")
        code(2, f"{b} = {a} * {L.carried[s]}[None, :] + {b}")
        ptr = L.ptr[("seq", i)]
        code(2, f"tl.store({ptr} + at * H + unit[None, :], {b}.to({ptr}.dtype.element_ty), mask=live)")
        code(2, f"{L.carried[s]} = lib.pick_row({b}, last_row)")
    for i, s in enumerate(L.states):
        ptr = L.ptr[("final", i)]
        code(1, f"tl.store({ptr} + offs, {L.carried[s]}.to({ptr}.dtype.element_ty), mask=inside)")
    return code.text()


def scan_backward(L: ScanLayout) -> str:
    code = Code()
    signature(code, "scan_backward_kernel", L.backward_args(), ("BLOCK", "CHUNK", "COMPUTE"))
    _columns(code, L)
    code(1, "first_row = (tl.arange(0, CHUNK) == 0)[:, None]")
    code(1, "# lambda_t = d loss / d s_t = a_(t+1) * lambda_(t+1) + c_t, c_t the gradient s_t gets directly")
    code(1, "# (the output's, and the final state's at a sequence's last step); chunks from the last")
    for s in L.states:
        code(1, f"{L.d_carried[s]} = tl.full((BLOCK,), 0.0, COMPUTE)  # lambda entering from the later chunk")
    code(1, "n_chunks = (T + CHUNK - 1) // CHUNK")
    code(1, "for ti in range(0, n_chunks):")
    code(2, "steps = (n_chunks - 1 - ti) * CHUNK + tl.arange(0, CHUNK)")
    code(2, "in_t = steps < T")
    code(2, "step_offset = tl.load(step_offset_ptr + steps, mask=in_t, other=0)")
    code(2, "rows_t = tl.load(step_rows_ptr + steps, mask=in_t, other=0)")
    code(2, "live = in_t[:, None] & (batch[None, :] < rows_t[:, None]) & inside[None, :]")
    code(2, "at = (step_offset[:, None] + batch[None, :]).to(tl.int64)")
    code(2, "# step t + 1, whose coefficient a multiplies lambda_(t+1)")
    code(2, "in_t = steps + 1 < T")
    code(2, "step_offset = tl.load(step_offset_ptr + steps + 1, mask=in_t, other=0)")
    code(2, "rows_t = tl.load(step_rows_ptr + steps + 1, mask=in_t, other=0)")
    code(2, "live_next = in_t[:, None] & (batch[None, :] < rows_t[:, None]) & inside[None, :]")
    code(2, "at_next = (step_offset[:, None] + batch[None, :]).to(tl.int64)")
    _chunk_loads(code, L, 2, "at_next", "live_next")
    code(2, _coefficients_call(L, "live_next"))
    for i, s in enumerate(L.states):
        a, b = L.coef_names[s]
        direct = L.ptr[("direct", i)]
        code(2, f"{a} = tl.where(live_next, {a}, 0.0)  # a sequence's last step: nothing comes after it")
        code(2, f"{b} = tl.where(live, tl.load({direct} + at * H + unit[None, :], mask=live, other=0.0)"
                ".to(COMPUTE), 0.0)")
        final = L.ptr[("d_final", i)]
        code(2, f"{b} += tl.where(live & ~live_next, tl.load({final} + offs, mask=inside, other=0.0)"
                ".to(COMPUTE)[None, :], 0.0)")
        code(2, f"{a}, {b} = tl.associative_scan(({a}, {b}), 0, lib.compose_affine, reverse=True)")
        code(2, f"{b} = {a} * {L.d_carried[s]}[None, :] + {b}")
        ptr = L.ptr[("lam", i)]
        code(2, f"tl.store({ptr} + at * H + unit[None, :], {b}.to({ptr}.dtype.element_ty), mask=live)")
        code(2, f"{L.d_carried[s]} = lib.pick_row({b}, first_row)")
    return code.text()


def column_config(plan: Plan, schedule: str, N: int, H: int, T: int, dtype, interpret: bool):
    """The launch of the time_loop or scan schedule at these sizes (tiles.Config)."""
    columns = N * H
    size = element_bytes(dtype)
    if plan.gemms:  # an output projection: the kernels are those of the states' plan
        plan = states_plan(plan)[0]
    rows = whole_rows(plan)  # a mean or sum over a row: one program per batch row, all H units
    if schedule == "time_loop":
        block = pow2(H) if rows else min(1024, pow2(columns)) if interpret else 128
        grid = (N,) if rows else (cdiv(columns, block),)
        reads = sum(len(g.params) for g in plan.hoisted) + len(ColumnLayout(plan).elementwise_inputs)
        writes = len(plan.ir.states) + (plan.ir.output not in plan.ir.states)
        held = f"a whole batch row (H = {H} in {block} lanes: the step takes a mean or sum over it)" if rows \
            else f"{block} (batch, hidden) columns"
        details = [
            f"{grid[0]} program(s) of {held}, each looping over the {T} steps with "
            f"the {len(plan.ir.states)} state(s) in registers; no barrier",
            f"memory per step: reads {reads}H, writes {writes}H numbers per sequence ({size}-byte "
            "storage): the floor is bandwidth",
        ]
        return Config("time_loop", True, "no column reads another: one launch per sequence, states in "
                      "registers", grid, {"BLOCK": block}, 4, details)
    block = pow2(H) if rows else min(256, pow2(columns)) if interpret else 32
    chunk = 16 if interpret else 64
    if rows:  # a [CHUNK, whole row] tile: at most 4096 numbers per state
        chunk = max(2, min(chunk, 4096 // block))
    grid = (N,) if rows else (cdiv(columns, block),)
    details = [
        f"{grid[0]} program(s) of {block} columns; T in chunks of {chunk} steps: tl.associative_scan of the "
        f"affine maps s -> a s + b inside a chunk ({chunk} x {block} tile), the state carried across chunks",
        "backward: the same scan in reverse time on the state gradients, then the pointwise backward of "
        "all steps at once",
    ]
    return Config("scan", True, "linear in each state: a chunked parallel scan over T", grid,
                  {"BLOCK": block, "CHUNK": chunk}, 4, details)


def column_source(plan: Plan) -> str:
    parts = []
    projected = bool(plan.gemms) and not column_decline(plan)
    if projected:  # an output projection: the states' plan's functions, then its kernels
        plan = states_plan(plan)[0]
        parts += [f"# ---- the states' recurrence alone (the output projection runs after it) {'-' * 27}",
                  *pointwise_sections(plan)]
    if not column_decline(plan):
        L = ColumnLayout(plan, direct=projected)
        parts += [f"# ---- time_loop schedule {'-' * 76}", TIME_LOOP_DOC.strip("\n") + "\n",
                  time_loop_forward(L), time_loop_backward(L)]
    if not scan_decline(plan):
        S = ScanLayout(plan, direct=projected)
        parts += [f"# ---- scan schedule {'-' * 81}", SCAN_DOC.strip("\n") + "\n",
                  scan_coefficients_function(S), scan_forward(S), scan_backward(S)]
    return "\n\n".join(p.strip("\n") + "\n" for p in parts)


TIME_LOOP_DOC = '''
# One program per BLOCK (batch row, hidden unit) columns; it loops over T with the states in
# registers (no column reads another: no barrier). Step t owns rows step_offset[t] .. + step_rows[t]
# of every [rows, .] sequence; a column whose sequence has ended keeps its state.
'''

SCAN_DOC = '''
# The same columns, T in chunks of CHUNK steps: tl.associative_scan composes a chunk's affine maps
# s -> a s + b (fp32; no division, so no range problem: see docs/triton.md), and the state carries
# from chunk to chunk. The backward scans the state gradients the same way in reverse time.
'''
