"""bench/gpu_session.sh dry and bench/gpu.py --dry-run on the CPU: the session script's plumbing, and
every implementation of every suite (celldsl's graphed path and its schedules on the Triton
interpreter, torch.nn for cuDNN's rows, the textbook loop) runs and agrees with the graphed path, so
the GPU session's code paths are tested where there is no GPU. No timing is checked."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
SESSION = BENCH.parent / "gpu_session.sh"


def load_bench():
    spec = importlib.util.spec_from_file_location("celldsl_bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def session_log(tmp_path_factory):
    """bench/gpu_session.sh, the one script a GPU session runs, in its `dry` stage: the same setup
    (environment, caches, versions header, log folder from $OUT) and, instead of the GPU work, the
    gpu tests collected and bench/gpu.py --dry-run. -> (its exit status, output, the log's text)."""
    out = tmp_path_factory.mktemp("session")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(out)}
    done = subprocess.run(["bash", str(SESSION), "dry"], env=env, capture_output=True, text=True, timeout=900)
    log = out / "dry_run.log"
    return done.returncode, done.stdout[-3000:] + done.stderr[-3000:], log.read_text() if log.exists() else ""


def test_dry_run_prints_one_row_per_case_and_implementation(session_log):
    status, output, log = session_log
    assert status == 0, output
    bench = load_bench()
    table = log[log.index("| suite | case"):]  # the progress lines before it go to stderr, also logged
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    header, rows = lines[0], lines[1:]
    assert "fwd ms | fwd+bwd ms" in header and "TFLOP/s" in header
    cols = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    seen = {(c[0], c[1], c[5]) for c in cols}
    expected = set()
    for suite, cases in bench.suites(dry=True).items():
        for case in cases:
            for impl in bench.impls_of(case, textbook=False):
                if impl in bench.CUDNN and impl != "cuDNN fp32":
                    continue  # the dry run is fp32 only
                if impl == "textbook" and (case.layers > 1 or case.bidirectional):
                    continue
                expected.add((suite, case.name(), impl))
    assert expected <= seen, f"missing rows: {sorted(expected - seen)}"
    everything = {"graphed", "persistent", "fused_step", "time_loop", "scan", "auto", "cuDNN fp32",
                  "textbook"}
    assert {impl for _, _, impl in seen} >= everything
    for c in cols:
        if c[5] == "textbook" and "layers" in c[1]:
            assert c[7] == "-" and "NotImplementedError" in c[-1]  # a row that says why it has no time
            continue
        assert float(c[7]) > 0 and float(c[8]) > 0, c
        assert float(c[-2]) < 1e-5, f"an implementation disagrees with the graphed path: {c}"


def test_bench_rows_compare_like_with_like():
    """The max-diff column is a real check: a textbook cell with a wrong weight shows up in it."""
    import torch

    bench = load_bench()
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        case = bench.Case("columns", "mingru", 2, 3, 8)
        x, _ = bench.inputs(case, torch.device("cpu"), torch.float32)
        run_g, _ = bench.build(case, "graphed", torch.device("cpu"), torch.float32)
        run_t, params = bench.build(case, "textbook", torch.device("cpu"), torch.float32)
        with torch.no_grad():
            want = run_g(x)
            torch.testing.assert_close(run_t(x), want, atol=1e-5, rtol=0)
            params[0].add_(0.1)  # perturb one weight of the textbook's layer only
            assert (run_t(x) - want).abs().max() > 1e-3
    finally:
        del os.environ["TRITON_INTERPRET"]


def test_targets_say_met_or_missed_by_how_much():
    bench = load_bench()
    lstm = bench.Case("dense", "lstm", 16, 1024, 768)
    rows = [bench.Row(lstm, "persistent", "bfloat16", (1.0, 4.0)),
            bench.Row(lstm, "cuDNN fp16", "float16", (2.0, 5.0)),
            bench.Row(lstm, "graphed", "bfloat16", (7.0, 24.0)),
            bench.Row(lstm, "auto", "bfloat16", (1.0, 30.0))]
    text = "\n".join(bench.targets(rows, float("nan")))
    assert "fwd no slower than cuDNN fp16 (same run): 1.00 ms vs 2.00 ms = x2.00: met" in text
    assert "fwd+bwd no slower than cuDNN fp16 (same run): 4.00 ms vs 5.00 ms = x1.25: met" in text
    assert "auto no slower than graphed (fwd+bwd): 30.00 ms vs 24.00 ms = x0.80: MISSED" in text



def test_gpu_session_script_dry_stage_writes_its_log(session_log):
    """The log starts with the versions, holds the collected gpu tests and ends with the exit status;
    a wrong stage is a usage error."""
    status, output, log = session_log
    assert status == 0, output
    assert log.startswith("# ") and "bash bench/gpu_session.sh dry" in log and "# torch" in log
    assert "tests collected" in log
    assert "| graphed " in log and log.rstrip().endswith("exit 0")
    bad = subprocess.run(["bash", str(SESSION), "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
