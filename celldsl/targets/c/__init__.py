"""The C target: each pointwise stage as C kernels (emit.py), the native time loop over them and the
GEMM (emit_loop.py, emit_gemm.py), built with the system's C compiler (fused.py, flags.py) and run by
FusedCPULoop (fused.py; native.py for the native loop, gemm.py for the GEMM measured fastest)."""

from __future__ import annotations

from ..base import Target


class CTarget(Target):
    name = "cpu"

    def source(self, plan) -> str:
        from .emit import c_source

        return c_source(plan)

    def load(self, compiled):
        """(the cell's C library, "") or (None, why it could not be built)."""
        from .fused import build_library

        return build_library(compiled)

    def loop(self, compiled, schedule: str | None = None):
        """FusedCPULoop, or the torch loop (with a warning) when no C compiler works."""
        from .fused import cpu_loop

        if schedule is not None:
            self.check_schedule(compiled.plan, schedule)
        return cpu_loop(compiled)

    def matrix_loop(self, compiled, fallback=None):
        """A matrix-memory cell's fused C loop (matrix_loop.py); CellError where the emitter cannot run
        it, unless a `fallback` loop (backend="auto") takes it."""
        from .matrix_loop import CMatrixLoop

        return CMatrixLoop(compiled, fallback)

    def schedules(self, plan) -> dict[str, str | None]:
        """The native loop (the whole sequence in one C call) or the Python loop over the steps."""
        from .emit_loop import native_blocker

        return {"native": native_blocker(plan) or None, "python": None}

    def describe(self, plan, sizes: dict | None = None) -> list[str]:
        """Which loop runs the cell on CPU tensors (float32 and float64; fused.py), and why."""
        from .emit_loop import native_blocker

        out = ["", "CPU loop (backend cpu or auto on CPU tensors, with a C compiler; targets/c/fused.py):"]
        blocker = native_blocker(plan)
        if any(g.heads is not None for g in [*plan.hoisted, *plan.gemms]):
            out.append(f"  the generic torch loop (targets/loop.py): {blocker}; "
                       "the C kernels take 2-D weights only")
        elif blocker:
            out += ["  the Python loop: one C call per pointwise stage and step, "
                    "each step product on the GEMM",
                    "  measured fastest at its shape (celldsl's, MKL or oneDNN; targets/c/gemm.py)",
                    f"  not the native loop: {blocker}"]
        elif not plan.gemms:
            out.append("  the native loop: the whole sequence in one C call "
                       "(no step GEMM: the columns are independent)")
        else:
            out += ["  the native loop: every step's GEMMs and pointwise kernels in one C call per layer and",
                    "  direction, when celldsl's GEMM measures fastest on the step products "
                    "at the shape (else a",
                    "  Python loop over the steps on the fastest torch GEMM; "
                    "targets/c/gemm.py caches the measurement)"]
        return out


TARGET = CTarget()
