"""What every generated Triton file shares: the activations, and the host helpers that launch kernels.

Generated files (kernels/<cell>.py and the cache's copies) do not repeat these; each reaches them as
`lib`, this file imported in the generated file's own mode (`shared_helpers()` in
targets/triton/module.py): interpreted while TRITON_INTERPRET=1, compiled otherwise, because
`@triton.jit` decides which when a file is imported and a kernel may only call helpers of its mode.

Core `tl` has no tanh (and the interpreter has no libdevice), so the activations are written from
`tl.exp` in forms that cannot overflow.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the mode this copy was imported in
INTERPRETED = tl.constexpr(INTERPRET)  # the same, readable inside kernels


# ---- activations written from tl.exp (no libdevice: they run on the interpreter and on any GPU) -----


@triton.jit
def sigmoid(x):
    # 1 / (1 + exp(-x)) from e = exp(-|x|) <= 1, so nothing overflows for any x
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def tanh(x):
    # tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) <= 1 (no overflow); near 0, 1 - e cancels, so
    # |x| < 1/16 takes the odd Taylor series through x^9 (relative error < 1e-14 there)
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(a < 0.0625, small, tl.where(x < 0, -big, big))


@triton.jit
def log1p(u):
    # log(1 + u) for u >= 0, accurate for tiny u: log(w) * u / (w - 1) with w = 1 + u rounded
    w = 1.0 + u
    d = w - 1.0
    return tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def softplus(x):
    # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def logsigmoid(x):
    # -softplus(-x) = min(x, 0) - log1p(exp(-|x|))
    return tl.minimum(x, 0.0) - log1p(tl.exp(-tl.abs(x)))


@triton.jit
def step(x):
    # 0 where x <= 0, else 1 (1 at NaN, as functions.step): the derivative of relu and of max/min (in
    # x's dtype: a float literal is fp32, and a product with another literal would then round to fp32
    # in an fp64 kernel)
    return tl.where(x <= 0, 0.0, 1.0).to(x.dtype)


@triton.jit
def sign(x):
    return (tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)).to(x.dtype)


@triton.jit
def mod(a, b):
    # a - b * floor(a / b): the remainder with the sign of b, as written (lang/functions.mod)
    return a - b * tl.floor(a / b)


@triton.jit
def pow(b, e):  # reached as lib.pow: the spelling of a non-integer power
    # b ** e for a non-integer e: nan for b < 0, as torch.pow
    return tl.exp(e * tl.log(b))


# ---- tiles of the schedules' kernels ----------------------------------------------------------------
# A tile is a [BLOCK_N, BLOCK_H] block of a row-major [rows, width] tensor: rows `at` (int64 row
# indices) by columns `cols`. Masked elements load as zero and are never stored.


@triton.jit
def load_block(ptr, at, width, cols, mask):
    return tl.load(ptr + at[:, None] * width + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_exchanged(ptr, at, width, cols, mask):
    # a tile other programs of the same launch wrote before the last grid barrier. What makes their
    # stores visible is the barrier's acquire (then the CTA barrier): the memory model. ".cg" (read
    # from L2, past the non-coherent L1) is a hint on top; Triton drops it on some paths
    return tl.load(ptr + at[:, None] * width + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def store_block(ptr, at, width, cols, value, mask):
    tl.store(ptr + at[:, None] * width + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_block(ptr, at, width, cols, value, mask):
    # read-modify-write of a tile only this program owns (no other program touches these elements)
    old = tl.load(ptr + at[:, None] * width + cols[None, :], mask=mask, other=0.0)
    tl.store(ptr + at[:, None] * width + cols[None, :], (old + value).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_vector(ptr, cols, H):
    # a [H] parameter as a [1, BLOCK_H] row that broadcasts over the tile's rows
    return tl.load(ptr + cols, mask=cols < H, other=0.0)[None, :]


@triton.jit
def add(a, b):
    # the combine of the sums below (tl.reduce with it, not tl.sum: the standard library's jit
    # functions are built in the mode triton was first imported in, so they fail under the
    # interpreter when that was the compiled mode)
    return a + b


@triton.jit
def column_sums(value, mask):
    # [BLOCK_N, BLOCK_H] -> [BLOCK_H]: the sums over the rows where mask holds
    return tl.reduce(tl.where(mask, value, 0.0), 0, add)


@triton.jit
def rowsum(x, mask):
    # the sum over a row's columns (a program of a pointwise kernel holds the whole row; masked lanes
    # are padding)
    return tl.reduce(tl.where(mask, x, 0.0), 0, add)


@triton.jit
def rowmean(x, mask, width):
    return rowsum(x, mask) / width


@triton.jit
def pick_row(value, row):
    # [CHUNK, BLOCK] -> [BLOCK]: the row where the [CHUNK, 1] mask `row` holds
    return tl.reduce(tl.where(row, value, 0.0), 0, add)


@triton.jit
def add_vector(ptr, cols, value, mask, H):
    # the tile's column sums (over its live rows) added to this program's columns of a [H] accumulator
    total = column_sums(value, mask)
    tl.store(ptr + cols, tl.load(ptr + cols, mask=cols < H, other=0.0) + total, mask=cols < H)


@triton.jit
def add_scalar(ptr, value, mask):
    # the tile's sum added to a scalar accumulator slot only this program owns
    tl.store(ptr, tl.load(ptr) + tl.reduce(column_sums(value, mask), 0, add))


@triton.jit
def dot(a, b, out_dtype: tl.constexpr, precision: tl.constexpr):
    # a @ b accumulated in out_dtype. The interpreter's tl.dot gets bfloat16 operands wrong, so there
    # they go in as fp32: the products of two bfloat16 numbers are exact in fp32, as on tensor cores.
    if INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=out_dtype, input_precision=precision)


@triton.jit
def weight_tile(w_ptr, block, cols, kk, H):
    # [BLOCK_K, BLOCK_H] tile W[block * H + cols, kk]^T of a [G * H, H] stacked weight: the operand of
    # `state [BLOCK_N, BLOCK_K] @ tile` for gate block `block` of this program's hidden units
    mask = (kk < H)[:, None] & (cols < H)[None, :]
    return tl.load(w_ptr + (block * H + cols)[None, :].to(tl.int64) * H + kk[:, None], mask=mask, other=0.0)


@triton.jit
def weight_tile_t(w_ptr, block, cols, kk, H):
    # [BLOCK_K, BLOCK_H] tile W[block * H + kk, cols]: the operand of `d_gates [BLOCK_N, BLOCK_K] @ tile`,
    # the gradient of the GEMM's operand (its columns `cols`) from gate block `block`
    mask = (kk < H)[:, None] & (cols < H)[None, :]
    return tl.load(w_ptr + (block * H + kk)[:, None].to(tl.int64) * H + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_previous(init_ptr, seq_ptr, rows, prev_at, t, kk, live, H):
    # [BLOCK_N, BLOCK_K] of the state step t reads: the initial state [N, H] at t = 0, else the new
    # state step t - 1 wrote (rows prev_at of the [rows, H] sequence); from L2, as load_exchanged
    step = rows * 0 + t  # t as a tensor: the interpreter takes no scalar flag in a mask
    mask = live[:, None] & (kk < H)[None, :]
    first = tl.load(init_ptr + rows[:, None] * H + kk[None, :], mask=mask & (step == 0)[:, None], other=0.0,
                    cache_modifier=".cg")
    later = tl.load(seq_ptr + prev_at[:, None] * H + kk[None, :], mask=mask & (step > 0)[:, None], other=0.0,
                    cache_modifier=".cg")
    return first + later


@triton.jit
def compose_affine(a1, b1, a2, b2):
    # the map s -> a1 s + b1 followed by s -> a2 s + b2: the scan's associative combine
    return a1 * a2, a2 * b1 + b2


@triton.jit
def grid_barrier(counter_ptr, target, SEQUENTIAL: tl.constexpr):
    """Wait until every program of this batch tile has arrived: `target` = (barriers passed so far,
    this one included) * programs per tile, on a counter the host zeroed before the launch.

    The CTA barrier orders this program's stores before one thread's release add, and that thread's
    acquire spin before every later load of the program. Programs never skip a barrier (same trip
    counts everywhere), and the launch is cooperative (all programs co-resident), so the spin always
    ends. SEQUENTIAL (the interpreter, one program running every slice in turn) needs none."""
    if not SEQUENTIAL:
        tl.debug_barrier()
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()


# ---- host helpers ------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_dtype(ref: torch.Tensor) -> None:
    if ref.dtype not in DTYPES:
        raise ValueError(f"the Triton backend stores float32, bfloat16, float16 or float64, got {ref.dtype}")


def compute_dtype(ref: torch.Tensor):
    """The dtype of the math: fp32 for every storage dtype, fp64 for fp64 (gradcheck)."""
    return tl.float64 if ref.dtype == torch.float64 else tl.float32


def rows(t):
    """A [..., K] tensor as a [rows, K] tensor with unit column stride, and its row stride."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def vec(t):
    """A [H] vector with unit stride."""
    return t if t.numel() <= 1 or t.stride(-1) == 1 else t.contiguous()


def on_device(ref, launch):
    """Run `launch()` with ref's CUDA device current (Triton launches on the current device)."""
    if ref.is_cuda and ref.device.index != torch.cuda.current_device():
        with torch.cuda.device(ref.device):
            return launch()
    return launch()


def launch(kernel, ref, args, outs, whole_rows=False):
    """One program per BLOCK elements of the flattened [rows, width] output; with whole_rows (a step
    that takes means or sums over a row) one program per row, BLOCK the row's width rounded up."""
    check_dtype(ref)
    numel = ref.numel()
    if numel == 0:
        return
    if numel >= 2**31:
        raise ValueError(f"a step of {numel} elements is too large for 32-bit offsets (< 2**31 expected)")
    if whole_rows:
        block = triton.next_power_of_2(ref.shape[-1])
    elif INTERPRET:
        block = min(triton.next_power_of_2(numel), 1 << 16)  # few, wide programs: the interpreter is slow
    else:
        block = min(1024, max(128, triton.next_power_of_2(triton.cdiv(numel, 264))))
    grid = (numel // ref.shape[-1] if whole_rows else triton.cdiv(numel, block),)
    on_device(ref, lambda: kernel[grid](*args, *outs, numel, ref.shape[-1], BLOCK=block,
                                        COMPUTE=compute_dtype(ref), num_warps=4))


def empty(ref, n):
    return [torch.empty(ref.shape, dtype=ref.dtype, device=ref.device) for _ in range(n)]
