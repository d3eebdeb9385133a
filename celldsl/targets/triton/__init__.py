"""The Triton target: the generated module of Triton kernels (emit.py: pointwise functions from
emit_pointwise.py, the schedules' kernels from emit_dense.py and emit_columns.py), loaded by file
(module.py, with helpers.py as the kernels' `lib`), and the GPU schedules that run it: graphed
(cuda_graph.py over the shared loop), persistent and fused_step (schedules.py), time_loop and scan
(columns.py). Which schedules apply is applies.py; how each launches at given sizes and which one
the compiler picks is choice.py (tiles.py: the launch arithmetic both share)."""

from __future__ import annotations

from ..base import Target


class TritonTarget(Target):
    name = "triton"

    def source(self, plan) -> str:
        from .emit import triton_module_source

        return triton_module_source(plan)

    def load(self, compiled):
        """The generated module (kernels/<stem>.py for a current zoo cell, else a cache file)."""
        from .module import load_triton_module

        return load_triton_module(compiled)

    def loop(self, compiled, schedule: str | None = None):
        """The graphed loop (schedule None), or the loop of a schedule, kept for the process."""
        if schedule is None:
            from ..loop import TorchLoop
            from .cuda_graph import GraphedLoop

            return GraphedLoop(TorchLoop(compiled.plan, self.load(compiled)))
        from .loops import schedule_loop

        return schedule_loop(compiled, schedule)

    def schedules(self, plan) -> dict[str, str | None]:
        from .applies import declines

        return declines(plan)

    def check_schedule(self, plan, schedule: str) -> None:
        from .choice import check_schedule

        check_schedule(plan, schedule)

    def describe(self, plan, sizes: dict | None = None) -> list[str]:
        from .choice import describe

        return describe(plan, sizes)


TARGET = TritonTarget()
