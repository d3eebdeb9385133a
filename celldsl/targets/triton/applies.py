"""Which Triton schedules apply to a plan, and why the others do not: from the plan alone (no sizes,
no torch). The emitters emit a schedule's kernels only where it applies (their layouts refuse the
rest), choice.py sizes the schedules that apply, and `celldsl explain` and a layer's `schedule=` ask
through the target's interface (`TritonTarget.schedules`), which reads `declines`."""

from __future__ import annotations

import sympy as sp

from ...lang.functions import Reduction
from ...plan import Plan

SCHEDULES = ("graphed", "persistent", "fused_step", "time_loop", "scan")
# what a dense tile holds
DENSE_ROLES = ("input", "state", "vector", "scalar", "hoisted", "product", "operand")
COLUMN_ROLES = ("input", "state", "vector", "scalar", "hoisted")  # what a column holds


def declines(plan) -> dict[str, str | None]:
    """For every schedule: None when it applies to the plan, else why not."""
    dense = dense_decline(plan)
    return {
        "graphed": None,
        "persistent": dense,
        "fused_step": dense,
        "time_loop": column_decline(plan),
        "scan": scan_decline(plan),
    }


def tile_decline(plan: Plan, columns: bool = False) -> str | None:
    """Why the schedules' kernels (dense, or with `columns` the time_loop and scan ones) cannot hold
    this plan's values (None when they can). Their tiles are [rows, H] slices of values H wide, one
    hidden unit per column, so they refuse other widths and earlier inputs (prev(x)) read by the step
    itself rather than compute them wrong. The dense kernels also refuse block-diagonal GEMMs (heads),
    reductions over a row and inputs of one value per sequence; the column kernels run those: their
    input projections are torch GEMMs before the loop (heads included), a `: 1` input is one load per
    row broadcast over its units, and a step that reduces over a row gets programs that hold whole
    rows (emit_columns.py). The graphed path runs all of these."""
    ir = plan.ir
    for g in [*plan.hoisted, *plan.gemms]:
        if g.heads and not (columns and g.stage == 0):
            return (f"the GEMM [{', '.join(g.params)}] @ {g.operand.name} is block-diagonal "
                    f"({g.heads} heads): the kernels multiply full weights")
    for s in ir.states:
        if ir.width(s) == "row":
            return (f"the state {s} is one value per sequence (`: 1`), not H values: the kernels tile every "
                    "value H wide")
        if ir.width(s) != "H":
            return f"the state {s} is {ir.width(s)} wide, not H: the kernels tile every value H wide"
    for g in plan.gemms:
        if g.operand_size != "H":
            return f"a step GEMM multiplies an operand of width {g.operand_size}, not H"
    for g in [*plan.hoisted, *plan.gemms]:
        wide = [w for w in g.widths if w != "H"]
        if wide:
            return f"the GEMM [{', '.join(g.params)}] has blocks {wide[0]} wide, not H"
    for pw in plan.pointwise:
        if pw.width != "H":
            return f"the step function {pw.name} runs over values {pw.width} wide, not H"
        if not columns and any(e.atoms(Reduction) for e in [*(e for _, e in pw.forward_temps),
                                                             *pw.forward_results]):
            return (f"the step function {pw.name} takes a mean or sum over a row: the dense kernels' "
                    "programs hold slices of a row, not whole rows")
        for sym in pw.inputs:
            if sym.name in ir.shifted:
                return f"the step reads {sym.name} itself (only hoisted GEMMs may read earlier inputs here)"
            if not columns and plan.width(sym) == "row":  # other inputs the step reads are H wide
                return f"the step reads {sym.name}, one value per sequence (`: 1`), not H values"
    return None


def whole_rows(plan: Plan) -> bool:
    """Whether the step reduces over a row (a mean or sum), so a column program must hold whole rows."""
    return any(e.atoms(Reduction) for pw in plan.pointwise
               for e in [*(e for _, e in pw.forward_temps), *pw.forward_results])


def dense_decline(plan: Plan) -> str | None:
    """Why the dense schedules cannot run this plan (None when they can)."""
    if not plan.gemms:
        if plan.recurrence != "dense":
            return f"the recurrence is {plan.recurrence}, not dense (no GEMM in the step)"
        return "no GEMM on the state every step (a reduction over the state couples its units instead)"
    why = tile_decline(plan)
    if why:
        return why
    for pw in plan.pointwise:
        for s in pw.inputs:
            if plan.roles.get(s) not in DENSE_ROLES:
                return f"the pointwise step reads {s.name} as {plan.roles.get(s)!r}, which no tile holds"
    for pw in plan.pointwise:
        for s in pw.inputs:
            if plan.roles.get(s) == "operand" and s.name not in [g.operand.name for g in plan.gemms]:
                return f"the pointwise step reads the operand {s.name}, which no GEMM multiplies"
    return None


def column_decline(plan: Plan) -> str | None:
    """Why the time_loop schedule cannot run this plan (None when it can)."""
    if plan.recurrence == "dense":
        return "the state goes through a GEMM every step (a dense recurrence): no column is independent"
    if plan.gemms:  # an output projection: the kernels run the states' plan, the output follows
        states, why = states_plan(plan)
        return why if states is None else column_decline(states)
    why = tile_decline(plan, columns=True)  # first: its reasons (a `: 1` state, a width) say more
    if why:
        return why
    if [pw.stage for pw in plan.pointwise] != [0]:
        return "the step is not one pointwise function of the previous states"
    (pw,) = plan.pointwise
    for s in pw.inputs:
        if plan.roles.get(s) not in COLUMN_ROLES:
            return f"the pointwise step reads {s.name} as {plan.roles.get(s)!r}, which no column holds"
    return None


def scan_decline(plan: Plan) -> str | None:
    """Why the scan schedule cannot run this plan (None when it can)."""
    why = column_decline(plan)
    if why:
        return why
    if plan.gemms:
        plan = states_plan(plan)[0]
    if plan.recurrence != "linear":
        return f"the recurrence is {plan.recurrence}, not linear in the state"
    try:
        coefficients(plan)
    except ValueError as err:
        return str(err)
    return None


_STATES_PLANS: dict[int, tuple[Plan, Plan | None, str | None]] = {}


def states_plan(plan: Plan) -> tuple[Plan | None, str | None]:
    """For a plan whose per-step GEMMs only the output reads (an output projection): the plan of the
    states' recurrence alone (the same IR with the first state as its output), whose pointwise
    functions are named stage0_states... so they sit beside the plan's own in one module; or None and
    why the column schedules cannot split it. The column loop runs this plan's kernels, then the
    output of every step at once from the previous states (columns.py)."""
    import dataclasses

    from ...plan import build_plan

    key = id(plan)
    if key in _STATES_PLANS and _STATES_PLANS[key][0] is plan:
        return _STATES_PLANS[key][1:]
    ir = plan.ir
    g = plan.gemms[0]
    lead = (f"the output reads the per-step GEMM [{', '.join(g.params)}] @ {g.operand.name} (no state "
            "goes through it)")
    states, why = None, None
    if ir.shifted:
        why = f"{lead} and the step reads earlier inputs (prev): the output is not split from the states"
    else:
        first = ir.states[0]
        states = build_plan(dataclasses.replace(ir, output=first, output_expr=ir.new_states[first]))
        if [(h.params, h.operand, h.heads) for h in states.hoisted] != \
                [(h.params, h.operand, h.heads) for h in plan.hoisted]:
            states, why = None, (f"{lead} and the output reads an input projection the states do not: "
                                 "the output is not split from the states")
        else:
            for pw in states.hoist_pointwise:
                pw.name = "hoist_states" + pw.name[len("hoist"):]
            for pw in states.pointwise:
                pw.name = pw.name.replace("stage", "stage_states", 1)
    _STATES_PLANS[key] = (plan, states, why)
    return states, why


def coefficients(plan: Plan) -> dict[str, tuple[sp.Expr, sp.Expr]]:
    """(a, b) of every new state s' = a * s + b, from the pointwise function's SymPy outputs: a is
    d s'/d s and b is s' at s = 0. ValueError when a or b holds a state (a new state that reads
    another state is linear, but not a scan of independent columns)."""
    (pw,) = plan.pointwise
    outputs = dict(pw.outputs)
    states = {s.name: s for s in pw.inputs if plan.role(s) == "state"}
    result = {}
    for name in plan.ir.states:
        expr = outputs[name + "'"]
        s = states.get(name)
        if s is None:  # the new state does not read the old one: a = 0
            a, b = sp.Integer(0), expr
        else:
            a, b = sp.diff(expr, s), expr.xreplace({s: sp.Integer(0)})
        held = {x.name for x in (a.free_symbols | b.free_symbols) if x.name in states}
        if held:
            raise ValueError(f"the new state {name}' = a * {name} + b has a or b reading the state(s) "
                             f"{', '.join(sorted(held))}: not a scan of independent columns")
        result[name] = (a, b)
    return result


# ---- the kernels a generated module defines --------------------------------------------------------


def schedule_names(plan: Plan) -> list[str]:
    """The schedules' kernels the module defines (their time loops rebind the states they carry)."""
    return dense_kernel_names(plan) + column_kernel_names(plan)


def dense_kernel_names(plan: Plan) -> list[str]:
    """The dense schedules' kernels in a generated module (empty when they do not apply)."""
    if dense_decline(plan):
        return []
    n_forward = len(plan.pointwise)
    n_backward = n_forward + (0 if any(pw.stage == 0 for pw in plan.pointwise) else 1)
    return (["persistent_forward_kernel", "persistent_backward_kernel"]
            + [f"fused_step_forward_kernel_{i + 1}" for i in range(n_forward)]
            + [f"fused_step_backward_kernel_{i + 1}" for i in range(n_backward)])


def column_kernel_names(plan: Plan) -> list[str]:
    names = []
    if plan.gemms and not column_decline(plan):  # an output projection: the states' plan's kernels
        return column_kernel_names(states_plan(plan)[0])
    if not column_decline(plan):
        names += ["time_loop_forward_kernel", "time_loop_backward_kernel"]
    if not scan_decline(plan):
        names += ["scan_coefficients", "scan_forward_kernel", "scan_backward_kernel"]
    return names
