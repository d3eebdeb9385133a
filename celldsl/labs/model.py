"""The network the labs train: [embedding or input projection] -> celldsl.Recurrent -> linear
readout at every step.

One place builds it (`build_model`), so swapping the recurrent layer is a one-line change, and
the parameter budget of Chung et al. (about 20k parameters per model, counted over the whole
network) is matched by `hidden_for_budget`.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn


class SequenceModel(nn.Module):
    """inputs [T, N, I] (or [T, N] token ids) -> (outputs [T, N, O], final recurrent state).

    Outputs are logits for bernoulli/categorical tasks and values for gaussian ones; the task's
    loss applies the sigmoid / softmax.
    """

    def __init__(
        self,
        rnn: nn.Module,
        readout: nn.Linear,
        embedding: nn.Embedding | None = None,
        projection: nn.Linear | None = None,
    ):
        super().__init__()
        self.embedding = embedding
        self.projection = projection
        self.rnn = rnn
        self.readout = readout

    def forward(self, inputs: Tensor, state=None):
        x = self.embedding(inputs) if self.embedding is not None else inputs
        if self.projection is not None:
            x = self.projection(x)
        h, state = self.rnn(x, state)
        return self.readout(h), state


def build_model(
    cell_path: str | Path,
    task,
    hidden: int,
    layers: int = 1,
    device=None,
    width: int | None = None,
    sizes: dict[str, int] | None = None,
) -> SequenceModel:
    """Recurrent layer from the .cell file plus a Linear readout (and an embedding for token tasks),
    sized for `task` (a labs/tasks/base.Task: its input_size, output_size and tokens).

    `width` (default `hidden`) is the model width: the embedding's size, or with a real-valued input
    a Linear(I, width) projection's; `sizes` are the cell's own sizes (a matrix cell's "heads", K,
    V, ...), given to celldsl.Recurrent. Both let cells with different states share one model width.

    Token tasks embed into `hidden` dimensions: cells such as Jozefowicz's MUT1/MUT2 add the
    input to H-wide values unweighted and so need input size == hidden size. For the same reason a
    real-valued task whose input is narrower than such a cell's hidden size gets a Linear(I, H)
    input projection (other cells read the input directly).
    """
    import celldsl

    embedding = projection = None
    input_size = task.input_size
    model_width = width or hidden
    if task.tokens:
        embedding = nn.Embedding(task.input_size, model_width, device=device)
        input_size = model_width
    elif width is not None or (input_size != hidden and _needs_input_as_wide_as_hidden(cell_path)):
        projection = nn.Linear(input_size, model_width, device=device)
        input_size = model_width
    given = {"sizes": dict(sizes)} if sizes else {}
    rnn = celldsl.Recurrent(str(cell_path), input_size, hidden, num_layers=layers, device=device, **given)
    readout = nn.Linear(hidden, task.output_size, device=device)
    return SequenceModel(rnn, readout, embedding, projection)


def _needs_input_as_wide_as_hidden(cell_path) -> bool:
    import celldsl

    cell = celldsl.compile_cell(str(cell_path))
    return cell.ir.inputs[0] in cell.ir.needs_hidden_size


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hidden_for_budget(cell_path: str | Path, task, budget: int, layers: int = 1) -> int:
    """The largest hidden size whose whole model has at most `budget` parameters (binary search;
    the count grows with the hidden size). Raises ValueError if even hidden=1 is over budget."""

    def size(h: int) -> int:
        try:  # no memory, no initialisation work
            return count_parameters(task.build_model(str(cell_path), h, layers, device="meta"))
        except (NotImplementedError, RuntimeError):  # an initialiser that cannot run on "meta"
            return count_parameters(task.build_model(str(cell_path), h, layers))

    if size(1) > budget:
        raise ValueError(f"{cell_path}: even hidden size 1 has {size(1)} parameters, more than {budget}")
    lo, hi = 1, 2
    while size(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # size(lo) <= budget < size(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    return lo


def state_per_layer(
    cell_path: str | Path, input_size: int, hidden: int, sizes: dict[str, int] | None = None
) -> int:
    """Numbers in one layer's recurrent state for one sequence: every state the cell carries (an
    LSTM's h and c, an mLSTM's C, n and m), counted from the cell's declared shapes with the sizes
    celldsl.Recurrent(cell, input_size, hidden, sizes=sizes) would use."""
    import math

    import celldsl
    from celldsl.nn.matrix import matrix_sizes

    compiled = celldsl.compile_cell(str(cell_path))
    ir = compiled.ir
    if getattr(compiled, "plan", None) is None:  # a matrix-memory cell: [heads, rows, cols] per state
        full = matrix_sizes(ir, hidden, sizes)
        return sum(math.prod(ir.state_shape(name, full)) for name in ir.states)
    full = compiled.sizes(input_size, hidden, None, sizes)
    return sum(full[ir.widths.get(name, "H")] for name in ir.states)


def sizes_for_state(
    cell_path: str | Path, state: int, width: int, sizes: dict[str, int] | None = None
) -> tuple[int, dict[str, int], int]:
    """(hidden, sizes, state numbers) that give the cell about `state` numbers of recurrent state per
    layer in a model `width` wide: the closest such count (the smaller on a tie).

    A vector cell (LSTM) varies its hidden size (its output is hidden wide; the embedding stays
    `width`). A matrix cell keeps its output `width` wide (heads x the output's width = width) and
    varies the other widths its states have (K), all equal, unless `sizes` fixes them; "heads"
    comes from `sizes` (default 1). Sizes a cell does not declare are not given to it. ValueError
    when no choice fits (e.g. heads does not divide width)."""
    import celldsl

    compiled = celldsl.compile_cell(str(cell_path))
    given = dict(sizes or {})
    if getattr(compiled, "plan", None) is not None:  # a vector cell: hidden is what varies
        mine = {k: v for k, v in given.items() if k in _vector_size_names(compiled)}
        count = lambda h: state_per_layer(cell_path, width, h, mine)  # noqa: E731
        hidden = _closest(count, state)
        return hidden, mine, count(hidden)
    ir = compiled.ir
    mine = {k: v for k, v in given.items() if k in {"heads", *ir.widths, *ir.init_sizes}}
    heads = mine.setdefault("heads", 1)
    out = ir.nodes[ir.output_node].kind
    out_width = next((w for w in (out.rows, out.cols) if w != "1"), None)
    if out_width is not None and out_width not in mine:
        if width % heads:
            raise ValueError(f"{cell_path}: heads={heads} does not divide the model width {width}")
        mine[out_width] = width // heads
    in_states = {w for s in ir.states for w in (ir.kinds[s].rows, ir.kinds[s].cols) if w in ir.widths}
    free = sorted(in_states - set(mine))
    if not free:
        return width, mine, state_per_layer(cell_path, width, width, mine)
    count = lambda k: state_per_layer(cell_path, width, width, {**mine, **dict.fromkeys(free, k)})  # noqa: E731
    k = _closest(count, state)
    return width, {**mine, **dict.fromkeys(free, k)}, count(k)


def _vector_size_names(compiled) -> set[str]:
    """The sizes a vector cell's layer takes (nn/arguments.declared_width_sizes)."""
    ir = compiled.ir
    return {*ir.widths.values(), *getattr(ir, "init_sizes", ())} - {"H", "row", *ir.inputs}


def _closest(count, target: int) -> int:
    """The n >= 1 whose count(n) (growing with n) is closest to target, the smaller on a tie."""
    lo, hi = 1, 2
    if count(lo) >= target:
        return lo
    while count(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # count(lo) < target <= count(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return lo if target - count(lo) <= count(hi) - target else hi
