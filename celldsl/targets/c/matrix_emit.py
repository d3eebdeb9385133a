"""A matrix-memory cell's IR (lang/tensors.py) -> C: the fused time loop, forward and backward.

The products with the input (`W @ x`, chains of them) and the leaves (parameters, constants, the
identity) are computed by torch before the loop for every step at once ("host" nodes, matrix_loop.py);
everything else runs here, one (sequence, head) at a time with time inside, so that state's tile
stays in cache. Sizes are compiled in (one library per cell and sizes), so every value is a fixed
array. The backward walks time in reverse, recomputing the states of each segment of `every` steps
from the forward's checkpoint, and sends the host nodes' adjoints back to torch. The source holds
no text of the cell: nodes are v0, v1, ..., and the cell's name only reaches a sanitised comment.

Speed (docs/benchmarks.md, matrix section): matrix_loop.py hands in the IR after matrix_rewrite.py
(`S @ (I - β k kᵀ)` as `S - β (S k) kᵀ`); each run of same-shaped elementwise nodes, outer products
and scalings (the IR's scale nodes: `diag(d) @ S`) is one loop over the elements forward (fast_step)
and backward (group_backward: the run's adjoints in registers); the step writes the next states in
place; while a segment is rebuilt the loop keeps, per step, the few values back() reads (the states
it reads in place), so the backward runs one step per step, not two; dot products add sixteen partial
sums as a tree.
"""

from __future__ import annotations

import re

import sympy as sp

from ...lang.tensors import ONE, TensorIR
from ..matrix_hoist import hoisted, unhoisted_shift
from .emit import C_TYPES, CPrinter, helper_functions, simd_declarations

SIMD_SUM = '_Pragma("omp simd reduction(+:acc)") '  # a sum vectorised (-fopenmp-simd)
FIXED = ("const", "size", "eye")  # host nodes without a gradient
LEAVES = ("input", "param", *FIXED)
ONCE = "+=\x01"  # a backward loop that adds to every element of its target once (assign_first_writes)
HOIST_CONSTANT = True  # pointwise values of parameters only are host nodes (a switch for A/B timing)
OWN_VALUE = True  # a derivative equal to the node's value (exp) reads the value (a switch for A/B timing)
PRUNE = True  # the backward's rebuild computes only what it keeps (a switch for A/B timing)
C_OPS = ("state", "pointwise", "scale", "matmul", "transpose", "sum", "mean", "max", "min", "diag")


def host_nodes(ir: TensorIR) -> list[bool]:
    """Per node: computed by torch before the loop rather than in the C loop: the leaves, and the
    projections (a product of host nodes, one of them free of the input: `W @ x`, `W2 @ (W1 @ x)`)
    and their transposes, and pointwise values of those free of the input. A product of two
    input-dependent values (`k @ vᵀ`) runs in the loop: hoisted it would be a matrix per step. Also
    what matrix_hoist.hoisted names: a prev() (the loop holds one step) and what depends on it but on
    no state (Mamba's conv taps and Δ, B, C; RWKV-6's lerps)."""
    out: list[bool] = []
    inputs: list[bool] = []
    shifted = hoisted(ir)
    for i, node in enumerate(ir.nodes):
        inputs.append(node.op == "input" or any(inputs[j] for j in node.args))
        host = node.op in LEAVES or (node.op in ("matmul", "transpose") and all(out[j] for j in node.args))
        if HOIST_CONSTANT and node.op == "pointwise" and not inputs[i] and all(out[j] for j in node.args):
            host = True  # of parameters only (Mamba's A = -exp(A_log)): once, not per step and element
        if node.op == "matmul" and all(inputs[j] for j in node.args):
            host = False
        out.append(host or shifted[i])
    return out


def blocker(ir: TensorIR) -> tuple[str, int | None]:
    """Why the C loop cannot run this cell ("" when it can), and the node to point at (or None)."""
    host = host_nodes(ir)
    shift = unhoisted_shift(ir)
    if shift is not None:
        return "prev() of a value that is, or reads, a matrix per step (hoisted before the loop it would " \
               "be T matrices)", shift
    for i, node in enumerate(ir.nodes):
        if not host[i] and node.op not in C_OPS:
            return f"its operation {node.op!r} has no C form", i
        if node.op == "eye" and node.name is None and any(i in n.args for n in ir.nodes):
            return "an identity of unknown size", i
    for s, i in ir.new_state.items():
        if host[i]:
            return f"state {s}'s next value depends on no state", i
    if host[ir.output_node]:
        return "its output depends on no state", ir.output_node
    return "", None


def loop_nodes(ir: TensorIR) -> list[bool]:
    """Per node: computed in the C loop: not a host node, and read (through loop nodes) by the output or
    a next state. A value only host nodes read (Mamba's conv tap on this step's u_in, which the hoisted
    conv sum reads) is torch's alone: the loop would compute it for nothing and take its operands."""
    host = host_nodes(ir)
    live = {ir.output_node, *ir.new_state.values()}
    for i in range(len(ir.nodes) - 1, -1, -1):
        if i in live and not host[i]:
            live.update(ir.nodes[i].args)
    return [not host[i] and (i in live or n.op == "state" or not PRUNE) for i, n in enumerate(ir.nodes)]


def used_host(ir: TensorIR) -> list[int]:
    """The host nodes the C loop reads, in node order."""
    host, loop = host_nodes(ir), loop_nodes(ir)
    return sorted({j for i, n in enumerate(ir.nodes) if loop[i] for j in n.args if host[j]})


def assign_first_writes(lines: list[str]) -> list[str]:
    """A target zeroed (memset) and then first written by a loop that adds to each of its elements once
    (marked ONCE): the loop assigns instead and the memset goes (one pass over the array, not three)."""
    out: list[str] = []
    for line in lines:
        found = re.search(r"(G->v\d+)\[[^\]]*\] " + re.escape(ONCE), line)
        if found:  # (a host node's adjoint, gh[j], torch zeroes: it adds up over the steps)
            target = found.group(1)
            mentions = re.compile(re.escape(target) + r"(?!\d)")
            last = next((k for k in range(len(out) - 1, -1, -1) if mentions.search(out[k])), None)
            if last is not None and out[last].strip() == f"memset({target}, 0, sizeof {target});":
                del out[last]
                line = line.replace(ONCE, "=")
        out.append(line.replace(ONCE, "+="))
    return out


def _size(w: str, dims: dict[str, int]) -> int:
    return 1 if w == ONE else dims[w]


def broadcast_index(shape: tuple[int, int], out: tuple[int, int], e: str = "e") -> str:
    """The index of an operand of this shape at element e = (a, b) of an `out` node: a number [0], one
    of the same shape [e], a scale node's column vector [a] (along the rows) or row vector [b]."""
    if shape == (1, 1):
        return "0"
    if shape == out:
        return e
    return "a" if shape[1] == 1 else "b"


class _Emitter:
    def __init__(self, ir: TensorIR, dims: dict[str, int], dtype: str):
        self.ir, self.dims, self.dt = ir, dims, dtype
        self.t = C_TYPES[dtype]
        self.host = host_nodes(ir)
        loop = loop_nodes(ir)
        self.c_nodes = [i for i in range(len(ir.nodes)) if loop[i]]
        self.state_node = {n.name: i for i, n in enumerate(ir.nodes) if n.op == "state"}

    def shape(self, i: int) -> tuple[int, int]:
        k = self.ir.nodes[i].kind
        return _size(k.rows, self.dims), _size(k.cols, self.dims)

    def size(self, i: int) -> int:
        r, c = self.shape(i)
        return r * c

    def ref(self, j: int) -> str:
        return f"h[{j}]" if self.host[j] else f"V->v{j}"

    def gref(self, j: int) -> str | None:
        if self.host[j]:
            return None if self.ir.nodes[j].op in FIXED else f"gh[{j}]"
        return f"G->v{j}"

    def struct(self) -> str:
        fields = "".join(f" {self.t} v{i}[{self.size(i)}];" for i in self.c_nodes)
        return f"typedef struct {{{fields} }} cd_mx_vals_{self.dt};"

    def literal(self, e: str, j: int, out: tuple[int, int]) -> str:
        """Operand j at element e (a, b) of a node of shape `out` (broadcast_index)."""
        return f"{self.ref(j)}[{broadcast_index(self.shape(j), out, e)}]"

    def printer(self, node, e: str = "e") -> CPrinter:
        syms = sp.symbols(f"a0:{len(node.args)}", real=True)
        out = (_size(node.kind.rows, self.dims), _size(node.kind.cols, self.dims))
        names = {s: self.literal(e, j, out) for s, j in zip(syms, node.args, strict=True)}
        return CPrinter(names, self.dt)

    # ---- forward -------------------------------------------------------------------------

    def step(self) -> str:
        """Every C node's value from the host pointers h and the states st (the backward reads them)."""
        t = self.t
        lines = [f"static inline void cd_mx_step_{self.dt}(cd_mx_vals_{self.dt} *restrict V, "
                 f"const {t} *const *h, const {t} *const *st)", "{"]
        lines += [line for line in self.step_body() if not line.startswith("@")]
        lines.append("}")
        return "\n".join(lines)

    def step_body(self) -> list[str]:
        """step()'s lines, each node's after a line "@<node>"."""
        ir, t = self.ir, self.t
        lines = []
        state_index = {s: k for k, s in enumerate(ir.states)}
        for i in self.c_nodes:
            lines.append(f"@{i}")
            node = ir.nodes[i]
            S, (r, _c) = self.size(i), self.shape(i)
            out, a = f"V->v{i}", [self.ref(j) for j in node.args]
            if node.op == "state":
                lines.append(f"    memcpy({out}, st[{state_index[node.name]}], sizeof({out}));")
            elif node.op == "pointwise":
                expr = self.printer(node).doprint(node.expr)
                lines.append(f"    for (int e = 0; e < {S}; ++e) {out}[e] = {expr};")
            elif node.op == "scale":  # a broadcast product: a vector operand read at [a] or [b]
                expr = self.printer(node).doprint(node.expr)
                lines.append(f"    {_elements(r, _c, f'{out}[e] = {expr};')}")
            elif node.op == "matmul":
                lines += self.matmul(i, out, a)
            elif node.op == "transpose":
                rr, cc = self.shape(node.args[0])
                lines.append(f"    for (int a = 0; a < {rr}; ++a) for (int b = 0; b < {cc}; ++b) "
                             f"{out}[b * {rr} + a] = {a[0]}[a * {cc} + b];")
            elif node.op in ("sum", "mean"):
                n = self.size(node.args[0])
                div = f" / ({t}){n}" if node.op == "mean" else ""
                lines.append(f"    {{ {t} acc = 0; {SIMD_SUM}for (int e = 0; e < {n}; ++e) acc += {a[0]}[e]; "
                             f"{out}[0] = acc{div}; }}")
            elif node.op in ("max", "min"):
                n, cmp = self.size(node.args[0]), ">" if node.op == "max" else "<"
                lines.append(f"    {{ {t} acc = {a[0]}[0]; for (int e = 1; e < {n}; ++e) "
                             f"if ({a[0]}[e] {cmp} acc || {a[0]}[e] != {a[0]}[e]) acc = {a[0]}[e]; "
                             f"{out}[0] = acc; }}")
            elif node.op == "diag":
                lines.append(f"    memset({out}, 0, sizeof({out})); "
                             f"for (int e = 0; e < {r}; ++e) {out}[e * {r} + e] = {a[0]}[e];")
        return lines

    def fusable(self, i: int) -> tuple[int, int] | None:
        """The (rows, cols) of a matrix node the fast step computes element by element in one loop
        with its neighbours (pointwise on same-shaped or one-number operands, or an outer product)."""
        node, (r, c) = self.ir.nodes[i], self.shape(i)
        if r == 1 or c == 1:
            return None
        if node.op == "pointwise" and all(self.size(j) in (1, r * c) for j in node.args):
            return r, c
        if node.op == "matmul" and self.shape(node.args[0])[1] == 1:
            return r, c
        if node.op == "scale":  # diag(d) @ S, S @ diag(d)
            return r, c
        return None

    def state_refs(self) -> dict[int, str]:
        """The state nodes, read in place from the loop's state pointers st."""
        state_index = {s: k for k, s in enumerate(self.ir.states)}
        return {i: f"st[{state_index[self.ir.nodes[i].name]}]" for i in self.c_nodes
                if self.ir.nodes[i].op == "state"}

    def fast_step(self, name: str = "fast", keep: set[int] | None = None) -> str:
        """The forward's step (and the backward's state rebuild): as `step`, but the states read in
        place and each run of matrix nodes of one shape fused into one loop over the elements, its
        values kept in registers unless a later node or `keep` (default: the output and the next
        states) reads them. The backward's step ("bstep") keeps the values its adjoints read."""
        ir, t = self.ir, self.t
        refs = {**self.state_refs(), **{i: f"ns[{k}]" for i, k in self.new_in_place().items()}}
        users: dict[int, set[int]] = {}
        for i in self.c_nodes:
            for j in ir.nodes[i].args:
                users.setdefault(j, set()).add(i)
        keep = {ir.output_node, *ir.new_state.values()} if keep is None else keep
        lines = [f"static inline void cd_mx_{name}_{self.dt}(cd_mx_vals_{self.dt} *restrict V, "
                 f"const {t} *const *h, const {t} *const *st, {t} *const *ns)", "{"]

        def ref(j: int) -> str:
            return refs.get(j, self.ref(j))

        def fused(group: list[int]) -> str:
            """One loop over the elements of the group's r x c shape, its values in registers."""
            r, c = self.fusable(group[0])
            members = set(group)
            body = []
            for i in group:
                node = ir.nodes[i]
                if node.op == "matmul":
                    j0, j1 = node.args
                    a0 = f"t{j0}" if j0 in members else f"{ref(j0)}[a]"
                    a1 = f"t{j1}" if j1 in members else f"{ref(j1)}[b]"
                    expr = f"{a0} * {a1}"
                else:
                    syms = sp.symbols(f"a0:{len(node.args)}", real=True)
                    names = {sym: f"t{j}" if j in members else
                             f"{ref(j)}[{broadcast_index(self.shape(j), (r, c))}]"
                             for sym, j in zip(syms, node.args, strict=True)}
                    expr = CPrinter(names, self.dt).doprint(node.expr)
                body.append(f"const {t} t{i} = {expr};")
                if i in keep or users.get(i, set()) - members:
                    body.append(f"{ref(i)}[e] = t{i};")
            return (f"    for (int a = 0; a < {r}; ++a) {{ _Pragma(\"omp simd\") "
                    f"for (int b = 0; b < {c}; ++b) "
                    f"{{ const int e = a * {c} + b; {' '.join(body)} }} }}")

        per_node = self.step_lines()
        needed = set(keep)  # what keep reads: the rebuild skips the rest (the readout of the output)
        for i in range(len(ir.nodes) - 1, -1, -1):
            if i in needed or not PRUNE:
                needed.update(ir.nodes[i].args)
        for run in self.runs(lambda i: PRUNE and i not in needed):
            if self.fusable(run[0]) is not None:
                lines.append(fused(run))
            else:
                lines += [self.with_refs(line, refs) for line in per_node[run[0]]]
        lines.append("}")
        return "\n".join(lines)

    def new_in_place(self) -> dict[int, int]:
        """The next states the step writes straight into the loop's next-state buffers ns[k] (node ->
        k): each C node (not a state) that is the next value of a state, for the first such state."""
        out: dict[int, int] = {}
        for k, s in enumerate(self.ir.states):
            i = self.ir.new_state[s]
            if not self.host[i] and self.ir.nodes[i].op != "state" and i not in out:
                out[i] = k
        return out

    def with_refs(self, line: str, refs: dict[int, str]) -> str:
        for i, r in refs.items():
            line = line.replace(f"memset(V->v{i}, 0, sizeof(V->v{i}))",
                                f"memset({r}, 0, {self.size(i)} * sizeof({self.t}))")
            line = line.replace(f"V->v{i}[", f"{r}[")
        return line

    def step_lines(self) -> dict[int, list[str]]:
        """step()'s lines, by node."""
        out, current = {}, None
        for line in self.step_body():
            if line.startswith("@"):
                current = int(line[1:])
                out[current] = []
            else:
                out[current].append(line)
        return out

    def matmul(self, i: int, out: str, a: list[str]) -> list[str]:
        j0, j1 = self.ir.nodes[i].args
        r, m = self.shape(j0)
        _, c = self.shape(j1)
        if c == 1:  # a matrix times a vector: dot products along the contiguous rows
            return [f"    for (int a = 0; a < {r}; ++a) "
                    f"{out}[a] = cd_mx_dot_{self.dt}(&{a[0]}[a * {m}], &{a[1]}[0], {m});"]
        return [f"    memset({out}, 0, sizeof({out}));",
                f"    for (int a = 0; a < {r}; ++a) for (int q = 0; q < {m}; ++q) {{ "
                f"const {self.t} w = {a[0]}[a * {m} + q]; "
                f"for (int b = 0; b < {c}; ++b) {out}[a * {c} + b] += w * {a[1]}[q * {c} + b]; }}"]

    # ---- backward ------------------------------------------------------------------------

    def step_backward(self) -> str:
        """Adjoints of one step, C nodes in reverse: into G (C nodes) or gh (host nodes)."""
        ir, t, t_ = self.ir, self.t, self.dt
        lines = [f"static inline void cd_mx_back_{self.dt}(const cd_mx_vals_{self.dt} *restrict V, "
                 f"cd_mx_vals_{self.dt} *restrict G, const {t} *const *h, {t} *const *gh, "
                 f"const {t} *const *st, const {t} *const *nx)", "{"]
        self.written = {ir.output_node, *ir.new_state.values()}  # the loop zeroes and fills these
        member_of = {i: g for g in self.groups() for i in g}
        for i in reversed(self.c_nodes):
            node = ir.nodes[i]
            if i in member_of:  # a fused group's adjoints: one pass at its last node
                if i == member_of[i][-1]:
                    lines += [f"    {b}" for b in self.group_backward(member_of[i])]
                continue
            if node.op == "state" or i not in self.written:  # a leaf, or nothing reached it: zero
                continue
            S, (r, c) = self.size(i), self.shape(i)
            g, a = f"G->v{i}", [self.ref(j) for j in node.args]
            body: list[str] = []
            if node.op in ("pointwise", "scale"):
                for k, j in enumerate(node.args):
                    dj = self.target(j, body)
                    if dj is None or node.grads[k] == 0:
                        continue
                    own = OWN_VALUE and str(node.grads[k]) == str(node.expr)  # exp: its value, read
                    d = f"V->v{i}[e]" if own else self.printer(node).doprint(node.grads[k])
                    if node.op == "scale":  # summed back to the operand's shape (broadcast_index)
                        at = broadcast_index(self.shape(j), (r, c))
                        body.append(_elements(r, c, f"{dj}[{at}] += {g}[e] * ({d});"))
                    elif self.size(j) == 1 and S > 1:
                        body.append(f"{{ {t} acc = 0; {SIMD_SUM}"
                                    f"for (int e = 0; e < {S}; ++e) acc += {g}[e] * ({d}); "
                                    f"{dj}[0] += acc; }}")
                    else:
                        body.append(f"for (int e = 0; e < {S}; ++e) {dj}[e] {ONCE} {g}[e] * ({d});")
            elif node.op == "matmul":
                j0, j1 = node.args
                rr, m = self.shape(j0)
                d0, d1 = self.target(j0, body), self.target(j1, body)
                if c == 1 and j0 != j1:  # A @ v: dA[a, q] += dC[a] v[q], dv[q] += A[a, q] dC[a]; one pass
                    both = ([f"{d0}[a * {m} + q] {ONCE} ga * {a[1]}[q];"] if d0 else []) + (
                        [f"{d1}[q] += {a[0]}[a * {m} + q] * ga;"] if d1 else [])
                    if both:
                        body.append(f"for (int a = 0; a < {rr}; ++a) {{ const {t} ga = {g}[a]; "
                                    f"_Pragma(\"omp simd\") for (int q = 0; q < {m}; ++q) "
                                    f"{{ {' '.join(both)} }} }}")
                    d1 = None
                elif rr == 1 and j0 != j1:
                    # aᵀ @ B: da[q] += sum_b dC[b] B[q, b], dB[q, b] += a[q] dC[b]; one pass
                    acc = f"{t} acc = 0; " if d0 else ""
                    both = (["acc += " + f"{g}[b] * {a[1]}[q * {c} + b];"] if d0 else []) + (
                        [f"{d1}[q * {c} + b] += aq * {g}[b];"] if d1 else [])
                    red = '_Pragma("omp simd reduction(+:acc)") ' if d0 else '_Pragma("omp simd") '
                    if both:
                        body.append(f"for (int q = 0; q < {m}; ++q) {{ const {t} aq = {a[0]}[q]; {acc}{red}"
                                    f"for (int b = 0; b < {c}; ++b) {{ {' '.join(both)} }} "
                                    + (f"{d0}[q] {ONCE} acc; " if d0 else "") + "}")
                    d1 = None
                elif d0:  # dA[a, q] += sum_b dC[a, b] B[q, b]
                    body.append(f"for (int a = 0; a < {rr}; ++a) for (int q = 0; q < {m}; ++q) "
                                f"{d0}[a * {m} + q] {ONCE} "
                                f"cd_mx_dot_{t_}(&{g}[a * {c}], &{a[1]}[q * {c}], {c});")
                if d1:  # dB[q, b] += sum_a A[a, q] dC[a, b]
                    body.append(f"for (int a = 0; a < {rr}; ++a) for (int q = 0; q < {m}; ++q) {{ "
                                f"const {t} w = {a[0]}[a * {m} + q]; "
                                f"for (int b = 0; b < {c}; ++b) "
                                f"{d1}[q * {c} + b] += w * {g}[a * {c} + b]; }}")
            elif node.op == "transpose":
                rr, cc = self.shape(node.args[0])
                d0 = self.target(node.args[0], body)
                if d0:
                    body.append(f"for (int a = 0; a < {rr}; ++a) for (int b = 0; b < {cc}; ++b) "
                                f"{d0}[a * {cc} + b] {ONCE} {g}[b * {rr} + a];")
            elif node.op in ("sum", "mean"):
                d0, n = self.target(node.args[0], body), self.size(node.args[0])
                div = f" / ({t}){n}" if node.op == "mean" else ""
                if d0:
                    body.append(f"for (int e = 0; e < {n}; ++e) {d0}[e] {ONCE} {g}[0]{div};")
            elif node.op in ("max", "min"):  # shared evenly among the elements equal to the result
                d0, n = self.target(node.args[0], body), self.size(node.args[0])
                if d0:
                    body.append(f"{{ {t} cnt = 0; for (int e = 0; e < {n}; ++e) "
                                f"cnt += {a[0]}[e] == V->v{i}[0]; "
                                f"for (int e = 0; e < {n}; ++e) "  # 0 / 0 = NaN where a NaN won, as torch
                                f"{d0}[e] += {g}[0] * ({a[0]}[e] == V->v{i}[0]) / cnt; }}")
            elif node.op == "diag":
                d0 = self.target(node.args[0], body)
                if d0:
                    body.append(f"for (int e = 0; e < {r}; ++e) {d0}[e] += {g}[e * {r} + e];")
            lines += [f"    {b}" for b in body]
        lines += [f"    memset(G->v{i}, 0, sizeof G->v{i});" for i in self.state_node.values()
                  if i not in self.written and not self.host[i]]  # a state nothing reads: gradient 0
        refs = self.state_refs()  # the states and the next states: read in place (the loop keeps them)
        for k, s in enumerate(ir.states):
            refs.setdefault(ir.new_state[s], f"nx[{k}]")
        lines = [self.with_refs(line, refs) for line in assign_first_writes(lines)]
        lines.append("}")
        self.read = sorted({int(m) for line in lines for m in re.findall(r"V->v(\d+)\[", line)})
        return "\n".join(lines)

    def runs(self, skip=lambda i: False) -> list[list[int]]:
        """The C nodes but the states (and those `skip` drops) in node order, as runs: each run of
        fusable matrix nodes of one shape that fast_step fuses into one loop is one list, every other
        node a list of its own. A run ends before a node of another shape, or one that reads it."""
        out: list[list[int]] = []
        group: list[int] = []
        shape = None
        for i in self.c_nodes:
            node = self.ir.nodes[i]
            if node.op == "state" or skip(i):
                continue
            f = self.fusable(i)
            if f is not None and (not group or f == shape):
                group.append(i)
                shape = f
                continue
            if group and (f is not None or set(node.args) & set(group)):
                out.append(group)
                group = []
                if f is not None:
                    group, shape = [i], f
                    continue
            out.append([i])
        if group:
            out.append(group)
        return out

    def groups(self) -> list[list[int]]:
        """The runs of matrix nodes fast_step fuses into one loop, in node order (the backward's)."""
        return [run for run in self.runs() if self.fusable(run[0]) is not None]

    def group_backward(self, group: list[int]) -> list[str]:
        """The adjoints of a fused group (pointwise nodes and outer products of one r x c shape) in one
        pass over its elements, the members' adjoints in registers: their users outside the group all
        come later in node order (fast_step ends a group before a node that reads it), so their
        adjoints are complete in G when the reverse walk reaches the group's last node."""
        ir, t = self.ir, self.t
        members = set(group)
        r, c = self.shape(group[0])
        S = r * c
        pre: list[str] = []  # zeroing, accumulators: before the loops
        inner: list[str] = []  # per element
        row: list[tuple[str, str]] = []  # (accumulator, target[a]): sums over b, per row a
        scalars: list[tuple[str, str]] = []  # (accumulator, target[0]): sums over every element
        mats: dict[int, list[str]] = {}  # non-member matrix targets (C or host nodes): their terms
        contrib: dict[int, list[str]] = {i: [] for i in group}
        external = {i for i in group if i in self.written}
        reached = set(external)

        def value(j: int) -> str:  # an argument's value at element e (an outer product: recomputed)
            n = ir.nodes[j]
            if j in members and n.op == "matmul":
                return f"({self.ref(n.args[0])}[a] * {self.ref(n.args[1])}[b])"
            return self.literal("e", j, (r, c))

        for i in reversed(group):
            if i not in reached:
                continue
            node, gi = ir.nodes[i], f"g{i}"
            terms = ([f"G->v{i}[e]"] if i in external else []) + contrib[i]
            inner.append(f"const {t} {gi} = {' + '.join(terms)};")
            if node.op == "matmul":  # u @ wᵀ: du[a] += sum_b g[a, b] w[b]; dw[b] += sum_a u[a] g[a, b]
                u, w = node.args
                du, dw = self.target(u, pre), self.target(w, pre)
                if du:
                    row.append((f"r{i}", f"{du}[a]"))
                    inner.append(f"r{i} += {gi} * {self.ref(w)}[b];")
                if dw:
                    inner.append(f"{dw}[b] += {self.ref(u)}[a] * {gi};")
                continue
            syms = sp.symbols(f"a0:{len(node.args)}", real=True)
            printer = CPrinter({sy: value(j) for sy, j in zip(syms, node.args, strict=True)}, self.dt)
            for k, j in enumerate(node.args):
                if node.grads[k] == 0:
                    continue
                grad = node.grads[k]
                # d exp(a) / da = exp(a): the value read, not recomputed (compared as printed: the
                # expressions may differ in their symbols' assumptions)
                if OWN_VALUE and str(grad) == str(node.expr):
                    term = f"{gi} * {value(i)}"
                else:
                    term = f"{gi} * ({printer.doprint(grad)})"
                if j in members:
                    contrib[j].append(term)
                    reached.add(j)
                elif self.size(j) == 1:
                    dj = self.target(j, pre)
                    if dj:
                        scalars.append((f"s{i}_{k}", f"{dj}[0]"))
                        inner.append(f"s{i}_{k} += {term};")
                elif self.size(j) != S:  # a scale node's column (row) vector: summed along its row (column)
                    dj = self.target(j, pre)
                    if dj and self.shape(j)[1] == 1:
                        row.append((f"r{i}_{k}", f"{dj}[a]"))
                        inner.append(f"r{i}_{k} += {term};")
                    elif dj:
                        inner.append(f"{dj}[b] += {term};")
                elif self.host[j]:
                    if self.gref(j):
                        mats.setdefault(j, []).append(term)
                else:
                    mats.setdefault(j, []).append(term)
        for j, terms in mats.items():
            if self.host[j] or j in self.written:
                inner.append(f"{self.gref(j)}[e] += {' + '.join(terms)};")
            else:  # the first write of this adjoint: every element once, no zeroing
                self.written.add(j)
                inner.append(f"{self.gref(j)}[e] = {' + '.join(terms)};")
        if not inner:
            return pre
        accs = [v for v, _ in scalars] + [v for v, _ in row]
        red = f'_Pragma("omp simd reduction(+:{",".join(accs)})") ' if accs else '_Pragma("omp simd") '
        out = pre + [f"{t} {v} = 0;" for v, _ in scalars]
        out.append(f"for (int a = 0; a < {r}; ++a) {{ "
                   + "".join(f"{t} {v} = 0; " for v, _ in row)
                   + f"{red}for (int b = 0; b < {c}; ++b) {{ const int e = a * {c} + b; {' '.join(inner)} }} "
                   + "".join(f"{dst} += {v}; " for v, dst in row) + "}")
        out += [f"{dst} += {v};" for v, dst in scalars]
        return out

    def target(self, j: int, body: list[str]) -> str | None:
        """Where node j's adjoint adds up (gref); a C node's array is zeroed before its first use
        (only the arrays the step reaches, each while it is in cache, instead of all of G)."""
        if not self.host[j] and j not in self.written:
            self.written.add(j)
            body.append(f"memset(G->v{j}, 0, sizeof G->v{j});")
        return self.gref(j)

    # ---- the loops -----------------------------------------------------------------------

    def common(self) -> str:
        """Pointers of the host nodes (and their adjoints) at step t of sequence n, head hh."""
        t = self.t
        used = used_host(self.ir)
        sets = "".join(f" h[{j}] = hv[{j}] + (t * N + n) * rs[{j}] + hh * hs[{j}];" for j in used)
        gsets = "".join(
            f" if (gb[{j}]) gh[{j}] = gb[{j}] + "
            f"((rs[{j}] ? t * N + n : n) * {self.dims['heads']} + hh) * {self.size(j)};"
            for j in used if self.ir.nodes[j].op not in FIXED)
        return (f"static inline void cd_mx_at_{self.dt}(const {t} **h, const {t} *const *hv, "
                f"const int64_t *rs, "
                f"const int64_t *hs, int64_t t, int64_t N, int64_t n, int64_t hh)\n{{{sets}\n}}\n"
                f"static inline void cd_mx_gat_{self.dt}({t} **gh, {t} *const *gb, const int64_t *rs, "
                f"int64_t t, int64_t N, int64_t n, int64_t hh)\n{{{gsets}\n}}")

    def loops(self) -> str:
        ir, t, dt = self.ir, self.t, self.dt
        H = self.dims["heads"]
        nn_ = len(ir.nodes)
        sz = [self.size(ir.new_state[s]) for s in ir.states]
        total = sum(sz)
        off = [sum(sz[:k]) for k in range(len(sz))]
        o = ir.output_node
        ow = self.size(o)
        in_place = self.new_in_place()
        state_index = {s: k for k, s in enumerate(ir.states)}

        def ptr(i: int, st: str, nx: str) -> str:  # where node i's value is after the step
            if i in in_place:
                return f"{nx} + {off[in_place[i]]}"
            if ir.nodes[i].op == "state":
                return f"{st} + {off[state_index[ir.nodes[i].name]]}"
            return f"V->v{i}"

        def copy_new(indent: int) -> str:  # the next states the step did not write in place
            return "".join(" " * indent + f"memcpy(nx + {off[k]}, {ptr(ir.new_state[s], 'st', 'nx')}, "
                           f"{sz[k]} * sizeof({t}));\n"
                           for k, s in enumerate(ir.states) if in_place.get(ir.new_state[s]) != k)

        pointers = self.per_state("stp[{k}] = st + {off}; nsp[{k}] = nx + {off};", off, sz, 12)
        fwd = f"""
int64_t cd_mx_forward_{dt}(int64_t N, int64_t T, const {t} *const *hv, const int64_t *rs, const int64_t *hs,
                          {t} *const *s0, {t} *const *s1, {t} *out, const int64_t *lengths, int64_t every,
                          {t} *const *ck)
{{
    cd_mx_vals_{dt} *V = malloc(sizeof *V);
    {t} *buf = malloc(2 * {total} * sizeof({t}));  /* this step's states and the next's, swapped */
    if (!V || !buf) {{ free(V); free(buf); return 1; }}
    const {t} *h[{nn_}] = {{0}};
    const {t} *stp[{len(sz)}];
    {t} *nsp[{len(sz)}];
    for (int64_t n = 0; n < N; ++n) for (int64_t hh = 0; hh < {H}; ++hh) {{
        {t} *st = buf, *nx = buf + {total};
{self.per_state("memcpy(st + {off}, s0[{k}] + (n * {H} + hh) * {sz}, {sz} * sizeof({t}));",
                        off, sz, 8)}
        const int64_t L = lengths ? lengths[n] : T;
        for (int64_t t = 0; t < L; ++t) {{
            if (every && t % every == 0) {{
{self.per_state("memcpy(ck[{k}] + ((t / every * N + n) * {H} + hh) * {sz}, st + {off}, {sz} * sizeof({t}));",
                        off, sz, 16)}
            }}
{pointers}
            cd_mx_at_{dt}(h, hv, rs, hs, t, N, n, hh);
            cd_mx_fast_{dt}(V, h, stp, nsp);
            memcpy(out + ((t * N + n) * {H} + hh) * {ow}, {ptr(o, 'st', 'nx')}, {ow} * sizeof({t}));
{copy_new(12)}            {{ {t} *swap = st; st = nx; nx = swap; }}
        }}
{self.per_state("memcpy(s1[{k}] + (n * {H} + hh) * {sz}, st + {off}, {sz} * sizeof({t}));",
                        off, sz, 8)}
    }}
    free(V); free(buf);
    return 0;
}}
"""
        rebuild = copy_new(16)
        # the values back() reads (but the states): kept per step of a segment while it is rebuilt
        kept = max(1, sum(self.size(j) for j in self.read))
        koff = [sum(self.size(j) for j in self.read[:m]) for m in range(len(self.read))]
        save = "".join(f"                memcpy(keep + (t - t0) * {kept} + {o}, V->v{j}, sizeof V->v{j});\n"
                       for j, o in zip(self.read, koff, strict=True))
        load = "".join(f"                memcpy(V->v{j}, keep + (t - t0) * {kept} + {o}, sizeof V->v{j});\n"
                       for j, o in zip(self.read, koff, strict=True))
        seeds, seeded = [], set()  # the adjoints of the next states and the output: copied, then added
        for k, s in enumerate(ir.states):
            i = ir.new_state[s]
            seeds.append(f" memcpy(G->v{i}, ds + {off[k]}, sizeof G->v{i});" if i not in seeded else
                         f" for (int e = 0; e < {sz[k]}; ++e) G->v{i}[e] += ds[{off[k]} + e];")
            seeded.add(i)
        at = f"(dout + ((t * N + n) * {H} + hh) * {ow})"
        seeds.append(f" memcpy(G->v{o}, {at}, sizeof G->v{o});" if o not in seeded else
                     f" for (int e = 0; e < {ow}; ++e) G->v{o}[e] += {at}[e];")
        seed = "".join(seeds)
        d_prev = "".join(
            (f" memcpy(ds + {off[k]}, G->v{self.state_node[s]}, {sz[k]} * sizeof({t}));"
             if s in self.state_node
             else f" memset(ds + {off[k]}, 0, {sz[k]} * sizeof({t}));") for k, s in enumerate(ir.states))
        alloc = (f"{t} *seg = malloc((size_t)(every + 1) * {total} * sizeof({t})), "
                 f"*keep = malloc((size_t)every * {kept} * sizeof({t}));")
        bwd = f"""
int64_t cd_mx_backward_{dt}(int64_t N, int64_t T, const {t} *const *hv, const int64_t *rs, const int64_t *hs,
                           const {t} *const *ck, const int64_t *lengths, int64_t every, const {t} *dout,
                           const {t} *const *dfin, {t} *const *dinit, {t} *const *gb)
{{
    cd_mx_vals_{dt} *V = malloc(sizeof *V), *G = malloc(sizeof *G);
    {alloc}
    if (!V || !G || !seg || !keep) {{ free(V); free(G); free(seg); free(keep); return 1; }}
    const {t} *h[{nn_}] = {{0}};
    {t} *gh[{nn_}] = {{0}};
    {t} ds[{total}];
    const {t} *stp[{len(sz)}], *nxp[{len(sz)}];
    {t} *nsp[{len(sz)}];
    for (int64_t n = 0; n < N; ++n) for (int64_t hh = 0; hh < {H}; ++hh) {{
{self.per_state("memcpy(ds + {off}, dfin[{k}] + (n * {H} + hh) * {sz}, {sz} * sizeof({t}));",
                        off, sz, 8)}
        const int64_t L = lengths ? lengths[n] : T;
        for (int64_t s = (L + every - 1) / every - 1; s >= 0; --s) {{
            const int64_t t0 = s * every, t1 = t0 + every < L ? t0 + every : L;
{self.per_state("memcpy(seg + {off}, ck[{k}] + ((s * N + n) * {H} + hh) * {sz}, {sz} * sizeof({t}));",
                        off, sz, 12)}
            for (int64_t t = t0; t < t1; ++t) {{
                {t} *st = seg + (t - t0) * {total}, *nx = st + {total};
{self.per_state("stp[{k}] = st + {off}; nsp[{k}] = nx + {off};",
                        off, sz, 16)}
                cd_mx_at_{dt}(h, hv, rs, hs, t, N, n, hh);
                cd_mx_bstep_{dt}(V, h, stp, nsp);
{rebuild}{save}            }}
            for (int64_t t = t1 - 1; t >= t0; --t) {{
                {t} *st = seg + (t - t0) * {total};
{self.per_state("stp[{k}] = st + {off}; nxp[{k}] = st + " + str(total) + " + {off};",
                        off, sz, 16)}
                cd_mx_at_{dt}(h, hv, rs, hs, t, N, n, hh);
                cd_mx_gat_{dt}(gh, gb, rs, t, N, n, hh);
{load}               {seed}
                cd_mx_back_{dt}(V, G, h, gh, stp, nxp);{d_prev}
            }}
        }}
{self.per_state("memcpy(dinit[{k}] + (n * {H} + hh) * {sz}, ds + {off}, {sz} * sizeof({t}));",
                        off, sz, 8)}
    }}
    free(V); free(G); free(seg); free(keep);
    return 0;
}}
"""
        return fwd + bwd

    def per_state(self, template: str, off: list[int], sz: list[int], indent: int = 0) -> str:
        """One line per state: template with {k} (its index), {off}, {sz}, {t} (the type), {H}."""
        H = self.dims["heads"]
        return "\n".join(" " * indent + template.format(k=k, off=off[k], sz=sz[k], t=self.t, H=H)
                         for k in range(len(sz)))


DOT = """static inline {t} cd_mx_dot_{dt}(const {t} *restrict x, const {t} *restrict y, int n)
{{
    /* sixteen partial sums, added up as a tree: a single sum's lanes would be added one after another */
    {t} p[16] = {{0}};
    int q = 0;
    for (; q + 16 <= n; q += 16) {{ _Pragma("omp simd") \
for (int l = 0; l < 16; ++l) p[l] += x[q + l] * y[q + l]; }}
    for (int l = 0; q + l < n; ++l) p[l] += x[q + l] * y[q + l];
    for (int l = 0; l < 8; ++l) p[l] += p[l + 8];
    for (int l = 0; l < 4; ++l) p[l] += p[l + 4];
    for (int l = 0; l < 2; ++l) p[l] += p[l + 2];
    return p[0] + p[1];
}}
"""

HEADER = """/* Generated by celldsl: a matrix-memory cell's fused time loop, forward and backward, one
   (sequence, head) at a time with time inside; sizes compiled in. Do not edit. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
"""


def matrix_c_source(ir: TensorIR, dims: dict[str, int]) -> str:
    """The C source of one cell at the sizes `dims` (every width, the input's and "heads"), float and
    double. The caller checks `blocker(ir)` first."""
    parts = [HEADER, simd_declarations()]  # emit.LIBM vectorised by glibc's libmvec where it links
    for dt in C_TYPES:
        em = _Emitter(ir, dims, dt)
        back = em.step_backward()  # first: bstep keeps the values it reads (em.read)
        keep = {*ir.new_state.values(), *em.read} | ({ir.output_node} if not PRUNE else set())
        parts += [helper_functions(dt), DOT.format(t=em.t, dt=dt), em.struct(), em.common(), em.fast_step(),
                  em.fast_step("bstep", keep), back, em.loops()]
    return "\n".join(parts) + "\n"


def _elements(r: int, c: int, body: str) -> str:
    """A loop over the elements (a, b) of an r x c value, e = a * c + b."""
    return (f"for (int a = 0; a < {r}; ++a) for (int b = 0; b < {c}; ++b) "
            f"{{ const int e = a * {c} + b; {body} }}")


SYMBOLS = [f"cd_mx_{way}_{dt}" for way in ("forward", "backward") for dt in C_TYPES]


class ForwardStep:
    """The forward step alone, for a time loop written elsewhere (export/c_matrix.py, the standalone
    library): `source` defines the step's values `cd_mx_vals_<dt>` (`value_count` numbers, one array
    per C node, fields v<node>), the dot product and `cd_mx_fast_<dt>(V, h, st, ns)`, which reads the
    host nodes at h[node], the states at st[k] and writes the next states in `in_place` (node -> k)
    into ns[k]; every other next state and the output are in V (or a state) after the call."""

    def __init__(self, ir: TensorIR, dims: dict[str, int], dtype: str):
        em = _Emitter(ir, dims, dtype)
        self.source = "\n".join([DOT.format(t=em.t, dt=dtype), em.struct(), em.fast_step()])
        self.in_place = em.new_in_place()
        self.value_count = sum(em.size(i) for i in em.c_nodes)
