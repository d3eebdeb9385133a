"""The optimizers the labs offer, by name, including RMSProp as TensorFlow 1 defines it.

`rmsprop-tf` is tf.compat.v1.train.RMSPropOptimizer (non-centered), the optimizer of the
lstm_copy_task project that the `graves` preset follows. It differs from torch.optim.RMSprop in
three ways that matter at lr 3e-5: the mean square starts at 1, not 0 (a warm-up: early steps are
lr * g, tiny, until the mean square has decayed to the gradients' scale); epsilon sits inside the
square root; and the learning rate is applied before the momentum buffer, not after:

    ms  = decay * ms + (1 - decay) * g^2              (ms starts at 1)
    mom = momentum * mom + lr * g / sqrt(ms + eps)
    p   = p - mom
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adam", "rmsprop", "rmsprop-tf")


class TFRMSprop(torch.optim.Optimizer):
    """RMSProp with TensorFlow 1's update and defaults (decay 0.9, epsilon 1e-10); see module doc."""

    def __init__(self, params, lr: float, decay: float = 0.9, momentum: float = 0.0, eps: float = 1e-10):
        if lr <= 0 or not 0 <= decay < 1 or not 0 <= momentum < 1 or eps < 0:
            raise ValueError(f"bad RMSProp settings: lr={lr}, decay={decay}, momentum={momentum}, eps={eps}")
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["ms"] = torch.ones_like(p)
                    state["mom"] = torch.zeros_like(p)
                ms, mom, g = state["ms"], state["mom"], p.grad
                ms.mul_(group["decay"]).addcmul_(g, g, value=1 - group["decay"])
                mom.mul_(group["momentum"]).addcdiv_(g, (ms + group["eps"]).sqrt_(), value=group["lr"])
                p.sub_(mom)
        return loss


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """adam: torch defaults. rmsprop: torch's, momentum 0.9 (Graves et al. 2014). rmsprop-tf:
    TensorFlow 1's, momentum 0.9 (lstm_copy_task)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9)
    if name == "rmsprop-tf":
        return TFRMSprop(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")
