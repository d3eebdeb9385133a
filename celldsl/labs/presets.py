"""Named settings that reproduce a paper's set-up: `celldsl train copy --preset graves`.

A preset fills in every training setting the command line leaves out; anything given on the
command line wins (task options merge, the command line's winning per key). Each preset says
where its numbers come from and where it still differs from the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    task: str
    doc: str
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (and param_budget)


PRESETS: dict[str, Preset] = {
    "graves": Preset(
        task="copy",
        doc=(
            "The 3x256 LSTM of Graves et al. 2014 (NTM paper, Table 3) with the encoding, loss and "
            "optimizer of ajithcodesit/lstm_copy_task: 10-bit input with start and end markers, 0.001 for "
            "every 0, the answer one step after the end marker, BCE averaged over all 42 steps; RMSProp as "
            "TensorFlow 1 defines it, lr 3e-5, momentum 0.9; gradients clipped elementwise to [-10, 10] "
            "(no norm clipping); batch 100; 40 'epochs' of 1000 batches (4M sequences) as that project's "
            "budget. Differences: the cell file decides the equations (cells/lstm.cell is torch.nn.LSTM: "
            "two bias vectors, U(-1/16, 1/16) initial weights, no forget bias of 1, where TF's LSTMCell "
            "has one bias, Glorot-uniform weights and adds 1 to the forget gate); test set 1000 sequences "
            "(theirs 10,000)."
        ),
        settings=dict(
            hidden=256,
            layers=3,
            batch=100,
            lr=3e-5,
            optimizer="rmsprop-tf",
            clip=0.0,
            clip_value=10.0,
            steps=40_000,
            eval_every=500,
            task_options={"encoding": "lstm_copy_task", "test_size": 1000},
        ),
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def apply_preset(name: str | None, task: str, given: dict[str, Any]) -> dict[str, Any]:
    """Settings for `task`: `given` (None = not given), then the preset's, for what is still None.
    Raises ValueError for an unknown preset or one made for another task."""
    if name is None:
        return dict(given)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    preset = PRESETS[name]
    if preset.task != task:
        raise ValueError(f"preset {name!r} is for the {preset.task} task, not {task}")
    out = dict(given)
    for key, value in preset.settings.items():
        if key == "task_options":
            out[key] = {**value, **(given.get(key) or {})}
        elif out.get(key) is None:
            out[key] = value
    return out
