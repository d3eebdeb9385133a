"""The interface every target offers the rest of celldsl (the driver, the op, the layers, explain).

A target turns a plan into source (`source`), loads what it generated (`load`), builds the time loop
that runs a compiled cell (`loop`: forward, backward and saved_shapes as in loop.py), and says which
of its schedules apply to a plan and why the others do not (`schedules`, `check_schedule`,
`describe`). Nothing outside a target's folder imports its emitters or runtime modules but the
`celldsl compile` command, which is the Triton target's own tool.
"""

from __future__ import annotations


class Target:
    """A target's interface; each folder under targets/ defines one subclass and its instance TARGET."""

    name = ""  # the layers' backend= name

    def source(self, plan) -> str:
        """The generated source of a plan (deterministic: the same plan gives the same text)."""
        raise NotImplementedError

    def load(self, compiled):
        """The generated code of a compiled cell, ready to call (written to the cache when needed)."""
        raise NotImplementedError

    def loop(self, compiled, schedule: str | None = None):
        """The time loop of a compiled cell (of a named schedule, for a target that has several)."""
        raise NotImplementedError

    def schedules(self, plan) -> dict[str, str | None]:
        """Every schedule of the target: None where it applies to the plan, else why not."""
        return {}

    def check_schedule(self, plan, schedule: str) -> None:
        """ValueError unless `schedule` is one of this target's schedules that applies to the plan."""
        raise ValueError(f"backend {self.name!r} has no schedules; got schedule={schedule!r}")

    def describe(self, plan, sizes: dict | None = None) -> list[str]:
        """The target's lines of `celldsl explain` (at `sizes`, where the target's choice depends on them)."""
        return []
