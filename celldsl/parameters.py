"""How a layer stores a cell's parameters, and the flat list the op takes.

A cell file groups parameters (`param weight_ih = [W_ii, W_if, ...]` is one tensor, torch.nn's
layout, so torch state_dicts load as they are); each group or ungrouped parameter is a `Store`.
`member` views one parameter of a store; `op_params` assembles what celldsl::cell_sequence takes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .compiler import CompiledCell
from .ir import H as HIDDEN

BIAS_NAME = re.compile(r"^(b|bias)(_\w*|\d*)$")  # what bias=False leaves out (fixed at 0)


@dataclass(frozen=True)
class Store:
    """One stored tensor: parameters stacked by rows (matrices, vectors) or entries (scalars)."""

    name: str
    members: tuple[str, ...]
    kind: str  # matrix | vector | scalar
    operand_size: str | None  # matrices: "H" or an input's name

    @property
    def is_bias(self) -> bool:
        return bool(BIAS_NAME.match(self.name))

    def shape(self, input_size: int, hidden_size: int, extra_sizes: dict[str, int] | None = None
              ) -> tuple[int, ...]:
        """input_size: the first input's; extra_sizes: the other inputs' (by name)."""
        n = len(self.members)
        if self.kind == "matrix":
            extra = extra_sizes or {}
            cols = hidden_size if self.operand_size == HIDDEN else extra.get(self.operand_size, input_size)
            return (n * hidden_size, cols)
        if self.kind == "vector":
            return (n * hidden_size,)
        return () if n == 1 else (n,)


def stores_of(cell: CompiledCell) -> list[Store]:
    ir, stores, seen = cell.ir, [], set()
    for name, p in ir.params.items():
        if p.group is None:
            stores.append(Store(name, (name,), p.kind, p.operand_size))
        elif p.group not in seen:
            seen.add(p.group)
            members = tuple(ir.groups[p.group])
            stores.append(Store(p.group, members, p.kind, p.operand_size))
    return stores


def member(store: Store, name: str, tensor: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """The parameter `name` of a store as a view of its tensor: [H, K], [H] or []."""
    j = store.members.index(name)
    if store.kind == "scalar":
        return tensor if len(store.members) == 1 else tensor[j]
    return tensor[j * hidden_size : (j + 1) * hidden_size]


def op_params(cell: CompiledCell, tensors: dict[str, torch.Tensor], hidden_size: int) -> list[torch.Tensor]:
    """The op's flat parameter list (concatenated hoisted and step GEMM weights, vectors, scalars:
    TorchLoop's argument order) from the stored tensors by store name."""
    members = {m: (store, tensors[store.name]) for store in stores_of(cell) for m in store.members}

    def view(name):
        store, tensor = members[name]
        return member(store, name, tensor, hidden_size)

    def gemm_weight(gemm):
        store, tensor = members[gemm.params[0]]
        return tensor if store.members == gemm.params else torch.cat([view(p) for p in gemm.params])

    plan, params = cell.plan, cell.ir.params
    return (
        [gemm_weight(g) for g in plan.hoisted]
        + [gemm_weight(g) for g in plan.gemms]
        + [view(n) for n, p in params.items() if p.kind == "vector"]
        + [view(n) for n, p in params.items() if p.kind == "scalar"]
    )


@torch.no_grad()
def initialize(cell: CompiledCell, stored: list[tuple[Store, torch.Tensor]], hidden_size: int) -> None:
    """torch's U(-1/sqrt(H), 1/sqrt(H)) for every stored tensor (in the order given), then the cell
    file's `init` lines."""
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for _store, tensor in stored:
        tensor.uniform_(-bound, bound)
    for store, tensor in stored:
        for name in store.members:
            init = cell.ir.params[name].init
            if init is not None:
                _apply_init(member(store, name, tensor, hidden_size), init, bound)


def _apply_init(view: torch.Tensor, init, default_bound: float) -> None:
    if init.kind == "constant":
        view.fill_(init.number)
    elif init.kind == "call" and init.name == "uniform":
        view.uniform_(-init.number, init.number)
    elif init.kind == "call" and init.name == "normal":
        view.normal_(0.0, init.number)
    elif init.name == "zeros":
        view.zero_()
    elif init.name == "ones":
        view.fill_(1.0)
    elif init.name == "orthogonal":
        if view.dim() == 2:
            nn.init.orthogonal_(view)
        else:
            view.uniform_(-default_bound, default_bound)
    elif init.name == "default":
        view.uniform_(-default_bound, default_bound)
