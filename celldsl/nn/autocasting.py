"""torch.autocast for the layers and cells: run the op in autocast's dtype, as torch.nn does.

torch.nn's recurrent ops are on autocast's lower-precision lists, so under
`torch.autocast("cpu", dtype=torch.bfloat16)` torch.nn.LSTM casts the input, the states and the
weights to bfloat16 and returns bfloat16. celldsl's layers do the same: the op runs in that dtype
(autocast itself switched off inside, the casts are differentiable, so float32 parameters get
float32 gradients). Which dtype comes back follows torch.nn class by class (`keeps_input_dtype`):
on the CPU torch.nn.GRU, LSTMCell and GRUCell end in float32 arithmetic and return the input's
dtype, the others return the low dtype; on CUDA all return the low dtype. Float64 inputs are left
alone, as autocast leaves them.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a recurrent op on `x` in, or None (autocast off for x's device, or
    x not a float16/bfloat16/float32 tensor)."""
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return torch.get_autocast_dtype(device)


def without_autocast(x: torch.Tensor, cast: torch.dtype | None):
    """A context that switches autocast off for x's device while the op runs (a no-op if cast is None)."""
    if cast is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def result_dtype(input_dtype: torch.dtype, cast: torch.dtype, device_type: str, keeps_input_dtype: bool
                 ) -> torch.dtype:
    """The dtype of the results under autocast: torch.nn's for the same class (module docstring)."""
    return input_dtype if keeps_input_dtype and device_type == "cpu" else cast
