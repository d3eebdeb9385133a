"""Random small cells mixing `: 1` states (one value per sequence), H-wide states, means and sums, run on
the torch, cpu (C kernels) and triton (Triton's interpreter) backends in float64, each against a small
torch interpreter of the same equations (written here from the expression tree the cell text is
printed from, never from celldsl's IR): outputs, final states and the gradients of the input, every
initial state and every parameter, padded and packed (issue 24, findings 1 and 2 and their class).

Hypothesis draws the cells with a fixed seed (derandomize) and a small count, so the test runs the
same cells in CI every time, in well under a minute. tests/test_row_width.py has one regression test
per finding.
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import celldsl
from celldsl.targets.c import fused as cpu_fused

T, N, I, H = 3, 3, 2, 3
LENGTHS = [3, 1, 2]
F64 = torch.float64
EXAMPLES = 10

# An expression is a tuple: ("leaf", name), ("num", c), (op, a[, b]) with op in add, mul, tanh, mean, sum.
# Wide leaves are [N, H] (states, products) or [H] (vectors); row leaves [N, 1] (`: 1` states) or [] (the
# scalar k); numbers are positive, so no sum cancels to a constant that SymPy would fold away.
PRODUCTS = {"Wx": "W @ x", "Uh": "U @ h", "Uhn": "U @ tanh(h * n)"}


def wide(depth, row_names):
    leaves = st.sampled_from(["h", "g", "Wx", "Uh", "Uhn", "v"]).map(lambda n: ("leaf", n))
    if depth == 0:
        return leaves
    sub, rows = wide(depth - 1, row_names), row(depth - 1, row_names)
    return st.one_of(
        leaves,
        st.tuples(st.just("add"), sub, sub),
        st.tuples(st.just("mul"), sub, rows),
        st.tuples(st.just("add"), sub, rows),
        st.tuples(st.just("tanh"), sub),
    )


def row(depth, row_names):
    leaves = st.one_of(st.sampled_from(row_names).map(lambda n: ("leaf", n)),
                       st.sampled_from([0.5, 0.3, 2.0]).map(lambda c: ("num", c)))
    if depth == 0:
        return leaves
    sub, wides = row(depth - 1, row_names), wide(depth - 1, row_names)
    return st.one_of(
        leaves,
        st.tuples(st.sampled_from(["mean", "sum"]), wides),
        st.tuples(st.just("add"), sub, sub),
        st.tuples(st.just("mul"), sub, sub),
        st.tuples(st.just("tanh"), sub),
    )


ROWS = ["n", "m", "k"]


@st.composite
def cells(draw):
    """(cell text, updates {state: expression}, output (name, expression or None))."""
    updates = {
        "h": ("tanh", ("add", ("leaf", "Wx"), draw(wide(2, ROWS)))),
        "g": ("tanh", draw(wide(2, ROWS))),
        "n": ("tanh", ("add", ("mul", ("num", 0.5), ("leaf", "n")), draw(row(2, ROWS)))),
        "m": ("tanh", draw(row(2, ROWS))),
    }
    output = draw(st.sampled_from(["h", "n", "y_row", "y_wide"]))
    out_expr = None
    if output == "y_row":
        out_expr = draw(row(2, ROWS))
    elif output == "y_wide":
        out_expr = draw(wide(1, ROWS))
    return updates, output, out_expr


def text_of(e):
    kind = e[0]
    if kind == "leaf":
        return PRODUCTS.get(e[1], e[1])
    if kind == "num":
        return repr(e[1])
    if kind in ("add", "mul"):
        return f"({text_of(e[1])} {'+' if kind == 'add' else '*'} {text_of(e[2])})"
    return f"{kind}({text_of(e[1])})"


def names_in(e, found):
    if e[0] == "leaf":
        found.add(e[1])
        if e[1] == "Uhn":
            found.update({"h", "n"})
    elif e[0] != "num":
        for a in e[1:]:
            names_in(a, found)
    return found


def cell_text(updates, output, out_expr):
    used = set()
    for e in [*updates.values(), *([out_expr] if out_expr else [])]:
        names_in(e, used)
    params = [p for p in ("W", "U") if any(k.startswith(p) for k in used)] + (["v"] if "v" in used else [])
    out = "y" if out_expr else output
    lines = ["cell random_rows", "input x", "state h, g", "state n : 1", "state m : 1", f"output {out}"]
    if params:
        lines.append(f"param {', '.join(params)}")
    if "k" in used:
        lines.append("param k : scalar")
    if out_expr:
        lines.append(f"y = {text_of(out_expr)}")
    lines += [f"{s}' = {text_of(e)}" for s, e in updates.items()]
    return "\n".join(lines) + "\n"


def evaluate(e, env):
    """The expression on tensors: wide values [n, H] or [H], rows [n, 1], scalars []. A mean or sum is over
    the H columns of its argument broadcast to [n, H]."""
    kind = e[0]
    if kind == "leaf":
        return env[e[1]]
    if kind == "num":
        return torch.tensor(e[1], dtype=F64)
    args = [evaluate(a, env) for a in e[1:]]
    if kind == "add":
        return args[0] + args[1]
    if kind == "mul":
        return args[0] * args[1]
    if kind == "tanh":
        return torch.tanh(args[0])
    full = torch.broadcast_to(args[0], (env["h"].shape[0], H))
    return full.mean(-1, keepdim=True) if kind == "mean" else full.sum(-1, keepdim=True)


def reference(p, x, states, updates, output, out_expr):
    """One sequence slice x [t, n, I] from states (h, g, n, m) -> (outputs [t, n, width], final states)."""
    names = ["h", "g", "n", "m"]
    cur = dict(zip(names, states, strict=True))
    outs = []
    for x_t in x:
        env = dict(cur, v=p.get("v"), k=p.get("k"))
        if "W" in p:
            env["Wx"] = x_t @ p["W"].T
        if "U" in p:
            env["Uh"] = cur["h"] @ p["U"].T
            env["Uhn"] = torch.tanh(cur["h"] * cur["n"]) @ p["U"].T
        new = {s: torch.broadcast_to(evaluate(e, env), cur[s].shape) for s, e in updates.items()}
        if out_expr is not None:
            y = evaluate(out_expr, env)
            width = 1 if output == "y_row" and per_sequence(out_expr) else H  # numbers alone: H wide
            outs.append(torch.broadcast_to(y, (x_t.shape[0], width)))
        else:
            outs.append(new[output])
        cur = new
    return torch.stack(outs), tuple(cur[s] for s in names)


def per_sequence(e):
    """Whether a row expression reads a `: 1` state or a mean or sum (else it is numbers and k only)."""
    if e[0] in ("mean", "sum") or e[0] == "leaf" and e[1] in ("n", "m"):
        return True
    return e[0] not in ("leaf", "num") and any(per_sequence(a) for a in e[1:])


def losses(out, finals):
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum()
    return loss + sum((f * torch.randn(f.shape, generator=g, dtype=F64)).sum() for f in finals)


def run_backend(text, backend, packed):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = celldsl.Recurrent(text, I, H, backend=backend, dtype=F64)
    with torch.no_grad():
        for q in layer.parameters():
            q.add_(torch.randn_like(q) * 0.3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, N, I, generator=gen, dtype=F64, requires_grad=True)
    widths = [1 if layer.compiled.ir.width(s) == "row" else H for s in layer.compiled.states]
    states = [(0.5 * torch.randn(N, w, generator=gen, dtype=F64)).requires_grad_() for w in widths]
    params = list(layer.parameters())
    if packed:
        seq = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
        out, finals = layer(seq, tuple(s[None] for s in states))
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, finals = layer(x, tuple(s[None] for s in states))
    finals = [f[0] for f in finals]
    grads = torch.autograd.grad(losses(out, finals), [x, *states, *params], allow_unused=True)
    p = {name: layer.cell_parameter(name) for name in layer.compiled.ir.params}
    return layer, x, states, params, p, [out.detach(), *(f.detach() for f in finals), *grads]


def expected_of(x, states, params, p, updates, output, out_expr, packed):
    lengths = LENGTHS if packed else [T] * N
    outs, finals = [], [[] for _ in states]
    for n, length in enumerate(lengths):
        o, fin = reference(p, x[:length, n : n + 1], tuple(s[n : n + 1] for s in states), updates, output,
                           out_expr)
        outs.append(torch.cat([o, o.new_zeros(T - length, 1, o.shape[-1])]))
        for i, f in enumerate(fin):
            finals[i].append(f)
    out, finals = torch.cat(outs, dim=1), [torch.cat(f) for f in finals]
    grads = torch.autograd.grad(losses(out, finals), [x, *states, *params], allow_unused=True)
    return [out.detach(), *(f.detach() for f in finals), *grads]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cell=cells(), packed=st.booleans())
def test_random_row_width_cells_match_a_torch_interpreter(backend, cell, packed, monkeypatch):
    if backend == "cpu" and cpu_fused.compiler() is None:
        pytest.skip("the cpu backend needs a C compiler")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    updates, output, out_expr = cell
    text = cell_text(updates, output, out_expr)
    _layer, x, states, params, p, got = run_backend(text, backend, packed)
    expected = expected_of(x, states, params, p, updates, output, out_expr, packed)
    names = ["out", "h", "g", "n", "m", "d x", "d h0", "d g0", "d n0", "d m0"]
    names += [f"d parameter {i}" for i in range(len(params))]
    for name, a, b in zip(names, got, expected, strict=True):
        if a is None or b is None:
            assert (a is None or not a.abs().max() > 0) and (b is None or not b.abs().max() > 0), name
            continue
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m, n=name: f"{text}\n{n}: {m}")
