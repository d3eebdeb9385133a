"""Where celldsl.LSTM's GPU time goes: kernels launched per step, GPU busy time vs wall time.

    python bench/gpu_profile.py                        # CUDA graphs on (the default)
    CELLDSL_CUDA_GRAPHS=0 python bench/gpu_profile.py  # the eager loop

At N=16, T=64, H=768, bf16 (a slice of the FlashRNN size): if the wall time per step is far above
the GPU's kernel time per step, the host (Python, launches) sets the pace.
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import celldsl  # noqa: E402

N, T, H = 16, 64, 768


def run(layer, x, phase: str) -> None:
    if phase == "fwd":
        with torch.no_grad():
            layer(x)
    else:
        layer(x)[0].float().sum().backward()


def main() -> None:
    layer = celldsl.LSTM(H, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, N, H, device="cuda", dtype=torch.bfloat16)
    for phase in ("fwd", "fwd+bwd"):
        for _ in range(3):
            run(layer, x, phase)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(layer, x, phase)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(layer, x, phase)
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in events) / 1e3
        print(f"{phase}: T={T}: wall {wall * 1e3:.1f} ms, GPU kernel time {busy:.1f} ms, "
              f"{len(events) / T:.1f} kernels per step, wall per step {wall / T * 1e6:.0f} us")
        counts: dict[str, int] = {}
        for e in events:
            counts[e.name[:60]] = counts.get(e.name[:60], 0) + 1
        for name, c in sorted(counts.items(), key=lambda kv: -kv[1])[:8]:
            print(f"   {c / T:5.1f}/step  {name}")


if __name__ == "__main__":
    main()
