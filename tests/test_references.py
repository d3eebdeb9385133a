"""The hand-written references (reference_cells.py) are right where an outside oracle exists.

- torch cells: equal torch.nn.LSTM / GRU / RNN in float64, with torch's weights split by gate rows.
- Greff variants, GRU forms, MUTs, min-RNNs, IndRNN, SRU, sLSTM: cross-checks that tie one
  reference to another (or to torch) through a parameter choice, e.g. NP == vanilla with zero
  peepholes, CIFG == vanilla with the forget gate's parameters set to minus the input gate's.
- Every cells/*.cell file has a reference that reads exactly the file's parameters and returns
  the file's states.
"""

import re
from pathlib import Path

import pytest
import torch
from reference_cells import EXTRA_INPUT_REFERENCES, REFERENCES
from zoo import GENERIC, ZOO

CELLS = Path(__file__).resolve().parents[1] / "cells"
T, N, I, H = 5, 3, 4, 6
ATOL = 1e-10
NEEDS_I_EQ_H = {"mut1", "mut2", "sru"}  # raw x used elementwise with H-wide values

TORCH_LAYOUT = {  # torch.nn state_dict groups (without the _l0 suffix), rows in torch's gate order
    "lstm": {
        "weight_ih": ["W_ii", "W_if", "W_ig", "W_io"],
        "weight_hh": ["W_hi", "W_hf", "W_hg", "W_ho"],
        "bias_ih": ["b_ii", "b_if", "b_ig", "b_io"],
        "bias_hh": ["b_hi", "b_hf", "b_hg", "b_ho"],
    },
    "gru": {
        "weight_ih": ["W_ir", "W_iz", "W_in"],
        "weight_hh": ["W_hr", "W_hz", "W_hn"],
        "bias_ih": ["b_ir", "b_iz", "b_in"],
        "bias_hh": ["b_hr", "b_hz", "b_hn"],
    },
    "rnn_tanh": {"weight_ih": ["W_ih"], "weight_hh": ["W_hh"], "bias_ih": ["b_ih"], "bias_hh": ["b_hh"]},
    "rnn_relu": {"weight_ih": ["W_ih"], "weight_hh": ["W_hh"], "bias_ih": ["b_ih"], "bias_hh": ["b_hh"]},
}


# --- reading what a test needs from a cell file (names only; the compiler does the real parsing) ---


def read_cell(stem: str) -> dict:
    """states, prev-states, output, param groups and param kinds of cells/<stem>.cell."""
    lines = [ln.split("#")[0].strip() for ln in (CELLS / f"{stem}.cell").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    states = next(ln.split(None, 1)[1] for ln in lines if ln.startswith("state "))
    output = next(ln.split(None, 1)[1] for ln in lines if ln.startswith("output "))
    groups, names = {}, []
    for ln in lines:
        if ln.startswith("param "):
            decl = ln.split(None, 1)[1].split(":")[0]
            if "=" in decl:
                group, members = decl.split("=")
                members = [m.strip() for m in members.strip(" []").split(",")]
                groups[group.strip()] = members
            else:
                members = [m.strip() for m in decl.split(",")]
            names += members
    equations = "\n".join(ln for ln in lines if "=" in ln and ln.split()[0] not in ("param", "init"))
    kinds = {}
    for name in names:
        if re.search(rf"\b{name}\s*@\s*(prev\(\s*)?x\b", equations):  # x or an earlier x
            kinds[name] = "matrix_x"
        elif re.search(rf"\b{name}\s*@|\([^()]*\b{name}\b[^()]*\)\s*@", equations):  # W @ or (W - Wᵀ) @
            kinds[name] = "matrix_h"
        else:
            kinds[name] = "vector"
    inputs = {
        n.strip()
        for ln in lines
        if ln.startswith("input ")
        for n in ln.split(None, 1)[1].split(":")[0].split(",")
    }
    prevs = [v for v in dict.fromkeys(re.findall(r"\bprev\(\s*(\w+)\s*\)", equations)) if v not in inputs]
    return {
        "states": [s.strip() for s in states.split(",")],
        "prevs": prevs,
        "output": output.strip(),
        "groups": groups,
        "kinds": kinds,
    }


def sizes(stem: str) -> tuple[int, int]:
    return (H, H) if stem in NEEDS_I_EQ_H else (I, H)


def random_params(stem: str, gen: torch.Generator, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Every parameter of the cell file, U(-scale, scale), float64, in torch's (out, in) layout."""
    i_size, h_size = sizes(stem)
    shape = {"matrix_x": (h_size, i_size), "matrix_h": (h_size, h_size), "vector": (h_size,)}
    return {
        name: (torch.rand(shape[kind], generator=gen, dtype=torch.float64) * 2 - 1) * scale
        for name, kind in read_cell(stem)["kinds"].items()
    }


def random_inputs(stem: str, gen: torch.Generator, n_states: int):
    i_size, h_size = sizes(stem)
    x = torch.randn(T, N, i_size, generator=gen, dtype=torch.float64)
    state = tuple(torch.randn(N, h_size, generator=gen, dtype=torch.float64) * 0.5 for _ in range(n_states))
    return x, state


def assert_same(a, b, atol=ATOL):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same(u, v, atol)
    else:
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# --- every cell file has a reference that agrees with it on names and states ------------------------


def test_every_cell_file_has_a_reference():
    """Here (reference_cells.py), or for issue 26's cells (the matrix ones, lru, chrono_lstm) in
    matrix_references.py, whose einsum loops test_matrix_cells.py and test_matrix_zoo.py run, or for
    the shaped ordinary cells (flstm) in test_lowrank_cells.py, which runs them."""
    import matrix_references
    import test_lowrank_cells

    here = sorted([*REFERENCES, *(c for c in EXTRA_INPUT_REFERENCES if c in ZOO)])
    there = sorted(c for c in ZOO if hasattr(matrix_references, f"ref_{c}"))
    shaped = sorted(c for c in ZOO if hasattr(test_lowrank_cells, f"ref_{c}"))
    assert sorted(here + there + shaped) == ZOO
    assert not set(here) & set(there) and not set(here + there) & set(shaped)


class RecordingParams(dict):
    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("stem", GENERIC)  # the others: tests/test_language2.py
def test_reference_reads_exactly_the_cell_params_and_returns_its_states(stem, gen):
    cell = read_cell(stem)
    n_states = len(cell["states"]) + len(cell["prevs"])
    p = RecordingParams(random_params(stem, gen))
    x, state = random_inputs(stem, gen, n_states)
    out, final = REFERENCES[stem](p, x, state)
    assert p.read == set(p)
    assert out.shape == (T, N, H) and len(final) == n_states
    assert all(s.shape == (N, H) for s in final)
    if cell["output"] in cell["states"]:  # the output is a state's new value
        assert_same(out[-1], final[cell["states"].index(cell["output"])])


@pytest.mark.parametrize("stem", sorted(TORCH_LAYOUT))
def test_torch_cell_files_group_params_like_torch_state_dict(stem):
    assert read_cell(stem)["groups"] == TORCH_LAYOUT[stem]


# --- torch cells equal torch.nn ---------------------------------------------------------------------


def torch_module(stem: str) -> torch.nn.Module:
    make = {
        "lstm": lambda: torch.nn.LSTM(I, H),
        "gru": lambda: torch.nn.GRU(I, H),
        "rnn_tanh": lambda: torch.nn.RNN(I, H, nonlinearity="tanh"),
        "rnn_relu": lambda: torch.nn.RNN(I, H, nonlinearity="relu"),
    }[stem]
    return make().double()


def params_from_module(stem: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Split torch's stacked weight_ih_l0 etc. by gate rows into the cell's individual names."""
    p = {}
    for group, names in TORCH_LAYOUT[stem].items():
        p.update(zip(names, getattr(module, f"{group}_l0").detach().chunk(len(names), dim=0), strict=True))
    return p


@pytest.mark.parametrize("stem", sorted(TORCH_LAYOUT))
def test_reference_equals_torch_nn(stem, gen):
    torch.manual_seed(0)
    module = torch_module(stem)
    x, state = random_inputs(stem, gen, 2 if stem == "lstm" else 1)
    with torch.no_grad():
        if stem == "lstm":
            out, (h_n, c_n) = module(x, (state[0][None], state[1][None]))
            final = (h_n[0], c_n[0])
        else:
            out, h_n = module(x, state[0][None])
            final = (h_n[0],)
    ref_out, ref_final = REFERENCES[stem](params_from_module(stem, module), x, state)
    assert_same(ref_out, out)
    assert_same(ref_final, final)


def test_indrnn_equals_torch_relu_rnn_with_diagonal_recurrent_weight(gen):
    p = random_params("indrnn", gen)
    rnn = torch.nn.RNN(I, H, nonlinearity="relu").double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(p["W"])
        rnn.weight_hh_l0.copy_(torch.diag(p["u"]))
        rnn.bias_ih_l0.copy_(p["b"])
        rnn.bias_hh_l0.zero_()
        x, (h0,) = random_inputs("indrnn", gen, 1)
        out, h_n = rnn(x, h0[None])
    ref_out, ref_final = REFERENCES["indrnn"](p, x, (h0,))
    assert_same(ref_out, out)
    assert_same(ref_final, (h_n[0],))


# --- Greff variants against the vanilla LSTM --------------------------------------------------------


def params_of(stem: str, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``p`` that cells/<stem>.cell declares."""
    return {k: v for k, v in p.items() if k in read_cell(stem)["kinds"]}


def vanilla_vs_variant(variant: str, gen: torch.Generator, **changes: float):
    """(vanilla run, variant run) on the same x, state and shared params; ``changes`` set vanilla biases."""
    p = random_params("greff_vanilla", gen)
    p.update({name: torch.full((H,), value, dtype=torch.float64) for name, value in changes.items()})
    x, state = random_inputs("greff_vanilla", gen, 2)
    return REFERENCES["greff_vanilla"](p, x, state), REFERENCES[variant](params_of(variant, p), x, state)


def test_greff_np_equals_vanilla_with_zero_peepholes(gen):
    vanilla, np_ = vanilla_vs_variant("greff_np", gen, p_i=0.0, p_f=0.0, p_o=0.0)
    assert_same(vanilla, np_)


@pytest.mark.parametrize(
    "variant, saturated_bias", [("greff_nig", "b_i"), ("greff_nfg", "b_f"), ("greff_nog", "b_o")]
)
def test_greff_gate_removed_equals_vanilla_with_that_gate_saturated_open(variant, saturated_bias, gen):
    vanilla, removed = vanilla_vs_variant(variant, gen, **{saturated_bias: 50.0})  # sigmoid(50) = 1 - 2e-22
    assert_same(vanilla, removed)


def test_greff_cifg_equals_vanilla_with_forget_params_minus_input_params(gen):
    # 1 - sigmoid(a) = sigmoid(-a): negating every input-gate term gives f = 1 - i.
    p = random_params("greff_vanilla", gen)
    for gate_param in ("W", "R", "p", "b"):
        p[f"{gate_param}_f"] = -p[f"{gate_param}_i"]
    x, state = random_inputs("greff_vanilla", gen, 2)
    cifg = REFERENCES["greff_cifg"](params_of("greff_cifg", p), x, state)
    assert_same(REFERENCES["greff_vanilla"](p, x, state), cifg)


def test_greff_fgr_equals_vanilla_without_gate_recurrence(gen):
    zero = torch.zeros(H, H, dtype=torch.float64)
    p = random_params("greff_fgr", gen)
    p.update({f"R_{a}{b}": zero for a in "ifo" for b in "ifo"})
    vanilla_p = params_of("greff_vanilla", p)
    x, state = random_inputs("greff_fgr", gen, 5)
    out, final = REFERENCES["greff_fgr"](p, x, state)
    vanilla_out, vanilla_final = REFERENCES["greff_vanilla"](vanilla_p, x, state[:2])
    assert_same(out, vanilla_out)
    assert_same(final[:2], vanilla_final)


def test_greff_fgr_feeds_back_the_previous_gates(gen):
    # Zero previous gates: step 1 is vanilla's step 1; from step 2 on the R_ab feedback changes y.
    p = random_params("greff_fgr", gen)
    vanilla_p = params_of("greff_vanilla", p)
    x, state = random_inputs("greff_fgr", gen, 2)
    zeros = tuple(torch.zeros(N, H, dtype=torch.float64) for _ in range(3))
    out, final = REFERENCES["greff_fgr"](p, x, state + zeros)
    vanilla_out, _ = REFERENCES["greff_vanilla"](vanilla_p, x, state)
    assert_same(out[0], vanilla_out[0])
    assert (out[1] - vanilla_out[1]).abs().max() > 1e-3
    _, (_, _, i, f, o) = REFERENCES["greff_fgr"](p, x[:1], state + zeros)
    assert ((0 < i) & (i < 1) & (0 < f) & (f < 1) & (0 < o) & (o < 1)).all()  # carried post-sigmoid


@pytest.mark.parametrize("a", "ifo")
@pytest.mark.parametrize("b", "ifo")
def test_greff_fgr_R_ab_feeds_gate_a_of_the_previous_step_into_gate_b(a, b, gen):
    # One step, only R_ab nonzero: gate b moves iff prev(a) is nonzero; gates i, f other than b stay.
    p = random_params("greff_fgr", gen)
    p.update({f"R_{u}{v}": torch.zeros(H, H, dtype=torch.float64) for u in "ifo" for v in "ifo"})
    p_ab = dict(p, **{f"R_{a}{b}": torch.rand(H, H, generator=gen, dtype=torch.float64)})
    x, (c0, y0) = random_inputs("greff_fgr", gen, 2)
    prev_gates = {g: torch.rand(N, H, generator=gen, dtype=torch.float64) for g in "ifo"}

    def gates(params, nonzero):
        state = (c0, y0, *(prev_gates[g] * (g in nonzero) for g in "ifo"))
        _, (_, _, i, f, o) = REFERENCES["greff_fgr"](params, x[:1], state)
        return dict(zip("ifo", (i, f, o), strict=True))

    base, fed = gates(p, a), gates(p_ab, a)
    assert (fed[b] - base[b]).abs().max() > 1e-3
    for g in "if":
        if g != b:
            assert_same(fed[g], base[g])
    others = set("ifo") - {a}
    assert_same(gates(p_ab, others), gates(p, others))


# --- GRU forms --------------------------------------------------------------------------------------


def test_gru_cho_equals_torch_gru_when_reset_is_one(gen):
    # With r = 1 the reset's place (before/after the matmul) no longer matters; b = b_in + b_hn.
    t = random_params("gru", gen)
    t["b_hr"] = torch.full((H,), 50.0, dtype=torch.float64)
    cho = {
        "W_r": t["W_ir"],
        "U_r": t["W_hr"],
        "b_r": t["b_ir"] + t["b_hr"],
        "W_z": t["W_iz"],
        "U_z": t["W_hz"],
        "b_z": t["b_iz"] + t["b_hz"],
        "W": t["W_in"],
        "U": t["W_hn"],
        "b": t["b_in"] + t["b_hn"],
    }
    x, state = random_inputs("gru", gen, 1)
    assert_same(REFERENCES["gru"](t, x, state), REFERENCES["gru_cho"](cho, x, state))


def test_gru_cho_equals_mut3_without_recurrent_update_gate(gen):
    # Both put the reset before the matmul, U (r * h). With no h in z, Cho's z (keeps the old h) is
    # MUT3's 1 - z (weights the candidate) when its parameters are negated.
    m = random_params("mut3", gen)
    m["W_hz"] = torch.zeros(H, H, dtype=torch.float64)
    cho = {
        "W_r": m["W_xr"],
        "U_r": m["W_hr"],
        "b_r": m["b_r"],
        "W_z": -m["W_xz"],
        "U_z": m["W_hz"],
        "b_z": -m["b_z"],
        "W": m["W_xh"],
        "U": m["W_hh"],
        "b": m["b"],
    }
    x, state = random_inputs("mut3", gen, 1)
    assert_same(REFERENCES["mut3"](m, x, state), REFERENCES["gru_cho"](cho, x, state))


def test_gru_cho_differs_from_torch_gru_in_general(gen):
    # The two reset placements are not equivalent (cell-equations.md, Sec. 12.1).
    t = random_params("gru", gen, scale=1.0)
    cho = {
        "W_r": t["W_ir"],
        "U_r": t["W_hr"],
        "b_r": t["b_ir"] + t["b_hr"],
        "W_z": t["W_iz"],
        "U_z": t["W_hz"],
        "b_z": t["b_iz"] + t["b_hz"],
        "W": t["W_in"],
        "U": t["W_hn"],
        "b": t["b_in"] + t["b_hn"],
    }
    x, state = random_inputs("gru", gen, 1)
    out, _ = REFERENCES["gru"](t, x, state)
    cho_out, _ = REFERENCES["gru_cho"](cho, x, state)
    assert (out - cho_out).abs().max() > 1e-3


# --- cells whose gate closes onto the old state -----------------------------------------------------


@pytest.mark.parametrize(
    "stem, biases",
    [
        ("mut1", {"b_z": -50.0}),
        ("mut2", {"b_z": -50.0}),
        ("mut3", {"b_z": -50.0}),
        ("mingru", {"b_z": -50.0}),
        ("minlstm", {"b_f": 50.0, "b_i": -50.0}),
    ],
)
def test_update_gate_shut_keeps_the_state(stem, biases, gen):
    # MUTs and minGRU: z weights the candidate, so z = 0 keeps h; minLSTM: f' = 1, i' = 0.
    p = random_params(stem, gen)
    p.update({name: torch.full((H,), value, dtype=torch.float64) for name, value in biases.items()})
    x, (h0,) = random_inputs(stem, gen, 1)
    out, (h_n,) = REFERENCES[stem](p, x, (h0,))
    assert_same(out, h0.expand(T, N, H))
    assert_same(h_n, h0)


def test_mingru_update_gate_open_takes_the_candidate(gen):
    p = random_params("mingru", gen)
    p["b_z"] = torch.full((H,), 50.0, dtype=torch.float64)
    x, state = random_inputs("mingru", gen, 1)
    out, _ = REFERENCES["mingru"](p, x, state)
    assert_same(out, x @ p["W_h"].T + p["b_h"])


# --- SRU, sLSTM -------------------------------------------------------------------------------------


def test_sru_equals_asappresearch_elementwise_recurrence(gen):
    # asappresearch/sru ops.py elementwise_recurrence_naive, identity g, scale_x = 1:
    #   c = U0 + (c_prev - U0) * f;  h = x + (c - x) * r, with U = x W and f, r reading c_prev.
    p = random_params("sru", gen)
    x, (c0,) = random_inputs("sru", gen, 1)
    c, hs = c0, []
    for x_t in x:
        u0, u1, u2 = x_t @ p["W"].T, x_t @ p["W_f"].T, x_t @ p["W_r"].T
        f = torch.sigmoid(u1 + p["b_f"] + c * p["v_f"])
        r = torch.sigmoid(u2 + p["b_r"] + c * p["v_r"])
        c = u0 + (c - u0) * f
        hs.append(x_t + (c - x_t) * r)
    assert_same(REFERENCES["sru"](p, x, (c0,)), (torch.stack(hs), (c,)))


def naive_slstm(p, x, h, c, n):
    """sLSTM without the stabiliser: i = exp(i~), f = sigmoid(f~)."""
    hs = []
    for x_t in x:
        gate = {g: x_t @ p[f"W_{g}"].T + h @ p[f"R_{g}"].T + p[f"b_{g}"] for g in "zifo"}
        i, f = torch.exp(gate["i"]), torch.sigmoid(gate["f"])
        c = f * c + i * torch.tanh(gate["z"])
        n = f * n + i
        h = torch.sigmoid(gate["o"]) * c / n
        hs.append(h)
    return torch.stack(hs), (h, c, n)


def test_slstm_stabiliser_leaves_h_unchanged(gen):
    p = random_params("slstm", gen)
    x, (h0, c0, n0) = random_inputs("slstm", gen, 3)
    n0 = n0.abs() + 0.5
    m0 = torch.zeros(N, H, dtype=torch.float64)
    out, (h, c, n, m) = REFERENCES["slstm"](p, x, (h0, c0, n0, m0))
    naive_out, (naive_h, naive_c, naive_n) = naive_slstm(p, x, h0, c0, n0)
    assert_same(out, naive_out)
    assert_same(h, naive_h)
    # the stabilised c, n are the naive ones scaled by exp(-m)
    assert_same(c, naive_c * torch.exp(-m))
    assert_same(n, naive_n * torch.exp(-m))


def test_slstm_stays_finite_where_the_naive_form_overflows(gen):
    p = random_params("slstm", gen)
    p["b_i"] = torch.full((H,), 800.0, dtype=torch.float64)  # exp(800) overflows float64
    x, (h0,) = random_inputs("slstm", gen, 1)
    zeros = torch.zeros(N, H, dtype=torch.float64)
    out, final = REFERENCES["slstm"](p, x, (h0, zeros, zeros, zeros))
    assert torch.isfinite(out).all() and all(torch.isfinite(s).all() for s in final)
    naive_out, _ = naive_slstm(p, x, h0, zeros, zeros)
    assert not torch.isfinite(naive_out).all()
