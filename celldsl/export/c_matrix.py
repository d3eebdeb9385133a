"""The standalone C library of a matrix-memory cell (lang/tensors.py): one layer, one direction, forward
only, as celldsl_<name>.c, .h and the weights as a flat little-endian .bin, with no dependency but libm.

The step is the C target's own (targets/c/matrix_emit.ForwardStep: the fused forward step of the cpu
backend, after matrix_rewrite's rewrites), run one sequence at a time, time inside, every head per
step. What the cpu backend hands to torch (the host nodes: projections `W @ x`, values of parameters
only, and every prev() with what depends on it but on no state) is computed here in plain C loops per
step, one node at a time, with the last k values of a prev() argument kept in a ring per sequence.
Sizes are compiled in; T and N are given per call; no allocation (the caller's workspace holds the
step's values), no globals, no threads. The only user text in the output is the cell's name made an
identifier after `celldsl_`, and, in comments, names reduced to printable ASCII.
"""

from __future__ import annotations

import math
from pathlib import Path

import sympy as sp
import torch

from ..lang.errors import CellError
from ..lang.tensors import ONE, TensorIR
from ..targets.c.emit import C_TYPES, CPrinter, helper_functions
from ..targets.c.matrix_emit import ForwardStep, blocker, broadcast_index, used_host
from ..targets.c.matrix_rewrite import rewrite
from ..targets.printers import identifier
from .c_library import comment

DTYPES = {torch.float32: ("f32", "<f4"), torch.float64: ("f64", "<f8")}

PRAGMAS = """#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  /* the step's OpenMP SIMD hints, without -fopenmp */
#pragma GCC diagnostic ignored "-Wunused-function"  /* helpers this cell does not call */
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-variable"
#endif"""


def library_name(ir: TensorIR) -> str:
    """The file stem and the prefix of every public name: `celldsl_` + the cell's name as an identifier."""
    return "celldsl_" + identifier(ir.name, set())


def refusal(ir: TensorIR, why: str, node: int | None) -> CellError:
    """A located reason: at the node it is about, else at the first state."""
    loc = ir.nodes[node].loc if node is not None else None
    loc = loc if loc is not None else ir.state_locs[ir.states[0]]
    return CellError(f"celldsl export --c cannot write this matrix-memory cell: {why}", ir.source, loc)


class _Host:
    """The values the cpu backend computes with torch before its loop, here in C: which nodes, where
    they live (the input's row, the weights, or an array of the workspace), once or per step."""

    def __init__(self, ir: TensorIR, dims: dict[str, int]):
        self.ir, self.dims, self.H = ir, dims, dims["heads"]
        self.used = used_host(ir)
        need = set(self.used)
        for i in range(len(ir.nodes) - 1, -1, -1):
            if i in need:
                need.update(ir.nodes[i].args)
        self.nodes = sorted(need)
        self.per_step: dict[int, bool] = {}
        self.per_head: dict[int, bool] = {}
        for i in self.nodes:
            n = ir.nodes[i]
            if n.op == "state":  # (host nodes depend on no state: matrix_hoist.hoisted, host_nodes)
                raise refusal(ir, "a value computed before the step reads a state", i)
            self.per_step[i] = n.op in ("input", "shift") or any(self.per_step[j] for j in n.args)
            self.per_head[i] = (ir.kinds[n.name].head if n.op == "param"
                                else any(self.per_head[j] for j in n.args))

    def size(self, i: int) -> int:
        k = self.ir.nodes[i].kind
        return math.prod(1 if w == ONE else self.dims[w] for w in (k.rows, k.cols))

    def shape(self, i: int) -> tuple[int, int]:
        k = self.ir.nodes[i].kind
        return tuple(1 if w == ONE else self.dims[w] for w in (k.rows, k.cols))

    def heads(self, i: int) -> int:
        return self.H if self.per_head[i] else 1

    def stride(self, i: int) -> int:
        """Elements from one head's value to the next (0: shared by the heads)."""
        return self.size(i) if self.per_head[i] else 0

    def stored(self) -> list[int]:
        """The nodes with an array in the workspace (the input and parameters are read in place)."""
        return [i for i in self.nodes if self.ir.nodes[i].op not in ("input", "param")]

    def node_code(self, i: int, dt: str) -> list[str]:
        """C computing node i for every head into v<i> (args v<j>), at step t of sequence n."""
        ir, t = self.ir, C_TYPES[dt]
        node = ir.nodes[i]
        S, (r, c) = self.size(i), self.shape(i)
        if node.op == "shift":  # ring: slot t % k holds the argument k steps back (zeros at first)
            j, k = node.args[0], int(node.value)
            B = self.heads(j) * self.size(j)
            return [f"memcpy(v{i}, ring{i} + (t % {k}) * {B}, {B} * sizeof({t}));",
                    f"memcpy(ring{i} + (t % {k}) * {B}, v{j}, {B} * sizeof({t}));"]
        a = [f"a{m}" for m in range(len(node.args))]
        if node.op in ("const", "size"):
            value = float(node.value) if node.op == "const" else float(self.dims[node.name])
            if not math.isfinite(value):
                raise refusal(ir, f"the constant {value} has no C literal here", i)
            body = [f"o[0] = {CPrinter({}, dt).doprint(sp.Float(value))};"]
        elif node.op == "eye":
            if node.name is None:
                raise refusal(ir, "an identity of unknown size", i)
            body = [f"for (int e = 0; e < {S}; ++e) o[e] = 0;",
                    f"for (int e = 0; e < {r}; ++e) o[e * {r} + e] = 1;"]
        elif node.op == "pointwise":
            syms = sp.symbols(f"a0:{len(node.args)}", real=True)
            names = {s: f"{a[m]}[{'e' if self.size(j) == S and S > 1 else '0'}]"
                     for m, (s, j) in enumerate(zip(syms, node.args, strict=True))}
            body = [f"for (int e = 0; e < {S}; ++e) o[e] = {CPrinter(names, dt).doprint(node.expr)};"]
        elif node.op == "scale":  # a broadcast product: a column (a0[a]) or row (a0[b]) vector's elements
            syms = sp.symbols(f"a0:{len(node.args)}", real=True)
            names = {s: f"{a[m]}[{broadcast_index(self.shape(j), (r, c), f'a * {c} + b')}]"
                     for m, (s, j) in enumerate(zip(syms, node.args, strict=True))}
            body = [f"for (int a = 0; a < {r}; ++a) for (int b = 0; b < {c}; ++b) "
                    f"o[a * {c} + b] = {CPrinter(names, dt).doprint(node.expr)};"]
        elif node.op == "matmul":
            m = self.shape(node.args[0])[1]
            body = [f"for (int a = 0; a < {r}; ++a) for (int b = 0; b < {c}; ++b) {{ {t} acc = 0; "
                    f"for (int q = 0; q < {m}; ++q) acc += a0[a * {m} + q] * a1[q * {c} + b]; "
                    f"o[a * {c} + b] = acc; }}"]
        elif node.op == "transpose":
            rr, cc = self.shape(node.args[0])
            body = [f"for (int a = 0; a < {rr}; ++a) for (int b = 0; b < {cc}; ++b) "
                    f"o[b * {rr} + a] = a0[a * {cc} + b];"]
        elif node.op in ("sum", "mean"):
            n = self.size(node.args[0])
            div = f" / ({t}){n}" if node.op == "mean" else ""
            body = [f"{{ {t} acc = 0; for (int e = 0; e < {n}; ++e) acc += a0[e]; o[0] = acc{div}; }}"]
        elif node.op in ("max", "min"):  # NaN wins, as torch's amax / amin (matrix_emit's step)
            n, cmp = self.size(node.args[0]), ">" if node.op == "max" else "<"
            body = [f"{{ {t} acc = a0[0]; for (int e = 1; e < {n}; ++e) "
                    f"if (a0[e] {cmp} acc || a0[e] != a0[e]) acc = a0[e]; o[0] = acc; }}"]
        elif node.op == "diag":
            body = [f"for (int e = 0; e < {S}; ++e) o[e] = 0;",
                    f"for (int e = 0; e < {r}; ++e) o[e * {r} + e] = a0[e];"]
        else:
            raise refusal(ir, f"its operation {node.op!r} has no C form before the step", i)
        args = "".join(f" const {t} *a{m} = v{j} + g * {self.stride(j)};" for m, j in enumerate(node.args))
        return [f"for (int g = 0; g < {self.heads(i)}; ++g) {{ {t} *o = v{i} + g * {S};{args}",
                *[f"    {line}" for line in body], "}"]


class _Layout:
    """Offsets: the weights (elements of the .bin), the states (x N, per row), the workspace (elements)."""

    def __init__(self, ir: TensorIR, original: TensorIR, dims: dict[str, int], host: _Host,
                 step: ForwardStep):
        H = dims["heads"]
        self.weights: list[tuple[str, tuple[int, ...], int]] = []
        at = 0
        for name in original.params:
            shape = original.param_shape(name, dims)
            self.weights.append((name, shape, at))
            at += math.prod(shape)
        self.weight_count = at
        self.param_at = {name: a for name, _, a in self.weights}
        kinds = [ir.kinds[s] for s in ir.states]
        self.state_sizes = [math.prod(1 if w == ONE else dims[w] for w in (k.rows, k.cols)) for k in kinds]
        self.state_off = [sum(self.state_sizes[:k]) for k in range(len(kinds))]  # within one head's block
        self.total = sum(self.state_sizes)  # one head's states
        work = step.value_count  # the step's values (cd_mx_vals) first
        self.states_at = work  # this step's states and the next's, every head: 2 H total
        work += 2 * H * self.total
        self.node_at: dict[int, int] = {}
        for i in host.stored():
            self.node_at[i] = work
            work += host.heads(i) * host.size(i)
        self.ring_at: dict[int, int] = {}
        self.ring_size: dict[int, int] = {}
        for i in host.stored():
            node = ir.nodes[i]
            if node.op == "shift":
                j = node.args[0]
                self.ring_at[i] = work
                self.ring_size[i] = int(node.value) * host.heads(j) * host.size(j)
                work += self.ring_size[i]
        self.work = work


def check_sizes(ir: TensorIR, sizes: dict) -> dict[str, int]:
    """Every width, "heads" and the input's size, as positive ints."""
    sizes = sizes if ir.heads else {"heads": 1, **sizes}  # one head (H, its widths): no "heads" to give
    needed = ["heads", ir.inputs[0], *ir.widths]
    missing = [w for w in needed if w not in sizes]
    if missing:
        raise ValueError(f"cell {ir.name!r}: sizes must give {', '.join(map(repr, needed))} (the input's "
                         f"size under its name, as MatrixRecurrent.layer_sizes[0] does); missing "
                         f"{', '.join(map(repr, missing))}")
    bad = {w: v for w, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"sizes must be positive integers, got {bad}")
    return dict(sizes)


def matrix_sources(compiled, sizes: dict[str, int], dtype: str = "f32") -> tuple[str, str, str]:
    """-> (file stem, .c text, .h text) of the cell at these sizes (every width, "heads", the input's)."""
    original = getattr(compiled, "ir", None)
    if not isinstance(original, TensorIR):
        raise ValueError("write_matrix_library writes a matrix-memory cell (compile_cell gives a "
                         "CompiledMatrixCell); an elementwise cell exports with export/c_library.py")
    dims = check_sizes(original, sizes)
    ir = rewrite(original)  # the cpu backend's step: the same values in fewer operations
    why, node = blocker(ir)
    if why:
        raise refusal(ir, why, node)
    host = _Host(ir, dims)
    step = ForwardStep(ir, dims, dtype)
    lay = _Layout(ir, original, dims, host, step)
    name = library_name(original)
    source = _source(ir, dims, dtype, name, host, step, lay)
    return name, source, _header(ir, original, dims, dtype, name, lay)


def _output_size(ir: TensorIR, dims: dict[str, int]) -> int:
    k = ir.nodes[ir.output_node].kind
    return math.prod(1 if w == ONE else dims[w] for w in (k.rows, k.cols))


def _header(ir: TensorIR, original: TensorIR, dims, dtype: str, name: str, lay: _Layout) -> str:
    t, up, H = C_TYPES[dtype], name.upper(), dims["heads"]
    out_kind = ir.nodes[ir.output_node].kind
    lines = [
        "/* Generated by celldsl export --c; do not edit. The forward of one matrix-memory cell over a",
        "   sequence, one layer, one direction, in C99 with libm only.",
        "",
        f"   x      [T, N, INPUT_SIZE]  time-major: the input {comment(ir.inputs[0])} at every step",
        f"   states [NUM_STATES blocks]: state k is [N, HEADS ({H}), rows, cols] (its own axes as the",
        "            layer's, without the 1 axes) at offset N * STATE<k>_OFFSET elements:",
        *[f"            {k}: {comment(s)} {_words(ir.kinds[s], dims, ir.heads)}, STATE{k}_SIZE {H * sz} per "
          f"row, offset N * {H * off}"
          for k, (s, sz, off) in enumerate(zip(ir.states, lay.state_sizes, lay.state_off, strict=True))],
        f"   out    [T, N, OUTPUT_SIZE]  the output {comment(ir.output)} "
        f"({_words(out_kind, dims, ir.heads)}) of every head side by side, at every step",
        "   work   WORKSPACE_PER_ROW * N elements of scratch (the loop runs one sequence at a time and",
        "          uses the first WORKSPACE_PER_ROW; sized per row as every exported cell's)",
        f"   weights: WEIGHT_COUNT {t}s, the .bin file as written (little-endian), the cell's parameters in",
        "            declaration order, each row-major in the shape given ([heads, rows, cols] without",
        "            the 1 axes; no heads axis for one the heads share):",
        *[f"            at {at}: {comment(label)} {list(shape)}" for label, shape, at in lay.weights],
        "",
        "   state_in and state_out may be the same buffer. Returns 0, or -1 when T < 1 or N < 1. */",
        f"#ifndef {up}_H",
        f"#define {up}_H",
        "#include <stdint.h>",
        "",
        f"#define {up}_INPUT_SIZE {dims[ir.inputs[0]]}",
        f"#define {up}_OUTPUT_SIZE {H * _output_size(ir, dims)}",
        f"#define {up}_HEADS {H}",
        f"#define {up}_NUM_STATES {len(ir.states)}",
        f"#define {up}_STATE_SIZE {H * lay.total}  /* the sizes of all states: N * this elements */",
        *[f"#define {up}_STATE{k}_SIZE {H * sz}\n#define {up}_STATE{k}_OFFSET {H * off}"
          for k, (sz, off) in enumerate(zip(lay.state_sizes, lay.state_off, strict=True))],
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


def _words(kind, dims, heads: bool) -> str:
    shape = [str(dims[w]) for w in (kind.rows, kind.cols) if w != ONE]
    per = " per head" if heads else ""
    return f"[{', '.join(shape)}]{per}" if shape else f"one number{per}"


def _source(ir: TensorIR, dims, dt: str, name: str, host: _Host, step: ForwardStep, lay: _Layout) -> str:
    t, H, I = C_TYPES[dt], dims["heads"], dims[ir.inputs[0]]
    nodes = len(ir.nodes)
    ow = _output_size(ir, dims)
    states = {s: k for k, s in enumerate(ir.states)}
    off, sz = lay.state_off, lay.state_sizes

    def where(i: int) -> str:  # node i's value after the step (matrix_emit's loop: the same places)
        if i in step.in_place:
            return f"nx + {off[step.in_place[i]]}"
        if ir.nodes[i].op == "state":
            return f"st + {off[states[ir.nodes[i].name]]}"
        return f"V->v{i}"

    decls = []
    for i in host.nodes:
        n = ir.nodes[i]
        if n.op == "input":
            decls.append(f"const {t} *v{i} = x;")
        elif n.op == "param":
            decls.append(f"const {t} *v{i} = weights + {lay.param_at[n.name]};")
        else:
            decls.append(f"{t} *v{i} = work + {lay.node_at[i]};")
    decls += [f"{t} *ring{i} = work + {at};" for i, at in lay.ring_at.items()]
    once = [line for i in host.stored() if not host.per_step[i] for line in host.node_code(i, dt)]
    per_step = []
    for i in host.nodes:
        if host.per_step[i] and ir.nodes[i].op == "input":
            per_step.append(f"v{i} = x + (t * N + n) * {I};")
        elif host.per_step[i]:
            per_step += host.node_code(i, dt)
    pointers = [f"h[{j}] = v{j} + hh * {host.stride(j)};" for j in host.used]
    pointers += [f"stp[{k}] = st + {off[k]}; nsp[{k}] = nx + {off[k]};" for k in range(len(ir.states))]
    copies = [f"memcpy(nx + {off[k]}, {where(ir.new_state[s])}, {sz[k]} * sizeof({t}));"
              for k, s in enumerate(ir.states) if step.in_place.get(ir.new_state[s]) != k]
    load = [f"memcpy(cur + hh * {lay.total} + {off[k]}, state_in + N * {H * off[k]} + (n * {H} + hh) * "
            f"{sz[k]}, {sz[k]} * sizeof({t}));" for k in range(len(ir.states))]
    store = [f"memcpy(state_out + N * {H * off[k]} + (n * {H} + hh) * {sz[k]}, cur + hh * {lay.total} + "
             f"{off[k]}, {sz[k]} * sizeof({t}));" for k in range(len(ir.states))]
    rings = [f"memset(ring{i}, 0, {size} * sizeof({t}));" for i, size in lay.ring_size.items()]
    values = f"cd_mx_vals_{dt}"

    def indent(lines, k):
        return [" " * k + line for line in lines]

    loop = [
        f"int {name}_forward(int64_t T, int64_t N, const {t} *x, const {t} *weights, const {t} *state_in,",
        f"    {t} *state_out, {t} *out, {t} *work)",
        "{",
        "    if (T < 1 || N < 1)",
        "        return -1;",
        f"    {values} *V = ({values} *)work;",
        f"    const {t} *h[{nodes}] = {{0}};",
        f"    const {t} *stp[{len(ir.states)}];",
        f"    {t} *nsp[{len(ir.states)}];",
        *indent(decls, 4),
        "    /* the values of parameters only: once */",
        *indent(once, 4),
        "    for (int64_t n = 0; n < N; ++n) {",
        f"        {t} *cur = work + {lay.states_at}, *nxt = cur + {H * lay.total};",
        f"        for (int64_t hh = 0; hh < {H}; ++hh) {{",
        *indent(load, 12),
        "        }",
        *indent(rings, 8),
        "        for (int64_t t = 0; t < T; ++t) {",
        "            /* what the step reads of this step's input: projections, prev() and what follows */",
        *indent(per_step, 12),
        f"            for (int64_t hh = 0; hh < {H}; ++hh) {{",
        f"                {t} *st = cur + hh * {lay.total}, *nx = nxt + hh * {lay.total};",
        *indent(pointers, 16),
        f"                cd_mx_fast_{dt}(V, h, stp, nsp);",
        f"                memcpy(out + ((t * N + n) * {H} + hh) * {ow}, {where(ir.output_node)}, "
        f"{ow} * sizeof({t}));",
        *indent(copies, 16),
        "            }",
        f"            {{ {t} *swap = cur; cur = nxt; nxt = swap; }}",
        "        }",
        f"        for (int64_t hh = 0; hh < {H}; ++hh) {{",
        *indent(store, 12),
        "        }",
        "    }",
        "    return 0;",
        "}",
    ]
    check = (f"typedef char cd_values_fit_{dt}[sizeof({values}) == {step.value_count} * sizeof({t}) ? 1 "
             ": -1];  /* V lies at the workspace's start */")
    return "\n".join([
        "/* Generated by celldsl export --c; do not edit. See the header for the layout. */",
        "#include <math.h>",
        "#include <stdint.h>",
        "#include <string.h>",
        f'#include "{name}.h"',
        PRAGMAS,
        helper_functions(dt),
        step.source,
        check,
        "",
        *loop,
        "",
    ])


def write_matrix_library(compiled, sizes: dict, params: dict, out_dir, dtype=torch.float32) -> list[Path]:
    """Write OUT_DIR/celldsl_<name>.c, .h and .bin for one layer and direction of a matrix-memory cell:
    `sizes` every width, "heads" and the input's size under the input's name (MatrixRecurrent's
    layer_sizes[0]); `params` the cell's parameters by name, as MatrixRecurrent stores them. Returns the
    paths. A CellError (located) for what the C loop cannot express; ValueError for bad sizes or
    parameters; TypeError for a dtype other than float32 / float64."""
    if dtype not in DTYPES:
        raise TypeError(f"write_matrix_library writes float32 or float64, got {dtype}")
    dt, np_type = DTYPES[dtype]
    name, source, header = matrix_sources(compiled, sizes, dt)  # first: nothing is written on a refusal
    ir = compiled.ir
    dims = check_sizes(ir, sizes)
    missing = [p for p in ir.params if p not in params]
    if missing:
        raise ValueError(f"cell {ir.name!r}: params lacks {', '.join(map(repr, missing))}")
    flat = []
    for p in ir.params:
        want, got = tuple(ir.param_shape(p, dims)), params[p]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"cell {ir.name!r}: parameter {p!r} must be a tensor of shape {list(want)} at "
                             f"these sizes, got {shape}")
        flat.append(got.detach().to("cpu", torch.float64).reshape(-1))
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    flat = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    data = flat.to(dtype).numpy().astype(np_type)
    paths = [directory / f"{name}.c", directory / f"{name}.h", directory / f"{name}.bin"]
    paths[0].write_text(source, encoding="ascii")
    paths[1].write_text(header, encoding="ascii")
    paths[2].write_bytes(data.tobytes())
    return paths


def write_layer_library(layer, out_dir, dtype=torch.float32) -> list[Path]:
    """write_matrix_library for a one-layer, one-direction MatrixRecurrent, with its own sizes and
    parameters (what `celldsl export --c` calls for a matrix-memory cell)."""
    if layer.num_layers != 1 or layer.num_directions != 1:
        raise ValueError(f"the C library is one layer and one direction; this layer has {layer.num_layers} "
                         f"layer(s) and {layer.num_directions} direction(s)")
    params = {p: getattr(layer, layer.param_name(p, 0, 0)) for p in layer.ir.params}
    return write_matrix_library(layer.compiled, layer.layer_sizes[0], params, out_dir, dtype)
