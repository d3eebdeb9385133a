"""Plan -> a Python module of Triton kernels with the torch module's function signatures.

For every Pointwise of the plan the module holds a `@triton.jit` step function (pure math on register
values, so a persistent kernel can inline it unchanged), one kernel for the forward and one for the
derived backward, and host wrappers `stage{k}_forward(*inputs)` / `stage{k}_backward(*inputs,
*grad_outputs)` (and `hoist_forward` / `hoist_backward`) that take and return exactly what the torch
module's functions do (targets/torch/emit.py), so targets/loop.py runs either unchanged.

Math is fp32 (fp64 when the storage is fp64, so gradcheck works), whatever the storage dtype. The
activations and host helpers live once in targets/triton/helpers.py, which every file imports as `lib`.
"""

from __future__ import annotations

from ...lang.functions import Reduction
from ...plan import Plan, Pointwise
from ..printers import PYTHON_RESERVED, TargetPrinter, identifier, python_text
from .applies import schedule_names

TWO_D = ("input", "state", "hoisted", "product", "operand")  # [rows, width] tensors (a row stride each)
RESERVED = {"tl", "triton", "torch", "lib", "shared_helpers", "BLOCK", "COMPUTE"}
KERNEL_LOCALS = {"offs", "mask", "row", "col", "numel", "width", "outs"}  # names _kernel and _host write


class TritonPrinter(TargetPrinter):
    functions = {
        "sigmoid": "lib.sigmoid({})",
        "tanh": "lib.tanh({})",
        "relu": "tl.maximum({}, 0.0, propagate_nan=tl.PropagateNan.ALL)",  # NaN stays NaN, as torch's
        "exp": "tl.exp({})",
        "log": "tl.log({})",
        "sin": "tl.sin({})",
        "cos": "tl.cos({})",
        "softplus": "lib.softplus({})",
        "logsigmoid": "lib.logsigmoid({})",
        "Abs": "tl.abs({})",
        "sign": "lib.sign({})",
        "sqrt": "tl.sqrt({})",
        "step": "lib.step({})",
        "maximum": "tl.maximum({}, {}, propagate_nan=tl.PropagateNan.ALL)",
        "minimum": "tl.minimum({}, {}, propagate_nan=tl.PropagateNan.ALL)",
        "pow": "lib.pow({}, {})",
        "where": "tl.where(({0}) != 0, {1}, {2}).to(({0}).dtype)",
        "floor": "tl.floor({})",
        "mod": "lib.mod({}, {})",
        "rowmean": "lib.rowmean({}, mask, width)",
        "rowsum": "lib.rowsum({}, mask)",
        "spread": "(({}) / width)",  # functions.spread: its function reduces, so it has the width
    }

    def _print_less(self, expr, op="<"):
        """1 where a < b, else 0, in the dtype of the operand that is a tensor (a float literal is fp32)."""
        a, b = (self._print(x) for x in expr.args)
        tensor = b if expr.args[0].is_Number else a
        return f"tl.where({a} {op} {b}, 1.0, 0.0).to(({tensor}).dtype)"

    def _print_less_equal(self, expr):
        return self._print_less(expr, "<=")

    def _print_NumberSymbol(self, expr):  # E (from exp(1)), pi
        return repr(float(expr))

    _print_Exp1 = _print_Pi = _print_NumberSymbol

    def _print_Pow(self, expr, rational=False):
        """`tl` tensors have no `**`: integer powers multiply out, others go through exp and log."""
        base, exp = expr.args
        if exp.is_Integer and 5 <= abs(int(exp)) <= 16:
            b = self.parenthesize(base, 100)
            prod = "(" + "*".join([b] * abs(int(exp))) + ")"
            return prod if int(exp) > 0 else f"(1.0/{prod})"
        if exp.is_Integer and abs(int(exp)) > 16:
            b = self._print(base)
            magnitude = f"tl.exp({float(exp)!r} * tl.log(tl.abs({b})))"
            return magnitude if int(exp) % 2 == 0 else f"(lib.sign({b}) * {magnitude})"
        return super()._print_Pow(expr, rational)


class Function:
    """Names for one pointwise function (forward or backward) in its step, kernel and host wrapper."""

    def __init__(self, prefix: str, pw: Pointwise, plan: Plan, backward: bool):
        self.prefix, self.pw, self.backward = prefix, pw, backward
        # the scope of the step function, kernel and host wrapper: Python's reserved words, the module's
        # helpers and functions, the kernel's locals, then every symbol's identifier as it is handed out
        taken = set(PYTHON_RESERVED) | RESERVED | KNOWN_GLOBALS | KERNEL_LOCALS | set(module_names(plan))
        self.args = list(pw.inputs) + (list(pw.grad_outputs) if backward else [])
        self.names = {s: identifier(s.name, taken) for s in self.args}
        # rowscalar: an input of one value per sequence ([rows, 1], `input t : 1`, `state n : 1`), the same
        # in every column of a function of another width (plan.Pointwise.kinds); rowgrad: the gradient of
        # an output of one value per row there
        self.kinds = [("rowscalar" if pw.kinds.get(s.name) == "row" else plan.role(s)) for s in pw.inputs]
        if backward:
            self.kinds += ["rowgrad" if pw.is_row_output(n) else "grad" for n, _ in pw.outputs]
        self.ptr = {s: identifier(self.names[s], taken, "_ptr") for s in self.args}
        self.stride = {
            s: identifier(self.names[s], taken, "_stride")
            for s, k in zip(self.args, self.kinds, strict=True)
            if k in TWO_D or k in ("grad", "rowscalar", "rowgrad")
        }
        if backward:
            self.temps, results = pw.backward_temps, pw.backward_results
            self.result_names = [identifier("d_" + self.names[s], taken) for s in pw.grad_inputs]
        else:
            self.temps, results = pw.forward_temps, pw.forward_results
            self.result_names = [identifier(name, taken) for name, _ in pw.outputs]
        self.results = list(results)
        # forward results of one value per row (plan.Pointwise.row_outputs) are stored as [rows, 1]
        self.per_row = [False] * len(self.results)
        if not backward:
            self.per_row = [pw.is_row_output(n) for n, _ in pw.outputs]
        # results that are zero (backward) return None; equal results are computed and stored once
        # and returned as the same tensor, as the torch module does (gate pre-activation gradients
        # usually serve a product, a hoisted product and a bias at once)
        self.slot_of: dict[int, int] = {}
        self.unique: list[int] = []  # index of the first result of each stored slot
        first_of: dict[tuple, int] = {}
        for i, r in enumerate(self.results):
            if backward and r == 0:
                continue
            if (r, self.per_row[i]) not in first_of:
                first_of[(r, self.per_row[i])] = len(self.unique)
                self.unique.append(i)
            self.slot_of[i] = first_of[(r, self.per_row[i])]
        self.out_ptrs = [identifier(self.result_names[i], taken, "_out_ptr") for i in self.unique]
        for t, _ in self.temps:
            self.names[t] = identifier(t.name, taken)
        # the input whose [rows, width] every result has: build_plan gives each function one
        # (Pointwise.ref); a Pointwise made otherwise takes its first [rows, width] input
        rows = (s for s, k in zip(self.args, self.kinds, strict=False) if k in TWO_D)
        self.ref = pw.ref or next(rows, None)
        self.reduces = any(e.atoms(Reduction) for e in [*(e for _, e in self.temps), *self.results])
        if self.ref is None:
            raise NotImplementedError(
                f"{prefix}: no input with a row per sequence (only vectors/scalars); nothing sets the shape"
            )


KNOWN_GLOBALS = {"lib", "shared_helpers"}  # the module-level names every generated file binds


def _step_function(f: Function) -> str:
    """The pure-math `@triton.jit` function: register values in, tuple of results out."""
    printer = TritonPrinter(f.names)
    name = f"{f.prefix}_step_grad" if f.backward else f"{f.prefix}_step"
    params = ", ".join([*(f.names[s] for s in f.args), *(["mask", "width"] if f.reduces else [])])
    lines = ["@triton.jit", f"def {name}({params}):"]
    what = "gradient of every input that needs one" if f.backward else "the outputs"
    lines.append(f"    # -> {what}: ({', '.join(f.result_names[i] for i in f.unique)})")
    for t, e in f.temps:
        lines.append(f"    {f.names[t]} = {printer.doprint(e)}")
    outs = []
    ref = f.names[f.ref]  # a [BLOCK] value: the shape and compute dtype of a constant result
    for i in f.unique:
        r = f.results[i]
        if not r.free_symbols:
            outs.append(f"tl.full({ref}.shape, {float(r)!r}, {ref}.dtype)")
        else:
            outs.append(printer.doprint(r))
    lines.append(f"    return ({', '.join(outs)},)" if outs else "    return ()")
    return "\n".join(lines) + "\n"


def _kernel(f: Function) -> str:
    """Loads each input at the flattened offset, runs the step function, stores the results."""
    name = f"{f.prefix}_{'backward' if f.backward else 'forward'}_kernel"
    params: list[str] = []
    for s in f.args:
        params.append(f.ptr[s])
        if s in f.stride:
            params.append(f.stride[s])
    params += f.out_ptrs
    params += ["numel", "width", "BLOCK: tl.constexpr", "COMPUTE: tl.constexpr"]
    lines = ["@triton.jit", f"def {name}(", *[f"    {p}," for p in params], "):"]
    if f.reduces:  # means and sums over a row: one program holds a whole row
        lines += [
            "    row = tl.program_id(0).to(tl.int64)",
            "    col = tl.arange(0, BLOCK)",
            "    mask = col < width",
            "    offs = row * width + col",
        ]
    else:
        lines += [
            "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
            "    mask = offs < numel",
            "    row = (offs // width).to(tl.int64)",
            "    col = offs % width",
        ]
    for s, k in zip(f.args, f.kinds, strict=True):
        v, p = f.names[s], f.ptr[s]
        if k == "vector":
            lines.append(f"    {v} = tl.load({p} + col, mask=mask, other=0.0).to(COMPUTE)")
        elif k == "scalar":
            lines.append(f"    {v} = tl.load({p}).to(COMPUTE)")
        elif k in ("rowscalar", "rowgrad"):  # + col * 0: a [BLOCK] of the row's value where row is one
            # number (a program holds a whole row)
            at = f"{p} + row * {f.stride[s]}" + (" + col * 0" if f.reduces else "")
            lines.append(f"    {v} = tl.load({at}, mask=mask, other=0.0).to(COMPUTE)")
        else:
            at = f"{p} + row * {f.stride[s]} + col"
            lines.append(f"    {v} = tl.load({at}, mask=mask, other=0.0).to(COMPUTE)")
    step = f"{f.prefix}_step_grad" if f.backward else f"{f.prefix}_step"
    call = ", ".join([*(f.names[s] for s in f.args), *(["mask", "width"] if f.reduces else [])])
    results = [f.result_names[i] for i in f.unique]
    if results:
        lines.append(f"    ({', '.join(results)},) = {step}({call})")
    for i, r, o in zip(f.unique, results, f.out_ptrs, strict=True):
        if f.per_row[i]:  # one value per row: column 0 stores it into [rows, 1]
            value = f"({r} + (col * 0).to(COMPUTE))"  # a [BLOCK] even where r is one number
            at, stored = f"{o} + row + col * 0", f"{value}.to({o}.dtype.element_ty)"
            lines.append(f"    tl.store({at}, {stored}, mask=mask & (col == 0))")
        else:
            lines.append(f"    tl.store({o} + offs, {r}.to({o}.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def _host(f: Function, fn_name: str) -> str:
    """The wrapper with the torch module's signature and return convention."""
    kernel = f"{f.prefix}_{'backward' if f.backward else 'forward'}_kernel"
    params = [f.names[s] for s in f.args]
    shapes = []
    for s, k in zip(f.args, f.kinds, strict=True):
        shape = {"vector": "[H]", "scalar": "[]", "grad": "like the output", "rowscalar": "[N, 1]",
                 "rowgrad": "[N, 1]"}.get(k, "[N, H]")
        if k == "input":
            shape = "[T, N, I]" if f.prefix == "hoist" else "[N, I]"
        shapes.append(f"{f.names[s]} {shape}")
    doc = f'    """{fn_name}({", ".join(shapes)})'
    if f.backward:
        doc += " -> one gradient per input of the forward that needs one (None where it is zero)"
    else:
        doc += f" -> ({python_text(', '.join(n for n, _ in f.pw.outputs))})"
    lines = [f"def {fn_name}({', '.join(params)}):", doc + '"""']
    ref = f.names[f.ref]
    lines.append(f"    outs = lib.empty({ref}, {len(f.unique)})")
    for slot, i in enumerate(f.unique):
        if f.per_row[i]:
            lines.append(f"    outs[{slot}] = {ref}.new_empty(({ref}.shape[0], 1))")
    args = []
    for s, k in zip(f.args, f.kinds, strict=True):
        v = f.names[s]
        if k == "vector":
            lines.append(f"    {v} = lib.vec({v})")
            args.append(v)
        elif k == "scalar":
            args.append(v)
        else:
            lines.append(f"    {v}, {f.stride[s]} = lib.rows({v})")
            args += [v, f.stride[s]]
    if f.unique:
        whole_rows = ", whole_rows=True" if f.reduces else ""
        lines.append(f"    lib.launch({kernel}, {ref}, [{', '.join(args)}], outs{whole_rows})")
    rets = [f"outs[{f.slot_of[i]}]" if i in f.slot_of else "None" for i in range(len(f.results))]
    lines.append(f"    return ({', '.join(rets)},)")
    return "\n".join(lines) + "\n"


def module_names(plan: Plan) -> list[str]:
    """Every function the module defines: per pointwise its step functions, kernels and host wrappers,
    then the kernels of the schedules that apply (schedule_names)."""
    names = []
    for prefix in plan.pointwise_prefixes():
        for way in ("forward", "backward"):
            names += [f"{prefix}_{way}", f"{prefix}_{way}_kernel"]
        names += [f"{prefix}_step", f"{prefix}_step_grad"]
    return names + schedule_names(plan)


def pointwise_sections(plan: Plan) -> list[str]:
    """The module's part for every pointwise function: step functions, kernels and host wrappers."""
    parts = []
    for pw in plan.all_pointwise():
        prefix = pw.name
        parts.append(f"# ---- {prefix} " + "-" * (95 - len(prefix)))
        for backward in (False, True):
            f = Function(prefix, pw, plan, backward)
            parts.append(_step_function(f))
            parts.append(_kernel(f))
            parts.append(_host(f, f"{prefix}_{'backward' if backward else 'forward'}"))
    return parts
