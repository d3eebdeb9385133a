"""Ahead-of-time compilation of the generated kernels with Triton's compiler, no GPU needed.

What it proves: the kernels are valid Triton for sm_80 and sm_90 (types, shapes, tl.dot operand
layouts, the constexpr branches each schedule takes at its tiles), ptxas accepts them, and the
resources it gives them (registers, shared memory, spills) are readable without a GPU; the
persistent kernel's PTX holds the grid barrier's release add and acquire spin. What it does not: a
compiled kernel may still compute the wrong numbers (the interpreter tests check the numbers) or hang
(only hardware runs the barrier: tests/test_triton_schedules_gpu.py).

The default run compiles a representative subset of the graphed path's kernels (a one-stage cell
with hoisted products and four gates, a cell with a stage-0 pointwise and three stages, an
elementwise cell reading the input) and the schedules' kernels of one cell per kind for cuda:80 and
cuda:90: LSTM (persistent, fused_step, bf16), GRU-Cho (both, two GEMM stages, fp32), SRU (time_loop)
and QRNN (time_loop, scan). The `slow` test compiles every kernel of every zoo cell for cuda:80 and
cuda:90 (the graphed path, about a minute on 2 cores); CELLDSL_EVERY_CELL=1 adds every schedule
kernel of every zoo cell for cuda:90 (about four minutes more), the same as
`celldsl compile cells/*.cell --target cuda:90`. A fresh Triton cache per test, so it really compiles.
"""

import os

import pytest
from zoo import ELEMENTWISE

from celldsl.cli.compile import aot_compile, main, parse_target
from celldsl.compiler import compile_cell
from celldsl.targets.triton.emit import kernel_names

TARGETS = [("cuda", 80), ("cuda", 90)]
SUBSET = ["lstm", "mut3", "sru"]


@pytest.fixture(autouse=True)
def fresh_triton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset


SMALL = {"N": 16, "H": 16, "T": 16}  # schedule kernels compile at the tiles of these sizes (fast)


def check_built(cell, built, dtype="float32", targets=TARGETS):
    names = kernel_names(compile_cell(cell).plan)
    assert [(b.kernel, b.target) for b in built] == [(n, f"cuda:{cc}") for n in names for _, cc in targets]
    for b in built:
        assert b.ptx_bytes > 0 and b.cubin_bytes > 0 and b.dtype == dtype


def check_schedules(cell, built, targets=TARGETS):
    """Every applicable schedule's kernels, for every target, with their resources read back."""
    from celldsl.targets.triton.applies import declines

    plan = compile_cell(cell).plan
    wanted = {s for s, why in declines(plan).items() if why is None and s != "graphed"}
    assert {b.schedule for b in built} - {"graphed"} == wanted
    for schedule in wanted:
        kernels = {b.kernel for b in built if b.schedule == schedule}
        assert kernels and all(k.startswith(schedule) for k in kernels), (schedule, kernels)
        for k in kernels:
            assert {b.target for b in built if b.kernel == k} == {f"cuda:{cc}" for _, cc in targets}
    for b in built:
        assert b.ptx_bytes > 0 and b.cubin_bytes > 0
        assert b.registers is not None and 0 < b.registers <= 255, b.line()
        assert b.shared is not None and b.local is not None, b.line()


@pytest.mark.parametrize("cell", SUBSET)
def test_subset_compiles_for_sm80_and_sm90(cell):
    check_built(cell, aot_compile(cell, TARGETS, schedules=False))


def test_bf16_storage_compiles():
    check_built("slstm", aot_compile("slstm", TARGETS, "bfloat16", schedules=False), "bfloat16")


SCHEDULE_KINDS = [("lstm", "bfloat16"), ("gru_cho", "float32"), ("sru", "float32"), ("qrnn", "float32")]
EVERY_CELL = os.environ.get("CELLDSL_EVERY_CELL") == "1"


@pytest.mark.parametrize(("cell", "dtype"), SCHEDULE_KINDS, ids=[c for c, _ in SCHEDULE_KINDS])
def test_every_schedule_compiles_for_sm80_and_sm90(cell, dtype):
    built = aot_compile(cell, TARGETS, dtype, sizes=SMALL)
    check_schedules(cell, [b for b in built if b.schedule != "graphed"])
    assert all(b.dtype == dtype for b in built)


def test_persistent_kernel_ptx_has_the_grid_barrier():
    """The barrier compiles to what docs/triton.md says: one thread's release add on the counter, an
    acquire load in the spin, CTA barriers around both; the bf16 recurrent GEMM runs on tensor cores."""
    import triton
    from triton.backends.compiler import GPUTarget

    from celldsl.cli.compile import _source, schedule_jobs
    from celldsl.targets.triton.module import load_triton_module

    plan = compile_cell("gru").plan
    module = load_triton_module(compile_cell("gru")).module(interpret=False)
    import torch

    for _, name, signature, constexprs, warps, _ in schedule_jobs(plan, torch.bfloat16, SMALL):
        if name != "persistent_forward_kernel":
            continue
        ptx = triton.compile(_source(getattr(module, name), signature, constexprs),
                             target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx
        assert "ld.global.gpu.acquire" in ptx or "atom.global.gpu.acquire" in ptx
        assert "bar.sync" in ptx
        assert "mma.sync" in ptx or "wgmma" in ptx, "the recurrent GEMM runs on tensor cores"
        return
    raise AssertionError("no persistent_forward_kernel job")


@pytest.mark.slow
@pytest.mark.parametrize("cell", ELEMENTWISE)  # matrix cells: tests/test_triton_matrix.py
def test_every_zoo_kernel_compiles_for_sm80_and_sm90(cell):
    check_built(cell, aot_compile(cell, TARGETS, schedules=False))


@pytest.mark.slow
@pytest.mark.skipif(not EVERY_CELL, reason="CELLDSL_EVERY_CELL=1 runs it (four minutes on 2 cores); CI "
                    "compiles one cell per kind of each schedule (test_every_schedule_compiles_...)")
def test_every_zoo_schedule_kernel_compiles_for_sm90():
    for cell in ELEMENTWISE:  # the matrix cells' kernels: tests/test_triton_matrix.py
        built = aot_compile(cell, [("cuda", 90)], sizes=SMALL)
        check_schedules(cell, [b for b in built if b.schedule != "graphed"], targets=[("cuda", 90)])


def test_ptx_targets_the_requested_architecture():
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from celldsl.cli.compile import _source
    from celldsl.targets.triton.module import load_triton_module

    module = load_triton_module(compile_cell("gru")).module(interpret=False)
    fn = module.stage1_forward_kernel
    sig = {a: ("constexpr" if a in ("BLOCK", "COMPUTE") else "*fp32" if a.endswith("_ptr") else "i32")
           for a in fn.arg_names}
    for cc in (80, 90):
        k = triton.compile(_source(fn, sig, {"BLOCK": 256, "COMPUTE": tl.float32}),
                           target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
        assert f".target sm_{cc}" in k.asm["ptx"]


def test_cli_writes_sources_and_compiles(tmp_path, capsys):
    from celldsl.targets.triton.emit import triton_module_source

    argv = ["compile", "cells/gru.cell", "-o", str(tmp_path), "--target", "cuda:90", "--sizes", "N=16,H=16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'gru.py'}" in out
    assert "stage1_forward_kernel" in out and "stage1_backward_kernel" in out and "cuda:90" in out
    assert "persistent_forward_kernel" in out and "regs" in out and "spills" in out
    assert (tmp_path / "gru.py").read_text() == triton_module_source(compile_cell("gru").plan)


def test_cli_rejects_bad_targets_and_nothing_to_do(capsys):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_target("sm_90")
    assert parse_target("cuda:90") == ("cuda", 90)
    assert main(["compile", "cells/gru.cell"]) == 2
    assert "nothing to do" in capsys.readouterr().err
