"""The adding problem in its original form: Hochreiter & Schmidhuber 1997, experiment 4 (section 5.4).

Each step is a pair (value, marker): value ~ U[-1, 1], marker in {1.0, 0.0, -1.0}. Lengths are
uniform integers in [T, T + T/10]. Exactly two pairs are marked with 1.0: one of the first 10
(its value is X1) and one of the first T/2 - 1 pairs that are still unmarked (X2). The first and
last pairs carry marker -1 unless marked. The target, given only at the end, is
0.5 + (X1 + X2) / 4, and a sequence counts as solved when |error| < 0.04.

"In the rare case where the first pair of the sequence gets marked, we set X1 to zero": we keep
its marker at 1.0 and set its value to 0 (whichever mark lands there), so the target is always
0.5 + (sum of the marked values) / 4. (Many later papers use a simplified version: values in
[0, 1], no -1 markers, target X1 + X2. That is not this task.)

Shapes: inputs [T_max, N, 2], targets [T_max, N, 1], mask [T_max, N] with one True per column
(the sequence's last step). Padding after a shorter sequence's end is never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from .base import Batch, Defaults, Sums, Task, split_batches

TEST_SEED = 19970001
SOLVED = 0.04


@dataclass
class AddingTask(Task):
    """Options: `T` (minimal length: 100, 500 or 1000 in the paper), `test_size` (2560 in the paper)."""

    T: int = 100
    test_size: int = 2560

    name: ClassVar[str] = "adding"
    output: ClassVar[str] = "gaussian"
    metric: ClassVar[str] = "solved"
    also_report: ClassVar[tuple[str, ...]] = ("mse",)
    higher_is_better: ClassVar[bool] = True
    defaults: ClassVar[Defaults] = Defaults(hidden=32, steps=1500, batch=32, lr=1e-2, eval_every=100)
    reference: ClassVar[str] = (
        "Hochreiter & Schmidhuber 1997 (LSTM, 2 blocks of 2 cells, online learning) solve T=100 after "
        "74k training sequences, T=500 after 209k and T=1000 after 853k, with at most 3 errors on 2560 "
        "test sequences. 'solved' is the fraction of test sequences with |error| < 0.04."
    )

    def __post_init__(self) -> None:
        if self.T < 20:
            raise ValueError(
                f"adding: T must be at least 20 (got {self.T}): X2 is drawn from the first T/2-1 pairs"
            )
        self.input_size = 2
        self.output_size = 1

    def sequence(self, gen: torch.Generator) -> tuple[Tensor, float]:
        """One sequence [L, 2] and its target."""
        L = self.T + int(torch.randint(0, self.T // 10 + 1, (1,), generator=gen))
        x = torch.zeros(L, 2)
        x[:, 0] = torch.rand(L, generator=gen) * 2 - 1
        x[0, 1] = -1.0
        x[L - 1, 1] = -1.0
        first = int(torch.randint(0, 10, (1,), generator=gen))
        # the second mark: one of the first T/2 - 1 pairs that are still unmarked
        k = int(torch.randint(0, self.T // 2 - 1, (1,), generator=gen))
        second = k if k < first else k + 1
        if 0 in (first, second):
            x[0, 0] = 0.0  # "we set X1 to zero" when the first pair is marked
        x[first, 1] = 1.0
        x[second, 1] = 1.0
        target = 0.5 + (x[first, 0].item() + x[second, 0].item()) / 4.0
        return x, target

    def batch_of(self, gen: torch.Generator, n: int) -> Batch:
        seqs = [self.sequence(gen) for _ in range(n)]
        T = max(s.shape[0] for s, _ in seqs)
        inputs = torch.zeros(T, n, 2)
        targets = torch.zeros(T, n, 1)
        mask = torch.zeros(T, n, dtype=torch.bool)
        for j, (s, t) in enumerate(seqs):
            L = s.shape[0]
            inputs[:L, j] = s
            targets[L - 1, j, 0] = t
            mask[L - 1, j] = True
        return Batch(inputs, targets, mask)

    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        return self.batch_of(gen, batch_size)

    def eval_sets(self) -> dict[str, list[Batch]]:
        if not hasattr(self, "_eval"):
            sets = {}
            for k, name in enumerate(("train", "test")):
                gen = torch.Generator().manual_seed(TEST_SEED + k)
                n = self.test_size if name == "test" else min(self.test_size, 512)
                sets[name] = split_batches(lambda m, g=gen: self.batch_of(g, m), n, 512)
            self._eval = sets
        return self._eval

    def score(self, out: Tensor, batch: Batch) -> Sums:
        err = (out[batch.mask] - batch.targets[batch.mask]).squeeze(-1)
        n = float(err.numel())
        return {
            "mse": (float((err**2).sum()), n),
            "solved": (float((err.abs() < SOLVED).sum()), n),
        }

    @torch.no_grad()
    def pictures(self, model, out_dir: Path, device) -> list[Path]:
        from ..plots import adding_scatter

        was_training = model.training
        model.eval()
        preds, targets = [], []
        for b in self.eval_sets()["test"]:
            b = b.to(device)
            out, _ = model(b.inputs)
            preds.append(out[b.mask].squeeze(-1).cpu())
            targets.append(b.targets[b.mask].squeeze(-1).cpu())
        model.train(was_training)
        return [
            adding_scatter(torch.cat(targets), torch.cat(preds), SOLVED, Path(out_dir) / "adding_scatter.png")
        ]
