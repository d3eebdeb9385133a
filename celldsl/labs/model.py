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
    cell_path: str | Path, task, hidden: int, layers: int = 1, device=None
) -> SequenceModel:
    """Recurrent layer from the .cell file plus a Linear readout (and an embedding for token tasks),
    sized for `task` (a labs/tasks/base.Task: its input_size, output_size and tokens).

    Token tasks embed into `hidden` dimensions: cells such as Jozefowicz's MUT1/MUT2 add the
    input to H-wide values unweighted and so need input size == hidden size. For the same reason a
    real-valued task whose input is narrower than such a cell's hidden size gets a Linear(I, H)
    input projection (other cells read the input directly).
    """
    import celldsl

    embedding = projection = None
    input_size = task.input_size
    if task.tokens:
        embedding = nn.Embedding(task.input_size, hidden, device=device)
        input_size = hidden
    elif input_size != hidden and _needs_input_as_wide_as_hidden(cell_path):
        projection = nn.Linear(input_size, hidden, device=device)
        input_size = hidden
    rnn = celldsl.Recurrent(str(cell_path), input_size, hidden, num_layers=layers, device=device)
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
