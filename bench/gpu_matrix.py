"""Matrix-memory cells on a GPU: celldsl's opt-in Triton schedule (targets/triton/matrix_loop.py)
against the torch loop and flash-linear-attention's fused_recurrent kernels (where `fla` installs).

    python bench/gpu_matrix.py             # a CUDA GPU: N=8, T=1024, 4 heads, K=V=64, I=256, fwd and fwd+bwd
    python bench/gpu_matrix.py --dry-run   # CPU, tiny sizes, Triton interpreter: every celldsl row runs
                                           # and agrees with the torch loop; no timing means anything

The fla rows compute the same recurrence: the cell's projections in torch from the same parameters
(the part celldsl's kernel does inside), then fla's kernel (gla: fused_recurrent_gla with gk = log α,
scale 1; deltanet: fused_recurrent_delta_rule on the L2-normed q, k), and their output is checked
against celldsl's before any time is taken. No figure from this script is claimed anywhere until a
GPU run's log is committed under docs/results/gpu/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CELLS = ("mlstm", "gla", "deltanet", "gated_deltanet")
FLA = {"gla", "deltanet"}  # cells with an fla fused_recurrent adapter below


def sizes_of(dry: bool) -> tuple[dict, int, int, int]:
    """(widths, N, T, I)."""
    if dry:
        return {"heads": 2, "K": 4, "V": 8, "R": 2}, 2, 5, 6
    return {"heads": 4, "K": 64, "V": 64, "R": 16}, 8, 1024, 256


def layer(cell: str, backend: str, sizes, I, device, dtype):
    from celldsl.nn.matrix import MatrixRecurrent

    torch.manual_seed(0)
    return MatrixRecurrent(str(ROOT / "cells" / f"{cell}.cell"), I, sizes, backend=backend,
                           device=device, dtype=dtype)


def fla_run(cell: str, m, x):
    """fla's fused_recurrent on the projections of the layer's parameters: -> output [T, N, H * V]."""
    p = {n.removesuffix("_l0"): t for n, t in m.named_parameters()}
    xs = x.transpose(0, 1)  # [N, T, I]

    def proj(w):  # [H, R, I] -> [N, T, H, R]
        return torch.einsum("nti,hri->nthr", xs, w)

    if cell == "gla":
        from fla.ops.gla import fused_recurrent_gla

        low = xs @ p["W_a1"].T  # [N, T, R]
        gk = torch.nn.functional.logsigmoid(torch.einsum("ntr,hkr->nthk", low, p["W_a2"]) + p["b_a"]) / 16
        o, _ = fused_recurrent_gla(proj(p["W_q"]), proj(p["W_k"]), proj(p["W_v"]), gk=gk, scale=1.0)
    else:
        from fla.ops.delta_rule import fused_recurrent_delta_rule

        def norm(a):
            s = a * torch.sigmoid(a)
            return s / torch.sqrt((s * s).sum(-1, keepdim=True) + 1e-6)

        beta = torch.sigmoid(torch.einsum("nti,hi->nth", xs, p["w_b"]) + p["b_b"])
        o, _ = fused_recurrent_delta_rule(norm(proj(p["W_q"])), norm(proj(p["W_k"])), proj(p["W_v"]), beta,
                                          scale=1.0)
    return o.reshape(o.shape[0], o.shape[1], -1).transpose(0, 1)


def have_fla() -> bool:
    try:
        import fla  # noqa: F401
    except ImportError:
        return False
    return True


def timed(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def rows(dry: bool, cells, warmup: int, repeats: int) -> list[tuple]:
    """(cell, impl, fwd ms, fwd+bwd ms, max |difference| from the torch loop's output)."""
    device = "cpu" if dry else "cuda"
    dtype = torch.float64 if dry else torch.float32
    sizes, N, T, I = sizes_of(dry)
    out = []
    for cell in cells:
        x = torch.randn(T, N, I, device=device, dtype=dtype)
        ref = layer(cell, "torch", sizes, I, device, dtype)
        want = ref(x)[0].detach()
        impls = {"celldsl torch": ref, "celldsl triton": layer(cell, "triton", sizes, I, device, dtype)}
        for impl, m in impls.items():
            got = m(x)[0].detach()
            diff = (got - want).abs().max().item()
            fwd = timed(lambda m=m, x=x: m(x), device, warmup, repeats)
            xg = x.clone().requires_grad_()
            both = timed(lambda m=m, xg=xg: m(xg)[0].sum().backward(), device, warmup, repeats)
            out.append((cell, impl, fwd, both, diff))
        if cell in FLA and not dry and have_fla():
            diff = (fla_run(cell, ref, x) - want).abs().max().item()
            fwd = timed(lambda c=cell, r=ref, x=x: fla_run(c, r, x), device, warmup, repeats)
            xg = x.clone().requires_grad_()
            both = timed(lambda c=cell, r=ref, xg=xg: fla_run(c, r, xg).sum().backward(), device,
                         warmup, repeats)
            out.append((cell, "fla fused_recurrent", fwd, both, diff))
        elif cell in FLA:
            why = "dry run" if dry else "fla not installed"
            out.append((cell, f"fla fused_recurrent ({why})", None, None, None))
    return out


def table(result: list[tuple], dry: bool) -> str:
    sizes, N, T, I = sizes_of(dry)
    where = "CPU dry run, Triton interpreter (times mean nothing)" if dry else torch.cuda.get_device_name()
    lines = [f"# matrix cells on {where}: N={N} T={T} I={I} {sizes}", "",
             "| cell | impl | fwd ms | fwd+bwd ms | max abs diff vs torch loop |", "|---|---|---|---|---|"]
    for cell, impl, fwd, both, diff in result:
        cells = ["-" if v is None else f"{v:.3g}" for v in (fwd, both, diff)]
        lines.append(f"| {cell} | {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the Triton interpreter")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    bad = [c for c in cells if c not in CELLS]
    if bad:
        ap.error(f"unknown cells {bad}; choose from {', '.join(CELLS)}")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.warmup, args.repeats = 0, 1
    elif not torch.cuda.is_available():
        print("bench/gpu_matrix.py needs a CUDA GPU (use --dry-run to exercise it on the CPU)",
              file=sys.stderr)
        return 2
    print(table(rows(args.dry_run, cells, args.warmup, args.repeats), args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
