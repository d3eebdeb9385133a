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

# A new cell's first build (fused.quick_attempts): the same flags at -Og, the library its first calls
# run while the -O3 one builds in the background. gcc's time is in its optimising passes, not the
# parsing: ln_lstm's 108 kB of C took 0.16 s of CPU at -O0, 0.25 s at -Og, 1.0 s at -O1 and 1.45 s at
# -O3 (its kernels: 7x, 3.6x, 1x and 1x the -O3 time); -Og keeps the temporary kernels within a few
# times the final ones for a quarter of -O1's build.
QUICK_LEVEL = "-Og"
# Background builds run below the process's own priority (nice), so the C compilers that build the
# final libraries take the CPU the first calls leave, rather than half of it on a 2-core machine.
BACKGROUND_NICE = 10


def cpu_fingerprint() -> str:
    """-march=native builds are only valid on the same kind of CPU: the cache key includes it."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + ":" + flags
