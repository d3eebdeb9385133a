"""The cold build (issue 27 item 7): with a cache that lacks the shared GEMM library, a new cell's
loop runs at once on its Python loop (torch's GEMMs, the cell's C kernels) while the GEMM library
builds in a background thread, and takes the library between two calls once it is built. Reference:
the generated torch loop (backend="torch") with the same weights. Timing lives in bench/cold_build.py."""

from __future__ import annotations

import pytest
import torch

import celldsl
from celldsl import compiler
from celldsl.compiler import compile_cell
from celldsl.nn.parameters import op_params, stores_of
from celldsl.ops.function import split_params
from celldsl.targets.c import fused


@pytest.fixture
def cold(tmp_path, monkeypatch, request):
    """An empty cache of this process's own, and no GEMM library loaded or building; torch's
    deterministic mode off (the suite's conftest turns it on, which builds every library up front)."""
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(False)
    request.addfinalizer(lambda: torch.use_deterministic_algorithms(deterministic[0],
                                                                    warn_only=deterministic[1]))
    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CELLDSL_BACKGROUND_BUILD", raising=False)
    monkeypatch.delenv("CELLDSL_CPU_GEMM", raising=False)
    monkeypatch.setattr(fused, "_gemm_libraries", {})
    monkeypatch.setattr(fused, "_gemm_builds", {})
    monkeypatch.setattr(fused, "_cell_builds", {})
    monkeypatch.setattr(compiler, "_COMPILED", {})  # cells compiled here stay here (their cache is this one)
    monkeypatch.setattr(compiler, "_RECORDED", set())
    if fused.compiler() is None:
        pytest.fail("no C compiler: the CPU kernels cannot be tested")
    return tmp_path


def layer_pair(stem: str):
    torch.manual_seed(0)
    return celldsl.Recurrent(stem, 6, 8, backend="torch"), compile_cell(stem)


def run(loop, ref, x):
    """out and the gradients of the loop's forward + backward, on ref's parameters (a fresh copy)."""
    layer = celldsl.Recurrent(ref.compiled, 6, 8, backend="torch")
    layer.load_state_dict(ref.state_dict())
    stored = {s.name: getattr(layer, f"{s.name}_l0") for s in stores_of(layer.compiled)}
    params = op_params(layer.compiled, stored, layer.compiled.sizes(6, 8, {}, None), like=x)
    split = split_params(loop, params)
    states = [torch.zeros(x.shape[1], 8) for _ in layer.compiled.states]
    out, finals, saved = loop.forward(x, states, *split)
    g = torch.ones_like(out)
    grads = loop.backward(x, states, *split, out, saved, g, [None] * len(states))
    return out, grads[0]


@pytest.mark.parametrize("stem", ["lstm", "gru"])
def test_python_loop_first_then_the_native_loop_once_built(cold, stem):
    ref, compiled = layer_pair(stem)
    x = torch.randn(5, 3, 6, requires_grad=True)
    want = ref(x)[0]
    want_dx, = torch.autograd.grad(want.sum(), x)
    loop = fused.cpu_loop(compiled)
    assert loop.lib is None and loop.waiting is not None  # the GEMM library builds in the background
    first, first_dx = run(loop, ref, x.detach())
    assert loop.ran["forward"] != "native"
    fused._gemm_builds[loop.waiting].join(timeout=120)
    second, second_dx = run(loop, ref, x.detach())  # takes the library between two calls
    assert loop.waiting is None and loop.lib is not None and loop.ran["forward"] == "native"
    for out, dx in ((first, first_dx), (second, second_dx)):
        torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
    # a second cell in the same process finds the library built: no waiting
    assert fused.cpu_loop(compile_cell("rnn_tanh")).lib is not None


def test_a_failed_background_build_leaves_the_python_loop_working(cold, monkeypatch):
    monkeypatch.setattr(fused, "gemm_source", lambda: "this is not C;\n")
    ref, compiled = layer_pair("lstm")
    x = torch.randn(4, 2, 6, requires_grad=True)
    want = ref(x)[0]
    want_dx, = torch.autograd.grad(want.sum(), x)
    loop = fused.cpu_loop(compiled)
    assert loop.waiting is not None
    fused._gemm_builds[loop.waiting].join(timeout=120)
    assert fused.gemm_library_ready(loop.waiting) == (True, None)
    for _ in range(2):
        out, dx = run(loop, ref, x.detach())
        torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
        assert loop.lib is None and loop.waiting is None and loop.ran["forward"] != "native"


def test_no_background_build_when_asked_or_when_cached(cold, monkeypatch):
    monkeypatch.setenv("CELLDSL_BACKGROUND_BUILD", "0")
    loop = fused.cpu_loop(compile_cell("gru"))
    assert loop.lib is not None and loop.waiting is None and not fused._gemm_builds
    monkeypatch.delenv("CELLDSL_BACKGROUND_BUILD")
    monkeypatch.setattr(fused, "_gemm_libraries", {})  # a new process: the library is in the cache
    loop = fused.cpu_loop(compile_cell("lstm"))
    assert loop.lib is not None and loop.waiting is None and not fused._gemm_builds


def test_deterministic_mode_builds_every_library_up_front(cold):
    """torch.use_deterministic_algorithms(True) asks for the same numbers from the same inputs: no
    quicker path whose sums could round otherwise runs before a library is swapped in."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    loop = fused.cpu_loop(compile_cell("gru"))
    assert loop.lib is not None and loop.waiting is None and loop.cell_waiting is None
    layer = matrix_pair("cpu")
    layer(torch.randn(3, 2, 6, dtype=torch.float64))
    (lib, _why, waiting), = layer.loop.libs.values()
    assert lib is not None and waiting is None and "cpu_matrix" in lib._name
    assert not fused._gemm_builds and not fused._cell_builds


def test_the_cells_quick_build_is_replaced_by_its_full_build(cold):
    """A new cell's kernels are built at -O1 first and at -O3 in the background; the loop swaps the
    library between two calls, with the same numbers (the same source)."""
    ref, compiled = layer_pair("gru")
    x = torch.randn(5, 3, 6, requires_grad=True)
    want = ref(x)[0]
    want_dx, = torch.autograd.grad(want.sum(), x)
    loop = fused.cpu_loop(compiled)
    assert loop.cell_waiting is not None
    quick = loop.cell_lib
    first, first_dx = run(loop, ref, x.detach())
    fused._cell_builds[loop.cell_waiting][0].join(timeout=120)
    second, second_dx = run(loop, ref, x.detach())
    assert loop.cell_waiting is None and loop.cell_lib is not quick
    assert loop.cell_lib._name != quick._name  # another file: the -O3 build
    for out, dx in ((first, first_dx), (second, second_dx)):
        torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
    # the -O3 library is in the cache now: a new process loads it, with no quick build
    fused._cell_builds.clear()
    assert fused.cpu_loop(compile_cell("gru")).cell_waiting is None


def test_a_failed_full_cell_build_keeps_the_quick_one(cold, monkeypatch):
    monkeypatch.setattr(fused, "build_library",
                        lambda cell, cache_root=None, **_kw: (None, "the -O3 build failed"))
    ref, compiled = layer_pair("lstm")
    x = torch.randn(4, 2, 6, requires_grad=True)
    want = ref(x)[0]
    loop = fused.cpu_loop(compiled)
    assert loop.cell_waiting is not None
    fused._cell_builds[loop.cell_waiting][0].join(timeout=120)
    quick = loop.cell_lib
    for _ in range(2):
        out, _dx = run(loop, ref, x.detach())
        torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
    assert loop.cell_waiting is None and loop.cell_lib is quick


def test_quick_build_at_og_and_background_builds_niced(cold, monkeypatch):
    """The first build is the quick one (-Og, flags.QUICK_LEVEL), run at the process's priority; the
    final libraries (the cell's and the GEMM's, -O3) build under `nice`, so they take the CPU the first
    calls leave. Each compiler command is recorded as _compile receives it."""
    if fused.shutil.which("nice") is None:
        pytest.fail("no `nice` on PATH: background builds run at the process's priority here")
    calls = []
    real = fused._compile
    monkeypatch.setattr(fused, "_compile", lambda cc, src, out, extra, seconds:
                        calls.append((list(cc), list(extra), out.name)) or real(cc, src, out, extra, seconds))
    loop = fused.cpu_loop(compile_cell("gru"))
    fused._cell_builds[loop.cell_waiting][0].join(timeout=120)
    fused._gemm_builds[loop.waiting].join(timeout=120)
    quick = [c for c in calls if c[2].startswith("quick_kernels")]
    full = [c for c in calls if c[2].startswith(("cpu_kernels", "cpu_gemm"))]
    assert quick and all("-Og" in extra and "-O1" not in extra and "-O3" not in extra
                         for _cc, extra, _ in quick)
    assert all(not cc[0].endswith("nice") for cc, _extra, _ in quick)
    assert {name.split("_")[1] for _cc, _extra, name in full} == {"kernels", "gemm"}
    assert all(cc[0].endswith("nice") and cc[1:3] == ["-n", "10"] and "-O3" in extra for cc, extra, _ in full)


def matrix_pair(backend: str):
    torch.manual_seed(0)
    return celldsl.MatrixRecurrent("mlstm", 6, {"heads": 2, "K": 3, "V": 4}, backend=backend,
                                   dtype=torch.float64)


def test_a_matrix_cells_quick_build_is_replaced_by_its_full_build(cold):
    """The matrix-memory cells' C loop (targets/c/matrix_loop.py) too: a quick library for the first
    calls, the final one taken between two calls once its background build is done; both give the
    torch loop's numbers (reference: backend="torch" with the same parameters)."""
    ref, layer = matrix_pair("torch"), matrix_pair("cpu")
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 6, dtype=torch.float64, requires_grad=True)
    want = ref(x)[0]
    want_dx, = torch.autograd.grad(want.sum(), x)
    results, names = [], []
    for _ in range(2):
        out = layer(x)[0]
        dx, = torch.autograd.grad(out.sum(), x)
        results.append((out, dx))
        (lib, _why, waiting), = layer.loop.libs.values()
        names.append(lib._name)
        if waiting is not None:
            fused._cell_builds[waiting][0].join(timeout=120)
    assert "quick_matrix" in names[0] and "cpu_matrix" in names[1]
    for out, dx in results:
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(dx, want_dx, rtol=1e-9, atol=1e-10)
