"""Polyphonic music modelling on the Bach chorales (Chung et al. 2014, section 4.1 / Table 2).

Each chorale is an 88-key piano roll on a quarter-note grid (`..pianoroll`). The model reads
frames 0..t-1 and outputs 88 independent sigmoid probabilities for frame t; frame 0 is predicted
from an all-zero input frame, so every frame of every chorale is scored exactly once:

    inputs  [T, N, 88] = [0, roll[0], ..., roll[T-2]]      targets [T, N, 88] = roll
    mask    [T, N]     = step < length of chorale n

`nll` is the negative log-likelihood per time step in nats: the binary cross-entropy summed over
the 88 keys, averaged over all frames of the set (the convention of Boulanger-Lewandowski et al.
2012, whose JSB Chorales numbers Chung et al. report).

Split rule (fixed, no randomness): chorale number r in Riemenschneider order (1..371) is in
`test` if r % 5 == 0, in `valid` if r % 5 == 1, else in `train`: 222 / 75 / 74 chorales.
The JSB Chorales data set used by Chung et al. has a different split (229 / 76 / 77 of 382
pieces) and was prepared from other files, so the numbers are close in kind but not comparable
digit for digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..pianoroll import KEYS, Chorale, load_chorales
from .base import Batch, Defaults, Sums, Task

EVAL_BATCH = 64


def split_of(number: int) -> str:
    """The split a chorale belongs to, from its Riemenschneider number (see module docstring)."""
    return {0: "test", 1: "valid"}.get(number % 5, "train")


def rolls_to_batch(rolls: list[np.ndarray]) -> Batch:
    """Next-frame prediction batch from rolls [T_i, 88] (shapes in the module docstring)."""
    T = max(len(r) for r in rolls)
    n = len(rolls)
    targets = torch.zeros(T, n, KEYS)
    mask = torch.zeros(T, n, dtype=torch.bool)
    for j, r in enumerate(rolls):
        targets[: len(r), j] = torch.from_numpy(r.astype(np.float32))
        mask[: len(r), j] = True
    inputs = torch.zeros_like(targets)
    inputs[1:] = targets[:-1]
    return Batch(inputs, targets, mask)


@dataclass
class ChoralesTask(Task):
    """Options: `max_train` (use only the first N training chorales; 0 = all, for quick tests)."""

    max_train: int = 0

    name: ClassVar[str] = "chorales"
    output: ClassVar[str] = "bernoulli"
    metric: ClassVar[str] = "nll"
    defaults: ClassVar[Defaults] = Defaults(hidden=36, steps=1000, batch=16, lr=1e-2, eval_every=100)
    reference: ClassVar[str] = (
        "Chung et al. 2014, Table 2, JSB Chorales, NLL per time step train/test: tanh 8.82/9.19, "
        "GRU 6.94/8.54, LSTM 8.15/8.67 (tanh 100 units, GRU 46, LSTM 36; about 20k parameters each; "
        "RMSProp with weight noise, best of 10 learning rates). Our split differs from theirs: chorales "
        "from the music21 corpus, split by Riemenschneider number (r % 5 == 0 test, == 1 valid, else "
        "train; 222/75/74), not the Boulanger-Lewandowski JSB files (229/76/77), so compare trends, "
        "not digits."
    )

    def __post_init__(self) -> None:
        self.input_size = KEYS
        self.output_size = KEYS
        self._splits: dict[str, list[Chorale]] | None = None

    def splits(self) -> dict[str, list[Chorale]]:
        if self._splits is None:
            splits: dict[str, list[Chorale]] = {"train": [], "valid": [], "test": []}
            for c in load_chorales():
                splits[split_of(c.number)].append(c)
            if self.max_train:
                splits["train"] = splits["train"][: self.max_train]
            self._splits = splits
        return self._splits

    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        train = self.splits()["train"]
        idx = torch.randint(0, len(train), (batch_size,), generator=gen).tolist()
        return rolls_to_batch([train[i].roll for i in idx])

    def eval_sets(self) -> dict[str, list[Batch]]:
        if not hasattr(self, "_eval"):
            sets = {}
            for name, chorales in self.splits().items():
                # sorted by length so that batches carry little padding
                rolls = sorted((c.roll for c in chorales), key=len)
                sets[name] = [
                    rolls_to_batch(rolls[i : i + EVAL_BATCH]) for i in range(0, len(rolls), EVAL_BATCH)
                ]
            self._eval = sets
        return self._eval

    def score(self, out: Tensor, batch: Batch) -> Sums:
        m = batch.mask
        nll = F.binary_cross_entropy_with_logits(out[m], batch.targets[m], reduction="sum")
        return {"nll": (float(nll), float(m.sum()))}

    @torch.no_grad()
    def pictures(self, model, out_dir: Path, device) -> list[Path]:
        from ..plots import pianoroll_prediction

        chorale = self.splits()["test"][0]
        b = rolls_to_batch([chorale.roll]).to(device)
        was_training = model.training
        model.eval()
        out, _ = model(b.inputs)
        model.train(was_training)
        probs = torch.sigmoid(out[:, 0]).cpu()
        path = Path(out_dir) / "chorale_prediction.png"
        return [pianoroll_prediction(b.targets[:, 0].cpu(), probs, chorale.name, path)]
