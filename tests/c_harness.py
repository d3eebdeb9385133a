"""Compile and run an exported C library (celldsl/export/c_library.py, c_matrix.py) from the tests.

tests/test_export_c.py and test_export_c_matrix.py each had a copy of this: a small C harness that
loads the weights and one binary input (x, then the states), calls NAME_forward once and checks that
T = 0 is refused with -1 (as both libraries' headers promise), then writes the outputs and the final
states; the strict compile (warnings are errors: the library must build cleanly in a user's strict
build); and the reading of the harness's output back into tensors.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on PATH (the test compiles the export)")
C_FLAGS = ["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-pedantic"]
REAL = {"f32": ("float", np.float32), "f64": ("double", np.float64)}  # C type, numpy type

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "NAME.h"
typedef REAL real;
static real *load(const char *path, long count)
{
    real *p = malloc((size_t)(count > 0 ? count : 1) * sizeof(real));
    FILE *f = fopen(path, "rb");
    if (!p || !f || fread(p, sizeof(real), (size_t)count, f) != (size_t)count) {
        fprintf(stderr, "read %s\n", path);
        exit(2);
    }
    fclose(f);
    return p;
}
int main(int argc, char **argv)
{
    long T = atol(argv[4]), N = atol(argv[5]);
    (void)argc;
    long nx = T * N * UP_INPUT_SIZE, ns = N * UP_STATE_SIZE, no = T * N * UP_OUTPUT_SIZE;
    real *w = load(argv[1], UP_WEIGHT_COUNT), *in = load(argv[2], nx + ns);
    real *out = malloc((size_t)(no + ns) * sizeof(real));
    real *work = malloc((size_t)(N * UP_WORKSPACE_PER_ROW) * sizeof(real));
    if (NAME_forward(T, N, in, w, in + nx, out + no, out, work) != 0) return 3;
    if (NAME_forward(0, N, in, w, in + nx, out + no, out, work) != -1) return 4;
    FILE *f = fopen(argv[3], "wb");
    fwrite(out, sizeof(real), (size_t)(no + ns), f);
    fclose(f);
    return 0;
}
"""


def compile_harness(library: Path, dtype: str) -> Path:
    """Write the harness beside the library's .c file (NAME.c, NAME.h) and compile both: the executable."""
    directory, name = library.parent, library.stem
    harness = HARNESS.replace("NAME", name).replace("UP_", name.upper() + "_").replace("REAL", REAL[dtype][0])
    (directory / "harness.c").write_text(harness)
    exe = directory / "harness"
    subprocess.run([CC, *C_FLAGS, "-o", str(exe), str(directory / "harness.c"), str(library), "-lm"],
                   check=True, capture_output=True, text=True)
    return exe


def run_harness(exe: Path, weights: Path, dtype: str, x: torch.Tensor, states: list[torch.Tensor]):
    """Run the harness on x [T, N, I] and the states [N, ...] (float64, rounded to dtype on the way in):
    the output [T, N, O] and the final states shaped as `states`, in float64."""
    np_type = REAL[dtype][1]
    T, N = x.shape[0], x.shape[1]
    d = exe.parent
    data = np.concatenate([x.numpy().ravel()] + [s.numpy().ravel() for s in states]).astype(np_type)
    (d / "in.bin").write_bytes(data.tobytes())
    subprocess.run([str(exe), str(weights), str(d / "in.bin"), str(d / "out.bin"), str(T), str(N)],
                   check=True, timeout=60)
    got = torch.from_numpy(np.fromfile(d / "out.bin", dtype=np_type).astype(np.float64))
    n_out = got.numel() - sum(s.numel() for s in states)
    out, at, finals = got[:n_out].reshape(T, N, -1), n_out, []
    for s in states:
        finals.append(got[at: at + s.numel()].reshape(s.shape))
        at += s.numel()
    return out, finals
