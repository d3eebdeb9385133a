"""What every generated Triton file shares: the activations, and the host helpers that launch kernels.

Generated files (kernels/<cell>.py and the cache's copies) do not repeat these; each reaches them as
`lib`, this file imported in the generated file's own mode (`shared_helpers()` in
runtime/triton_module.py): interpreted while TRITON_INTERPRET=1, compiled otherwise, because
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
    # 1 where x > 0, else 0: the derivative of relu and of max/min
    return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def pow(b, e):  # reached as lib.pow: the spelling of a non-integer power
    # b ** e for a non-integer e: nan for b < 0, as torch.pow
    return tl.exp(e * tl.log(b))


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


def launch(kernel, ref, args, outs):
    """One program per BLOCK elements of the flattened [rows, width] output."""
    check_dtype(ref)
    numel = ref.numel()
    if numel == 0:
        return
    if numel >= 2**31:
        raise ValueError(f"a step of {numel} elements is too large for 32-bit offsets (< 2**31 expected)")
    if INTERPRET:
        block = min(triton.next_power_of_2(numel), 1 << 16)  # few, wide programs: the interpreter is slow
    else:
        block = min(1024, max(128, triton.next_power_of_2(triton.cdiv(numel, 264))))
    grid = (triton.cdiv(numel, block),)
    on_device(ref, lambda: kernel[grid](*args, *outs, numel, ref.shape[-1], BLOCK=block,
                                        COMPUTE=compute_dtype(ref), num_warps=4))


def empty(ref, n):
    return [torch.empty(ref.shape, dtype=ref.dtype, device=ref.device) for _ in range(n)]
