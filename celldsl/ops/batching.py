"""vmap batching rules for celldsl::cell_sequence and celldsl::cell_sequence_backward.

Forward, parameters shared: the vmapped dimension (size B) folds into the batch, one call. It folds
as the innermost batch index (sequence n of sample b becomes n*B + b), so the rows of every
[rows, ...] tensor become [rows, B, ...] and results come back as views: a packed batch stays
packed (the running sequences of step t are the first b_t*B, batch_sizes * B) and the saved tensors
of sample b are saved[:, b].

Everything else runs one call per sample: parameters batched (an ensemble), and the backward. The
backward's parameter gradients are sums over the batch, so folding would add up the samples'
gradients where vmap(grad(...)) or is_grads_batched want one gradient per sample.
"""

from __future__ import annotations

import torch

from .op import cell_sequence, cell_sequence_backward


def _flat_dims(in_dims):
    """in_dims mirrors the arguments (a list for a list argument) -> one flat list of Optional[int]."""
    flat = []
    for d in in_dims:
        flat.extend(d if isinstance(d, (list, tuple)) else [d])
    return flat


def _per_sample(op, info, in_dims, args):
    """op on each sample in turn, the results stacked along dim 0: (list of outputs, out_dims)."""
    def pick(a, d, b):
        if isinstance(a, (list, tuple)):
            return [pick(t, e, b) for t, e in zip(a, d, strict=True)]
        return a if d is None or a is None else a.select(d, b)

    results = [op(*(pick(a, d, b) for a, d in zip(args, in_dims, strict=True)))
               for b in range(info.batch_size)]
    stacked = [torch.stack(parts) for parts in zip(*results, strict=True)]
    return stacked, [0] * len(stacked)


def _fold(t: torch.Tensor, d, batch: int, at: int) -> torch.Tensor:
    """Move the vmapped dim d of t (None: not batched, expand) just after dim `at`, and merge it in."""
    if d is None:
        t = t.unsqueeze(at + 1).expand(*t.shape[: at + 1], batch, *t.shape[at + 1 :])
    else:
        t = t.movedim(d, at + 1)
    return t.reshape(*t.shape[:at], -1, *t.shape[at + 2 :])


def _unfold(t: torch.Tensor, batch: int, at: int) -> torch.Tensor:
    """The inverse of _fold, as a view: dim `at` of size n*B -> dims (n, B)."""
    return t.view(*t.shape[:at], t.shape[at] // batch, batch, *t.shape[at + 1 :])


def cell_sequence_vmap(info, in_dims, key, backend, x, states, params, batch_sizes):
    from .op import cell_sequence

    _k, _b, x_dim, state_dims, param_dims, sizes_dim = in_dims
    args = (key, backend, x, states, params, batch_sizes)
    if any(d is not None for d in param_dims) or sizes_dim is not None:
        return _per_sample(cell_sequence, info, in_dims, args)
    B, packed = info.batch_size, batch_sizes is not None
    # padded x [T, N, I]: batch dim 1; packed x [rows, I]: rows; states [N, H]: dim 0
    xf = _fold(x, x_dim, B, 0 if packed else 1)
    sf = [_fold(s, d, B, 0) for s, d in zip(states, state_dims, strict=True)]
    result = cell_sequence(key, backend, xf, sf, list(params), batch_sizes * B if packed else None)
    n = len(states)
    out, finals, saved = result[0], result[1 : 1 + n], result[1 + n :]
    out = _unfold(out, B, 0 if packed else 1)
    finals = [_unfold(f, B, 0) for f in finals]
    saved = [_unfold(s, B, 0) for s in saved]
    return [out, *finals, *saved], [1 if packed else 2] + [1] * (n + len(saved))


def cell_sequence_backward_vmap(info, in_dims, key, backend, x, states, params, batch_sizes, out, saved,
                                grad_out, grad_finals, needs_dx=True):
    from .op import cell_sequence_backward

    args = (key, backend, x, states, params, batch_sizes, out, saved, grad_out, grad_finals, needs_dx)
    dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    return _per_sample(cell_sequence_backward, info, dims, args)


torch.library.register_vmap(cell_sequence, cell_sequence_vmap)
torch.library.register_vmap(cell_sequence_backward, cell_sequence_backward_vmap)
