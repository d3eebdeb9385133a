"""The op's parameter list as data a scripted layer can evaluate: a small stack program per layer and
direction.

Eager layers build celldsl::cell_sequence's flat parameter list with `parameters.op_params` (rows of
the stored tensors, combinations such as `(W - Wᵀ - gamma * eye)`, blocks stacked per head). A
scripted `Recurrent` or `Cell` cannot run that Python, and its source may not be generated from cell
text, so `program` records the same steps as integers (and the numbers of coefficients as floats)
over a list of the stored tensors, and `run_program` (compiled by TorchScript) replays them on every
call, so gradients reach the parameters as in eager mode. tests/test_deploy_jit.py checks that the
replay equals op_params for every zoo cell.
"""


import sympy as sp
import torch
from torch import Tensor

from ..lang.ir import EYE
from .parameters import stores_of

LOAD, ZEROS, ROWS, INDEX, TRANSPOSE, EYE_OP, CONST, ADD, MUL, POW, CAT, STACK = range(12)


def program(cell, stored: dict[str, int | None], shapes: dict[str, tuple[int, ...]],
            sizes: dict[str, int]) -> tuple[list[int], list[float]]:
    """The instructions that leave op_params' list on the stack, for one layer and direction.

    stored: store name -> its index in the layer's list of stored tensors (None: left out by
    bias=False, zeros of shapes[name] as in eager mode). Mirrors parameters.op_params step by step."""
    code: list[int] = []
    floats: list[float] = []
    members = {m: store for store in stores_of(cell) for m in store.members}
    products = {p.symbol: p for p in cell.ir.products.values()}

    def load(store) -> None:
        k = stored[store.name]
        if k is None:
            shape = list(shapes[store.name])
            code.extend([ZEROS, len(shape), *shape])
        else:
            code.extend([LOAD, k])

    def view(name: str) -> int:
        """Push parameter `name` (parameters.member); returns its number of dimensions."""
        store = members[name]
        load(store)
        j, n = store.members.index(name), len(store.members)
        if store.kind == "scalar":
            if n > 1:
                code.extend([INDEX, j])
            return 0
        if store.heads:
            if n > 1:
                code.extend([INDEX, j])
            return 3
        rows = sizes[store.rows]
        code.extend([ROWS, j * rows, (j + 1) * rows])
        return 2 if store.kind == "matrix" else 1

    def coefficient(expr: sp.Expr) -> None:
        if expr.is_Number:
            code.extend([CONST, len(floats)])
            floats.append(float(expr))
        elif isinstance(expr, sp.Symbol):
            view(expr.name)
        elif isinstance(expr, (sp.Add, sp.Mul, sp.Pow)):
            op = {sp.Add: ADD, sp.Mul: MUL, sp.Pow: POW}[type(expr)]
            coefficient(expr.args[0])
            for arg in expr.args[1:]:
                coefficient(arg)
                code.append(op)
        else:
            raise ValueError(f"a matrix coefficient must be built from numbers and scalar parameters, "
                             f"not {expr}")

    def weight(product) -> int:
        if product.terms is None:
            return view(product.param)
        for i, term in enumerate(product.terms):
            if term.matrix == EYE:
                code.extend([EYE_OP, sizes[product.cols]])
            else:
                view(term.matrix)
                if term.transposed:
                    code.append(TRANSPOSE)
            if term.coef != 1:
                coefficient(term.coef)
                code.append(MUL)
            if i:
                code.append(ADD)
        return 2

    def gemm_weight(gemm) -> None:
        store = members.get(gemm.params[0])
        if store is not None and store.members == gemm.params and not store.heads:
            load(store)
            return
        dims = [weight(products[sym]) for sym in gemm.products]
        code.extend([STACK if dims[0] == 3 else CAT, len(dims)])

    plan, params = cell.plan, cell.ir.params
    for gemm in (*plan.hoisted, *plan.gemms):
        gemm_weight(gemm)
    for kind in ("vector", "scalar"):
        for name, p in params.items():
            if p.kind == kind:
                view(name)
    return code, floats


def run_program(code: list[int], floats: list[float], stored: list[Tensor], like: Tensor) -> list[Tensor]:
    """Replay `program`'s instructions on the stored tensors; `like` (the input) gives the dtype and
    device of the zeros, identities and numbers it makes. TorchScript compiles this."""
    stack: list[Tensor] = []
    pc = 0
    while pc < len(code):
        op = code[pc]
        if op == 0:  # LOAD k
            stack.append(stored[code[pc + 1]])
            pc += 2
        elif op == 1:  # ZEROS ndim *shape
            n = code[pc + 1]
            stack.append(torch.zeros(code[pc + 2 : pc + 2 + n], dtype=like.dtype, device=like.device))
            pc += 2 + n
        elif op == 2:  # ROWS start stop
            t = stack.pop()
            stack.append(t[code[pc + 1] : code[pc + 2]])
            pc += 3
        elif op == 3:  # INDEX j
            t = stack.pop()
            stack.append(t[code[pc + 1]])
            pc += 2
        elif op == 4:  # TRANSPOSE
            t = stack.pop()
            stack.append(t.t())
            pc += 1
        elif op == 5:  # EYE n
            stack.append(torch.eye(code[pc + 1], dtype=like.dtype, device=like.device))
            pc += 2
        elif op == 6:  # CONST i: floats[i]
            stack.append(torch.full([], floats[code[pc + 1]], dtype=like.dtype, device=like.device))
            pc += 2
        elif op == 7 or op == 8 or op == 9:  # ADD, MUL, POW
            b = stack.pop()
            a = stack.pop()
            stack.append(a + b if op == 7 else a * b if op == 8 else torch.pow(a, b))
            pc += 1
        elif op == 10 or op == 11:  # CAT n, STACK n
            parts: list[Tensor] = []
            for _ in range(code[pc + 1]):
                parts.insert(0, stack.pop())
            stack.append(torch.cat(parts) if op == 10 else torch.stack(parts))
            pc += 2
        else:
            raise RuntimeError("celldsl: unknown instruction " + str(op) + " in a parameter program")
    return stack
