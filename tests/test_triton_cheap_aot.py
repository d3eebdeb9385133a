"""The time_loop and scan kernels of issue 26's cheap cases compile ahead of time for sm_90 (no GPU
needed; tests/test_triton_aot.py is the pattern): one cell with all three at once, a mean in the step
(whole-row programs, the scan's reductions over axis 1 of its [CHUNK, BLOCK] tiles), a `: 1` input and
heads on an input projection. The numbers are checked on the interpreter (tests/test_triton_schedules.py)."""

import pytest

from celldsl.cli.compile import aot_compile
from celldsl.compiler import compile_cell
from celldsl.targets.triton.applies import declines

CHEAP = """
cell cheap
input x
input dt : 1
state h
output h
param W : heads(2)
param U, b
a = sigmoid(U @ x + b) * exp(-dt)
z = W @ x
h' = a * h + (1 - a) * (z - mean(z))
"""


@pytest.fixture(autouse=True)
def fresh_triton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.mark.parametrize("H", [16, 768], ids=["H16", "H768"])
def test_cheap_column_kernels_compile_for_sm90(H):
    """H = 768: the whole-row programs at a real width (BLOCK 1024, a scan chunk of 4); ptxas gives
    them registers without spilling (Triton 3.x, float32)."""
    why = declines(compile_cell(CHEAP).plan)
    assert why["time_loop"] is None and why["scan"] is None, why
    built = [b for b in aot_compile(CHEAP, [("cuda", 90)], "float32", sizes={"N": 16, "H": H, "T": 64})
             if b.schedule in ("time_loop", "scan")]
    kernels = {b.kernel for b in built}
    assert kernels == {"time_loop_forward_kernel", "time_loop_backward_kernel", "scan_forward_kernel",
                       "scan_backward_kernel"}, kernels
    for b in built:
        assert b.target == "cuda:90" and b.ptx_bytes > 0 and b.cubin_bytes > 0, b.line()
        assert b.registers is not None and 0 < b.registers <= 255 and b.local == 0, b.line()


PROJECTED = """
cell projected
input x
state h
output y
param W, U, V, b
a = sigmoid(U @ x + b)
h' = a * h + (1 - a) * (W @ x - mean(W @ x))
y = tanh(V @ h')
"""


def test_output_projection_column_kernels_compile_for_sm90():
    """An output projection: the column kernels of the states' plan (with their direct gradients) and
    the states' pointwise kernels the scan's backward runs over all steps."""
    why = declines(compile_cell(PROJECTED).plan)
    assert why["time_loop"] is None and why["scan"] is None, why
    states = ["stage_states0_forward_kernel", "stage_states0_backward_kernel"]
    built = aot_compile(PROJECTED, [("cuda", 90)], "float32", kernels=states)
    built += [b for b in aot_compile(PROJECTED, [("cuda", 90)], "float32", sizes={"N": 16, "H": 256, "T": 64})
              if b.schedule in ("time_loop", "scan")]
    wanted = [*states, "time_loop_forward_kernel", "time_loop_backward_kernel", "scan_forward_kernel",
              "scan_backward_kernel"]
    assert sorted(b.kernel for b in built) == sorted(wanted)
    for b in built:
        assert b.ptx_bytes > 0 and b.cubin_bytes > 0 and b.registers is not None and b.local == 0, b.line()
