"""The loop object of every Triton schedule for a compiled cell, kept for the process: the target's
interface (`TritonTarget.loop(compiled, schedule)`) returns these. schedules.py runs the dense
schedules, columns.py the column ones, cuda_graph.py replays the graphed path."""

from __future__ import annotations

from .choice import ASSUMED, check_schedule, choose
from .columns import ColumnLoop
from .cuda_graph import GraphedLoop
from .module import interpreting
from .schedules import DenseLoop, device_of

# ---- the loops, per (cell, schedule) -----------------------------------------------------------------

_LOOPS: dict = {}


class AutoLoop:
    """schedule="auto": the schedule `choose` picks for each call's sizes, verified on hardware or not
    (for benchmarks and tests; the layers' default stays the graphed path until it is verified)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.plan = compiled.plan
        self.base = compiled.triton_loop  # saved_shapes and the argument split are the same everywhere

    def __getattr__(self, name):
        return getattr(self.base, name)

    def pick(self, x, states) -> str:
        N, H = states[0].shape
        T = x.shape[0] if x.dim() == 3 else 0
        interpret = interpreting() or not x.is_cuda
        device = ASSUMED if interpret else device_of(x.device)
        return choose(self.plan, N, H, T or 1, x.dtype, device)[0]

    def forward(self, x, states, *args, **kwargs):
        return schedule_loop(self.compiled, self.pick(x, states)).forward(x, states, *args, **kwargs)

    def backward(self, x, states, *args, **kwargs):
        return schedule_loop(self.compiled, self.pick(x, states)).backward(x, states, *args, **kwargs)


def schedule_loop(compiled, schedule: str):
    """The loop object of a schedule for a compiled cell (kept for the process, as the cell's own loops)."""
    key = (compiled.key, schedule)
    loop = _LOOPS.get(key)
    if loop is None:
        check_schedule(compiled.plan, schedule)
        if schedule == "auto":
            loop = AutoLoop(compiled)
        elif schedule == "graphed":
            loop = compiled.triton_loop
        elif schedule == "persistent":
            loop = DenseLoop(compiled, schedule)
        elif schedule == "fused_step":
            loop = GraphedLoop(DenseLoop(compiled, schedule))
        else:
            loop = ColumnLoop(compiled, schedule)
        _LOOPS[key] = loop
    return loop
