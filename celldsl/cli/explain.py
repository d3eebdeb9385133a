"""`celldsl explain`: the plan of a compiled cell as a person reads it.

Shows the cell's inputs, states and parameters with their shapes in I (input size), H (hidden
size) and C_<name> (the size of each further input, e.g. C_ctx), the concatenated GEMMs per stage
(hoisted ones run once over all time steps), the fused pointwise forward of every stage as it runs
(CSE'd, products written `W@x`), the size of the derived backward and what it reads of each step,
FLOPs per step, the recurrence kind, and the Triton schedules (with `sizes`, the launch of each and
the compiler's choice).
"""

from __future__ import annotations

import re

import sympy as sp

from ..lang.errors import printable
from ..lang.ir import H as HIDDEN
from ..plan import Gemm, Plan, coupled_states

I_SYM, H_SYM = sp.Symbol("I", positive=True), sp.Symbol("H", positive=True)
EXAMPLE = {I_SYM: 256, H_SYM: 256}  # sizes for the worked FLOP numbers

RECURRENCE_WORDS = {
    "dense": "dense: a GEMM on the state every step",
    "linear": "linear in the state: s' = a * s + b with a, b free of states "
              "(each state is a scan of its own)",
    "coupled": "linear in the states, but coupled: s' = a * s + b with b reading another state ({reads}), "
               "so not a scan of independent columns",
    "elementwise": "elementwise: the state enters only elementwise, but not linearly",
}


def recurrence_words(plan: Plan) -> str:
    """The recurrence kind as a sentence. A linear recurrence is called a scan of independent
    columns only when no state's update reads another state, and a per-step GEMM that only the
    output reads (an output projection) is named as such, not as a GEMM on the state."""
    words = RECURRENCE_WORDS.get(plan.recurrence, plan.recurrence)
    coupled = coupled_states(plan) if plan.recurrence == "linear" else {}
    if coupled:
        reads = "; ".join(f"{s}' reads {', '.join(o)}" for s, o in coupled.items())
        words = RECURRENCE_WORDS["coupled"].format(reads=reads)
    if plan.gemms and plan.recurrence != "dense":
        names = ", ".join(p for g in plan.gemms for p in g.params)
        words += f"; the per-step GEMM [{names}] is an output projection: only the output reads it, no state"
    return words


def explain(compiled, sizes: dict | None = None) -> str:
    """A multi-line description of `compiled.plan` (a CompiledCell); `sizes` ({"N", "H", "T", "dtype"})
    adds the launch every Triton schedule would make at those sizes and the one the compiler picks."""
    if getattr(compiled, "plan", None) is None:  # a matrix-memory cell (compiler.CompiledMatrixCell)
        return compiled.explain()
    plan: Plan = compiled.plan
    ir = plan.ir
    names = _display_names(plan)
    out: list[str] = []
    title = f"cell {ir.name}" + (f": {printable(ir.doc)}" if ir.doc else "")
    out += [title, f"  file: {printable(ir.source.filename)}"]
    if ir.cite:
        out.append(f"  source: {printable(ir.cite)}")

    out += ["", "inputs:"]
    out += [f"  {x}  [{_width(ir.width(x), ir)}]" for x in ir.inputs]
    out += ["states (the layer's state tuple, in this order):"]
    for i, s in enumerate(ir.states):
        extra = "  (carried for prev(); starts at zero)" if i >= ir.declared_states else ""
        out.append(f"  {s}  [{_width(ir.width(s), ir)}]{extra}")
    output_width = _width(ir.width(ir.output), ir)
    note = "" if ir.output_declared else "  (no output line: the cell's one state)"
    out.append(f"output: {ir.output}" + ("'" if ir.output in ir.states else "") + f"  [{output_width}]{note}")
    for (a, b), loc in ir.same_widths.items():
        where = f"line {loc.line}, column {loc.column}" if loc else "?"
        first, second = (b, a) if a == HIDDEN else (a, b)
        what = f"input '{first}'" if first in ir.inputs else f"{first}-wide values"
        out.append(f"needs {_size_sym(first, ir)} == {_size_sym(second, ir)}: {what} meets "
                   f"{_width_words(second, ir)} elementwise ({where})")

    out += ["", "parameters:"]
    total = sp.Integer(0)
    for store, members, kind, shape, size in _stores(ir):
        total += size * len(members)
        group = f" = [{', '.join(members)}]" if members != (store,) else ""
        applied = ""
        if kind == "matrix":
            operand = ir.params[members[0]].operand_size
            target = f"input {operand}" if operand in ir.inputs else _width_words(operand, ir)
            applied = ", applied to " + target
        out.append(f"  {store}{group}  {shape}  ({kind}{applied})")
    out.append(f"  total: {_poly(total)} numbers per layer and direction")

    out += ["", "GEMMs (one per operand and stage; W stacks the rows of the listed parameters):"]
    for g in plan.hoisted:
        out.append(f"  hoisted (once over all T steps): {_gemm(g, plan)}")
    for k in range(1, plan.num_stages + 1):
        for g in plan.gemms_of_stage(k):
            out.append(f"  stage {k}: {_gemm(g, plan)}")
    if not plan.hoisted and not plan.gemms:
        out.append("  none")
    out.append(f"  {plan.num_stages} GEMM stage(s) per step")
    out.append(f"recurrence: {recurrence_words(plan)}")

    out += ["", "forward, fused per stage (intermediates inlined, CSE'd; W@x is a row block of a GEMM):"]
    stages = plan.all_pointwise()
    for pw in stages:
        where = "before the loop" if pw.stage < 0 else f"pointwise {pw.stage}"
        where += f" [{_width(pw.width, ir)}]" if len(plan.pointwise_of_stage(pw.stage)) > 1 else ""
        inputs = ", ".join(names.get(s, s.name) for s in pw.inputs)
        out.append(f"  {where} (reads {inputs}):")
        for t, e in pw.forward_temps:
            out.append(f"    {t} = {_show(e, names)}")
        for (name, _), e in zip(pw.outputs, pw.forward_results, strict=True):
            out.append(f"    {name} = {_show(e, names)}")

    fwd_ops = sum(pw.forward_ops() for pw in stages)
    bwd_ops = sum(pw.backward_ops() for pw in stages)
    out += ["", "derived backward (chain rule on the SymPy forward, CSE'd; recomputes forward temps):"]
    for pw in stages:
        where = "before the loop" if pw.stage < 0 else f"pointwise {pw.stage}"
        where += f" [{_width(pw.width, ir)}]" if len(plan.pointwise_of_stage(pw.stage)) > 1 else ""
        grads = ", ".join(names.get(s, s.name) for s in pw.grad_inputs)
        out.append(
            f"  {where}: {len(pw.backward_temps)} temps, {pw.backward_ops()} ops "
            f"(forward {pw.forward_ops()} ops); gradients of {grads}"
        )
    out.append(f"  total: {bwd_ops} backward ops, {fwd_ops} forward ops")
    saved = [(what, sum((_size_sym(w, ir) for w in widths), sp.Integer(0)))
             for what, widths in plan.saved_per_step()]
    total = _compact(sum((w for _, w in saved), sp.Integer(0)))
    out.append(f"  saved per step for the backward ({total} numbers per sequence):")
    out += [f"    {what}  [{_compact(w)}]" for what, w in saved]

    hoisted = sum(_gemm_flops(g, ir) for g in plan.hoisted)
    step = sum(_gemm_flops(g, ir) for g in plan.gemms)
    pointwise = sp.Integer(sum(pw.forward_ops() for pw in plan.pointwise)) * H_SYM
    before = sp.Integer(sum(pw.forward_ops() for pw in plan.hoist_pointwise)) * I_SYM
    forward = hoisted + step + pointwise + before
    out += ["", "FLOPs per step and sequence (a multiply-add is 2; a pointwise op or function is 1):"]
    out.append(f"  hoisted GEMMs: {_poly(hoisted)}")
    out.append(f"  step GEMMs: {_poly(step)}")
    out.append(f"  pointwise: {_poly(pointwise + before)}")
    at = " = ".join(["I", "H", *(f"C_{n}" for n in ir.inputs[1:])]) + " = 256"
    out.append(f"  forward total: {_poly(forward)}  (at {at}: {_mega(forward)})")
    hoist_bwd = sum(pw.backward_ops() for pw in plan.hoist_pointwise)
    backward = 2 * (hoisted + step) + (bwd_ops - hoist_bwd) * H_SYM + hoist_bwd * I_SYM
    out.append(
        f"  backward: {_poly(backward)}  (GEMMs twice: input and weight gradients; "
        f"at {at}: {_mega(backward)})"
    )
    from ..targets import NAMES, target

    for name in NAMES:  # what each target runs, and at `sizes` how (the torch target adds nothing)
        out += target(name).describe(plan, sizes)
    return "\n".join(out)


# ---- helpers -----------------------------------------------------------------------------------


def _size_sym(name: str, ir) -> sp.Expr:
    """The size of a width: H, I (the first input), C_<name> (any further input), 1 (one value per
    sequence) or a width the cell declares (P)."""
    if name == HIDDEN:
        return H_SYM
    if name == "row":
        return sp.Integer(1)
    if name in ir.inputs:
        return I_SYM if name == ir.inputs[0] else sp.Symbol(f"C_{name}", positive=True)
    return sp.Symbol(name, positive=True)


def _width_words(name: str, ir) -> str:
    if name == HIDDEN:
        return "H-wide values"
    return f"input '{name}'" if name in ir.inputs else f"{name}-wide values"


def _width(name: str, ir) -> str:
    return str(_size_sym(name, ir))


def _stores(ir):
    """(stored name, members, kind, shape text, numbers per member as a polynomial in I, H)."""
    seen, found = set(), []
    for name, p in ir.params.items():
        if p.group is not None and p.group in seen:
            continue
        members = tuple(ir.groups[p.group]) if p.group is not None else (name,)
        store = p.group if p.group is not None else name
        seen.add(store)
        n = len(members)
        if p.kind == "matrix":
            rows, cols = _size_sym(p.rows, ir), _size_sym(p.operand_size, ir)
            heads = f" in {p.heads} heads (block-diagonal)" if p.heads else ""
            shape, size = f"{_times(n)}{rows} x {cols}{heads}", rows * cols / (p.heads or 1)
        elif p.kind == "vector":
            width = _size_sym(p.rows, ir)
            shape, size = f"{_times(n)}{width}", width
        else:
            shape, size = "1" if n == 1 else str(n), sp.Integer(1)
        found.append((store, members, p.kind, shape, size))
    return found


def _gemm(g: Gemm, plan: Plan) -> str:
    cols = _size_sym(g.operand_size, plan.ir)
    operand = g.operand.name
    rows = _compact(_rows(g, plan.ir))
    text = f"[{', '.join(g.params)}] ({rows} x {cols}) @ {operand}"
    if plan.roles.get(g.operand) == "operand":
        text += f",  {operand} = {_operand_expr(g, plan)}"
    return text


def _operand_expr(g: Gemm, plan: Plan) -> str:
    names = _display_names(plan)
    stages = plan.all_pointwise()
    for pw in stages:
        for name, e in pw.outputs:
            if name == g.operand.name:
                return _show(e, names)
    return "?"


def _display_names(plan: Plan) -> dict[sp.Symbol, str]:
    """Product symbols (`W@`, `W@1`) shown as `W@x`, `W@operand3`."""
    names = {}
    for g in [*plan.hoisted, *plan.gemms]:
        for param, sym in zip(g.params, g.products, strict=True):
            names[sym] = f"{param}@{g.operand.name}"
    return names


def _show(expr: sp.Expr, names: dict[sp.Symbol, str]) -> str:
    shown = expr.xreplace({s: sp.Symbol(n) for s, n in names.items() if s in expr.free_symbols})
    return sp.sstr(shown)


def _times(n: int) -> str:
    return "" if n == 1 else str(n)


def _compact(e: sp.Expr) -> str:
    """A size as papers write it: 4H, 3H + P."""
    return re.sub(r"(\d)\*", r"\1", sp.sstr(e))


def _rows(g: Gemm, ir) -> sp.Expr:
    return sum((_size_sym(w, ir) for w in g.widths), sp.Integer(0))


def _gemm_flops(g: Gemm, ir) -> sp.Expr:
    return 2 * _rows(g, ir) * _size_sym(g.operand_size, ir)


def _poly(e: sp.Expr) -> str:
    e = sp.expand(e)
    if e == 0:
        return "0"
    gens = sorted(e.free_symbols | {H_SYM, I_SYM}, key=str)
    terms = sorted(sp.Add.make_args(e), key=lambda t: -sp.Poly(t, *gens).total_degree())
    return " + ".join(sp.sstr(t).replace("**", "^") for t in terms)


def _mega(e: sp.Expr) -> str:
    return f"{float(e.subs(EXAMPLE).subs({s: 256 for s in e.free_symbols})) / 1e6:.3g} MFLOP"

