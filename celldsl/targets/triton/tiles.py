"""The launch of a schedule at given sizes (`Config`) and the arithmetic of tiles: shared by the
schedule choice (choice.py) and the column emitter (emit_columns.column_config). No torch: explain
stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Config:
    """A schedule at given sizes: whether it fits, why, and the launch it makes."""

    schedule: str
    fits: bool
    why: str
    grid: tuple[int, ...] = ()
    blocks: dict[str, int] = field(default_factory=dict)  # BLOCK_N, BLOCK_H, BLOCK_K, ...
    num_warps: int = 4
    details: list[str] = field(default_factory=list)


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 or "bfloat16" (this module imports no torch: explain stays fast)."""
    return str(dtype).removeprefix("torch.")


def element_bytes(dtype) -> int:
    return BYTES[dtype_name(dtype)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int, least: int = 1) -> int:
    p = 1
    while p < n:
        p *= 2
    return max(least, p)
