"""Computing an `init` line's expression (lang/inits.py checks it) with torch, node by node.

Each random draw has the parameter's shape and uses torch's global generator, in the order the text
writes the draws; sizes come from the layer (H, I, the inputs', the declared widths', and the names
only init expressions read, such as chrono's T_max, from `sizes=`); parameters read are the values
earlier init lines gave them.
"""

from __future__ import annotations

import torch

from ..lang import ast
from ..lang.functions import CONSTANTS

UNARY = {
    "sigmoid": torch.sigmoid,
    "σ": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "exp": torch.exp,
    "log": torch.log,
    "sin": torch.sin,
    "cos": torch.cos,
    "abs": torch.abs,
    "sqrt": torch.sqrt,
    "floor": torch.floor,
    "softplus": torch.nn.functional.softplus,
    "logsigmoid": torch.nn.functional.logsigmoid,
}
BINARY = {"max": torch.maximum, "min": torch.minimum,
          "mod": lambda a, b: a - b * torch.floor(a / b)}  # as written, as every backend's step computes it


def init_value(
    expr, like: torch.Tensor, sizes: dict[str, int], params: dict[str, torch.Tensor], what: str
) -> torch.Tensor:
    """The value of an init expression for a parameter shaped like `like` (float64, then cast)."""
    opts = {"dtype": torch.float64, "device": like.device}

    def num(v) -> torch.Tensor:
        return torch.as_tensor(float(v), **opts)

    def walk(e) -> torch.Tensor:
        if isinstance(e, ast.Num):
            return num(e.text)
        if isinstance(e, ast.Neg):
            return -walk(e.operand)
        if isinstance(e, ast.BinOp):
            a, b = walk(e.left), walk(e.right)
            return {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "^": torch.pow}[e.op](
                a, b
            )
        if isinstance(e, ast.Var):
            if e.name in params:
                return params[e.name].detach().to(**opts)
            if e.name in sizes:
                return num(sizes[e.name])
            if e.name in CONSTANTS:
                return num(float(CONSTANTS[e.name]))
            raise ValueError(
                f"{what}: its init expression reads '{e.name}'; give its size, e.g. sizes={{'{e.name}': ...}}"
            )
        if isinstance(e, ast.Call):
            args = [walk(a) for a in e.args]
            if e.func == "uniform":
                lo, hi = (-args[0], args[0]) if len(args) == 1 else args
                return lo + (hi - lo) * torch.rand(like.shape, **opts)
            if e.func == "normal":
                mean, std = (num(0), args[0]) if len(args) == 1 else args
                return mean + std * torch.randn(like.shape, **opts)
            if e.func == "where":
                return torch.where(args[0] != 0, args[1], args[2])
            if e.func == "clip":
                return torch.clamp(args[0], args[1], args[2])
            if e.func in BINARY:
                return BINARY[e.func](*args)
            return UNARY[e.func](args[0])
        raise AssertionError(type(e))

    value = walk(expr)
    try:
        value = torch.broadcast_to(value, like.shape)
    except RuntimeError:
        raise ValueError(
            f"{what}: its init expression gives shape {tuple(value.shape)}, but the parameter is "
            f"{tuple(like.shape)}"
        ) from None
    if not torch.isfinite(value).all():
        raise ValueError(f"{what}: its init expression gives values that are not finite (log of 0 or less?)")
    if value.numel() and value.abs().max() > torch.finfo(like.dtype).max:
        raise ValueError(f"{what}: its init expression gives values too large for {like.dtype}")
    return value
