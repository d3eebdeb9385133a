"""A/B in one process: celldsl.LSTM inference with fused steps (FusedCPULoop.fused_steps) vs without
(the chunked projection and the step tiles) vs torch.nn; order rotated, process CPU time, medians.
Usage: fused_ab.py lstm32[,lstm64,...]  (REPEATS=21 by default; THREADS=2; CLOCK=wall for wall time)."""
import os
import statistics
import sys
import time

os.environ.setdefault("CELLDSL_BACKGROUND_BUILD", "0")
import torch

import celldsl
from celldsl.targets.c.fused import FusedCPULoop

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
cfgs = {"lstm32": (100, 32, 128, 256), "lstm1": (100, 1, 128, 256), "lstm64": (100, 64, 128, 256),
        "lstm33": (100, 33, 128, 256), "lstm128": (100, 128, 512, 512), "lstm16": (100, 16, 128, 256)}
repeats = int(os.environ.get("REPEATS", "21"))
clock = time.perf_counter if os.environ.get("CLOCK") == "wall" else time.process_time
for name in sys.argv[1].split(","):
    T, N, I, H = cfgs[name]
    ref = torch.nn.LSTM(I, H)
    m = celldsl.LSTM(I, H)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(T, N, I)

    def mk(fused, m=m, x=x):
        def run():
            FusedCPULoop.fused_steps = fused
            return m(x)[0]
        return run
    impls = {"nn": lambda ref=ref, x=x: ref(x)[0], "two": mk(False), "fused": mk(True)}
    with torch.no_grad():
        outs = {n: f() for n, f in impls.items()}
        assert torch.equal(outs["two"], outs["fused"])
        for _ in range(3):
            for f in impls.values():
                f()
        t0 = clock()
        impls["nn"]()
        reps = max(1, int(0.05 / (clock() - t0)))
        times = {n: [] for n in impls}
        names = list(impls)
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = clock()
                for _ in range(reps):
                    impls[n]()
                times[n].append((clock() - t0) / reps)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(name, f"reps={reps} repeats={repeats}", " | ".join(
        f"{n} {med[n] * 1e3:.3f}ms {med[n] / med['nn']:.3f}x nn {med[n] / med['two']:.3f}x two"
        for n in names),
        flush=True)
