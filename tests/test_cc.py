"""$CC as make reads it (issue 24, findings 13 and 21): a program and its arguments; a missing program,
a $CC that cannot be split, and a "compiler" whose library lacks the kernels each give a warning that
says what was wrong, and the torch loop computes instead (the existing fallback for a missing compiler),
never a traceback or a silently different number."""

import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

from celldsl import Recurrent, compile_cell
from celldsl.targets.c import fused as cpu_fused

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="needs gcc on PATH to build the kernels")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CELLDSL_CPU_FUSED", raising=False)
    monkeypatch.setattr(cpu_fused, "_warned", set())


@pytest.mark.parametrize("cc", ["gcc -O2", "  gcc   -O2 ", "'gcc' -O2"])
@needs_gcc
def test_cc_with_arguments_is_split(monkeypatch, cc):
    monkeypatch.setenv("CC", cc)
    assert cpu_fused.compiler_command() == ([GCC, "-O2"], "")
    assert cpu_fused.compiler() == GCC


@needs_gcc
def test_cc_with_a_wrapper_builds_the_kernels(monkeypatch, tmp_path):
    """`CC="ccache gcc"`: the first word is the program run, the rest its arguments (here the wrapper
    is `env`, which every system has, as ccache is not)."""
    monkeypatch.setenv("CC", "env gcc -O2")
    lib, why = cpu_fused.build_library(compile_cell("rnn_tanh"))
    assert lib is not None, why


@pytest.mark.parametrize(("cc", "said"), [
    ("no-such-compiler -O2", "no C compiler: the program 'no-such-compiler' of $CC='no-such-compiler -O2' is "
                             "not found"),
    ("gcc 'unclosed", "cannot read $CC=\"gcc 'unclosed\": No closing quotation"),
])
def test_a_bad_cc_says_what_is_wrong(monkeypatch, cc, said):
    monkeypatch.setenv("CC", cc)
    command, why = cpu_fused.compiler_command()
    assert command is None and why.startswith(said), why
    with pytest.warns(RuntimeWarning, match="CPU kernels unavailable") as caught:
        loop = cpu_fused.cpu_loop(compile_cell("rnn_tanh"))
    assert said in str(caught[0].message)
    assert loop is compile_cell("rnn_tanh").torch_loop


@needs_gcc
def test_a_cc_whose_library_lacks_the_kernels_falls_back_with_a_warning(monkeypatch, tmp_path):
    """Finding 21: such a library once ended in an AttributeError (undefined symbol) when the loop was
    built. Its functions are checked after loading; the torch loop computes, with a warning."""
    empty = tmp_path / "empty.c"
    empty.write_text("int nothing_here(void) { return 0; }\n")
    fake = tmp_path / "fake-cc"
    fake.write_text(f'#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'
                    f'exec {GCC} -shared -fPIC -o "$2" {empty}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(fake))
    # a key of its own: no other test has built (and kept) a loop for this cell in this process
    text = (Path(__file__).resolve().parents[1] / "cells" / "rnn_tanh.cell").read_text()
    cell = compile_cell(text + "\n# test_cc: a CC that leaves the kernels out\n")
    lib, why = cpu_fused.build_library(cell)
    assert lib is None and "lacks the kernel function" in why and str(fake) in why, why
    gemm, why = cpu_fused.build_gemm_library()
    assert gemm is None and "cd_panel_width_f32" in why, why
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="lacks the kernel function"):
        layer = Recurrent(cell, 4, 5, backend="cpu").double()
        x = torch.randn(3, 2, 4, dtype=torch.float64)
        out, _ = layer(x)
    plain = Recurrent("rnn_tanh", 4, 5, backend="torch").double()
    plain.load_state_dict(layer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, _ = plain(x)
    assert torch.equal(out, want)
