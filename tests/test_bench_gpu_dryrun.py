"""bench/gpu.py --dry-run on the CPU: every implementation of every cell runs (celldsl on the Triton
interpreter, torch.nn, the textbook loop, torch.compile of its step with the eager backend) and agrees
with celldsl, so the GPU benchmark's code paths are tested where there is no GPU. No timing is checked."""

import importlib.util
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("celldsl_bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_one_full_table(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = load_bench()
    assert bench.main(["--dry-run"]) == 0
    assert "TRITON_INTERPRET" not in os.environ, "the dry run restores the environment"
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    header, rows = lines[0], lines[1:]
    for impl in bench.IMPLS:
        assert f"{impl} fwd | {impl} fwd+bwd" in header
    assert [r.split("|")[1].strip() for r in rows] == list(bench.CELLS)
    for r in rows:
        cols = [c.strip() for c in r.strip("|").split("|")]
        times = cols[5:-1]
        has_cudnn = cols[0] in ("lstm", "gru")
        for i, t in enumerate(times):
            if bench.IMPLS[i // 2] == "cuDNN" and not has_cudnn:
                assert t == "-"
            else:
                assert float(t) > 0, r
        assert float(cols[-1]) < 1e-5, f"an implementation disagrees with celldsl: {r}"


def test_bench_rows_compare_like_with_like():
    """The max-diff column is a real check: a textbook cell with a wrong weight shows up in it."""
    import torch

    bench = load_bench()
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        impls = bench.implementations("gru", 2, 8, torch.device("cpu"), torch.float32, "eager")
        x = torch.randn(3, 2, 8)
        with torch.no_grad():
            want = impls["celldsl"][0](x)
            torch.testing.assert_close(impls["textbook"][0](x), want, atol=1e-5, rtol=0)
            impls["textbook"][1][0].add_(0.1)  # perturb one textbook weight
            assert (impls["textbook"][0](x) - want).abs().max() > 1e-3
    finally:
        del os.environ["TRITON_INTERPRET"]
