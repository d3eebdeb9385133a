"""Which Triton schedule runs a cell, and how: from the plan and the sizes, without torch or a GPU.

`declines(plan)` (applies.py) says which schedules apply (and why the others do not), `configure` the launch a
schedule makes at given sizes on a device (tiling, weights per program, barriers, or why it does not
fit), `choose` the compiler's pick. `celldsl explain FILE --sizes N=16,H=768` prints all three;
targets/triton/schedules.py runs them. The schedules themselves are described there.
"""

from __future__ import annotations

from dataclasses import dataclass

from .applies import SCHEDULES, declines
from .emit_columns import column_config
from .emit_dense import DenseLayout
from .tiles import BYTES, Config, cdiv, dtype_name, element_bytes, pow2

VERIFIED_ON_HARDWARE: frozenset[str] = frozenset({"graphed"})  # gpu tests passed on a GPU, log committed

MIN_DOT = 16  # tl.dot's smallest tile side


@dataclass(frozen=True)
class Device:
    """What the schedule choice needs to know of a GPU."""

    name: str
    multiprocessors: int
    shared_memory: int  # bytes a program may use (the opt-in maximum per block)
    registers: int  # 32-bit registers per multiprocessor
    capability: int  # 90 for sm_90


# explain without a GPU: an H100/H200 (both have 132 multiprocessors and 227 KiB of shared memory per block)
ASSUMED = Device("an H100/H200 (assumed: no GPU queried)", 132, 232448, 65536, 90)


def check_schedule(plan, schedule: str) -> None:
    """ValueError unless `schedule` is a known schedule that applies to the plan."""
    if schedule not in SCHEDULES and schedule != "auto":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} or 'auto', got {schedule!r}")
    if schedule == "auto":
        return
    why = declines(plan)[schedule]
    if why:
        ok = ", ".join(s for s, w in declines(plan).items() if w is None)
        raise ValueError(f"schedule {schedule!r} does not apply to cell {plan.ir.name!r}: {why}; "
                         f"the schedules that do: {ok}")


# ---- sizes -> launch configuration -----------------------------------------------------------------


def configure(plan, schedule: str, N: int, H: int, T: int, dtype, device: Device,
              interpret: bool = False) -> Config:
    """The launch `schedule` makes at these sizes on `device` (or why it does not fit)."""
    why = declines(plan)[schedule]
    if why:
        return Config(schedule, False, why)
    if schedule == "graphed":
        return Config(schedule, True, "any cell, any size: cuBLAS GEMMs and one pointwise kernel per stage "
                                      "and step, replayed from a CUDA graph")
    if schedule == "persistent":
        return _persistent(plan, N, H, T, dtype, device, interpret)
    if schedule == "fused_step":
        return _fused_step(plan, N, H, dtype, interpret)
    return column_config(plan, schedule, N, H, T, dtype, interpret)


def _persistent(plan, N, H, T, dtype, device: Device, interpret: bool) -> Config:
    layout = DenseLayout(plan)
    size = element_bytes(dtype)
    block_n = pow2(N, MIN_DOT) if N <= 16 else 32
    block_k = pow2(H, MIN_DOT)
    tiles = cdiv(N, block_n)
    gate_rows = sum(layout.gemm_rows(i) for i in range(len(plan.gemms)))
    budget = int(0.75 * device.shared_memory)
    if interpret:
        block_h = MIN_DOT
    else:
        block_h = MIN_DOT  # the smallest slice: the most programs, the least weight per program
        while tiles * cdiv(H, block_h) > device.multiprocessors and block_h < pow2(H, MIN_DOT):
            block_h *= 2
    slices = cdiv(H, block_h)
    weights = gate_rows * block_h * block_k * size
    operand = block_n * block_k * size
    blocks = {"BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_K": block_k}
    phases = len(layout.phases)
    details = [
        f"tiling: {tiles} batch tile(s) of {block_n} rows x {slices} slice(s) of {block_h} hidden units = "
        f"{tiles * slices} programs, each owning every gate row ({gate_rows} per hidden unit) of its slice",
        f"weights per program: {gate_rows} x {block_h} x {block_k} (H={H} padded to {block_k}) "
        f"{dtype_name(dtype)} = {weights / 1024:.0f} KiB, loaded once and kept on chip "
        f"(registers or shared memory, as Triton lays out tl.dot's operand); budget {budget / 1024:.0f} KiB "
        f"(3/4 of the {device.shared_memory / 1024:.0f} KiB a program may use)",
        f"operand tile per step: {block_n} x {block_k} = {operand / 1024:.0f} KiB, read from L2",
        f"grid barriers per step: {phases} forward, {plan.num_stages} backward "
        f"({T * phases} forward in all)",
    ]
    grid = (tiles, 1) if interpret else (tiles, slices)
    if not interpret and tiles * slices > device.multiprocessors:
        return Config("persistent", False, f"{tiles * slices} programs of at least {MIN_DOT} hidden units "
                      f"cannot all be resident on {device.multiprocessors} multiprocessors (one each)",
                      grid, blocks, 4, details)
    if not interpret and weights > budget:
        return Config("persistent", False, f"the weights of a slice ({weights / 1024:.0f} KiB) exceed the "
                      f"on-chip budget ({budget / 1024:.0f} KiB)", grid, blocks, 4, details)
    if T * phases * slices >= 2**31:
        return Config("persistent", False, "too many barriers for a 32-bit counter", grid, blocks, 4, details)
    num_warps = 8 if weights > 64 * 1024 else 4
    return Config("persistent", True, f"the weights of a slice ({weights / 1024:.0f} KiB) fit on chip and "
                  f"the {tiles * slices} programs fit on the {device.multiprocessors} multiprocessors",
                  grid, blocks, num_warps, details)


def _fused_step(plan, N, H, dtype, interpret: bool) -> Config:
    block_n = min(64, pow2(N, MIN_DOT))
    block_h = MIN_DOT if interpret or H <= 16 else 32
    block_k = min(64, pow2(H, MIN_DOT))
    tiles, slices = cdiv(N, block_n), cdiv(H, block_h)
    layout = DenseLayout(plan)
    backward = len(layout.phases) + (layout.phases[0].stage > 0)
    details = [
        f"tiling: {tiles} batch tile(s) of {block_n} rows x {slices} slice(s) of {block_h} hidden units "
        f"per launch; the GEMM runs over H in chunks of {block_k}, weights read from L2 every step",
        f"launches per step: {len(layout.phases)} forward, {backward} backward, replayed from a CUDA graph",
    ]
    blocks = {"BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_K": block_k}
    return Config("fused_step", True, "any H: the recurrent GEMM and its pointwise step in one kernel per "
                  "stage and step", (tiles, slices), blocks, 4, details)


def choose(plan, N: int, H: int, T: int, dtype, device: Device) -> tuple[str, list[Config]]:
    """The schedule the compiler picks at these sizes, and every schedule's configuration (the why)."""
    configs = [configure(plan, s, N, H, T, dtype, device) for s in SCHEDULES]
    fits = {c.schedule: c for c in configs if c.fits}
    order = ("persistent", "scan", "time_loop", "fused_step")
    if plan.recurrence != "dense":  # an output projection: the column schedules take its GEMM out of the loop
        order = ("scan", "time_loop", "persistent", "fused_step")
    for preferred in order:
        if preferred in fits:
            return preferred, configs
    return "graphed", configs


# ---- `celldsl explain`: the schedule section -----------------------------------------------------

SIZE_KEYS = {"N": "batch", "H": "hidden size", "T": "steps", "dtype": "storage dtype"}


def parse_sizes(text: str) -> dict:
    """"N=16,H=768[,T=1024][,dtype=bfloat16]" -> {"N": 16, "H": 768, ...}; ValueError on anything else."""
    sizes: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in SIZE_KEYS:
            raise ValueError(f"expected KEY=VALUE with KEY in {', '.join(SIZE_KEYS)}, got {part!r}")
        if key == "dtype":
            if value not in BYTES:
                raise ValueError(f"dtype must be one of {', '.join(BYTES)}, got {value!r}")
            sizes[key] = value
        elif not value.isdigit() or int(value) <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        else:
            sizes[key] = int(value)
    missing = [k for k in ("N", "H") if k not in sizes]
    if missing:
        raise ValueError(f"--sizes needs {' and '.join(missing)} (e.g. N=16,H=768)")
    return sizes


def describe(plan, sizes: dict | None = None, device: Device = ASSUMED) -> list[str]:
    """The schedule section of `celldsl explain`: which schedules apply and, at `sizes`, the launch
    each would make, the compiler's choice and the CUDA default."""
    why = declines(plan)
    out = ["", "schedules (the Triton backend on CUDA tensors; `schedule=` on a layer forces one):"]
    if not sizes:
        for s in SCHEDULES:
            out.append(f"  {s:10s} " + ("applies" if why[s] is None else f"does not apply: {why[s]}"))
        out.append("  (--sizes N=16,H=768[,T=1024,dtype=bfloat16] shows the launch of each and the choice)")
        return out
    N, H, T, dtype = sizes["N"], sizes["H"], sizes.get("T", 1024), sizes.get("dtype", "bfloat16")
    pick, configs = choose(plan, N, H, T, dtype, device)
    out[-1] = (f"schedules (the Triton backend on CUDA tensors) at N={N}, H={H}, T={T}, {dtype}, on "
               f"{device.name}:")
    by_name = {c.schedule: c for c in configs}
    out.append(f"  the compiler's choice: {pick} ({by_name[pick].why})")
    default = pick if pick in VERIFIED_ON_HARDWARE else "graphed"
    if default != pick:
        out.append(f"  the CUDA default: {default}, until {pick}'s gpu tests pass on hardware "
                   f"(schedule={pick!r} or schedule='auto' runs the choice now)")
    else:
        out.append(f"  the CUDA default: {default}")
    for c in configs:
        state = "fits" if c.fits else ("does not apply" if why[c.schedule] else "does not fit")
        out.append(f"  {c.schedule:10s} {state}: {c.why}")
        if c.grid:
            blocks = ", ".join(f"{k}={v}" for k, v in c.blocks.items())
            out.append(f"      grid {c.grid}, {blocks}, num_warps={c.num_warps}")
        out += [f"      {d}" for d in c.details]
    return out
