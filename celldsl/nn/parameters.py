"""How a layer stores a cell's parameters, and the flat list the op takes.

A cell file groups parameters (`param weight_ih = [W_ii, W_if, ...]` is one tensor, torch.nn's
layout, so torch state_dicts load as they are); each group or ungrouped parameter is a `Store`.
`member` views one parameter of a store; `op_params` assembles what celldsl::cell_sequence takes.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass

import sympy as sp
import torch
from torch import nn

from ..compiler import CompiledCell
from ..lang.errors import CellTensorError
from ..lang.ir import EYE
from .inits import init_value

BIAS_NAME = re.compile(r"^(b|bias)(_\w*|\d*)$")  # what bias=False leaves out (fixed at 0)


@dataclass(frozen=True)
class Store:
    """One stored tensor: parameters stacked by rows (matrices, vectors) or entries (scalars)."""

    name: str
    members: tuple[str, ...]
    kind: str  # matrix | vector | scalar
    operand_size: str | None  # matrices: the width of what they read (their columns)
    rows: str | None = None  # matrices: their rows' width; vectors: their width
    heads: int | None = None  # `heads(n)`: a block-diagonal matrix, stored as [n, d, d]

    @property
    def is_bias(self) -> bool:
        return bool(BIAS_NAME.match(self.name))

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The stored shape, with `sizes` the size of every width (CompiledCell.sizes)."""
        n = len(self.members)
        if self.kind == "matrix" and self.heads:
            block = (self.heads, sizes[self.rows] // self.heads, sizes[self.operand_size] // self.heads)
            return block if n == 1 else (n, *block)
        if self.kind == "matrix":
            return (n * sizes[self.rows], sizes[self.operand_size])
        if self.kind == "vector":
            return (n * sizes[self.rows],)
        return () if n == 1 else (n,)


def stores_of(cell: CompiledCell) -> tuple[Store, ...]:
    """The cell's stores in the order of its parameters; computed once per compiled cell (a layer asks
    at every call). Under torch.compile/export they are computed, not looked up: dynamo would guard
    on the weak dictionary's keys, and one collected before the guards are built fails the trace."""
    if torch.compiler.is_compiling():
        return tuple(_stores(cell))
    stores = _STORES.get(cell)
    if stores is None:
        stores = _STORES[cell] = tuple(_stores(cell))
    return stores


_STORES: weakref.WeakKeyDictionary[CompiledCell, tuple[Store, ...]] = weakref.WeakKeyDictionary()


def _stores(cell: CompiledCell) -> list[Store]:
    ir, stores, seen = cell.ir, [], set()
    for name, p in ir.params.items():
        if p.group is None:
            stores.append(Store(name, (name,), p.kind, p.operand_size, p.rows, p.heads))
        elif p.group not in seen:
            seen.add(p.group)
            members = tuple(ir.groups[p.group])
            stores.append(Store(p.group, members, p.kind, p.operand_size, p.rows, p.heads))
    return stores


def member(store: Store, name: str, tensor: torch.Tensor, sizes: dict[str, int]) -> torch.Tensor:
    """The parameter `name` of a store as a view of its tensor: [rows, K], [NH, d, d] (heads), [width]
    or []."""
    j = store.members.index(name)
    if store.kind == "scalar":
        return tensor if len(store.members) == 1 else tensor[j]
    if store.heads:
        return tensor if len(store.members) == 1 else tensor[j]
    n = sizes[store.rows]
    return tensor[j * n : (j + 1) * n]


def checked_shape(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor
                  ) -> torch.Tensor:
    """A layer's stored tensor `name` as the op takes it: zeros of `shape` (like `like`) for one the
    layer leaves out (bias=False), else the tensor, which must have `shape`. A parameter assigned
    directly (`layer.bias_hh_l0 = nn.Parameter(...)`, `.data = ...`) skips load_state_dict's size
    check; without this the kernels would read the wrong rows of it."""
    if tensor is None:
        return like.new_zeros(shape)
    if tuple(tensor.shape) != shape:
        raise CellTensorError(f"size mismatch for {name}: the layer needs shape {torch.Size(shape)}, the "
                              f"parameter has shape {tensor.shape}")
    return tensor


def op_params(
    cell: CompiledCell, tensors: dict[str, torch.Tensor], sizes: dict[str, int], like: torch.Tensor,
    into: dict[int, torch.Tensor] | None = None, blocks: dict[int, list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """The op's flat parameter list (concatenated hoisted and step GEMM weights, vectors, scalars:
    TorchLoop's argument order) from the stored tensors by store name. A combination of matrices
    (`(W - Wᵀ - gamma * eye) @ h`) is built here from its parts, so autograd takes the weight's
    gradient through it; blocks with heads stack to [G, NH, d, d] (targets/gemm.py). `like` (the
    input) gives the identity's dtype and device: a cell may have no stored tensor at all. into:
    {index in the list: tensor} for GEMM weights made of blocks, written block by block into that
    tensor (a streaming step's copy, made again at every call: nn/cells._Step._refresh) rather than
    concatenated into a new one. blocks: a dict that receives, by index, the blocks of each GEMM
    weight made of blocks (views of the stored tensors, or combinations), in order."""
    members = {m: (store, tensors[store.name]) for store in stores_of(cell) for m in store.members}
    products = {p.symbol: p for p in cell.ir.products.values()}

    def view(name):
        store, tensor = members[name]
        return member(store, name, tensor, sizes)

    scalars = {n: view(n) for n, p in cell.ir.params.items() if p.kind == "scalar"}

    def weight(product) -> torch.Tensor:
        if product.terms is None:
            return view(product.param)
        total = None
        for term in product.terms:
            if term.matrix == EYE:
                part = torch.eye(sizes[product.cols], dtype=like.dtype, device=like.device)
            else:
                part = view(term.matrix).t() if term.transposed else view(term.matrix)
            part = part * coefficient(term.coef, scalars) if term.coef != 1 else part
            total = part if total is None else total + part
        return total

    def gemm_weight(gemm, index):
        store, tensor = members.get(gemm.params[0], (None, None))
        if store is not None and store.members == gemm.params and not store.heads:
            return tensor
        made = [weight(products[sym]) for sym in gemm.products]
        if blocks is not None:
            blocks[index] = made
        out = into.get(index)
        if out is None:
            return torch.stack(made) if made[0].dim() == 3 else torch.cat(made)
        parts = out.unbind(0) if made[0].dim() == 3 else out.split([b.shape[0] for b in made])
        for part, block in zip(parts, made, strict=True):
            part.copy_(block)
        return out

    plan, params, into = cell.plan, cell.ir.params, into or {}
    nh = len(plan.hoisted)
    return (
        [gemm_weight(g, i) for i, g in enumerate(plan.hoisted)]
        + [gemm_weight(g, nh + i) for i, g in enumerate(plan.gemms)]
        + [view(n) for n, p in params.items() if p.kind == "vector"]
        + [view(n) for n, p in params.items() if p.kind == "scalar"]
    )


def refresh_copies(cell: CompiledCell, stored: dict[str, torch.Tensor], sizes: dict[str, int],
                   like: torch.Tensor, held: list[torch.Tensor], copies: list[int]) -> None:
    """The op parameters `copies` of a prepared call (no views of the stored tensors: blocks of several
    parameters, a combination such as W - Wᵀ) made again from the stored tensors as they are now,
    into the tensors the call reads (`held`: its op parameter list)."""
    fresh = op_params(cell, stored, sizes, like=like, into={i: held[i] for i in copies})
    for i in copies:
        if fresh[i] is not held[i]:
            held[i].copy_(fresh[i])


def coefficient(expr: sp.Expr, scalars: dict[str, torch.Tensor]):
    """A combination's coefficient (numbers and scalar parameters: ir.MatrixTerm.coef) as a tensor or
    a number, differentiable in the scalar parameters."""
    if expr.is_Number:
        return float(expr)
    if isinstance(expr, sp.Symbol):
        return scalars[expr.name]
    args = [coefficient(a, scalars) for a in expr.args]
    if isinstance(expr, sp.Add):
        return sum(args[1:], args[0])
    if isinstance(expr, sp.Mul):
        result = args[0]
        for a in args[1:]:
            result = result * a
        return result
    if isinstance(expr, sp.Pow):
        return args[0] ** args[1]
    raise ValueError(f"a matrix coefficient must be built from numbers and scalar parameters, not {expr}")


@torch.no_grad()
def initialize(cell: CompiledCell, stored: list[tuple[Store, torch.Tensor]], sizes: dict[str, int]) -> None:
    """torch's U(-1/sqrt(H), 1/sqrt(H)) for every stored tensor (in the order given), then the cell
    file's `init` lines."""
    hidden_size = sizes["H"]
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for _store, tensor in stored:
        tensor.uniform_(-bound, bound)
    sizes = {"I": sizes[cell.ir.inputs[0]], **sizes}  # init expressions name the input's size I
    positions, seen = [[]], set()  # every layer and direction: one list of stores each
    for store, tensor in stored:
        if store.name in seen:
            positions.append([])
            seen = set()
        seen.add(store.name)
        positions[-1].append((store, tensor))
    for position in positions:
        views = {name: member(store, name, tensor, sizes)
                 for store, tensor in position for name in store.members}
        computed = []
        for store, _tensor in position:
            for name in store.members:
                init = cell.ir.params[name].init
                if init is not None and init.kind == "expr":
                    computed.append(name)
                elif init is not None:
                    _apply_init(views[name], init, bound)
        # init expressions in text order: each reads the parameters earlier lines set
        def place(name):
            loc = cell.ir.params[name].init.loc
            return loc.line, loc.column

        for name in sorted(computed, key=place):
            view = views[name]
            view.copy_(init_value(cell.ir.params[name].init.expr, view, sizes, views, f"parameter {name!r}"))


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
