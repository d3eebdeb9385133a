"""The lab tasks by name, and `make_task` to build one from command-line options.

>>> make_task("adding", {"T": "500"}).T
500
"""

from __future__ import annotations

from dataclasses import fields

from .adding import AddingTask
from .arithmetic import ArithmeticTask
from .base import Batch, Defaults, Task, evaluate
from .chorales import ChoralesTask
from .copy import CopyTask
from .mqar import MQARTask
from .translate import TranslateTask

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (CopyTask, AddingTask, ChoralesTask, ArithmeticTask, TranslateTask, MQARTask)
}

__all__ = ["TASKS", "Batch", "Defaults", "Task", "evaluate", "make_task", "parse_options"]


def _coerce(kind, text: str):
    if kind in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    for name, conv in (("int", int), ("float", float), ("str", str)):
        if kind in (name, conv):
            return conv(text)
    raise TypeError(f"unsupported option type {kind!r}")


def make_task(name: str, options: dict[str, object] | None = None) -> Task:
    """Build task `name` with `options` (values may be strings, as given on the command line)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    cls = TASKS[name]
    known = {f.name: f.type for f in fields(cls)}
    kwargs = {}
    for key, value in (options or {}).items():
        if key not in known:
            raise ValueError(f"task {name!r} has no option {key!r}; options: {', '.join(known) or 'none'}")
        kwargs[key] = _coerce(known[key], value) if isinstance(value, str) else value
    return cls(**kwargs)


def parse_options(items: list[str] | None) -> dict[str, str]:
    """['T=500', 'test_size=100'] -> {'T': '500', 'test_size': '100'}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"task option must look like KEY=VALUE (got {item!r})")
        out[key.strip()] = value.strip()
    return out
