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

from .lang.errors import CellError, raise_all
from .lang.functions import Reduction, spread
from .lang.ir import CellIR, generated, generated_symbols, symbol

ROWS = ("input", "state", "hoisted", "product", "operand")  # roles of values with a row per sequence


@dataclass(frozen=True)
class Gemm:
    """`operand @ W.T` where W stacks the rows of `params` in order; block j is `products[j]`."""

    stage: int  # 0: hoisted over all time steps; k >= 1: the k-th GEMM stage of a step
    operand: sp.Symbol  # the value multiplied: an input, a state, or an output of the previous pointwise
    operand_size: str  # the operand's width: "H", a declared width, or an input's name
    params: tuple[str, ...]  # per block: a matrix parameter, or a combination's name (ir.Product.terms)
    products: tuple[sp.Symbol, ...]
    widths: tuple[str, ...] = ()  # per block: its number of rows (a width)
    heads: int | None = None  # every block block-diagonal with this many square blocks (targets/gemm.py)


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
    name: str = ""  # what the emitted code calls it: "hoist", "stage0", "stage1", "stage1_1", ...
    width: str = "H"  # the width of its outputs: a kernel runs over [rows, width]
    # how each input (by name) is laid out: "full" ([rows, width]), "row" (one value per row, [rows, 1],
    # broadcast over the columns: its gradient is the sum over them), "vector" ([width]), "scalar"
    kinds: dict[str, str] = field(default_factory=dict)
    # outputs of one value per row in a function of another width (a `: 1` state updated from a mean
    # over H-wide values): stored as [rows, 1]; their gradients enter the backward as spread(g)
    row_outputs: tuple[str, ...] = ()
    ref: sp.Symbol | None = None  # the first "full" input: the shape of what the function returns

    def is_row_output(self, name: str) -> bool:
        return name in self.row_outputs

    def forward_ops(self) -> int:
        return _ops([e for _, e in self.forward_temps] + self.forward_results)

    def backward_ops(self) -> int:
        return _ops([e for _, e in self.backward_temps] + self.backward_results)


@dataclass
class Plan:
    ir: CellIR
    hoisted: list[Gemm]  # input projections, one GEMM per operand over all time steps
    hoist_pointwise: list[Pointwise]  # computes hoisted operands that are expressions of inputs
    gemms: list[Gemm]  # per-step GEMMs, by stage
    pointwise: list[Pointwise]  # per-step pointwise functions, by stage (0..S); one per output width
    num_stages: int  # S: GEMM stages per step
    recurrence: str  # "linear" (scan applies), "elementwise" (no GEMM on the state), "dense"
    roles: dict[sp.Symbol, str] = field(default_factory=dict)  # leaf symbol -> role

    @property
    def states(self) -> list[str]:
        return self.ir.states

    def inputs_read(self) -> list[str]:
        """The inputs one step reads (pointwise or as a GEMM operand), in declaration order; an input
        read nowhere (only in unused equations) is left out of the x the loop takes."""
        stages = self.all_pointwise()
        read = {s.name for pw in stages for s in pw.inputs} | {g.operand.name for g in self.hoisted}
        read |= {self.ir.shifted[name][0] for name in read if name in self.ir.shifted}  # prev(x) reads x
        return [name for name in self.ir.inputs if name in read]

    def pointwise_prefixes(self) -> list[str]:
        """The names emitted code gives the pointwise functions: "hoist" (if any), "stage0", "stage1", ..."""
        return [pw.name for pw in self.all_pointwise()]

    def all_pointwise(self) -> list[Pointwise]:
        """The hoisted pointwise functions (run once over all steps), then the per-step ones by stage."""
        return [*self.hoist_pointwise, *self.pointwise]

    def pointwise_of_stage(self, k: int) -> list[Pointwise]:
        return [pw for pw in self.pointwise if pw.stage == k]

    def gemms_of_stage(self, k: int) -> list[Gemm]:
        return [g for g in self.gemms if g.stage == k]

    def width(self, sym: sp.Symbol) -> str:
        """The width (widths.py) of a leaf of the pointwise functions: "1" for scalars, "row" for an
        input of one value per sequence, else the width its values have."""
        return _leaf_width(sym, self.roles, self.ir, [*self.hoisted, *self.gemms])

    def role(self, sym: sp.Symbol) -> str:
        """input | state | vector | scalar | hoisted | product | operand."""
        return self.roles[sym]

    def saved_per_step(self) -> list[tuple[str, tuple[str, ...]]]:
        """What the backward reads of each step, as (value, its widths): the new states, every GEMM's
        output (hoisted ones included) and every computed GEMM operand. The pointwise backward
        recomputes the rest of the forward from these (the torch loop saves exactly this)."""
        saved = [(s + "'", (self.ir.width(s),)) for s in self.ir.states]
        for g in [*self.gemms, *self.hoisted]:
            where = "hoisted " if g.stage == 0 else f"stage {g.stage} "
            saved.append((f"{where}GEMM [{', '.join(g.params)}] @ {g.operand.name}", g.widths))
        saved += [
            (g.operand.name, (g.operand_size,)) for g in self.gemms if self.roles.get(g.operand) == "operand"
        ]
        return saved


def _leaf_width(sym: sp.Symbol, roles: dict, ir: CellIR, gemms: list[Gemm]) -> str:
    role = roles[sym]
    if role == "scalar":
        return "1"
    if role in ("hoisted", "product"):
        return next(w for g in gemms for p, w in zip(g.products, g.widths, strict=True) if p == sym)
    if role == "operand":
        return next(g.operand_size for g in gemms if g.operand == sym)
    return ir.width(ir.shifted.get(sym.name, (sym.name,))[0])


def _ops(exprs) -> int:
    return int(sum(sp.count_ops(e) for e in exprs))


def _leaves(expr: sp.Expr) -> set[sp.Symbol]:
    return {s for s in expr.free_symbols if isinstance(s, sp.Symbol)}


def make_pointwise(
    stage: int, outputs: list[tuple[str, sp.Expr]], differentiable, name: str = "", width: str = "H",
    row_outputs: tuple[str, ...] = (), extra_inputs: tuple[sp.Symbol, ...] = (),
) -> Pointwise:
    """Build the fused function and derive its backward symbolically (chain rule + CSE).

    `row_outputs` are outputs of one value per row in a function of another width: their gradients
    are seeded as spread(g) (functions.spread), so that the sums over the columns that the backward
    takes (of a broadcast value, of a sum) give g. `extra_inputs` are inputs no output reads (a
    state that gives the function its shape, see build_plan)."""
    exprs = [e for _, e in outputs]
    leaves = set().union(*(_leaves(e) for e in exprs)) if exprs else set()
    inputs = sorted(leaves | set(extra_inputs), key=lambda s: s.name)
    temps, results = cse(exprs, "t")
    grad_outputs = tuple(symbol(f"grad[{name}]") for name, _ in outputs)
    grad_inputs = tuple(s for s in inputs if differentiable(s))
    # Vector-Jacobian product: d input = sum_j grad_j * d output_j / d input. Differentiate the
    # CSE'd form so shared subexpressions are differentiated once (reverse mode over the temps).
    reverse = _ReverseMode()
    for (out, _), g, r in zip(outputs, grad_outputs, results, strict=True):
        reverse.add(r, spread(g) if out in row_outputs else g)
    for t, e in reversed(temps):
        if t in reverse.adjoint:
            reverse.add(e, sp.Add(*reverse.adjoint.pop(t)))
    backward = [sp.Add(*reverse.adjoint[s]) if s in reverse.adjoint else sp.Integer(0) for s in grad_inputs]
    # The backward reads forward temps t_i and the partial products p_k of the product rule: it
    # recomputes those it needs (in order), then its own CSE'd temps u_j. (Inlining the t_i instead
    # would unshare them: exponential on deep DAGs.)
    btemps, bresults = cse(backward, "u")
    needed = set().union(*(e.free_symbols for e in [*bresults, *(e for _, e in btemps)]))
    recompute = []
    for t, e in reversed(temps + reverse.temps):
        if t in needed:
            recompute.append((t, e))
            needed |= e.free_symbols
    btemps = recompute[::-1] + btemps
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
        name=name or (f"stage{stage}" if stage >= 0 else "hoist"),
        width=width,
        row_outputs=tuple(n for n, _ in outputs if n in row_outputs),
    )


SYMPY_CSE_MAX_NODES = 2000  # sp.cse finds more sharing, but its cost grows much faster than linearly


def cse(exprs: list[sp.Expr], prefix: str) -> tuple[list[tuple[sp.Symbol, sp.Expr]], list[sp.Expr]]:
    """Common subexpressions as temporaries %<prefix>0, %<prefix>1, ...: SymPy's cse, which also shares
    parts of sums and products (every zoo cell), up to SYMPY_CSE_MAX_NODES distinct nodes; beyond, a
    linear-time tree CSE (each repeated subtree once), so a large cell compiles in seconds, not minutes."""
    if _distinct_nodes(exprs) <= SYMPY_CSE_MAX_NODES:
        return sp.cse(exprs, symbols=generated_symbols(prefix), order="none")
    return _tree_cse(exprs, generated_symbols(prefix))


def _distinct_nodes(exprs) -> int:
    seen, todo = set(), list(exprs)
    while todo:
        e = todo.pop()
        if e not in seen:
            seen.add(e)
            todo.extend(e.args)
    return len(seen)


def _tree_cse(exprs, symbols):
    """Every non-atomic subexpression that occurs more than once becomes a temporary (post-order, so
    each temporary is defined before its first use)."""
    count: dict[sp.Basic, int] = {}
    todo = list(exprs)
    while todo:
        e = todo.pop()
        if e.is_Atom:
            continue
        count[e] = count.get(e, 0) + 1
        if count[e] == 1:
            todo.extend(e.args)
    temps, memo = [], {}
    for root in exprs:
        stack = [(root, False)]
        while stack:
            e, ready = stack.pop()
            if e in memo:
                continue
            if e.is_Atom:
                memo[e] = e
            elif not ready:
                stack.append((e, True))
                stack.extend((a, False) for a in e.args if a not in memo)
            else:
                rebuilt = e.func(*(memo[a] for a in e.args))
                if count[e] > 1:
                    sym = next(symbols)
                    temps.append((sym, rebuilt))
                    rebuilt = sym
                memo[e] = rebuilt
    return temps, [memo[e] for e in exprs]


PRODUCT_RULE_MIN = 4  # from this many factors, d(f_0 ... f_n)/d f_i uses partial products


class _ReverseMode:
    """Reverse mode over SymPy expressions: `add(expr, grad)` appends grad * d expr / d s to
    adjoint[s] for every leaf s.

    The chain rule is applied node by node (Add, Mul, constant powers, functions by their `fdiff`),
    so the cost is linear in the size of the expression; other nodes fall back to sp.diff. A product
    of n >= PRODUCT_RULE_MIN factors would give n gradients of n - 1 factors each (quadratic: a
    product of 1000 factors took minutes); instead the prefix products f_0 ... f_{i-1} and suffix
    products f_{i+1} ... f_n become temporaries (`temps`, symbols %p0, %p1, ...), each one
    multiplication from the last, and d/d f_i is prefix_i * suffix_i: linear in n, no division (so
    a factor that is zero costs nothing)."""

    def __init__(self):
        self.adjoint: dict[sp.Symbol, list[sp.Expr]] = {}
        self.temps: list[tuple[sp.Symbol, sp.Expr]] = []
        self._names = generated_symbols("p")

    def add(self, expr: sp.Expr, grad: sp.Expr) -> None:
        if isinstance(expr, sp.Symbol):
            self.adjoint.setdefault(expr, []).append(grad)
        elif not expr.free_symbols:
            return
        elif isinstance(expr, sp.Add):
            for term in expr.args:
                self.add(term, grad)
        elif isinstance(expr, sp.Mul):
            self._product(expr.args, grad)
        elif isinstance(expr, sp.Pow) and not expr.exp.free_symbols:
            base, e = expr.args
            self.add(base, grad * e * base ** (e - 1))
        elif isinstance(expr, Reduction):  # linear and symmetric: mean's adjoint is the mean of the adjoint
            self.add(expr.args[0], type(expr)(grad))
        elif isinstance(expr, sp.Function):
            for i, arg in enumerate(expr.args):
                if arg.free_symbols:
                    self.add(arg, grad * expr.fdiff(i + 1))
        else:
            for s in _leaves(expr):
                d = _numbers_as_floats(sp.diff(expr, s))
                if d != 0:
                    self.adjoint.setdefault(s, []).append(grad * d)

    def _product(self, factors: tuple, grad: sp.Expr) -> None:
        varying = [f for f in factors if f.free_symbols]
        if len(varying) < PRODUCT_RULE_MIN:
            for i, f in enumerate(factors):
                if f.free_symbols:
                    self.add(f, grad * sp.Mul(*factors[:i], *factors[i + 1 :]))
            return
        grad = grad * sp.Mul(*(f for f in factors if not f.free_symbols))
        prefix, suffix = self._partials(varying), self._partials(varying[::-1])[::-1]
        for f, before, after in zip(varying, prefix, suffix, strict=True):
            self.add(f, grad * before * after)

    def _partials(self, factors: list[sp.Expr]) -> list[sp.Expr]:
        """[1, f_0, f_0 f_1, ..., f_0 ... f_{n-2}], each product after the first a temporary."""
        partials: list[sp.Expr] = [sp.Integer(1), factors[0]]
        for f in factors[1:-1]:
            sym = next(self._names)
            self.temps.append((sym, partials[-1] * f))
            partials.append(sym)
        return partials


def _numbers_as_floats(expr: sp.Expr) -> sp.Expr:
    """log(2) in d(2^h)/dh, and any other constant that is not a plain number, becomes a float, so
    the plan's expressions hold numbers only (as the IR's do: ir.py folds constants)."""
    return expr.replace(lambda e: e.is_number and not e.is_Number and bool(e.args), lambda e: e.evalf(20))


def build_plan(ir: CellIR) -> Plan:
    products = ir.products
    roles: dict[sp.Symbol, str] = {}
    for name in [*ir.inputs, *ir.shifted]:
        roles[symbol(name)] = "input"
    for name in ir.states:
        roles[symbol(name)] = "state"
    for p in ir.params.values():
        if p.kind in ("vector", "scalar"):
            roles[symbol(p.name)] = p.kind
    state_syms = {symbol(s) for s in ir.states}

    # Level of each product: 0 = hoisted (operand of inputs only), k = k-th GEMM stage of the step.
    # The IR lists products in creation order, operands before the products that read them, so one
    # pass in that order sees every operand's products first (no recursion on long chains).
    level: dict[sp.Symbol, int] = {}
    for sym, product in products.items():
        deps = _leaves(product.operand)
        inner = [level[d] for d in deps if d in products]
        if deps & state_syms or any(inner):
            level[sym] = 1 + max(inner, default=0)
        elif inner:
            raise CellError(
                "a matrix product of an input-only expression that itself contains a matrix product "
                "(two chained input projections) is not supported where the parameters' shapes are "
                "inferred; declare them (param W_1 : (R, x), param W_2 : (h, R): a rank-R bottleneck) and "
                "the cell runs with shaped parameters, or compute it outside the cell",
                ir.source,
                product.loc,
            )
        else:
            level[sym] = 0

    finals: list[tuple[str, sp.Expr]] = [(s + "'", ir.new_states[s]) for s in ir.states]
    if ir.output not in ir.states:
        finals.append((ir.output, ir.output_expr))
    needed = _needed_products(finals, products)
    num_stages = max((level[s] for s in needed), default=0)

    # GEMMs: one per (stage, operand); rows in parameter declaration order (a combination of matrices
    # goes where its first matrix is declared, after that matrix's own block).
    declared = {name: i for i, name in enumerate(ir.params)}

    def order(sym: sp.Symbol) -> tuple[int, int]:
        product = products[sym]
        first = (
            product.param
            if product.terms is None
            else next((t.matrix for t in product.terms if t.matrix in declared), None)
        )
        return (declared.get(first, len(declared)), product.terms is not None)

    by_operand: dict[tuple[int, sp.Expr, int], list[sp.Symbol]] = {}
    for sym in needed:  # blocks with heads (block-diagonal) make GEMMs of their own, one per head count
        by_operand.setdefault((level[sym], products[sym].operand, products[sym].heads or 0), []).append(sym)
    hoisted, gemms = [], []
    operand_outputs: dict[int, list[tuple[str, sp.Expr]]] = {}  # stage k -> operands it computes
    for index, ((stage, operand, heads), syms) in enumerate(
        sorted(by_operand.items(), key=lambda kv: (kv[0][0], min(order(s) for s in kv[1])))
    ):
        syms.sort(key=order)
        if isinstance(operand, sp.Symbol):
            operand_sym = operand
        else:
            operand_sym = generated(f"operand{index}")
            roles[operand_sym] = "operand"
            operand_outputs.setdefault(stage, []).append((operand_sym.name, operand))
        gemm = Gemm(
            stage,
            operand_sym,
            products[syms[0]].cols,
            tuple(products[s].param for s in syms),
            tuple(syms),
            tuple(products[s].rows for s in syms),
            heads or None,
        )
        (hoisted if stage == 0 else gemms).append(gemm)
        for s in syms:
            roles[s] = "hoisted" if stage == 0 else "product"

    def differentiable(s: sp.Symbol) -> bool:
        return roles.get(s) in ("input", "state", "vector", "scalar", "hoisted", "product")

    operand_width = {g.operand.name: g.operand_size for g in [*hoisted, *gemms]}
    all_gemms = [*hoisted, *gemms]
    errors: list[CellError] = []

    def width(output: str) -> str:
        if output in operand_width:
            return operand_width[output]
        return ir.width(output[:-1] if output.endswith("'") else output)

    def group_width(output: str, expr: sp.Expr) -> str:
        """The width of the function that computes an output: its own, except for one value per row
        computed by means or sums, which runs over the columns they reduce (H before others)."""
        w = width(output)
        if w != "row":
            return w
        over = {ir.reduced[r][0] for r in expr.atoms(Reduction) if r in ir.reduced}
        return min(over, key=lambda v: (v != "H", v), default="row")

    def check_reductions(w: str, group: list) -> None:
        """A mean or sum in a function must be over values of the function's width: every offending
        place is reported (in text order, by raise_all)."""
        for _name, e in group:
            for r in sorted(e.atoms(Reduction), key=sp.default_sort_key):
                over, locs = ir.reduced.get(r, (w, ()))
                if over == w:
                    continue
                for loc in locs:
                    errors.append(CellError(
                        f"a mean or sum over {over}-wide values is used here by {w}-wide values in the same "
                        "step stage: not supported (a kernel runs over one width)", ir.source, loc))

    def leaf_kind(sym: sp.Symbol, w: str) -> str:
        role = roles[sym]
        if role in ("vector", "scalar"):
            return role
        return "row" if w != "row" and _leaf_width(sym, roles, ir, all_gemms) == "row" else "full"

    def shape_input(stage: int, w: str, group: list) -> tuple[sp.Symbol, ...]:
        """A function whose outputs read nothing with a row per sequence of its width (`h' = 0.5 * b`,
        `n' = 0.5 * n` with n declared `: 1`... ) still returns [rows, width]: it takes the previous value
        of a state of that width (or an input) as an extra input that sets the shape."""
        leaves = set().union(*(_leaves(e) for _, e in group))
        if any(roles.get(s) in ROWS and _leaf_width(s, roles, ir, all_gemms) == w for s in leaves):
            return ()
        names = [s for s in ir.states if ir.width(s) == w] if stage >= 0 else []
        names += [i for i in ir.inputs if ir.width(i) == w]
        # none (a hoisted operand t * v of an input `t : 1` and a vector): the emitters broadcast as
        # before, from the inputs the function has
        return (symbol(names[0]),) if names else ()

    def pointwise_of(stage: int, outs: list, base: str) -> list[Pointwise]:
        """One fused function per width of its outputs (a kernel runs over [rows, width]): a stage whose
        outputs have two widths (lstm_proj: c is H wide, h P wide) is two functions, base and base_1.
        One value per row computed by a mean or sum joins the function of the width it reduces."""
        by_width: dict[str, list] = {}
        for out in outs:
            by_width.setdefault(group_width(*out), []).append(out)
        made = []
        for i, (w, group) in enumerate(by_width.items()):
            check_reductions(w, group)
            rows = tuple(n for n, _ in group if w != "row" and width(n) == "row")
            pw = make_pointwise(stage, group, differentiable, base if i == 0 else f"{base}_{i}", w, rows,
                                shape_input(stage, w, group))
            pw.kinds = {s.name: leaf_kind(s, w) for s in pw.inputs}
            pw.ref = next((s for s in pw.inputs if pw.kinds[s.name] == "full" and roles[s] in ROWS), None)
            made.append(pw)
        return made

    hoist_pointwise = pointwise_of(-1, operand_outputs[0], "hoist") if operand_outputs.get(0) else []
    pointwise = []
    for k in range(num_stages + 1):
        outs = list(operand_outputs.get(k + 1, []))
        if k == num_stages:
            outs += finals
        if k == 0 and not outs:
            continue  # stage-1 operands are plain states: nothing to compute before the first GEMM
        pointwise += pointwise_of(k, outs, f"stage{k}")
    unique = {(e.line, e.column, e.message): e for e in errors}  # one place may offend in several functions
    raise_all(list(unique.values()))
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
    seen: dict[sp.Symbol, None] = {}  # ordered set
    stack = [e for _, e in finals]
    while stack:
        e = stack.pop()
        for s in sorted(_leaves(e), key=lambda s: s.name):
            if s in products and s not in seen:
                seen[s] = None
                stack.append(products[s].operand)
    return list(seen)


def _recurrence_kind(ir: CellIR, gemms: list[Gemm], state_syms: set) -> str:
    """'dense': a GEMM on the state every step. 'linear': every new state is a * s + b where a holds
    no state (b may read other states: `coupled_states` says which). 'elementwise': the states enter
    only elementwise, but not linearly. A per-step GEMM that only the output reads (an output
    projection `y = V @ h'`) is no GEMM on the state: the states' recurrence is what is classified.

    Linearity is decided on the structure (sums of terms, each a product with at most one factor
    that holds a state, that factor linear itself), memoised over shared subexpressions: linear
    time, where sp.expand can blow up exponentially. A form whose linearity only shows after
    simplification is reported as elementwise, the safe side."""
    step_products = {p for g in gemms for p in g.products}
    if step_products & set(_needed_products(list(ir.new_states.items()), ir.products)):
        return "dense"
    for e in ir.new_states.values():  # a mean or sum over a state couples its units as a GEMM does
        if any(r.free_symbols & state_syms for r in e.atoms(Reduction)):
            return "dense"
    has_state: dict[sp.Basic, bool] = {}
    linear: dict[sp.Basic, bool] = {}

    def holds_state(e: sp.Basic) -> bool:
        if e not in has_state:
            has_state[e] = e in state_syms or any(holds_state(a) for a in e.args)
        return has_state[e]

    def is_linear(e: sp.Basic) -> bool:
        if e not in linear:
            if not holds_state(e) or e in state_syms:
                linear[e] = True
            elif isinstance(e, sp.Add):
                linear[e] = all(is_linear(a) for a in e.args)
            elif isinstance(e, sp.Mul):
                with_state = [a for a in e.args if holds_state(a)]
                linear[e] = len(with_state) == 1 and is_linear(with_state[0])
            else:
                linear[e] = False
        return linear[e]

    if all(is_linear(ir.new_states[s]) for s in ir.states):
        return "linear"
    return "elementwise"


def coupled_states(plan: Plan) -> dict[str, list[str]]:
    """For a linear recurrence, each state whose new value reads other states (s' = a * s + b with b
    holding them, e.g. h' = 0.5 h + 0.1 g): state -> the states it reads. Empty when every state is
    a scan of its own (a parallel scan applies)."""
    states = {symbol(s): s for s in plan.ir.states}
    found = {}
    for name in plan.ir.states:
        others = sorted(states[s] for s in plan.ir.new_states[name].free_symbols
                        if s in states and states[s] != name)
        if others:
            found[name] = others
    return found
