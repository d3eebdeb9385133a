"""The decoder's one-step cell: the only place the translate lab touches the step API.

STEP API: the interface is exactly that of `celldsl.Cell` (issue 8):
    Cell(cell, input_size, hidden_size, input_sizes={"ctx": C}, device=...)
    forward(input [N, I], state=None, ctx=[N, C]) -> (output [N, H], new_state)
with the state a tensor for a one-state cell, else a tuple in the cell's state order. Until
celldsl.Cell is on this branch, `step_cell` runs a `celldsl.Recurrent` on a length-1 sequence;
when it lands, the body of `step_cell` becomes `return celldsl.Cell(...)` (one line).
"""

from __future__ import annotations

from torch import Tensor, nn


def step_cell(cell, input_size: int, hidden_size: int, input_sizes: dict[str, int], device=None) -> nn.Module:
    """One step of `cell` with the celldsl.Cell interface (see module docstring)."""
    # STEP API: when celldsl.Cell lands, this line becomes
    # return celldsl.Cell(cell, input_size, hidden_size, input_sizes=input_sizes, device=device)
    return RecurrentAsCell(cell, input_size, hidden_size, input_sizes, device)


class RecurrentAsCell(nn.Module):
    """celldsl.Cell's interface on a celldsl.Recurrent run over one time step."""

    def __init__(self, cell, input_size: int, hidden_size: int, input_sizes: dict[str, int], device=None):
        super().__init__()
        import celldsl

        self.layer = celldsl.Recurrent(cell, input_size, hidden_size, input_sizes=input_sizes, device=device)
        self.cell = self.layer.cell  # the compiled cell: states, inputs
        self.hidden_size = hidden_size

    def forward(self, input: Tensor, state=None, **extra: Tensor):
        one = isinstance(state, Tensor)
        seq_state = None
        if state is not None:
            seq_state = state.unsqueeze(0) if one else tuple(s.unsqueeze(0) for s in state)
        extra = {k: v.unsqueeze(0) for k, v in extra.items()}
        out, final = self.layer(input.unsqueeze(0), seq_state, **extra)
        final = final.squeeze(0) if isinstance(final, Tensor) else tuple(s.squeeze(0) for s in final)
        return out.squeeze(0), final


def reorder_state(state, index: Tensor):
    """Rows `index` of a step state (a tensor or a tuple of tensors [N, H]): beam search's reordering."""
    if isinstance(state, Tensor):
        return state.index_select(0, index)
    return tuple(s.index_select(0, index) for s in state)
