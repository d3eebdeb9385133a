"""What a cell file, its path and its names can and cannot do (issue 8; docs/security.md).

- a file's path never reaches generated source: files named with quotes, backslashes, newlines,
  `\"\"\"`, `\\N`, `*/` or undecodable bytes compile and compute what the same cell at a plain path
  computes, on every backend, and run nothing (the issue's `touch pwned` file name among them);
- user names never meet generated names: names drawn from Python's keywords and builtins, C's
  keywords, and every identifier the generated torch, Triton and C sources use (kernel locals,
  helpers, the compiler's own generated names) give valid sources with distinct, unreserved
  identifiers, and compute what the same cell with plain names computes;
- `celldsl compile -o` replaces a symlink instead of following it, refuses two cells with one stem,
  and says clearly when -o is not a usable folder;
- small ones: bad init values are located errors, `explain` escapes control characters, and a cell
  file is read up to a bound (`/dev/zero` is an error, not a hang).

The compile-time bounds (the "bombs") are in tests/test_bombs.py.
"""

import ast
import builtins
import keyword
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import celldsl
from celldsl import compile_cell
from celldsl.cli.main import main
from celldsl.lang.errors import CellError, CellWarning
from celldsl.lang.functions import FUNCTIONS
from celldsl.targets.c import fused as cpu_fused
from celldsl.targets.c.emit import C_RESERVED, c_source
from celldsl.targets.torch.emit import function_names, torch_module_source
from celldsl.targets.triton.applies import schedule_names
from celldsl.targets.triton.emit import triton_module_source
from celldsl.targets.triton.emit_columns import COLUMN_LOCALS
from celldsl.targets.triton.emit_dense import DENSE_LOCALS
from celldsl.targets.triton.emit_pointwise import KERNEL_LOCALS, KNOWN_GLOBALS, module_names

ROOT = Path(__file__).resolve().parents[1]
HAVE_CC = cpu_fused.compiler() is not None
BACKENDS = ["torch", "cpu", "triton"]


def run_layer(cell, backend, monkeypatch, *, seed=0, state_dict=None, size=4):
    """(output, final states, gradients of x and of every parameter) of a one-layer Recurrent."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = celldsl.Recurrent(cell, size, size, backend=backend, dtype=torch.float64)
    if state_dict is not None:
        layer.load_state_dict(state_dict)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, size, generator=g, dtype=torch.float64, requires_grad=True)
    out, final = layer(x)
    final = final if isinstance(final, tuple) else (final,)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + sum(f.sum() for f in final)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return layer, [out.detach(), *(f.detach() for f in final), *grads]


def assert_same(a, b, what):
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.shape == v.shape and torch.allclose(u, v, atol=1e-12, rtol=1e-12), f"{what}: tensor {i}"


# ---- file paths ----------------------------------------------------------------------------------

RNN_TEXT = """input x
state h
param W, U, b
h' = tanh(W @ x + U @ h + b)
"""
HOSTILE_NAMES = [
    'p""" if __import__("os").system("touch pwned") else """',  # the issue's: closes the docstring
    "p''' + __import__('os').system('touch pwned') + '''",
    "back\\slash \\N{BULLET} \\x41 \\u0041",
    "line\nbreak\r\x1b[31m red \x07 bell",
    '*/ int main(void) { return system("touch pwned"); } /*',
    "# comment, \"quotes\" and ''' and ` backticks",
]
HOSTILE_BYTES = [b"not-utf8-\xff\xfe\x80", b"latin1-caf\xe9"]


def _hostile_file(folder: Path, name):
    """Write RNN_TEXT to folder/<name>.cell; the path as a str (undecodable bytes become surrogates, as
    os.fsdecode gives them), or as a Path when it holds a line break (a str with one is cell text)."""
    if isinstance(name, bytes):
        path = os.fsdecode(os.path.join(os.fsencode(folder), name + b".cell"))
    else:
        path = str(folder / (name.replace("/", "_") + ".cell"))
    with open(path, "w") as f:
        f.write(RNN_TEXT)
    return Path(path) if "\n" in path else path


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_file_names_run_nothing_and_compute_the_same(backend, tmp_path, monkeypatch):
    if backend == "cpu" and not HAVE_CC:
        pytest.skip("needs a C compiler to build the kernels")
    monkeypatch.chdir(tmp_path)  # `touch pwned` would land here
    plain = _hostile_file(tmp_path, "plain")
    layer, expected = run_layer(plain, backend, monkeypatch)
    for name in HOSTILE_NAMES + HOSTILE_BYTES:
        path = _hostile_file(tmp_path, name)
        _, got = run_layer(path, backend, monkeypatch, state_dict=layer.state_dict())
        assert_same(got, expected, repr(name))
        cell = compile_cell(path)
        for source in (torch_module_source(cell.plan), triton_module_source(cell.plan), c_source(cell.plan)):
            assert "pwned" not in source and "__import__" not in source
    assert not list(tmp_path.rglob("pwned"))


def test_hostile_file_names_through_the_cli(tmp_path, monkeypatch, capsys):
    """`celldsl check`, `explain` and `compile -o` (and its sm_90 build, below) on the issue's file."""
    monkeypatch.chdir(tmp_path)
    paths = [_hostile_file(tmp_path, n) for n in HOSTILE_NAMES + HOSTILE_BYTES]
    paths = [str(p) for p in paths]  # the command line takes any path
    assert main(["check", *paths]) == 0
    for path in paths:
        assert main(["explain", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out  # control characters are escaped, not printed
    assert main(["compile", paths[0], "-o", str(tmp_path / "out")]) == 0
    (generated,) = (tmp_path / "out").glob("*.py")
    compile(generated.read_text(), str(generated), "exec")  # valid Python, whatever the file name
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.slow
def test_hostile_file_name_through_an_sm90_build(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.chdir(tmp_path)
    path = _hostile_file(tmp_path, HOSTILE_NAMES[0])
    assert main(["compile", path, "--target", "cuda:90"]) == 0
    assert not list(tmp_path.rglob("pwned"))


PATH_ALPHABET = st.sampled_from(
    list("ab_-. '\"\\\n\t*/#${}()[]%;") + ['"""', "'''", "\\N", "\\x", "é", "\u2028"]
)


@settings(
    max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=st.lists(PATH_ALPHABET, min_size=1, max_size=12))
def test_fuzzed_file_names_compute_what_a_plain_name_does(parts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "".join(parts).replace("/", "_").replace("\x00", "")
    if name in (".", "..", "") or len(name.encode()) > 200:
        name = "x" + name[:50]
    layer, expected = run_layer(_hostile_file(tmp_path, "plain"), "torch", monkeypatch)
    _, got = run_layer(_hostile_file(tmp_path, name), "torch", monkeypatch, state_dict=layer.state_dict())
    assert_same(got, expected, repr(name))
    assert not list(tmp_path.rglob("pwned"))


# ---- names -----------------------------------------------------------------------------------------

LANGUAGE_WORDS = {"cell", "doc", "cite", "input", "state", "output", "param", "init", "prev", *FUNCTIONS}
C_KEYWORDS = {  # C89 to C23, and the names this project's C headers define
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum", "extern",
    "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return", "short",
    "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile",
    "while", "_Alignas", "_Alignof", "_Atomic", "_Bool", "_Complex", "_Generic", "_Imaginary", "_Noreturn",
    "_Static_assert", "_Thread_local", "alignas", "alignof", "bool", "constexpr", "false", "nullptr",
    "static_assert", "thread_local", "true", "typeof", "typeof_unqual", "NULL", "NAN", "INFINITY", "HUGE_VAL",
    "M_PI", "M_E", "EOF", "errno", "int64_t", "intptr_t", "size_t", "main", "exp", "expf", "log", "logf",
    "tanh", "tanhf", "pow", "powf", "fabs", "sqrt", "log1p", "log1pf",
}  # fmt: skip
NAME = re.compile(r"(?!\d)\w+")


def _template(names: dict[str, list[str]]) -> str:
    """A cell that uses every given name in its role: one input, states, matrices on the input and on
    H-wide values, vectors, scalars and intermediates (one carried by prev(), one a GEMM operand)."""
    x, S, MX, MH, V, C, A = (
        names[k] for k in ("input", "states", "mx", "mh", "vectors", "scalars", "inters")
    )
    lines = [f"input {x[0]}", f"state {', '.join(S)}", f"output {S[0]}", f"param {', '.join(MX + MH + V)}"]
    if C:
        lines.append(f"param {', '.join(C)} : scalar")
    sums = " + ".join(
        [f"{m} @ {x[0]}" for m in MX]
        + [f"{v} * {S[i % len(S)]}" for i, v in enumerate(V)]
        + [f"{c}" for c in C]
    )
    lines.append(f"{A[0]} = sigmoid({sums} + {MH[0]} @ {S[0]})")
    for j, a in enumerate(A[1:], 1):
        lines.append(f"{a} = tanh({A[j - 1]} * {S[j % len(S)]} + 0.5 * prev({A[j - 1]}))")
    for i, s in enumerate(S):
        m = MH[i % len(MH)]
        lines.append(
            f"{s}' = {A[-1]} * {s} + (1 - {A[0]}) * tanh({m} @ ({A[0]} * {s}) + {S[(i + 1) % len(S)]})"
        )
    for m in MH[len(S) :]:  # matrices no state took
        lines[-1] += f" + 0.1 * tanh({m} @ {S[0]})"
    return "\n".join(lines) + "\n"


ROLES = ("input", "states", "mx", "mh", "vectors", "scalars", "inters")


def _assign(pool: list[str]) -> dict[str, list[str]]:
    """Distribute names over the roles: the first seven one to each role, the rest in turn to every
    role but the input (a cell here has one); a role left empty (a short pool) gets a plain name."""
    roles = {r: [] for r in ROLES}
    for i, name in enumerate(pool):
        role = ROLES[i] if i < len(ROLES) else ROLES[1 + (i - len(ROLES)) % (len(ROLES) - 1)]
        roles[role].append(name)
    for i, role in enumerate(ROLES):
        if not roles[role]:
            roles[role].append(f"plain{i}")
    return roles


def _plain_twin(roles: dict[str, list[str]]) -> dict[str, list[str]]:
    counter = iter(range(10_000))
    return {r: [f"n{next(counter)}" for _ in names] for r, names in roles.items()}


def _identifiers(source: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", source))


def forbidden_names() -> list[str]:
    """Every name a cell file could pick that a target language or the generated code already uses."""
    sample = _template(
        {
            "input": ["x"],
            "states": ["h", "c"],
            "mx": ["W"],
            "mh": ["U", "R"],
            "vectors": ["b"],
            "scalars": ["k"],
            "inters": ["g", "r"],
        }
    )
    plan = compile_cell(sample).plan
    generated = _identifiers(torch_module_source(plan) + triton_module_source(plan) + c_source(plan))
    pool = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins)) | C_KEYWORDS | generated
    pool |= set(C_RESERVED) | KNOWN_GLOBALS | KERNEL_LOCALS | set(module_names(plan))
    pool |= DENSE_LOCALS | COLUMN_LOCALS  # the schedules' kernels (a dense sample cell has no column kernels)
    pool |= {
        "operand0",
        "operand1",
        "operand2",
        "t0",
        "t1",
        "u0",
        "u1",
        "p0",
        "sum0",
        "h_new",
        "grad_h_new",
        "prev_g",
        "W_mm",
        "U_mm_1",
        "v_h",
        "h_new_2",
        "stage1_forward_kernel",
    }
    return sorted(n for n in pool if NAME.fullmatch(n) and n not in LANGUAGE_WORDS)


FORBIDDEN = forbidden_names()
CHUNK = 40


def _chunks():
    return [FORBIDDEN[i : i + CHUNK] for i in range(0, len(FORBIDDEN), CHUNK)]


def _compile_quiet(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        return compile_cell(text)


def _function_scopes(source: str):
    """(module-level names, [(function name, its parameters and assigned locals)]) of Python source."""
    tree = ast.parse(source)
    module = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    module |= {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    module |= {
        a.asname or a.name.split(".")[0]
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    scopes = []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        local = [a.arg for a in fn.args.args]
        local += [
            t.id
            for n in ast.walk(fn)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        ]
        local += [
            e.id
            for n in ast.walk(fn)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Tuple)
            for e in t.elts
            if isinstance(e, ast.Name)
        ]
        scopes.append((fn.name, local))
    return module, scopes


def test_the_forbidden_pool_holds_every_reserved_set():
    assert {
        "lambda",
        "None",
        "import",
        "__import__",
        "print",
        "match",
        "offs",
        "row",
        "col",
        "mask",
        "outs",
        "stage1_forward_kernel",
        "operand1",
        "double",
        "NAN",
        "tl",
        "torch",
        "F",
    } <= set(FORBIDDEN)
    assert len(FORBIDDEN) > 300


@pytest.mark.parametrize("chunk", range(len(_chunks())))
def test_generated_sources_are_valid_for_forbidden_names(chunk, tmp_path):
    """For every forbidden name, in every role: the torch and Triton modules parse; in every function a
    name is bound once (host wrappers aside, which rebind their arguments, and the schedules' kernels,
    whose time loops rebind what they carry), and no parameter or local is a Python keyword or builtin
    or shadows a module-level name (a helper, a kernel, another function); the C source compiles."""
    cell = _compile_quiet(_template(_assign(_chunks()[chunk])))
    reserved = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))
    hosts = {n for n in module_names(cell.plan) if n.endswith(("_forward", "_backward"))}
    hosts |= set(schedule_names(cell.plan))
    sources = (
        (torch_module_source(cell.plan), set(function_names(cell.plan)), set()),
        (triton_module_source(cell.plan), set(module_names(cell.plan)), hosts),
    )
    for source, generated, rebinding in sources:
        compile(source, "<generated>", "exec")
        module, scopes = _function_scopes(source)
        assert generated <= {fn for fn, _ in scopes}
        for fn, local in (scope for scope in scopes if scope[0] in generated):  # the fixed helpers aside
            if fn not in rebinding:
                assert len(set(local)) == len(local), f"{fn} binds a name twice: {sorted(local)}"
            clash = set(local) & (module | reserved)
            assert not clash, f"{fn}: {sorted(clash)}"
    if HAVE_CC:
        src = tmp_path / "k.c"
        src.write_text(c_source(cell.plan))
        done = subprocess.run(
            [cpu_fused.compiler(), "-std=c99", "-fsyntax-only", "-Wall", str(src)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]


ISSUE_CASES = {  # the collisions the issue reports, each once silently wrong or a crash
    "state operand1": {"states": ["h", "operand1"]},
    "input operand0": {"input": ["operand0"]},
    "keywords as states": {"states": ["lambda", "None", "import", "class"]},
    "keywords as input": {"input": ["lambda"]},
    "keywords as vectors": {"vectors": ["return", "True", "yield"]},
    "keywords as scalars": {"scalars": ["def", "False", "pass"]},
    "__import__": {"vectors": ["__import__"], "states": ["__class__"]},
    "triton locals": {
        "states": ["offs", "row", "col"],
        "vectors": ["mask", "outs"],
        "mh": ["stage1_forward_kernel"],
        "scalars": ["numel"],
    },
}


def _roles_with(overrides: dict[str, list[str]]) -> dict[str, list[str]]:
    base = {
        "input": ["x"],
        "states": ["h"],
        "mx": ["W"],
        "mh": ["U"],
        "vectors": ["b"],
        "scalars": ["k"],
        "inters": ["g", "r"],
    }
    return base | overrides


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reported_collisions_compute_what_plain_names_do(case, backend, monkeypatch):
    if backend == "cpu" and not HAVE_CC:
        pytest.skip("needs a C compiler to build the kernels")
    roles = _roles_with(ISSUE_CASES[case])
    _check_twins(roles, backend, monkeypatch)


def _check_twins(roles, backend, monkeypatch):
    text, twin = _template(roles), _template(_plain_twin(roles))
    plain, expected = run_layer(_compile_quiet(twin), backend, monkeypatch)
    renamed = dict(zip([k for k in plain.state_dict()], _param_keys(roles), strict=True))
    state = {renamed[k]: v for k, v in plain.state_dict().items()}
    _, got = run_layer(_compile_quiet(text), backend, monkeypatch, state_dict=state)
    assert_same(got, expected, text)


def _param_keys(roles):
    return [f"{n}_l0" for n in roles["mx"] + roles["mh"] + roles["vectors"] + roles["scalars"]]


@settings(
    max_examples=4, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.lists(st.sampled_from(FORBIDDEN), min_size=8, max_size=16, unique=True),
    backend=st.sampled_from(BACKENDS),
)
def test_forbidden_names_compute_what_plain_names_do(names, backend, monkeypatch):
    if backend == "cpu" and not HAVE_CC:
        backend = "torch"
    _check_twins(_assign(names), backend, monkeypatch)


# ---- celldsl compile -o -------------------------------------------------------------------------------


def test_compile_output_replaces_symlinks_instead_of_following_them(tmp_path, capsys):
    outside = tmp_path / "precious.txt"
    outside.write_text("do not overwrite")
    out = tmp_path / "out"
    out.mkdir()
    (out / "lstm.py").symlink_to(outside)
    assert main(["compile", str(ROOT / "cells" / "lstm.cell"), "-o", str(out)]) == 0
    assert outside.read_text() == "do not overwrite"
    assert not (out / "lstm.py").is_symlink() and "def stage1_forward" in (out / "lstm.py").read_text()


def test_compile_output_refuses_two_cells_with_one_stem(tmp_path, capsys):
    for sub, stem in (("a", "lstm"), ("b", "gru")):
        (tmp_path / sub).mkdir()
        shutil.copy(ROOT / "cells" / f"{stem}.cell", tmp_path / sub / "same.cell")
    code = main(
        [
            "compile",
            str(tmp_path / "a" / "same.cell"),
            str(tmp_path / "b" / "same.cell"),
            "-o",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "would both be written to" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "same.py").exists()


@pytest.mark.parametrize("how", ["a file", "below a file"])
def test_compile_output_that_is_not_a_folder_is_a_clean_error(how, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    target = blocker if how == "a file" else blocker / "sub"
    code = main(["compile", str(ROOT / "cells" / "gru.cell"), "-o", str(target)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("celldsl: error: -o ") and "Traceback" not in err


# ---- small ones -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ("normal(-1)", "standard deviation must not be negative"),
    ("uniform(-1)", "half-width a of uniform(a) must not be negative"),
    ("uniform(1e308)", "too large for an initial value"),
    ("1e39", "too large for an initial value"),
    ("-1e39", "too large for an initial value"),
    ("normal(1e39)", "too large for an initial value"),
    ("orthogonal", "orthogonal initialises a matrix, but 'b' is a vector"),
])  # fmt: skip
def test_bad_init_values_are_located_errors(value, message):
    text = f"input x\nstate h\nparam W, U, b\ninit b = {value}\nh' = tanh(W @ x + U @ h + b)\n"
    with pytest.raises(CellError, match=re.escape(message)) as info:
        compile_cell(text)
    assert (info.value.line, info.value.column) == (4, 10)


def test_two_inits_of_one_parameter_are_an_error():
    text = "input x\nstate h\nparam W, U, b\ninit b = 1\ninit U, b = zeros\nh' = tanh(W @ x + U @ h + b)\n"
    with pytest.raises(CellError, match=r"'b' is initialised twice \(first on line 4\)") as info:
        compile_cell(text)
    assert (info.value.line, info.value.column) == (5, 9)


def test_explain_escapes_control_characters(tmp_path, capsys):
    path = tmp_path / "bell.cell"
    path.write_text('doc "rings \x07 and \x1b[2J clears"\ncite "\x1b]0;title\x07"\n' + RNN_TEXT)
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x07" not in out and "\x1b" not in out and "rings \\x07 and \\x1b[2J clears" in out


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_check_reads_a_bounded_amount(tmp_path):
    """A device is refused before it is read (issue 24: so is a FIFO, which once blocked forever); a
    regular file is read up to 512 kB."""
    link = tmp_path / "zero.cell"
    link.symlink_to("/dev/zero")
    big = tmp_path / "big.cell"
    big.write_bytes(b"# a comment\n" * 50_000)
    for path, said in (("/dev/zero", "it is a character device, not a regular file"),
                       (str(link), "it is a character device, not a regular file"),
                       (str(big), "larger than 512 kB")):
        done = subprocess.run(
            [sys.executable, "-m", "celldsl.cli", "check", path], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1 and said in done.stderr, done.stderr
