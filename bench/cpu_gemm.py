"""The GEMM backends of the CPU loops side by side, at the shapes of a recurrent layer.

    .venv/bin/python bench/cpu_gemm.py --threads 1        # 1 thread, this thread's CPU time
    .venv/bin/python bench/cpu_gemm.py --threads 2        # 2 threads, wall clock

Each row is one product at one shape, measured the way targets/c/gemm.py measures when it chooses
(fresh here: the cache file is neither read nor written): random data, every backend's product
checked against torch first, interleaved rounds, the minimum per call. GFLOP/s = 2 m k n / time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celldsl.targets.c import fused as cpu_fused  # noqa: E402
from celldsl.targets.c import gemm as cpu_gemm  # noqa: E402

# (kind, m, k, n): the per-step products of an LSTM at (N=32, H=256), N=1 and (N=128, H=512), a GRU's,
# and the products over all rows at T=100 (hoisted: x @ W_ih.T, input_grad: d @ W_ih, weight_grad:
# d.T @ h for W_hh, d.T @ x for W_ih, the GRU's W_hh and the large LSTM's W_hh)
SHAPES = [
    ("step", 32, 256, 1024), ("step_backward", 32, 256, 1024),
    ("step", 32, 256, 768), ("step_backward", 32, 256, 768),
    ("step", 1, 256, 1024), ("step_backward", 1, 256, 1024),
    ("step", 4, 256, 1024),
    ("step", 128, 512, 2048), ("step_backward", 128, 512, 2048),
    ("hoisted", 3200, 128, 1024), ("hoisted", 100, 128, 1024), ("input_grad", 3200, 128, 1024),
    ("weight_grad", 3200, 256, 1024), ("weight_grad", 3200, 128, 1024), ("weight_grad", 3200, 256, 768),
    ("weight_grad", 12800, 512, 2048),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lib, why = cpu_fused.build_gemm_library()
    if lib is None:
        print(f"the native GEMM is unavailable here ({why}); only torch's backends are timed")
    spec = importlib.util.spec_from_file_location("bench_cpu", Path(__file__).with_name("cpu.py"))
    bench_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_cpu)  # for its description of the CPU
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    command = " ".join(["python bench/cpu_gemm.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: `{command}`\n\n{bench_cpu.cpu_model()}; load average {load}; torch {torch.__version__}, "
          f"{args.threads} threads, float32; minimum of {cpu_gemm.ROUNDS} interleaved rounds\n")
    print("| product | m x k x n | " + " | ".join(cpu_gemm.BACKENDS) + " | fastest |")
    print("|---|---|" + "---:|" * (len(cpu_gemm.BACKENDS) + 1))
    for kind, m, k, n in SHAPES:
        site = cpu_gemm.Site(kind, torch.float32, m, k, n, args.threads)
        names = cpu_gemm.candidates(kind, torch.float32, lib is not None)
        seconds = cpu_gemm.measure(site, lib, names)
        cells = [f"{seconds[b] * 1e6:.0f} us, {2 * m * k * n / seconds[b] / 1e9:.0f} GF/s"
                 if b in seconds else "-" for b in cpu_gemm.BACKENDS]
        print(f"| {kind} | {m} x {k} x {n} | " + " | ".join(cells) + f" | {min(seconds, key=seconds.get)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
