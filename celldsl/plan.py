"""IR -> execution plan: GEMM groups and stages, fused pointwise functions and their derived backward.

One step of a cell runs as: stage 1 GEMMs -> pointwise 1 -> stage 2 GEMMs -> ... -> pointwise S.
Products whose operand depends only on inputs are *hoisted*: one GEMM over all time steps before
the loop. A product whose operand is computed in the same step (MUT's `W_hh @ (r * h)`) waits for
the stage after the one that computes it, so S is the longest chain of dependent products.
Pointwise 0 runs first when a stage-1 operand is an expression of the previous states (MUT3's
`tanh(h)`), or alone when the cell has no recurrent GEMM at all (minGRU, IndRNN, SRU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .errors import CellError
from .ir import H, CellIR, symbol


@dataclass(frozen=True)
class Gemm:
    """`operand @ W.T` where W stacks the rows of `params` in order; block j is `products[j]`."""

    stage: int  # 0: hoisted over all time steps; k >= 1: the k-th GEMM stage of a step
    operand: sp.Symbol  # the value multiplied: an input, a state, or an output of the previous pointwise
    operand_size: str  # "H" or the name of an input
    params: tuple[str, ...]
    products: tuple[sp.Symbol, ...]


@dataclass
class Pointwise:
    """A fused elementwise function `outputs = f(inputs)` and its vector-Jacobian product.

    `forward` and `backward` are CSE'd: a list of temporaries then the results. The backward takes
    the inputs (it recomputes what it needs of the forward) and one gradient per output
    (`grad_outputs`), and returns the gradient of every input that needs one (`grad_inputs`).
    """

    stage: int
    inputs: tuple[sp.Symbol, ...]
    outputs: tuple[tuple[str, sp.Expr], ...]
    forward_temps: list[tuple[sp.Symbol, sp.Expr]]
    forward_results: list[sp.Expr]
    grad_outputs: tuple[sp.Symbol, ...]
    grad_inputs: tuple[sp.Symbol, ...]  # inputs that get a gradient, in `inputs` order
    backward_temps: list[tuple[sp.Symbol, sp.Expr]]
    backward_results: list[sp.Expr]

    def forward_ops(self) -> int:
        return _ops([e for _, e in self.forward_temps] + self.forward_results)

    def backward_ops(self) -> int:
        return _ops([e for _, e in self.backward_temps] + self.backward_results)


@dataclass
class Plan:
    ir: CellIR
    hoisted: list[Gemm]  # input projections, one GEMM per operand over all time steps
    hoist_pointwise: Pointwise | None  # computes hoisted operands that are expressions of inputs
    gemms: list[Gemm]  # per-step GEMMs, by stage
    pointwise: list[Pointwise]  # per-step pointwise functions, by stage (0..S)
    num_stages: int  # S: GEMM stages per step
    recurrence: str  # "linear" (scan applies), "elementwise" (no GEMM on the state), "dense"
    roles: dict[sp.Symbol, str] = field(default_factory=dict)  # leaf symbol -> role

    @property
    def states(self) -> list[str]:
        return self.ir.states

    def gemms_of_stage(self, k: int) -> list[Gemm]:
        return [g for g in self.gemms if g.stage == k]

    def role(self, sym: sp.Symbol) -> str:
        """input | state | vector | scalar | hoisted | product | operand."""
        return self.roles[sym]


def _ops(exprs) -> int:
    return int(sum(sp.count_ops(e) for e in exprs))


def _leaves(expr: sp.Expr) -> set[sp.Symbol]:
    return {s for s in expr.free_symbols if isinstance(s, sp.Symbol)}


def make_pointwise(stage: int, outputs: list[tuple[str, sp.Expr]], differentiable) -> Pointwise:
    """Build the fused function and derive its backward symbolically (chain rule + CSE)."""
    exprs = [e for _, e in outputs]
    inputs = sorted(set().union(*(_leaves(e) for e in exprs)) if exprs else set(), key=lambda s: s.name)
    temps, results = sp.cse(exprs, symbols=sp.numbered_symbols("t", real=True), order="none")
    grad_outputs = tuple(symbol(f"grad[{name}]") for name, _ in outputs)
    grad_inputs = tuple(s for s in inputs if differentiable(s))
    # Vector-Jacobian product: d input = sum_j grad_j * d output_j / d input. Differentiate the
    # CSE'd form so shared subexpressions are differentiated once (reverse mode over the temps).
    adjoint: dict[sp.Symbol, sp.Expr] = {}
    for g, r in zip(grad_outputs, results, strict=True):
        _accumulate(adjoint, r, g)
    for t, e in reversed(temps):
        if t in adjoint:
            _accumulate(adjoint, e, adjoint.pop(t))
    backward = [adjoint.get(s, sp.Integer(0)) for s in grad_inputs]
    # backward refers to temps t_i: substitute their definitions back, then CSE the whole backward
    back_exprs = [sp.Integer(0) if b == 0 else b for b in backward]
    defs = dict(temps)
    back_full = [_inline(b, defs) for b in back_exprs]
    btemps, bresults = sp.cse(back_full, symbols=sp.numbered_symbols("u", real=True), order="none")
    return Pointwise(
        stage=stage,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        forward_temps=temps,
        forward_results=results,
        grad_outputs=grad_outputs,
        grad_inputs=grad_inputs,
        backward_temps=btemps,
        backward_results=bresults,
    )


def _accumulate(adjoint: dict, expr: sp.Expr, grad: sp.Expr) -> None:
    for s in _leaves(expr):
        d = sp.diff(expr, s)
        if d != 0:
            adjoint[s] = adjoint.get(s, sp.Integer(0)) + grad * d


def _inline(expr: sp.Expr, defs: dict) -> sp.Expr:
    # temps are in dependency order; substituting repeatedly until none remain is cheap at this size
    for _ in range(len(defs) + 1):
        present = [s for s in expr.free_symbols if s in defs]
        if not present:
            return expr
        expr = expr.xreplace({s: defs[s] for s in present})
    return expr


def build_plan(ir: CellIR) -> Plan:
    products = ir.products
    roles: dict[sp.Symbol, str] = {}
    for name in ir.inputs:
        roles[symbol(name)] = "input"
    for name in ir.states:
        roles[symbol(name)] = "state"
    for p in ir.params.values():
        if p.kind in ("vector", "scalar"):
            roles[symbol(p.name)] = p.kind
    state_syms = {symbol(s) for s in ir.states}

    # Level of each product: 0 = hoisted (operand of inputs only), k = k-th GEMM stage of the step.
    level: dict[sp.Symbol, int] = {}

    def level_of(sym: sp.Symbol) -> int:
        if sym in level:
            return level[sym]
        operand = products[sym].operand
        deps = _leaves(operand)
        inner = [level_of(d) for d in deps if d in products]
        if deps & state_syms or any(inner):
            level[sym] = 1 + max(inner, default=0)
        else:
            if any(d in products for d in deps):
                raise CellError(
                    "a matrix product of an input-only expression that itself contains a matrix product "
                    "(two chained input projections) is not supported; compute it outside the cell",
                    ir.source,
                    products[sym].loc,
                )
            level[sym] = 0
        return level[sym]

    finals: list[tuple[str, sp.Expr]] = [(s + "'", ir.new_states[s]) for s in ir.states]
    if ir.output not in ir.states:
        finals.append((ir.output, ir.output_expr))
    needed = _needed_products(finals, products)
    for sym in needed:
        level_of(sym)
    num_stages = max(level.values(), default=0)

    # GEMMs: one per (stage, operand); rows in parameter declaration order.
    param_order = {name: i for i, name in enumerate(ir.params)}
    by_operand: dict[tuple[int, sp.Expr], list[sp.Symbol]] = {}
    for sym in needed:
        by_operand.setdefault((level[sym], products[sym].operand), []).append(sym)
    hoisted, gemms = [], []
    operand_outputs: dict[int, list[tuple[str, sp.Expr]]] = {}  # stage k -> operands it computes
    for index, ((stage, operand), syms) in enumerate(sorted(
        by_operand.items(), key=lambda kv: (kv[0][0], min(param_order[products[s].param] for s in kv[1]))
    )):
        syms.sort(key=lambda s: param_order[products[s].param])
        if isinstance(operand, sp.Symbol):
            operand_sym = operand
        else:
            operand_sym = symbol(f"operand{index}")
            roles[operand_sym] = "operand"
            operand_outputs.setdefault(stage, []).append((operand_sym.name, operand))
        size = ir.params[products[syms[0]].param].operand_size
        gemm = Gemm(stage, operand_sym, size or H, tuple(products[s].param for s in syms), tuple(syms))
        (hoisted if stage == 0 else gemms).append(gemm)
        for s in syms:
            roles[s] = "hoisted" if stage == 0 else "product"

    def differentiable(s: sp.Symbol) -> bool:
        return roles.get(s) in ("input", "state", "vector", "scalar", "hoisted", "product")

    hoist_pointwise = None
    if operand_outputs.get(0):
        hoist_pointwise = make_pointwise(-1, operand_outputs[0], differentiable)
    pointwise = []
    for k in range(num_stages + 1):
        outs = list(operand_outputs.get(k + 1, []))
        if k == num_stages:
            outs += finals
        if k == 0 and not outs:
            continue  # stage-1 operands are plain states: nothing to compute before the first GEMM
        pointwise.append(make_pointwise(k, outs, differentiable))
    return Plan(
        ir=ir,
        hoisted=hoisted,
        hoist_pointwise=hoist_pointwise,
        gemms=gemms,
        pointwise=pointwise,
        num_stages=num_stages,
        recurrence=_recurrence_kind(ir, gemms, state_syms),
        roles=roles,
    )


def _needed_products(finals, products) -> list[sp.Symbol]:
    seen: list[sp.Symbol] = []
    stack = [e for _, e in finals]
    while stack:
        e = stack.pop()
        for s in sorted(_leaves(e), key=lambda s: s.name):
            if s in products and s not in seen:
                seen.append(s)
                stack.append(products[s].operand)
    return seen


def _recurrence_kind(ir: CellIR, gemms: list[Gemm], state_syms: set) -> str:
    """'dense': a GEMM on the state every step. 'linear': s' = a*s + b with a, b free of states
    (a parallel scan applies). 'elementwise': state only elementwise, but nonlinearly."""
    if gemms:
        return "dense"
    for s in ir.states:
        e = sp.expand(ir.new_states[s])
        for t in state_syms:
            coeff = sp.diff(e, t)
            if coeff.free_symbols & state_syms:
                return "elementwise"
    return "linear"
