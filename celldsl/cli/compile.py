"""`celldsl compile`: write the generated Triton source of cells, and compile its kernels ahead of time.

    celldsl compile cells/*.cell -o kernels/                   # the zoo's kernels/ directory
    celldsl compile cells/lstm.cell --target cuda:80 --target cuda:90   # PTX + cubin, no GPU needed
    celldsl compile cells/lstm.cell --target cuda:90 --dtype bfloat16 --sizes N=16,H=768   # + resources

Ahead-of-time compilation runs Triton's compiler (`triton.compile(ASTSource(...), target=GPUTarget(
"cuda", cc, 32))`) for every kernel of the file without a GPU, so a kernel that does not compile for a
target fails here and in CI rather than on first use; the schedules' kernels compile with the tiles
their schedule picks at --sizes, and each line reports registers, shared memory and spilled bytes.
The main CLI calls `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..lang.errors import printable

TARGET = re.compile(r"^cuda:(\d{2,3})$")
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # storage dtype -> pointer type
BLOCK = 1024


@dataclass(frozen=True)
class Built:
    """One kernel compiled for one target, with the resources ptxas gave it (None where the tools to
    read them are missing): registers per thread, shared memory per program (Triton's dynamic
    allocation plus static), and local memory per thread (spilled registers live there)."""

    cell: str
    kernel: str
    target: str
    dtype: str
    ptx_bytes: int
    cubin_bytes: int
    seconds: float
    registers: int | None = None
    shared: int | None = None
    local: int | None = None
    schedule: str = "graphed"
    note: str = ""

    def line(self) -> str:
        sizes = f"ptx {self.ptx_bytes / 1024:6.1f} KiB  cubin {self.cubin_bytes / 1024:6.1f} KiB"
        name = f"{self.cell:16s} {self.schedule:10s} {self.kernel:30s} {self.target:8s} {self.dtype:9s}"
        if self.registers is None:
            used = "  regs ?  smem ?  spills ?"
        else:
            used = f"  regs {self.registers:3d}  smem {self.shared / 1024:6.1f} KiB  spills {self.local} B"
        return f"{name} {sizes}{used}  {self.seconds:5.2f} s" + (f"  ({self.note})" if self.note else "")


def resource_usage(cubin: bytes, kernel: str) -> dict[str, int] | None:
    """{"REG", "SHARED", "LOCAL", "STACK"} of a kernel, read with the cuobjdump that Triton's wheel
    ships (None when there is none): what a GPU driver would report, without a GPU."""
    import shutil
    import subprocess
    import tempfile

    tool = None
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError):
        tool = shutil.which("cuobjdump")
    if not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    usage = None
    for line in out.splitlines():
        if line.strip().startswith("Function"):
            usage = None if kernel not in line else {}
        elif usage is not None and "REG:" in line:
            usage = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            return usage
    return None


def parse_target(text: str) -> tuple[str, int]:
    """"cuda:90" -> ("cuda", 90)."""
    m = TARGET.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a target like cuda:80 or cuda:90, got {text!r}")
    return "cuda", int(m.group(1))


def _refuse_matrix_cells(compiled) -> None:
    """The Triton target has no kernels for matrix-memory cells yet: a located CellError, not a crash."""
    from ..targets import refuse_matrix

    for c in compiled:
        if getattr(c, "plan", None) is None:
            refuse_matrix(c.ir, "triton")


def write_sources(cells, out_dir) -> list[Path]:
    """Write `<stem>.py` (the generated Triton module) for each cell into out_dir; returns the paths.

    Each file is written to a temporary file in out_dir and renamed over the old one, so a symlink
    in out_dir is replaced, never followed out of it. Two cells with the same stem are an error
    (one would silently overwrite the other); so is an out_dir that is not a writable folder."""
    from .. import cache
    from ..compiler import compile_cell
    from ..targets.triton.emit import triton_module_source

    out = Path(out_dir)
    compiled = list({c.key: c for c in map(compile_cell, cells)}.values())  # a file given twice is one
    _refuse_matrix_cells(compiled)
    stems: dict[str, str] = {}
    for c in compiled:
        stem = Path(c.ir.source.filename).stem if c.ir.source.filename != "<cell>" else c.name
        if stem in stems:
            raise ValueError(f"{printable(stems[stem])} and {printable(c.ir.source.filename)} would both be "
                             f"written to {printable(str(out / (stem + '.py')))}; rename one of them")
        stems[stem] = c.ir.source.filename
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {printable(str(out))}: not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"-o {printable(str(out))}: cannot create the folder: {err.strerror}") from None
    written = []
    for c, stem in zip(compiled, stems, strict=True):
        path = out / f"{stem}.py"
        text = triton_module_source(c.plan)
        try:
            if path.is_symlink() or not path.is_file() or path.read_text(encoding="utf-8") != text:
                cache.atomic_write(path, text.encode("utf-8"), shared=True)
        except OSError as err:
            raise ValueError(f"cannot write {printable(str(path))}: {err.strerror}") from None
        written.append(path)
    return written


def _source(fn, signature: dict[str, str], constexprs: dict[str, object]):
    """ASTSource across Triton versions: 3.3+ takes `constexprs` and lists them in the signature as
    "constexpr"; older releases take `constants` and a signature without them."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs=constexprs)
    plain = {k: v for k, v in signature.items() if v != "constexpr"}
    return ASTSource(fn, plain, constants=constexprs)


SIZES = {"N": 16, "H": 768, "T": 1024}  # the sizes the schedules' kernels are compiled at by default


def aot_compile(cell, targets, dtype: str = "float32", kernels: list[str] | None = None,
                schedules: bool = True, sizes: dict[str, int] | None = None) -> list[Built]:
    """Compile every kernel of a cell's generated module for each (backend, capability) target: the
    pointwise kernels of the graphed path, then (schedules=True) the kernels of every schedule that
    applies, with the block sizes that schedule picks at `sizes` (N, H, T; default SIZES).

    `dtype` is the storage dtype the pointers get; the math is fp32 whatever it is."""
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from ..compiler import compile_cell
    from ..targets.triton.emit import kernel_names
    from ..targets.triton.module import load_triton_module

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    compiled = compile_cell(cell)
    _refuse_matrix_cells([compiled])
    module = load_triton_module(compiled).module(interpret=False)
    stem = Path(compiled.ir.source.filename).stem
    jobs = []  # (schedule, kernel, signature, constexprs, num_warps, note)
    for name in kernels or kernel_names(compiled.plan):
        fn = getattr(module, name)
        signature = {}
        for arg in fn.arg_names:
            if arg in ("BLOCK", "COMPUTE"):
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*" + DTYPES[dtype]
            else:
                signature[arg] = "i32"
        jobs.append(("graphed", name, signature, {"BLOCK": BLOCK, "COMPUTE": tl.float32}, 4, ""))
    if schedules and not kernels:
        jobs += schedule_jobs(compiled.plan, getattr(torch, dtype), {**SIZES, **(sizes or {})})
    built = []
    for schedule, name, signature, constexprs, num_warps, note in jobs:
        fn = getattr(module, name)
        src = _source(fn, signature, constexprs)
        for backend, capability in targets:
            start = time.perf_counter()
            target = GPUTarget(backend, capability, 32)
            kernel = triton.compile(src, target=target, options={"num_warps": num_warps})
            seconds = time.perf_counter() - start
            usage = resource_usage(kernel.asm["cubin"], name) or {}
            shared = kernel.metadata.shared + usage.get("SHARED", 0) if usage else None
            built.append(
                Built(
                    stem, name, f"{backend}:{capability}", dtype,
                    len(kernel.asm["ptx"]), len(kernel.asm["cubin"]), seconds,
                    usage.get("REG"), shared, usage.get("LOCAL"), schedule, note,
                )
            )  # fmt: skip
    return built


def schedule_jobs(plan, dtype, sizes: dict[str, int]) -> list[tuple]:
    """(schedule, kernel, signature, constexprs, num_warps, note) for every schedule kernel of a plan,
    with the configuration each schedule picks at `sizes` on an sm_90 device (targets/triton/schedules.py)."""
    import triton.language as tl

    from ..targets.triton.applies import declines
    from ..targets.triton.choice import ASSUMED, configure
    from ..targets.triton.emit_columns import ColumnLayout, ScanLayout
    from ..targets.triton.emit_dense import DenseLayout, backward_order

    storage = "*" + DTYPES[str(dtype).removeprefix("torch.")]
    types = {"storage": storage, "compute": "*fp32", "int32": "*i32", "i32": "i32"}
    compute = {"COMPUTE": tl.float32}
    jobs = []
    why = declines(plan)
    N, H, T = sizes["N"], sizes["H"], sizes["T"]
    for schedule in ("persistent", "fused_step", "time_loop", "scan"):
        if why[schedule]:
            continue
        c = configure(plan, schedule, N, H, T, dtype, ASSUMED)
        note = f"N={N} H={H}: {'fits' if c.fits else 'does not fit: ' + c.why}"
        if schedule in ("persistent", "fused_step"):
            L = DenseLayout(plan)
            fused = schedule == "fused_step"
            base = dict(c.blocks, SEQUENTIAL=False, DOT_PRECISION="ieee", **compute)
            forward = [f"fused_step_forward_kernel_{n + 1}" for n in range(len(L.phases))] if fused \
                else ["persistent_forward_kernel"]
            backward = [f"fused_step_backward_kernel_{n + 1}" for n in range(len(backward_order(L)))] \
                if fused else ["persistent_backward_kernel"]
            for names, args, extra in ((forward, L.forward_args(fused), {}),
                                       (backward, L.backward_args(fused), {"HAS_GRAD_OUT": True})):
                for name in names:
                    signature = {a.name: types[a.dtype] for a in args}
                    consts = {**base, **extra}
                    signature |= {k: "constexpr" for k in consts}
                    jobs.append((schedule, name, signature, consts, c.num_warps, note))
        else:
            L = ScanLayout(plan) if schedule == "scan" else ColumnLayout(plan)
            prefix = "scan" if schedule == "scan" else "time_loop"
            for way, args, extra in (("forward", L.forward_args(), {}),
                                     ("backward", L.backward_args(), {} if schedule == "scan" else
                                      {"HAS_GRAD_OUT": True})):
                consts = {**c.blocks, **compute, **extra}
                signature = {a.name: types[a.dtype] for a in args} | {k: "constexpr" for k in consts}
                jobs.append((schedule, f"{prefix}_{way}_kernel", signature, consts, c.num_warps, note))
    return jobs


def run(args: argparse.Namespace) -> int:
    from ..lang.errors import CellError

    try:
        if args.output:
            for path in write_sources(args.cells, args.output):
                print(f"wrote {printable(str(path))}")
        if args.target:
            for cell in args.cells:
                for dtype in args.dtype or ["float32"]:
                    for b in aot_compile(cell, args.target, dtype, sizes=args.sizes):
                        print(b.line())
        if not args.output and not args.target:
            print("celldsl compile: nothing to do: give -o DIR and/or --target cuda:CC", file=sys.stderr)
            return 2
    except CellError as e:
        print(e, file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # one line, as every error of the `celldsl` command (cli.py)
        print(f"celldsl: error: {printable(str(e))}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    """Add `compile` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "compile",
        help="write the Triton kernels of cells; optionally compile them to PTX/cubin",
        description="Write the generated Triton source of each cell (<stem>.py) and/or compile every "
        "kernel ahead of time for CUDA targets (no GPU needed).",
    )
    p.add_argument("cells", nargs="+", metavar="FILE", help=".cell files (or zoo names)")
    p.add_argument("-o", "--output", metavar="DIR", help="directory for the generated <stem>.py files")
    p.add_argument(
        "--target", action="append", type=parse_target, metavar="cuda:CC",
        help="compile every kernel for this target (repeatable), e.g. cuda:80, cuda:90",
    )  # fmt: skip
    p.add_argument(
        "--dtype", action="append", choices=sorted(DTYPES),
        help="storage dtype of the compiled kernels' pointers (repeatable; default float32)",
    )  # fmt: skip
    p.add_argument(
        "--sizes", type=_sizes, metavar="N=16,H=768",
        help="sizes whose tiles the schedules' kernels are compiled with (default N=16,H=768,T=1024)",
    )  # fmt: skip
    p.set_defaults(func=run)


def _sizes(text: str) -> dict:
    from ..targets.triton.choice import parse_sizes

    try:
        return parse_sizes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celldsl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
