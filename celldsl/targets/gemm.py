"""The GEMMs of the time loop, plain or block-diagonal over heads, with their two gradients.

A plain weight is [rows, K] and computes `v @ w.T`. A weight with heads (`param R : heads(4)`) is
[G, NH, dh, dh]: G blocks of the concatenated GEMM, each block-diagonal with NH square blocks of
size dh = K / NH (the layout xLSTM stores its recurrent matrices in). Head k of block g reads
columns [k dh, (k+1) dh) of v and writes the same columns of block g, so the output is
[b, G * NH * dh] laid out as the plain GEMM's: block g, then within it head by head.
"""

from __future__ import annotations

import torch


def rows_of(w: torch.Tensor) -> int:
    """The number of output columns (the concatenated GEMM's rows) of a weight."""
    return w.shape[0] if w.dim() == 2 else w.shape[0] * w.shape[1] * w.shape[2]


def matmul(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """v [b, K] -> [b, rows]."""
    if w.dim() == 2:
        return v @ w.t()
    G, NH, dh, _ = w.shape
    out = torch.einsum("bkd,gked->bgke", v.reshape(v.shape[0], NH, dh), w)
    return out.reshape(v.shape[0], G * NH * dh)


def input_grad(d_out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient of v from that of the output [b, rows]: [b, K]."""
    if w.dim() == 2:
        return d_out @ w
    G, NH, dh, _ = w.shape
    dv = torch.einsum("bgke,gked->bkd", d_out.reshape(d_out.shape[0], G, NH, dh), w)
    return dv.reshape(d_out.shape[0], NH * dh)


def weight_grad(d_out: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient of w (shaped like w) from the output's [b, rows] and the operand v [b, K]."""
    if w.dim() == 2:
        return d_out.t() @ v
    G, NH, dh, _ = w.shape
    b = v.shape[0]
    return torch.einsum("bgke,bkd->gked", d_out.reshape(b, G, NH, dh), v.reshape(b, NH, dh))
