"""Plan -> C source: each stage's pointwise forward and derived backward as one loop over [n, H].

The torch module (targets/torch/emit.py) stays the executable meaning of a cell. This file prints the same
CSE'd SymPy expressions with SymPy's C99 printer, so that the CPU loops (targets/c/fused.py) run
a stage of a step as one C function instead of one torch call per operation (the per-op overhead,
not the arithmetic, is what a step of a small cell costs on the CPU).

Every kernel is one function over rows 0..n-1 and a range of columns,

    static void NAME_f32_cols(int64_t n, void *const *p, const int64_t *ld, int64_t j0, int64_t j1,
                              int64_t slot)                                              (and _f64)

`p[k]` points at argument k of `KernelSpec.args`: a "rows" argument is element [i, j] at
p[k][i * ld[k] + j]; a "rowscalar" (one value per row: an input declared `: 1`) is p[k][i * ld[k]];
a "vector" is [H]; a "scalar" is one value; an accumulator ("acc" mode, double) receives the sum
over rows (vectors: per column, so threads that own different columns never share one) or over
everything (scalars: into ((double *)p[k])[slot], one slot per thread, summed by the caller). H is
the width of the kernel's Pointwise (one kernel per stage and output width). A kernel with means or
sums over a row (`_reduction_passes`) or a row-scalar gradient needs whole rows: NAME splits its
rows, not its columns, over the threads (`_split_rows`: threads past the first sum their vector
gradients into private columns, added at the end), and the native loop, which splits the columns
over threads, never runs it (emit_loop.native_blocker). Around it:

- NAME_f32(n, H, p, ld, nt): every row and column, split over `nt` OpenMP threads (built with OpenMP);
- NAME_f32_at(r, q, n, H, args, nt): the same, with the pointers of a step computed from its rows
  (`cd_rows`, see CALL_AT): the Python loop makes one cheap ctypes call per stage and step;
- NAME_f32_rows(args, r, q, n, j0, j1, slot): what the native time loop (targets/c/emit_loop.py) calls.

A backward kernel writes each gradient with mode "=" when it is the first contribution to that
destination within a step and "+=" after, and skips gradients equal to another one it writes
(see `BackwardSchedule`) or summed after the loop (`Folding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.codegen.ast import float32, float64, real
from sympy.printing.c import C99CodePrinter

from ...lang.functions import Reduction, rowmean
from ...lang.ir import generated
from ...plan import Plan, Pointwise
from ..printers import identifier
from .emit_loop import loop_source

C_TYPES = {"f32": "float", "f64": "double"}

# grad-input roles whose gradient is a [n, H] tensor (the rest are summed: vectors, scalars)
ROW_ROLES = ("input", "state", "hoisted", "product", "operand")

C_RESERVED = {
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
    "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return",
    "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void",
    "volatile", "while", "n", "H", "p", "ld", "i", "j", "j0", "j1", "slot", "c", "chunk", "args",
    "int64_t", "intptr_t", "NAN", "INFINITY",
}
LIBM = ("exp", "tanh", "log", "log1p", "pow")
# cell functions with a static C helper cd_<name>_<dtype> (see _helpers)
HELPERS = ("sigmoid", "relu", "softplus", "logsigmoid", "step", "maximum", "minimum", "less", "less_equal",
           "where", "floor", "mod", "sin", "cos")


@dataclass(frozen=True)
class KernelArg:
    """One entry of a kernel's pointer table.

    part: "input" (a pointwise input, `name` its symbol), "output" (a forward result, `name` the
    output's name: "h'" or an operand), "grad_output" (the gradient of output `name`), "grad_input"
    (the gradient of input symbol `name`). kind: "rows" | "vector" | "scalar". mode (grad_input
    only): "=", "+=" (rows), "acc" (vectors and scalars: a double accumulator, summed over rows),
    "same:NAME" (not written: equal to NAME's gradient; see BackwardSchedule) or "fold" (not
    written: a folded vector, see Folding).
    """

    part: str
    name: str
    kind: str
    mode: str = ""


@dataclass(frozen=True)
class KernelSpec:
    name: str  # e.g. "stage1_backward"; the C functions are name + "_f32" / "_f64"
    stage: int
    backward: bool
    args: tuple[KernelArg, ...]
    pointwise: str = ""  # the Pointwise it runs (its name: "stage1", "stage1_1", ...)
    zero: tuple[str, ...] = ()  # pointwise inputs read as 0 (Folding.zero): not arguments


def _kind(plan: Plan, sym: sp.Symbol) -> str:
    """"vector", "scalar", "rowscalar" (one value per row: an input declared `: 1`) or "rows"."""
    role = plan.role(sym)
    if role in ("vector", "scalar"):
        return role
    return "rowscalar" if plan.width(sym) == "row" else "rows"


def _dest(plan: Plan, sym: sp.Symbol) -> tuple:
    """Where the gradient of a pointwise input goes; two symbols with the same key add up."""
    role = plan.role(sym)
    if role == "state":
        return ("state", plan.states.index(sym.name))
    if role in ("hoisted", "product"):
        return (role, sym.name)
    if role == "input":
        return ("input", sym.name)  # each input of a multi-input cell has its own gradient buffer
    return (role, sym.name)


@dataclass
class BackwardSchedule:
    """How one reverse step writes its gradients, in the order the CPU loop runs it: pointwise S
    backward, stage S GEMM backward, ..., pointwise 0 backward.

    modes[pointwise name][symbol name]: "=" (first contribution to that destination in the step), "+=",
    "acc" (vectors, scalars: summed into a double accumulator), or "same:NAME" (equal to the gradient
    of NAME in the same kernel, which is the only contribution to both: not written; the loop reuses
    NAME's buffer or accumulator). first_gemm[stage]: indices (in plan.gemms) of the GEMMs whose
    operand gradient is the first contribution to a state's gradient (`mm(out=)`, not `addmm_`).
    hoisted_alias[i] = g: hoisted GEMM i's output gradient equals step GEMM g's, block by block (the
    torch LSTM: d(W_ii@x) = d(W_hi@h)), so one buffer serves both.
    """

    modes: dict[int, dict[str, str]]
    first_gemm: dict[int, set[int]]
    hoisted_alias: dict[int, int]


def backward_schedule(plan: Plan) -> BackwardSchedule:
    written: set = set()
    modes: dict[int, dict[str, str]] = {}
    first_gemm: dict[int, set[int]] = {}
    for k in reversed(range(plan.num_stages + 1)):
        for pw in plan.pointwise_of_stage(k):
            m = modes.setdefault(pw.name, {})
            for sym in pw.grad_inputs:
                if _kind(plan, sym) not in ("rows", "rowscalar"):
                    m[sym.name] = "acc"
                    continue
                key = _dest(plan, sym)
                m[sym.name] = "+=" if key in written else "="
                written.add(key)
        first_gemm[k] = set()
        for gi, g in enumerate(plan.gemms):
            if g.stage != k or plan.role(g.operand) != "state":
                continue
            key = ("state", plan.states.index(g.operand.name))
            if key not in written:
                first_gemm[k].add(gi)
                written.add(key)
    hoisted_alias = _alias_gradients(plan, modes)
    return BackwardSchedule(modes, first_gemm, hoisted_alias)


def _alias_gradients(plan: Plan, modes: dict) -> dict[int, int]:
    """Mark gradients equal to another one of the same kernel as "same:NAME" (in `modes`): vectors
    (summed once), and hoisted GEMM blocks when a whole hoisted GEMM matches a step GEMM."""
    stages_of: dict[str, int] = {}
    for pw in plan.pointwise:
        for sym in pw.grad_inputs:
            stages_of[sym.name] = stages_of.get(sym.name, 0) + 1
    results: dict[str, tuple[int, sp.Expr]] = {}
    for pw in plan.pointwise:
        for sym, expr in zip(pw.grad_inputs, pw.backward_results, strict=True):
            if stages_of[sym.name] == 1:  # one kernel writes it: its buffer holds exactly `expr`
                results[sym.name] = (pw.name, expr)
    # vectors: the first vector with the same gradient expression accumulates for all of them
    for pw in plan.pointwise:
        first: dict[sp.Expr, str] = {}
        for sym, expr in zip(pw.grad_inputs, pw.backward_results, strict=True):
            if plan.role(sym) != "vector" or sym.name not in results or expr == 0:
                continue
            if expr in first:
                modes[pw.name][sym.name] = "same:" + first[expr]
            else:
                first[expr] = sym.name
    hoisted_alias: dict[int, int] = {}
    for hi, h in enumerate(plan.hoisted):
        for gi, g in enumerate(plan.gemms):
            if gi in hoisted_alias.values() or len(g.products) != len(h.products):
                continue
            pairs = list(zip(h.products, g.products, strict=True))
            if all(p.name in results and q.name in results and results[p.name] == results[q.name]
                   and modes[results[q.name][0]][q.name] == "=" for p, q in pairs):
                hoisted_alias[hi] = gi
                for p, q in pairs:
                    modes[results[p.name][0]][p.name] = "same:" + q.name
                break
    return hoisted_alias


def summed_products(plan: Plan) -> dict[int, tuple[int, int]]:
    """Step GEMMs whose blocks the cell only ever uses added to hoisted blocks (LSTM's W_hi@h + W_ii@x).

    Returns {step GEMM index g: (hoisted GEMM index, first block l)}: block j of g always appears as
    q_j + p_j with p_j block l + j of that hoisted GEMM, in every forward and backward expression.
    The CPU loop then computes S = p + q with one addmm per step (reading the hoisted rows inside
    the GEMM) and binds the kernels' p_j to S and q_j to zero: every expression sees p + q = S, and
    the kernels read one block where they read two.
    """
    exprs = []
    for pw in plan.pointwise:
        exprs += [e for _, e in pw.forward_temps] + list(pw.forward_results)
        exprs += [e for _, e in pw.backward_temps] + list(pw.backward_results)
    found: dict[int, tuple[int, int]] = {}
    used: set[sp.Symbol] = set()  # a hoisted block joins one sum at most
    for gi, g in enumerate(plan.gemms):
        m = len(g.products)
        for hi, h in enumerate(plan.hoisted):
            for first in range(len(h.products) - m + 1):
                pairs = list(zip(h.products[first : first + m], g.products, strict=True))
                if used & {p for p, _ in pairs}:
                    continue
                total = {q: generated(f"sum{j}") - p for j, (p, q) in enumerate(pairs)}
                hoisted = {p for p, _ in pairs}
                if all(not (sp.sympify(e).xreplace(total).free_symbols & hoisted) for e in exprs):
                    found[gi] = (hi, first)
                    used |= hoisted
                    break
            if gi in found:
                break
    return found


@dataclass(frozen=True)
class Folding:
    """What the CPU loops compute inside the GEMMs instead of in the kernels of every step.

    summed: step GEMM g -> (hoisted GEMM, first block), see `summed_products`: g's output is added
    onto those hoisted rows in place, so the kernels read one block (S = p + q) where they read two.
    biases: vector name -> (GEMM kind "hoisted" or "step", GEMM index, block): a vector that every
    expression reads only as `block + vector` (LSTM's b_ii and b_hi, GRU's b_hn) is added to that
    GEMM's output once (its bias) before or while the loop runs, and its gradient, equal to the
    block's, is one column sum of the block's gradient after the loop.
    zero: the symbols the kernels read as 0 because their value is inside another block (summed
    products, folded vectors); they are not kernel arguments.
    """

    summed: dict[int, tuple[int, int]]
    biases: dict[str, tuple[str, int, int]]
    zero: frozenset[str]


def _expressions(plan: Plan, hoist: bool = False) -> list[sp.Expr]:
    stages = [*plan.pointwise, *(plan.hoist_pointwise if hoist else [])]
    exprs = []
    for pw in stages:
        exprs += [e for _, e in pw.forward_temps] + list(pw.forward_results)
        exprs += [e for _, e in pw.backward_temps] + list(pw.backward_results)
    return [sp.sympify(e) for e in exprs]


def folding(plan: Plan) -> Folding:
    """Find the summed products and the foldable vectors of a plan (decided symbolically on every
    forward and backward expression, so a cell that reads a bias any other way keeps it)."""
    summed = summed_products(plan)
    exprs = _expressions(plan, hoist=True)
    partner: dict[sp.Symbol, sp.Symbol] = {}  # hoisted block -> the step product summed with it
    for gi, (hi, first) in summed.items():
        for j, q in enumerate(plan.gemms[gi].products):
            partner[plan.hoisted[hi].products[first + j]] = q
    blocks: dict[sp.Symbol, tuple[str, int, int]] = {}  # the block the kernels read -> where it is
    for hi, g in enumerate(plan.hoisted):
        for j, p in enumerate(g.products):
            blocks[p] = ("hoisted", hi, j)
    for gi, g in enumerate(plan.gemms):
        for j, q in enumerate(g.products):
            if q not in partner.values():
                blocks[q] = ("step", gi, j)
    # candidates: the blocks that are direct terms of a sum that also has the vector as a term
    terms: dict[sp.Symbol, list[sp.Symbol]] = {}
    owner = {q: p for p, q in partner.items()}
    for e in exprs:
        for add in e.atoms(sp.Add):
            args = set(add.args)
            for v in args:
                if isinstance(v, sp.Symbol) and plan.roles.get(v) == "vector":
                    for s in args:
                        block = owner.get(s, s)
                        if block in blocks and block not in terms.setdefault(v, []):
                            terms[v].append(block)
    folded: dict[sp.Symbol, list[sp.Symbol]] = {}
    biases: dict[str, tuple[str, int, int]] = {}
    total = generated("folded")
    for v, candidates in terms.items():
        for block in sorted(candidates, key=lambda b: blocks[b][0] != "hoisted"):  # hoisted: added once
            group = [*folded.get(block, []), v]
            others = [partner[block]] if block in partner else []
            gone = {block, *group, *others}
            value = total - sp.Add(*group) - sp.Add(*others)
            if all(not (e.xreplace({block: value}).free_symbols & gone) for e in exprs):
                folded.setdefault(block, []).append(v)
                biases[v.name] = blocks[block]
                break
    zero = frozenset({q.name for q in partner.values()} | set(biases))
    return Folding(summed, biases, zero)


def kernel_specs(plan: Plan) -> list[KernelSpec]:
    """The kernels of a plan's per-step pointwise stages (the hoisted pointwise stays in torch: it runs
    once per sequence). Symbols of `Folding.zero` are no arguments (the kernel reads them as 0); the
    gradient of a folded vector has mode "fold" (not written: a column sum after the loop)."""
    modes = backward_schedule(plan).modes
    fold = folding(plan)
    specs = []
    for pw in plan.pointwise:
        ins = tuple(KernelArg("input", s.name, _kind(plan, s)) for s in pw.inputs if s.name not in fold.zero)
        # one value per row in a function of another width (plan.Pointwise.row_outputs): [rows, 1]
        out_kinds = ["rowscalar" if pw.is_row_output(name) else "rows" for name, _ in pw.outputs]
        outs = tuple(KernelArg("output", name, k) for (name, _), k in zip(pw.outputs, out_kinds, strict=True))
        zero = tuple(s.name for s in pw.inputs if s.name in fold.zero)
        specs.append(KernelSpec(f"{pw.name}_forward", pw.stage, False, ins + outs, pw.name, zero))
        grads = tuple(KernelArg("grad_output", name, k)
                      for (name, _), k in zip(pw.outputs, out_kinds, strict=True))
        dsts = tuple(
            KernelArg("grad_input", s.name, _kind(plan, s),
                      "fold" if s.name in fold.biases else modes[pw.name][s.name])
            for s in pw.grad_inputs
        )
        specs.append(KernelSpec(f"{pw.name}_backward", pw.stage, True, ins + grads + dsts, pw.name, zero))
    return specs


class CPrinter(C99CodePrinter):
    """SymPy -> C for one element type; cell functions print as the static helpers of `_helpers`."""

    def __init__(self, names: dict[sp.Symbol, str], dtype: str):
        self.dtype = dtype
        helpers = {f: f"cd_{f}_{dtype}" for f in HELPERS}
        super().__init__({"type_aliases": {real: float32 if dtype == "f32" else float64},
                          "user_functions": helpers})
        self.names = names

    def _print_Symbol(self, expr):
        return self.names[expr]

    def _literal(self, value: float) -> str:
        text = repr(float(value))
        if "e" not in text and "." not in text and "inf" not in text and "nan" not in text:
            text += ".0"
        return text + ("f" if self.dtype == "f32" else "")

    def _print_Rational(self, expr):
        return self._literal(float(expr))

    _print_Float = _print_Rational

    def _print_Integer(self, expr):
        return self._literal(int(expr))

    def _print_Half(self, expr):
        return self._literal(0.5)

    def _print_spread(self, expr):
        """functions.spread: the kernel has whole rows (it has means or sums), so j1 - j0 is the width."""
        return f"({self._print(expr.args[0])} / ({C_TYPES[self.dtype]})(j1 - j0))"

    def _print_Pow(self, expr):
        base, exp = expr.args
        if exp.is_Integer and 1 <= abs(int(exp)) <= 4:
            b = "(" + self._print(base) + ")"
            prod = "*".join([b] * abs(int(exp)))
            return f"({prod})" if exp > 0 else f"({self._literal(1)}/({prod}))"
        return super()._print_Pow(expr)


def _helpers(dtype: str) -> str:
    """Cell functions with torch's definitions (softplus threshold 20, NaN-propagating max/min)."""
    t = C_TYPES[dtype]
    f = "f" if dtype == "f32" else ""
    s = dtype
    return f"""
static inline {t} cd_sigmoid_{s}({t} x) {{ return 1 / (1 + exp{f}(-x)); }}
static inline {t} cd_relu_{s}({t} x) {{ return x < 0 ? 0 : x; }}
static inline {t} cd_softplus_{s}({t} x) {{ return x > 20 ? x : log1p{f}(exp{f}(x)); }}
static inline {t} cd_logsigmoid_{s}({t} x) {{ return (x < 0 ? x : 0) - log1p{f}(exp{f}(-fabs{f}(x))); }}
static inline {t} cd_step_{s}({t} x) {{ return x <= 0 ? 0 : 1; }}
static inline {t} cd_maximum_{s}({t} a, {t} b) {{ return (a != a || a > b) ? a : b; }}
static inline {t} cd_minimum_{s}({t} a, {t} b) {{ return (a != a || a < b) ? a : b; }}
static inline {t} cd_less_{s}({t} a, {t} b) {{ return a < b ? 1 : 0; }}
static inline {t} cd_less_equal_{s}({t} a, {t} b) {{ return a <= b ? 1 : 0; }}
static inline {t} cd_where_{s}({t} c, {t} a, {t} b) {{ return c != 0 ? a : b; }}
static inline {t} cd_floor_{s}({t} x) {{ return floor{f}(x); }}
static inline {t} cd_mod_{s}({t} a, {t} b) {{ return a - b * floor{f}(a / b); }}
static inline {t} cd_sin_{s}({t} x) {{ return sin{f}(x); }}
static inline {t} cd_cos_{s}({t} x) {{ return cos{f}(x); }}
"""


def helper_functions(dtype: str) -> str:
    """The static helpers the kernels call, for sources built outside this module (celldsl/export/)."""
    return _helpers(dtype)


def simd_declarations() -> str:
    """Declare libm's functions as having SIMD variants (glibc's libmvec) so that gcc vectorises the
    row loops with them; compiled only with -DCELLDSL_LIBMVEC (see targets/c/fused.py)."""
    lines = ["#ifdef CELLDSL_LIBMVEC"]
    for name in LIBM:
        for t, suffix in (("float", "f"), ("double", "")):
            args = f"{t}, {t}" if name == "pow" else t
            lines.append("#pragma omp declare simd notinbranch")
            lines.append(f"extern {t} {name}{suffix}({args});")
    lines.append("#endif")
    return "\n".join(lines)


def _comment(text: str) -> str:
    """Text safe inside a C comment: printable ASCII, no comment end (file names come from users)."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text.replace("*/", "*?").replace("/*", "/?")


def kernel_function(spec: KernelSpec, pw: Pointwise, dtype: str) -> str:
    """The C of one kernel: NAME_cols (the loop over rows and a column range), NAME (all columns over
    `nt` threads), NAME_at (a step of the Python loop) and NAME_rows (a step of the native loop)."""
    t = C_TYPES[dtype]
    taken = set(C_RESERVED) | {f"cd_{f}_{dtype}" for f in HELPERS}
    taken |= {f + suffix for f in LIBM + ("fabs", "sqrt") for suffix in ("", "f")}
    names: dict[sp.Symbol, str] = {}
    syms = {s.name: s for s in pw.inputs}
    grads = dict(zip((n for n, _ in pw.outputs), pw.grad_outputs, strict=True))
    pre, row_ptrs, loads, body, row_post, post, reductions = [], [], [], [], [], [], []
    row_sums: list[str] = []  # per-row accumulators (gradients of one value per row)
    whole_rows = False  # a kernel that writes one value per row, or sums over a row, takes whole rows
    vector_sums: list[int] = []  # arguments that receive a vector gradient summed over rows
    results = dict(zip(pw.grad_inputs, pw.backward_results, strict=True)) if spec.backward else \
        dict(zip((n for n, _ in pw.outputs), pw.forward_results, strict=True))
    temps = pw.backward_temps if spec.backward else pw.forward_temps
    zero = {syms[name]: sp.Integer(0) for name in spec.zero}  # their value is inside another block
    if zero:
        results = {k: sp.sympify(e).xreplace(zero) for k, e in results.items()}
        temps = [(tmp, sp.sympify(e).xreplace(zero)) for tmp, e in temps]
    for k, arg in enumerate(spec.args):
        if arg.part in ("input", "grad_output"):
            sym = syms[arg.name] if arg.part == "input" else grads[arg.name]
            names[sym] = var = identifier("v_" + sym.name, taken)  # v_: never a C keyword or macro
            if arg.kind == "scalar":
                pre.append(f"    const {t} {var} = *(const {t} *)p[{k}];  /* {_comment(sym.name)} */")
            elif arg.kind == "vector":
                row_ptrs.append(f"        const {t} *a{k} = (const {t} *)p[{k}];")
                loads.append(f"            const {t} {var} = a{k}[j];  /* {_comment(sym.name)} */")
            elif arg.kind == "rowscalar":  # one value per row, the same for every column
                row_ptrs.append(f"        const {t} *a{k} = (const {t} *)p[{k}] + i * ld[{k}];")
                loads.append(f"            const {t} {var} = a{k}[0];  /* {_comment(sym.name)} */")
            else:
                row_ptrs.append(f"        const {t} *a{k} = (const {t} *)p[{k}] + i * ld[{k}];")
                loads.append(f"            const {t} {var} = a{k}[j];  /* {_comment(sym.name)} */")
    temps, results, passes, levels = _reduction_passes(temps, results)
    for tmp, _ in temps:
        names[tmp] = identifier("v_" + tmp.name, taken)
    for red, _kind, _arg in passes:
        names[red] = identifier("v_" + red.name, taken)
    printer = CPrinter(names, dtype)
    plan_rows = materialized(temps, passes, levels, list(results.values()))
    slot_of = {tmp: k for k, tmp in enumerate(plan_rows.kept)}

    def temp_lines(computed, loaded):
        """The temps of one loop over a row's columns: kept ones read from the scratch row, the others
        computed (and written to the scratch row when a later loop reads them)."""
        lines = []
        for tmp, e in temps:
            kept = f"cd_kept[{slot_of[tmp]} * (j1 - j0) + j - j0]" if tmp in slot_of else None
            if tmp in loaded:
                lines.append(f"            const {t} {names[tmp]} = {kept};")
            elif tmp in computed:
                lines.append(f"            const {t} {names[tmp]} = {printer.doprint(e)};")
                if kept:
                    lines.append(f"            {kept} = {names[tmp]};")
        return lines

    passes_code = []  # per row: a pass over the columns for each level of means and sums, then the body
    mean = " / (double)(j1 - j0)"  # a kernel with reductions always gets whole rows (see the docstring)
    for group, (computed, loaded) in zip(levels, plan_rows.passes, strict=True):
        level = [(f"m_{names[passes[k][0]]}", *passes[k]) for k in group]  # (accumulator, red, kind, arg)
        passes_code += [f"        double {acc} = 0;  /* {kind} of {_comment(sp.sstr(arg))[:60]} */"
                        for acc, _red, kind, arg in level]
        passes_code += [f"#pragma omp simd reduction(+:{', '.join(acc for acc, *_ in level)})",
                        "        for (int64_t j = j0; j < j1; ++j) {", *loads, *temp_lines(computed, loaded)]
        passes_code += [f"            {acc} += (double)({printer.doprint(arg)});"
                        for acc, _red, _kind, arg in level]
        passes_code.append("        }")
        passes_code += [f"        const {t} {names[red]} = ({t})({acc}{mean if kind == 'mean' else ''});"
                        for acc, red, kind, _arg in level]
    if passes:
        body += temp_lines(*plan_rows.body)
    else:
        body += [f"            const {t} {names[tmp]} = {printer.doprint(e)};" for tmp, e in temps]
    for k, arg in enumerate(spec.args):
        if arg.part == "output":
            value = printer.doprint(results[arg.name])
            row_ptrs.append(f"        {t} *o{k} = ({t} *)p[{k}] + i * ld[{k}];")
            if arg.kind == "rowscalar":  # one value per row, the same in every column: written once
                whole_rows = True
                body.append(f"            if (j == j0) o{k}[0] = {value};  /* {_comment(arg.name)} */")
            else:
                body.append(f"            o{k}[j] = {value};  /* {_comment(arg.name)} */")
        elif arg.part == "grad_input":
            expr = results[syms[arg.name]]
            if (expr == 0 and arg.mode != "=") or arg.mode.startswith("same:") or arg.mode == "fold":
                continue
            value = printer.doprint(expr)
            if arg.kind == "rows":
                row_ptrs.append(f"        {t} *o{k} = ({t} *)p[{k}] + i * ld[{k}];")
                body.append(f"            o{k}[j] {arg.mode} {value};  /* d {_comment(arg.name)} */")
            elif arg.kind == "vector":
                vector_sums.append(k)
                row_ptrs.append(f"        double *o{k} = (double *)p[{k}];")
                body.append(f"            o{k}[j] += (double)({value});  /* d {_comment(arg.name)} */")
            elif arg.kind == "rowscalar":  # summed over the row's columns, then written once per row
                row_sums.append(f"r{k}")
                row_ptrs.append(f"        {t} *o{k} = ({t} *)p[{k}] + i * ld[{k}];")
                row_ptrs.append(f"        double r{k} = 0;  /* d {_comment(arg.name)} */")
                body.append(f"            r{k} += (double)({value});")
                row_post.append(f"        o{k}[0] {arg.mode} ({t})r{k};")
            else:
                reductions.append(f"s{k}")
                pre.append(f"    double s{k} = 0;  /* d {_comment(arg.name)} */")
                body.append(f"            s{k} += (double)({value});")
                post.append(f"    ((double *)p[{k}])[slot] += s{k};")
    simd = f" reduction(+:{', '.join(reductions + row_sums)})" if reductions or row_sums else ""
    fn, m = f"{spec.name}_{dtype}", len(spec.args)
    lines = [
        f"static void {fn}_cols(int64_t n, void *const *p, const int64_t *ld, int64_t j0, int64_t j1, "
        "int64_t slot)",
        "{",
        *pre,
        *([f"    {t} *cd_kept = ({t} *)cd_scratch({len(plan_rows.kept)} * (j1 - j0) * sizeof({t}));"]
          if plan_rows.kept else []),
        "    for (int64_t i = 0; i < n; ++i) {",
        *row_ptrs,
        *passes_code,
        f"#pragma omp simd{simd}",
        "        for (int64_t j = j0; j < j1; ++j) {",
        *loads,
        *body,
        "        }",
        *row_post,
        "    }",
        *post,
        *(["    free(cd_kept);"] if plan_rows.kept else []),
        "    (void)p; (void)ld; (void)slot;",
        "}",
        "",
        f"void {fn}(int64_t n, int64_t H, void *const *p, const int64_t *ld, int64_t nt)",
        "{",
        *(_split_rows(fn, t, m, vector_sums) if row_sums or passes or whole_rows else _split_columns(fn)),
        "}",
        "",
        f"void {fn}_at(int64_t r, int64_t q, int64_t n, int64_t H, const cd_rows *args, int64_t nt)",
        "{",
        f"    void *p[{m}];",
        f"    int64_t ld[{m}];",
        f"    cd_pointers(args, {m}, r, q, p, ld);",
        f"    {fn}(n, H, p, ld, nt);",
        "}",
        "",
        f"static void {fn}_rows(const cd_rows *args, int64_t r, int64_t q, int64_t n, int64_t j0, "
        "int64_t j1, int64_t slot)",
        "{",
        f"    void *p[{m}];",
        f"    int64_t ld[{m}];",
        f"    cd_pointers(args, {m}, r, q, p, ld);",
        f"    {fn}_cols(n, p, ld, j0, j1, slot);",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _split_columns(fn: str) -> list[str]:
    """The body of NAME: each of nt threads takes a range of columns (multiples of 16) of every row."""
    return ["    const int64_t chunk = ((H + nt - 1) / nt + 15) / 16 * 16;  /* columns per thread */",
            "#pragma omp parallel for num_threads(nt) if(nt > 1) schedule(static)",
            "    for (int64_t c = 0; c < nt; ++c)",
            f"        {fn}_cols(n, p, ld, CD_MIN(c * chunk, H), CD_MIN(c * chunk + chunk, H), c);"]


def _split_rows(fn: str, t: str, m: int, vector_sums: list[int]) -> list[str]:
    """The body of NAME for a kernel that needs whole rows (means or sums over a row): each of nt
    threads takes a range of rows. Every argument with a row stride starts at the thread's first
    row; the vector gradients, which sum over all rows, go to private columns for threads past the
    first and are added at the end (scalar gradients already have one slot per thread)."""
    lines = ["    nt = CD_MIN(nt, n > 0 ? n : 1);",
             "    const int64_t per = (n + nt - 1) / nt;  /* rows per thread */"]
    if vector_sums:
        lines.append(f"    double *own = nt > 1 ? (double *)cd_scratch((nt - 1) * {len(vector_sums)} * H * "
                     "sizeof(double)) : 0;")
        lines.append(f"    if (own) memset(own, 0, (nt - 1) * {len(vector_sums)} * H * sizeof(double));")
    lines += ["#pragma omp parallel for num_threads(nt) if(nt > 1) schedule(static)",
              "    for (int64_t c = 0; c < nt; ++c) {",
              "        const int64_t i0 = CD_MIN(c * per, n);",
              f"        void *q[{m}];",
              f"        for (int k = 0; k < {m}; ++k)",
              f"            q[k] = (char *)p[k] + i0 * ld[k] * (int64_t)sizeof({t});"]
    lines += [f"        if (c > 0) q[{k}] = own + ((c - 1) * {len(vector_sums)} + {v}) * H;"
              for v, k in enumerate(vector_sums)]
    lines += [f"        {fn}_cols(CD_MIN(per, n - i0), q, ld, 0, H, c);", "    }"]
    if vector_sums:
        lines += ["    for (int64_t c = 1; c < nt; ++c)",
                  "        for (int64_t j = 0; j < H; ++j) {",
                  *[f"            ((double *)p[{k}])[j] += own[((c - 1) * {len(vector_sums)} + {v}) * H + j];"
                    for v, k in enumerate(vector_sums)],
                  "        }",
                  "    free(own);"]
    return lines


@dataclass(frozen=True)
class RowPlan:
    """Which temps each loop over a row's columns computes and which it reads back.

    A kernel with means or sums over a row runs one loop per level of reductions (`_reduction_passes`),
    then its body; a temp that several of those loops need (a gate's sigmoid, say) is computed by the
    first and kept in a scratch row (`cd_kept`, one row of the temp per kept temp) for the others,
    instead of being computed again by each. passes: (computed, loaded) per level, in order; body:
    the same for the body; kept: the temps some later loop loads, in slot order."""

    passes: list[tuple[set, set]]
    body: tuple[set, set]
    kept: list


def materialized(temps, passes, levels, results) -> RowPlan:
    """The RowPlan of a kernel: each loop (a level of passes, `_reduction_passes`) computes the temps
    its expressions need that no earlier loop computed, and loads those an earlier loop did."""
    defined = dict(temps)
    done: set = set()  # temps some earlier loop computed

    def need(exprs):
        computed, loaded, todo = set(), set(), [s for e in exprs for s in sp.sympify(e).free_symbols]
        while todo:
            s = todo.pop()
            if s not in defined or s in computed or s in loaded:
                continue
            if s in done:
                loaded.add(s)
            else:
                computed.add(s)
                todo.extend(defined[s].free_symbols)
        return computed, loaded

    per_pass = []
    for group in levels:
        computed, loaded = need([passes[k][2] for k in group])
        per_pass.append((computed, loaded))
        done |= computed
    body = need(results)
    loads = set().union(body[1], *(ld for _, ld in per_pass))
    return RowPlan(per_pass, body, [tmp for tmp, _ in temps if tmp in loads])


def _reduction_passes(temps, results):
    """Means and sums over a row's columns (functions.Reduction) need the whole row first: each becomes
    a symbol computed by a pass of its own, in order of nesting (layernorm's variance reads its mean).
    Returns (temps, results) with every reduction replaced by its symbol; per reduction, in an order
    where each pass reads only earlier ones, (its symbol, "mean" | "sum", its argument); and the
    passes (indices) grouped by level, a pass's level one more than the highest of the reductions it
    reads, so that the passes of a level share one loop over the columns: ln_lstm's forward has 18
    reductions in 4 levels (its kernel's share of a forward+backward 4.2% -> 3.4% in a perf profile),
    its backward 24 in 8 (whose time is mostly in the body, which this does not change). Which temps
    each loop computes or reads back is `materialized`'s answer."""
    nodes = []
    for e in [*(e for _, e in temps), *(results.values() if isinstance(results, dict) else results)]:
        for r in sorted(e.atoms(Reduction), key=sp.default_sort_key):
            if r not in nodes:
                nodes.append(r)
    if not nodes:
        return temps, results, [], []
    by_depth = sorted(nodes, key=lambda r: len(r.args[0].atoms(Reduction)))  # inner reductions first
    sub = {r: generated(f"red{i}") for i, r in enumerate(by_depth)}

    def replace(e):
        return e.xreplace(sub)

    temps = [(tmp, replace(e)) for tmp, e in temps]
    results = {k: replace(v) for k, v in results.items()}
    defined = dict(temps)
    passes, level = [], {}  # reduction symbol -> its level, once a pass computes it
    pending = list(by_depth)
    while pending:
        for r in pending:
            arg = r.args[0].xreplace({k: v for k, v in sub.items() if k != r})
            needed, todo = set(), list(arg.free_symbols)
            while todo:
                s = todo.pop()
                if s in defined and s not in needed:
                    needed.add(s)
                    todo.extend(defined[s].free_symbols)
            reds = {s for s in needed | arg.free_symbols if s in sub.values()} | \
                {s for tmp in needed for s in defined[tmp].free_symbols if s in sub.values()}
            if reds <= level.keys():  # every reduction it reads is computed by an earlier pass
                kind = "mean" if isinstance(r, rowmean) else "sum"
                passes.append((sub[r], kind, arg))
                level[sub[r]] = 1 + max((level[s] for s in reds), default=-1)
                pending.remove(r)
                break
        else:
            raise AssertionError("reductions that read each other")
    groups: dict[int, list[int]] = {}
    for k, (red, _kind, _arg) in enumerate(passes):
        groups.setdefault(level[red], []).append(k)
    return temps, results, passes, [groups[n] for n in sorted(groups)]


CALL_AT = """
/* Where the arguments of a step are: the step's rows start at row r, the previous step's at row q
   (q < 0: the first step). Argument k points at base + r * row_bytes or, when prev (a previous
   state), at base + q * row_bytes (first when q < 0: the initial state); its rows are ld elements
   apart. A vector, scalar or [N, H] buffer has row_bytes 0. */
typedef struct { int64_t base, row_bytes, first, ld, prev; } cd_rows;
#define CD_MIN(a, b) ((a) < (b) ? (a) : (b))

static inline void *cd_at(const cd_rows *a, int64_t r, int64_t q)
{
    const int64_t row = a->prev ? q : r;
    return (void *)(intptr_t)(row < 0 ? a->first : a->base + row * a->row_bytes);
}

static inline void cd_pointers(const cd_rows *args, int64_t m, int64_t r, int64_t q, void **p, int64_t *ld)
{
    for (int64_t k = 0; k < m; ++k) {
        p[k] = cd_at(&args[k], r, q);
        ld[k] = args[k].ld;
    }
}

/* The scratch rows of a kernel with reductions (see RowPlan): a few kB per call. Out of memory
   here is out of memory everywhere; there is no result to return instead of one computed wrong. */
static void *cd_scratch(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fputs("celldsl: out of memory for a kernel's scratch rows\\n", stderr);
        abort();
    }
    return p;
}

int64_t cd_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
"""

HEADER = """/* Generated by celldsl for the cell {name}: the pointwise stages of one step as C loops over
   [n, H], a GEMM and the time loop over both; do not edit. The torch module of the same cell is its
   executable meaning. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

"""


def c_source(plan: Plan) -> str:
    """One translation unit with a float and a double version of every kernel of `kernel_specs` and
    the native time loop over them and the GEMM (targets/c/emit_loop.py; the GEMM,
    targets/c/emit_gemm.py, is its own library)."""
    by_name = {pw.name: pw for pw in plan.pointwise}
    header = HEADER.format(name=_comment(plan.ir.name))
    specs = kernel_specs(plan)
    parts = [header, simd_declarations(), CALL_AT]
    for dtype in C_TYPES:
        parts.append(_helpers(dtype))
        for spec in specs:
            parts.append(kernel_function(spec, by_name[spec.pointwise], dtype))
        parts.append(loop_source(plan, specs, dtype))
    return "\n".join(parts)
