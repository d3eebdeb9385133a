"""The C compiler's flags and the CPU a build is valid for: part of the kernels' cache key (fused.py)
and of the GEMM measurements' (gemm.py), so both read them here."""

from __future__ import annotations

import platform

# -fno-trapping-math (as torch is built): without it gcc leaves a loop with relu, step, max or min
# scalar ("control flow in loop"); no program here reads floating-point traps.
# -ffp-contract=fast: -std=c99 (ISO C) turns gcc's default contraction off, and then `acc += x * b`
# is a multiply and an add instead of one FMA: the GEMM ran at 66-75 GFLOP/s instead of 80-86 on
# this project's CPU (32x256x1024, one thread). torch's own kernels contract too.
BASE_FLAGS = ["-std=c99", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
              "-Wl,-z,defs"]
# first try: tuned for this CPU, OpenMP threads (torch's own libgomp: it is loaded already, and the
# loader shares a library by its soname), glibc's vector math (libmvec); then plainer builds
FAST = ["-O3", "-fopenmp-simd"]
ATTEMPTS = (
    [*FAST, "-march=native", "-fopenmp", "-DCELLDSL_LIBMVEC", "-lmvec", "-lm"],
    [*FAST, "-march=native", "-DCELLDSL_LIBMVEC", "-lmvec", "-lm"],
    [*FAST, "-march=native", "-lm"],
    [*FAST, "-lm"],
)


def cpu_fingerprint() -> str:
    """-march=native builds are only valid on the same kind of CPU: the cache key includes it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + ":" + flags
