"""The plan: GEMM grouping and stages, hoisting, recurrence kinds, prev() states, and the symbolically
derived backward of every pointwise function checked against finite differences of its forward.

The derivative check evaluates the plan's own SymPy expressions with sympy.lambdify on mpmath (40
digits). That is test code evaluating compiler-generated expressions, never cell text.
"""

import random
import warnings
from pathlib import Path

import mpmath
import pytest
import sympy as sp
from zoo import ELEMENTWISE, MATRIX, SHAPED
from zoo import ZOO as ALL

from celldsl import compile_cell
from celldsl.lang.errors import CellWarning, Source
from celldsl.lang.ir import build_ir
from celldsl.lang.syntax import parse
from celldsl.plan import build_plan

CELLS = Path(__file__).resolve().parents[1] / "cells"
ZOO = ELEMENTWISE  # a plan is an elementwise cell's; the matrix cells have none (tests/zoo.py: MATRIX)


def plan_of(name: str):
    return compile_cell(name).plan


def plan_of_text(text: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)  # some small test cells leave a parameter unused
        return build_plan(build_ir(parse(text, "t.cell"), Source(text, "t.cell")))


def test_the_zoo_is_all_there():
    assert len(ZOO) == 33 and len(ALL) == 33 + len(MATRIX) + len(SHAPED) == 42


# ---- GEMM grouping and stages -------------------------------------------------------------------


def test_lstm_one_hoisted_4HxI_gemm_and_one_recurrent_4HxH_gemm():
    plan = plan_of("lstm")
    (hoisted,) = plan.hoisted
    assert hoisted.stage == 0
    assert hoisted.params == ("W_ii", "W_if", "W_ig", "W_io")  # torch's row order i, f, g, o
    assert hoisted.operand.name == "x" and hoisted.operand_size == "x"
    (step,) = plan.gemms
    assert step.stage == 1
    assert step.params == ("W_hi", "W_hf", "W_hg", "W_ho")
    assert step.operand.name == "h" and step.operand_size == "H"
    assert plan.num_stages == 1
    assert [pw.stage for pw in plan.pointwise] == [1]
    assert plan.hoist_pointwise == []


@pytest.mark.parametrize(("cell", "stages"), [("gru", 1), ("rnn_tanh", 1), ("lstm", 1), ("greff_vanilla", 1)])
def test_single_stage_cells(cell, stages):
    plan = plan_of(cell)
    assert plan.num_stages == stages
    assert len(plan.gemms) == 1 and plan.gemms[0].operand.name in ("h", "y")


def test_gru_torch_form_needs_one_stage_because_reset_applies_after_the_matmul():
    plan = plan_of("gru")
    assert [g.params for g in plan.hoisted] == [("W_ir", "W_iz", "W_in")]
    assert [(g.stage, g.params, g.operand.name) for g in plan.gemms] == [(1, ("W_hr", "W_hz", "W_hn"), "h")]


@pytest.mark.parametrize("cell", ["gru_cho", "mut1", "mut2", "mut3", "vanilla_rnn"])
def test_products_of_same_step_values_need_a_second_stage(cell):
    plan = plan_of(cell)
    assert plan.num_stages == 2
    (second,) = plan.gemms_of_stage(2)
    assert plan.role(second.operand) == "operand"  # computed by pointwise 1 of the same step
    assert [pw.stage for pw in plan.pointwise][-2:] == [1, 2]


def test_gru_cho_stages():
    plan = plan_of("gru_cho")
    assert [(g.stage, g.params, g.operand.name) for g in plan.gemms][:1] == [(1, ("U_r", "U_z"), "h")]
    (second,) = plan.gemms_of_stage(2)
    assert second.params == ("U",)
    operand = dict(plan.pointwise[0].outputs)[second.operand.name]
    r = sp.Symbol("h", real=True)
    assert r in operand.free_symbols and any(s.name == "U_r@" for s in operand.free_symbols)


def test_mut3_stage_one_operand_of_the_previous_state_runs_in_pointwise_zero():
    plan = plan_of("mut3")
    assert plan.pointwise[0].stage == 0
    assert [str(e) for _, e in plan.pointwise[0].outputs] == ["tanh(h)"]


@pytest.mark.parametrize("cell", ZOO)
def test_stages_are_minimal_and_gemms_grouped_by_operand(cell):
    plan = plan_of(cell)
    products = plan.ir.products
    stage_of = {p: g.stage for g in [*plan.hoisted, *plan.gemms] for p in g.products}
    states = {sp.Symbol(s, real=True) for s in plan.states}
    operand_value = {}
    for pw in plan.all_pointwise():
        operand_value.update({sp.Symbol(n, real=True): e for n, e in pw.outputs if n.startswith("operand")})
    seen = set()
    for g in [*plan.hoisted, *plan.gemms]:
        assert (g.stage, g.operand) not in seen, "one GEMM per operand and stage"
        seen.add((g.stage, g.operand))
        for p in g.products:
            assert products[p].param == g.params[g.products.index(p)]
            deps = products[p].operand.free_symbols
            inner = [stage_of[d] for d in deps if d in stage_of]
            if g.stage == 0:
                assert not deps & states and not inner, "hoisted products read inputs only"
            else:
                # as early as possible: right after the latest product its operand needs
                assert g.stage == 1 + max(inner, default=0)
                assert deps & states or inner
        if g.operand in operand_value:
            assert operand_value[g.operand] == products[g.products[0]].operand
    assert plan.num_stages == max((g.stage for g in plan.gemms), default=0)


def test_every_product_of_one_operand_shares_one_gemm_across_equations():
    plan = plan_of_text(
        "cell t\ninput x\nstate h, c\noutput h\nparam A, B, C, D\n"
        "h' = tanh(A @ h + B @ x)\nc' = sigmoid(C @ h + D @ x) * c\n"
    )
    assert [g.params for g in plan.hoisted] == [("B", "D")]
    assert [g.params for g in plan.gemms] == [("A", "C")]


def test_a_long_chain_of_products_gets_one_stage_per_link():
    text = "cell t\ninput x\nstate h\nparam " + ", ".join(f"W{i}" for i in range(30)) + "\n"
    text += "a0 = tanh(W0 @ h)\n" + "".join(f"a{i} = tanh(W{i} @ a{i - 1})\n" for i in range(1, 30))
    text += "h' = a29 + x\n"
    plan = plan_of_text(text)
    assert plan.num_stages == 30
    assert [g.stage for g in plan.gemms] == list(range(1, 31))


def test_input_expressions_are_hoisted_with_their_own_pointwise():
    plan = plan_of_text("cell t\ninput x\nstate h\nparam W, R\nh' = tanh(W @ tanh(x) + R @ h)\n")
    (hoisted,) = plan.hoisted
    assert plan.role(hoisted.operand) == "operand"
    (hoist,) = plan.hoist_pointwise
    assert hoist.stage == -1 and [str(e) for _, e in hoist.outputs] == ["tanh(x)"]


def test_lstm_saves_new_states_and_gemm_outputs_per_step():
    saved = plan_of("lstm").saved_per_step()
    assert [w for _, w in saved] == [("H",), ("H",), ("H",) * 4, ("H",) * 4]
    assert saved[0][0] == "h'" and saved[1][0] == "c'"


# ---- recurrence kinds and prev() states -----------------------------------------------------------

KINDS = {
    "mingru": "linear",
    "minlstm": "linear",
    "indrnn": "elementwise",
    "sru": "elementwise",
    "qrnn": "linear",
    "qrnn_f": "linear",
    "lru": "linear",  # a complex diagonal: coupled real and imaginary parts, no GEMM on the state
}


@pytest.mark.parametrize("cell", ZOO)
def test_recurrence_kind(cell):
    assert plan_of(cell).recurrence == KINDS.get(cell, "dense")


@pytest.mark.parametrize(
    ("equation", "kind"),
    [
        ("h' = (1 - sigmoid(W @ x)) * h + W @ x", "linear"),
        ("h' = h / (1 + exp(W @ x)) + 2", "linear"),
        ("h' = h * h + W @ x", "elementwise"),
        ("h' = tanh(h) + W @ x", "elementwise"),
        ("h' = W @ x", "linear"),  # no state at all: trivially linear
    ],
)
def test_recurrence_kind_of_small_cells(equation, kind):
    plan = plan_of_text(f"cell t\ninput x\nstate h\nparam W\n{equation}\n")
    assert plan.recurrence == kind


def test_fgr_carries_the_previous_gates_as_extra_states():
    plan = plan_of("greff_fgr")
    ir = plan.ir
    assert ir.states == ["c", "y", "prev(i)", "prev(f)", "prev(o)"]
    assert ir.declared_states == 2
    new_c = ir.new_states["c"]
    # prev(i)' is this step's i, the same expression c' is built from
    for gate in ("i", "f"):
        value = ir.new_states[f"prev({gate})"]
        assert value.func.__name__ == "sigmoid"
        assert value in sp.preorder_traversal(new_c)
    assert ir.new_states["prev(o)"] in sp.preorder_traversal(ir.new_states["y"])
    operands = [g.operand.name for g in plan.gemms]
    assert operands == ["y", "prev(i)", "prev(f)", "prev(o)"]
    assert [g.params for g in plan.gemms][1:] == [("R_ii", "R_if", "R_io"), ("R_fi", "R_ff", "R_fo"),
                                                  ("R_oi", "R_of", "R_oo")]  # fmt: skip


# ---- the derived backward against finite differences ------------------------------------------------

MP = {
    "sigmoid": lambda v: 1 / (1 + mpmath.exp(-v)),
    "relu": lambda v: v if v > 0 else 0 * v,
    "step": lambda v: mpmath.mpf(1) if v > 0 else mpmath.mpf(0),
    "softplus": lambda v: mpmath.log1p(mpmath.exp(v)),
    "logsigmoid": lambda v: -mpmath.log1p(mpmath.exp(-v)),
    "maximum": lambda a, b: a if a >= b else b,
    "minimum": lambda a, b: a if a <= b else b,
    "less": lambda a, b: mpmath.mpf(1) if a < b else mpmath.mpf(0),
    "less_equal": lambda a, b: mpmath.mpf(1) if a <= b else mpmath.mpf(0),
    "where": lambda c, a, b: a if c != 0 else b,
    "mod": lambda a, b: a - b * mpmath.floor(a / b),
    # a reduction over a row of one element is that element (here every value is a single number);
    # reductions over real rows are checked by the cells that use them (tests/test_language2.py)
    "rowmean": lambda v: v,
    "rowsum": lambda v: v,
}
MODULES = [MP, "mpmath"]


def _fn(args, exprs):
    return sp.lambdify(list(args), list(exprs), modules=MODULES, dummify=True)


def _pointwise_functions(pw):
    """forward (un-CSE'd outputs), forward (CSE'd, as run) and backward as numeric functions."""
    ins, grads = list(pw.inputs), list(pw.grad_outputs)
    forward = _fn(ins, [e for _, e in pw.outputs])

    def sequential(temps, results, args):
        steps = []
        known = list(args)
        for t, e in temps:
            steps.append(_fn(known, [e]))
            known = [*known, t]
        final = _fn(known, results)

        def run(*values):
            values = list(values)
            for f in steps:
                values.append(f(*values)[0])
            return final(*values)

        return run

    forward_cse = sequential(pw.forward_temps, pw.forward_results, ins)
    backward = sequential(pw.backward_temps, pw.backward_results, ins + grads)
    return forward, forward_cse, backward


def _check_pointwise(pw, rng, points=2):
    mpmath.mp.dps = 40
    eps = mpmath.mpf("1e-15")
    forward, forward_cse, backward = _pointwise_functions(pw)
    index = {s: i for i, s in enumerate(pw.inputs)}
    for _ in range(points):
        x = [mpmath.mpf(rng.uniform(-1.2, 1.2)) for _ in pw.inputs]
        g = [mpmath.mpf(rng.uniform(-1, 1)) for _ in pw.grad_outputs]
        y = forward(*x)
        assert all(abs(a - b) <= 1e-30 * max(1, abs(a)) for a, b in zip(y, forward_cse(*x), strict=True))
        grads = backward(*x, *g)
        assert len(grads) == len(pw.grad_inputs)
        for sym, got in zip(pw.grad_inputs, grads, strict=True):
            i = index[sym]
            up, down = list(x), list(x)
            up[i] += eps
            down[i] -= eps
            diffs = zip(g, forward(*up), forward(*down), strict=True)
            fd = sum(gj * (a - b) for gj, a, b in diffs) / (2 * eps)
            assert abs(got - fd) <= 1e-15 * max(1, abs(fd)), (sym, got, fd)


@pytest.mark.parametrize("cell", ZOO)
def test_derived_backward_matches_finite_differences_of_the_forward(cell):
    plan = plan_of(cell)
    rng = random.Random(f"{cell}-backward")
    stages = plan.all_pointwise()
    for pw in stages:
        assert set(pw.grad_inputs) == set(pw.inputs), "every pointwise input is differentiable"
        _check_pointwise(pw, rng)


@pytest.mark.parametrize(
    "equation",
    [
        "h' = tanh(W @ tanh(x) + R @ h)",  # the hoisted pointwise
        "h' = max(R @ h, tanh(x)) + min(h, 0.5) + abs(h) + softplus(h) + logsigmoid(h) + relu(h)",
        "h' = sqrt(h * h + 1) + exp(-h) + log(1 + h * h) + h ^ 3 + 2 / (3 + h * h) + W @ x",
        "h' = (h + 1) ^ 0.5 * sigmoid(x) + R @ h",
    ],
)
def test_derived_backward_of_every_function(equation):
    plan = plan_of_text(f"cell t\ninput x\nstate h\nparam W, R\n{equation}\n")
    rng = random.Random(equation)
    for pw in plan.all_pointwise():
        _check_pointwise(pw, rng, points=3)


def test_the_documented_example_compiles_to_one_stage():
    text = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text().split("```")[1]
    plan = plan_of_text(text)
    assert [g.params for g in plan.hoisted] == [("W_z", "W_i", "W_f", "W_o")]
    assert [g.params for g in plan.gemms] == [("R_z", "R_i", "R_f", "R_o")]
    assert plan.ir.params["R_z"].init.name == "uniform"
