"""Ahead-of-time compilation of the generated kernels with Triton's compiler, no GPU needed.

The default run compiles a representative subset (a one-stage cell with hoisted products and four
gates, a cell with a stage-0 pointwise and three stages, an elementwise cell reading the input);
the `slow` test compiles every kernel of every zoo cell for cuda:80 and cuda:90 (about a minute on
2 cores). A fresh Triton cache per test, so it really compiles.
"""

import pytest

from celldsl.compiler import ZOO, compile_cell
from celldsl.emit.triton_source import kernel_names
from celldsl.triton_cli import aot_compile, main, parse_target

TARGETS = [("cuda", 80), ("cuda", 90)]
SUBSET = ["lstm", "mut3", "sru"]


@pytest.fixture(autouse=True)
def fresh_triton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset


def check_built(cell, built, dtype="float32"):
    names = kernel_names(compile_cell(cell).plan)
    assert [(b.kernel, b.target) for b in built] == [(n, f"cuda:{cc}") for n in names for _, cc in TARGETS]
    for b in built:
        assert b.ptx_bytes > 0 and b.cubin_bytes > 0 and b.dtype == dtype


@pytest.mark.parametrize("cell", SUBSET)
def test_subset_compiles_for_sm80_and_sm90(cell):
    check_built(cell, aot_compile(cell, TARGETS))


def test_bf16_storage_compiles():
    check_built("slstm", aot_compile("slstm", TARGETS, "bfloat16"), "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("cell", sorted(p.stem for p in ZOO.glob("*.cell")))
def test_every_zoo_kernel_compiles_for_sm80_and_sm90(cell):
    check_built(cell, aot_compile(cell, TARGETS))


def test_ptx_targets_the_requested_architecture():
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from celldsl.runtime.triton_module import load_triton_module
    from celldsl.triton_cli import _source

    module = load_triton_module(compile_cell("gru")).module(interpret=False)
    fn = module.stage1_forward_kernel
    sig = {a: ("constexpr" if a in ("BLOCK", "COMPUTE") else "*fp32" if a.endswith("_ptr") else "i32")
           for a in fn.arg_names}
    for cc in (80, 90):
        k = triton.compile(_source(fn, sig, {"BLOCK": 256, "COMPUTE": tl.float32}),
                           target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
        assert f".target sm_{cc}" in k.asm["ptx"]


def test_cli_writes_sources_and_compiles(tmp_path, capsys):
    from celldsl.emit.triton_source import triton_module_source

    assert main(["compile", "cells/gru.cell", "-o", str(tmp_path), "--target", "cuda:90"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'gru.py'}" in out
    assert "stage1_forward_kernel" in out and "stage1_backward_kernel" in out and "cuda:90" in out
    assert (tmp_path / "gru.py").read_text() == triton_module_source(compile_cell("gru").plan)


def test_cli_rejects_bad_targets_and_nothing_to_do(capsys):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_target("sm_90")
    assert parse_target("cuda:90") == ("cuda", 90)
    assert main(["compile", "cells/gru.cell"]) == 2
    assert "nothing to do" in capsys.readouterr().err
