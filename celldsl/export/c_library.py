"""A standalone C library of one cell's forward over a sequence: <name>.c, <name>.h and the weights as
a flat little-endian binary file, with no dependency but libc and libm.

The step's pointwise stages are the CPU backend's own kernels (targets/c/emit.kernel_function: the
same C99 printing of the CSE'd SymPy step), made static; around them this file writes a plain time
loop and a plain GEMM loop (no GEMM library, no threads), with every size of the exported weights
fixed at compile time and T, N given per call. The only user text in the output is the cell's name
made an identifier (after the prefix `celldsl_`, which no generated name uses) and, in comments,
weight labels reduced to printable ASCII.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..targets.c.emit import CALL_AT, KernelArg, KernelSpec, helper_functions, kernel_function
from ..targets.printers import identifier
from .model import ExportCell, ExportError

TYPES = {"f32": ("float", "<f4", torch.float32), "f64": ("double", "<f8", torch.float64)}


def comment(text: str) -> str:
    """Printable ASCII without a comment's end (labels name the cell's parameters)."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text.replace("*/", "*?").replace("/*", "/?")


def c_name(cell: ExportCell) -> str:
    """The file stem and the prefix of every public name: `celldsl_` + the cell's name as an identifier."""
    return "celldsl_" + identifier(cell.ir.name, set())


def _spec(cell: ExportCell, pw) -> KernelSpec:
    """The forward kernel of one pointwise stage, every input an argument (no folding into GEMMs)."""
    plan = cell.plan

    def kind(sym):
        role = plan.role(sym)
        if role in ("vector", "scalar"):
            return role
        return "rowscalar" if plan.width(sym) == "row" else "rows"

    def out_kind(name):  # a `: 1` state's new value in an H-wide function: one value per row
        row = getattr(pw, "is_row_output", None)
        return "rowscalar" if row is not None and row(name) else "rows"

    ins = tuple(KernelArg("input", s.name, kind(s)) for s in pw.inputs)
    outs = tuple(KernelArg("output", name, out_kind(name)) for name, _ in pw.outputs)
    return KernelSpec(f"{pw.name}_forward", pw.stage, False, ins + outs, pw.name)


def _static(text: str) -> str:
    """Every external definition of the kernels made static: two exported cells link together."""
    return re.sub(r"^(void|int64_t) ", r"static \1 ", text, flags=re.M)


class _Layout:
    """Offsets of the weights (elements of the binary file) and of the workspace (multiples of N)."""

    def __init__(self, cell: ExportCell):
        self.weights: list[tuple[str, tuple[int, ...], int]] = []
        at = 0
        for label, w in cell.weights():
            self.weights.append((label, tuple(w.shape), at))
            at += w.numel()
        self.weight_count = at
        plan, ir = cell.plan, cell.ir
        nh = len(plan.hoisted)
        self.hoisted = [self.weights[i][2] for i in range(nh)]
        self.step = [self.weights[nh + i][2] for i in range(len(plan.gemms))]
        nvec = sum(1 for p in ir.params.values() if p.kind == "vector")
        vec_names = [n for n, p in ir.params.items() if p.kind == "vector"]
        sca_names = [n for n, p in ir.params.items() if p.kind == "scalar"]
        base = nh + len(plan.gemms)
        self.param = {n: self.weights[base + i][2] for i, n in enumerate(vec_names)}
        self.param |= {n: self.weights[base + nvec + i][2] for i, n in enumerate(sca_names)}
        widths = cell.state_widths()
        self.state_width = sum(widths)
        self.state_at = {s: sum(widths[:i]) for i, s in enumerate(ir.states)}  # x N
        work = 2 * self.state_width  # current and new states
        self.new_at = self.state_width
        self.hoisted_at, self.product_at, self.env_at = [], [], {}
        for w in cell.hoisted_w:
            self.hoisted_at.append(work)
            work += _rows(w)
        for w in cell.step_w:
            self.product_at.append(work)
            work += _rows(w)
        self.env_width = {}
        for pw in plan.all_pointwise():
            for name, _ in pw.outputs:
                if name.endswith("'") and name[:-1] in ir.states:
                    continue
                self.env_width[name] = _value_width(cell, name)
                self.env_at[name] = work
                work += self.env_width[name]
        self.zeros_at = work  # [N, I] zeros: prev(x) before the first step
        work += cell.input_size
        self.work = work


def _rows(w: torch.Tensor) -> int:
    return w.shape[0] if w.dim() == 2 else w.shape[0] * w.shape[1] * w.shape[2]


def _value_width(cell: ExportCell, name: str) -> int:
    ir, plan = cell.ir, cell.plan
    if name == ir.output:
        return cell.sizes[ir.width(name)]
    for g in [*plan.gemms, *plan.hoisted]:
        if g.operand.name == name:
            return cell.sizes[g.operand_size]
    raise ExportError(f"cell {ir.name!r}: the step computes {name!r}, which is no state, output or GEMM "
                      "operand")


def _gemm_call(w: torch.Tensor, w_at: int, out: str, ld_out: int, v: str, ld_v: int) -> str:
    if w.dim() == 2:
        return f"cd_gemm(N, {w.shape[0]}, {w.shape[1]}, {v}, {ld_v}, W + {w_at}, {out}, {ld_out});"
    G, NH, dh, _ = w.shape
    return f"cd_gemm_heads(N, {G}, {NH}, {dh}, {v}, {ld_v}, W + {w_at}, {out}, {ld_out});"


# What the CPU backend's kernels leave that a standalone build would warn about, silenced for this file
PRAGMAS = """#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  /* the kernels' OpenMP hints, without -fopenmp */
#pragma GCC diagnostic ignored "-Wunused-function"  /* each kernel's other entry points */
#pragma GCC diagnostic ignored "-Wunused-variable"  /* loads a pass over a row does not read */
#endif"""

GEMMS = """
/* out[i, r] = sum_k v[i, k] W[r, k]: rows i < n, r < R (v's rows ldv apart, out's ldo). */
static void cd_gemm(int64_t n, int64_t R, int64_t K, const {t} *v, int64_t ldv, const {t} *W, {t} *out,
                    int64_t ldo)
{{
    for (int64_t i = 0; i < n; ++i)
        for (int64_t r = 0; r < R; ++r) {{
            {t} acc = 0;
            for (int64_t k = 0; k < K; ++k)
                acc += v[i * ldv + k] * W[r * K + k];
            out[i * ldo + r] = acc;
        }}
}}

/* W [G, NH, dh, dh], block-diagonal per head:
   out[i, (g NH + h) dh + e] = sum_d v[i, h dh + d] W[g, h, e, d]. */
static void cd_gemm_heads(int64_t n, int64_t G, int64_t NH, int64_t dh, const {t} *v, int64_t ldv,
                          const {t} *W, {t} *out, int64_t ldo)
{{
    for (int64_t i = 0; i < n; ++i)
        for (int64_t g = 0; g < G; ++g)
            for (int64_t h = 0; h < NH; ++h)
                for (int64_t e = 0; e < dh; ++e) {{
                    {t} acc = 0;
                    for (int64_t d = 0; d < dh; ++d)
                        acc += v[i * ldv + h * dh + d] * W[((g * NH + h) * dh + e) * dh + d];
                    out[i * ldo + (g * NH + h) * dh + e] = acc;
                }}
}}
"""


def _header(cell: ExportCell, name: str, dtype: str, lay: _Layout) -> str:
    t = TYPES[dtype][0]
    up = name.upper()
    ir = cell.ir
    lines = [
        "/* Generated by celldsl export --c; do not edit. The forward of one recurrent cell over a sequence,",
        "   one layer, one direction, in C99 with libm only.",
        "",
        "   x      [T, N, INPUT_SIZE]  time-major; the cell's inputs side by side, in declaration order:",
        *[f"            {comment(n)}: columns [{c.start}, {c.stop})" for n, c in cell.columns.items()],
        "   states [NUM_STATES blocks]: state k is [N, width_k] at offset N * STATE_OFFSET_k (elements):",
        *[f"            {k}: {comment(s)}, width {w}, offset N * {lay.state_at[s]}"
          for k, (s, w) in enumerate(zip(ir.states, cell.state_widths(), strict=True))],
        f"   out    [T, N, OUTPUT_SIZE]  the cell's output {comment(ir.output)} at every step",
        "   work   WORKSPACE_PER_ROW * N elements of scratch",
        f"   weights: WEIGHT_COUNT {t}s, the .bin file as written (little-endian), tensor by tensor, each",
        "            row-major in the shape given (GEMM weights [rows, K] compute v @ W^T; [G, NH, dh, dh]",
        "            is block-diagonal per head):",
        *[f"            at {at}: {comment(label)} {list(shape)}" for label, shape, at in lay.weights],
        "",
        "   state_in and state_out may be the same buffer. Returns 0, or -1 when T < 1 or N < 1. */",
        f"#ifndef {up}_H",
        f"#define {up}_H",
        "#include <stdint.h>",
        "",
        f"#define {up}_INPUT_SIZE {cell.input_size}",
        f"#define {up}_OUTPUT_SIZE {cell.output_width()}",
        f"#define {up}_NUM_STATES {len(ir.states)}",
        f"#define {up}_STATE_SIZE {lay.state_width}  /* the widths of all states: N * this elements */",
        f"#define {up}_WEIGHT_COUNT {lay.weight_count}",
        f"#define {up}_WORKSPACE_PER_ROW {lay.work}",
        "",
        f"int {name}_forward(int64_t T, int64_t N, const {t} *x, const {t} *weights, const {t} *state_in,",
        f"    {t} *state_out, {t} *out, {t} *work);",
        "",
        "#endif",
        "",
    ]
    return "\n".join(lines)


def _args(cell: ExportCell, spec: KernelSpec, lay: _Layout) -> list[tuple[str, int]]:
    """(pointer expression, leading dimension) of every argument of a forward kernel at step t."""
    plan, ir, sizes = cell.plan, cell.ir, cell.sizes
    I = cell.input_size
    where: dict[str, tuple[str, int]] = {}
    for gi, g in enumerate(plan.hoisted):
        at, ld = lay.hoisted_at[gi], _rows(cell.hoisted_w[gi])
        for j, p in enumerate(g.products):
            where[p.name] = (f"work + N * {at} + {sum(sizes[w] for w in g.widths[:j])}", ld)
    for gi, g in enumerate(plan.gemms):
        at, ld = lay.product_at[gi], _rows(cell.step_w[gi])
        for j, p in enumerate(g.products):
            where[p.name] = (f"work + N * {at} + {sum(sizes[w] for w in g.widths[:j])}", ld)
    out = []
    for a in spec.args:
        n = a.name
        if a.part == "output":
            if n.endswith("'") and n[:-1] in ir.states:
                s = n[:-1]
                out.append((f"work + N * {lay.new_at + lay.state_at[s]}", sizes[ir.width(s)]))
            else:
                out.append((f"work + N * {lay.env_at[n]}", lay.env_width[n]))
            continue
        role = plan.role(next(s for s in _inputs(spec, plan) if s.name == n))
        if role == "state":
            out.append((f"work + N * {lay.state_at[n]}", sizes[ir.width(n)]))
        elif role in ("vector", "scalar"):
            out.append((f"W + {lay.param[n]}", 0))
        elif role in ("hoisted", "product"):
            out.append(where[n])
        elif role == "operand":
            out.append((f"work + N * {lay.env_at[n]}", lay.env_width[n]))
        elif role == "input":
            out.append((_input_pointer(cell, n, lay), I))
        else:
            raise ExportError(f"cell {ir.name!r}: the step reads {n!r} of role {role}, which the C export "
                              "does not place")
    return out


def _inputs(spec, plan):
    pw = next(p for p in plan.all_pointwise() if p.name == spec.pointwise)
    return pw.inputs


def _input_pointer(cell: ExportCell, name: str, lay: _Layout) -> str:
    """The rows of input `name` (or prev(x, k)) at step t, as a C expression."""
    source, k = cell.ir.shifted.get(name, (name, 0))
    col = cell.columns[source].start
    if k == 0:
        return f"x + t * N * {cell.input_size} + {col}"
    return f"(t >= {k} ? x + (t - {k}) * N * {cell.input_size} : work + N * {lay.zeros_at}) + {col}"


def _hoisted_gemms(cell: ExportCell, lay: _Layout) -> list[str]:
    """The input projections of step t: on the step's rows of an input, or of a hoisted operand."""
    out = []
    for gi, g in enumerate(cell.plan.hoisted):
        name = g.operand.name
        if name in lay.env_at:
            v, ld = f"work + N * {lay.env_at[name]}", lay.env_width[name]
        else:
            v, ld = _input_pointer(cell, name, lay), cell.input_size
        out.append(_gemm_call(cell.hoisted_w[gi], lay.hoisted[gi], f"work + N * {lay.hoisted_at[gi]}",
                              _rows(cell.hoisted_w[gi]), v, ld))
    return out


def c_sources(cell: ExportCell, dtype: str = "f32") -> tuple[str, str, str]:
    """-> (file stem, .c text, .h text)."""
    name = c_name(cell)
    t = TYPES[dtype][0]
    lay = _Layout(cell)
    plan, ir = cell.plan, cell.ir
    specs = {pw.name: _spec(cell, pw) for pw in plan.all_pointwise()}
    kernels = [_static(kernel_function(specs[pw.name], pw, dtype)) for pw in plan.all_pointwise()]
    body = []
    for k in range(-1, plan.num_stages + 1):  # -1: the hoisted operands, computed from the step's inputs
        if k == 0:
            body += _hoisted_gemms(cell, lay)
        for gi, g in enumerate(plan.gemms):
            if g.stage != k:
                continue
            if plan.role(g.operand) == "state":
                v, ld = f"work + N * {lay.state_at[g.operand.name]}", cell.sizes[ir.width(g.operand.name)]
            else:
                v, ld = f"work + N * {lay.env_at[g.operand.name]}", lay.env_width[g.operand.name]
            body.append(_gemm_call(cell.step_w[gi], lay.step[gi], f"work + N * {lay.product_at[gi]}",
                                   _rows(cell.step_w[gi]), v, ld))
        for pw in plan.pointwise_of_stage(k) if k >= 0 else plan.hoist_pointwise:
            spec = specs[pw.name]
            args = _args(cell, spec, lay)
            body.append("{")
            body.append(f"    void *p[{len(args)}];")
            body.append(f"    int64_t ld[{len(args)}];")
            for j, (ptr, ld) in enumerate(args):
                body.append(f"    p[{j}] = (void *)({ptr}); ld[{j}] = {ld};")
            body.append(f"    {spec.name}_{dtype}_cols(N, p, ld, 0, {cell.sizes[pw.width]}, 0);")
            body.append("}")
    O = cell.output_width()
    if ir.output in ir.states:
        result = f"work + N * {lay.new_at + lay.state_at[ir.output]}"
    else:
        result = f"work + N * {lay.env_at[ir.output]}"
    loop = [
        f"int {name}_forward(int64_t T, int64_t N, const {t} *x, const {t} *weights, const {t} *state_in,",
        f"    {t} *state_out, {t} *out, {t} *work)",
        "{",
        f"    const {t} *W = weights;",
        "    if (T < 1 || N < 1)",
        "        return -1;",
        f"    memcpy(work, state_in, (size_t)(N * {lay.state_width}) * sizeof({t}));",
        f"    memset(work + N * {lay.zeros_at}, 0, (size_t)(N * {cell.input_size}) * sizeof({t}));",
        "    for (int64_t t = 0; t < T; ++t) {",
        *["        " + line for line in body],
        f"        memcpy(out + t * N * {O}, {result}, (size_t)(N * {O}) * sizeof({t}));",
        f"        memcpy(work, work + N * {lay.new_at}, (size_t)(N * {lay.state_width}) * sizeof({t}));",
        "    }",
        f"    memcpy(state_out, work, (size_t)(N * {lay.state_width}) * sizeof({t}));",
        "    (void)W;",
        "    return 0;",
        "}",
    ]
    source = "\n".join([
        "/* Generated by celldsl export --c; do not edit. See the header for the layout. */",
        "#include <math.h>",
        "#include <stdint.h>",
        "#include <stdio.h>",
        "#include <stdlib.h>",
        "#include <string.h>",
        f'#include "{name}.h"',
        PRAGMAS,
        _static(CALL_AT),
        helper_functions(dtype),
        GEMMS.format(t=t),
        *kernels,
        *loop,
        "",
    ])
    return name, source, _header(cell, name, dtype, lay)


def write_c(cell: ExportCell, directory: str | Path, dtype: str = "f32") -> list[Path]:
    """Write DIR/<name>.c, .h and .bin; returns their paths."""
    name, source, header = c_sources(cell, dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np_type, torch_type = TYPES[dtype][1], TYPES[dtype][2]
    flat = torch.cat([w.reshape(-1) for _, w in cell.weights()]) if cell.weights() else torch.zeros(0)
    data = flat.to(torch_type).numpy().astype(np_type).tobytes()
    paths = [directory / f"{name}.c", directory / f"{name}.h", directory / f"{name}.bin"]
    paths[0].write_text(source, encoding="ascii")
    paths[1].write_text(header, encoding="ascii")
    paths[2].write_bytes(data)
    return paths
