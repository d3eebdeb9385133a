"""What every lab task provides: batches, a loss, metrics, defaults and pictures.

A task is a sequence-to-sequence problem in time-major layout, the layout `celldsl.Recurrent`
(like torch.nn.LSTM) uses by default:

    inputs   [T, N, I] float     (or [T, N] int64 token ids when `tokens` is True)
    targets  [T, N, O] float     (bernoulli / gaussian outputs) or [T, N] int64 (categorical)
    mask     [T, N] bool         which (step, sequence) pairs are scored

The model emits one output vector per step ([T, N, O]: logits or a real value); the mask says
which of them the loss and the metrics read. Padding lives only where the mask is False and
after each sequence's last real step, so a causal model never sees it before it matters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Batch:
    """One batch of sequences (shapes in the module docstring)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))

    @property
    def size(self) -> int:
        return self.mask.shape[1]


@dataclass(frozen=True)
class Defaults:
    """Training settings small enough for a few minutes on 2 CPU cores."""

    hidden: int = 32
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-2
    eval_every: int = 100


Sums = dict[str, tuple[float, float]]
"""Metric name -> (sum, weight); the metric is sum/weight after adding over batches."""


class Task:
    """Base class. Subclasses are dataclasses whose fields are the task's options (`-o KEY=VALUE`).

    Subclasses set the class attributes and implement `train_batch`, `eval_sets` and `score`.
    """

    name: ClassVar[str]
    output: ClassVar[str]  # "bernoulli" (sigmoid + BCE), "gaussian" (linear + MSE), "categorical"
    tokens: ClassVar[bool] = False  # inputs are token ids: the model puts an embedding in front
    metric: ClassVar[str]  # the headline metric, reported in tables
    also_report: ClassVar[tuple[str, ...]] = ()  # further test metrics that comparison tables show
    higher_is_better: ClassVar[bool] = False
    defaults: ClassVar[Defaults] = Defaults()
    reference: ClassVar[str] = ""  # what the papers report, printed next to comparison tables

    input_size: int
    output_size: int

    # -- data -------------------------------------------------------------------------------
    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        """A fresh training batch drawn with `gen` (the only source of randomness)."""
        raise NotImplementedError

    def eval_sets(self) -> dict[str, list[Batch]]:
        """Fixed evaluation data, e.g. {"train": [...], "test": [...]}. Same for every run and
        seed, so that cells are compared on identical sequences."""
        raise NotImplementedError

    # -- objective and metrics --------------------------------------------------------------
    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        """The training objective: mean over scored steps (summed over output units)."""
        m = batch.mask
        if self.output == "bernoulli":
            per_unit = F.binary_cross_entropy_with_logits(out[m], batch.targets[m], reduction="none")
            return per_unit.sum(-1).mean()
        if self.output == "gaussian":
            return F.mse_loss(out[m], batch.targets[m])
        if self.output == "categorical":
            return F.cross_entropy(out[m], batch.targets[m])
        raise ValueError(f"unknown output kind {self.output!r}")

    def score(self, out: Tensor, batch: Batch) -> Sums:
        """Metric sums for one batch (see `Sums`)."""
        raise NotImplementedError

    def corpus_scores(self, model: torch.nn.Module, batches: list[Batch], device) -> dict[str, float]:
        """Metrics of a whole evaluation set that do not add up over batches (e.g. corpus BLEU);
        reported next to `score`'s at every evaluation."""
        return {}

    # -- the model ----------------------------------------------------------------------------
    def build_model(
        self, cell: str, hidden: int, layers: int = 1, device=None, width=None, sizes=None
    ) -> torch.nn.Module:
        """The network trained on this task: by default `model.build_model` ([embedding] ->
        celldsl.Recurrent -> linear readout; `width` and `sizes` as there); a task with another
        architecture overrides this."""
        from ..model import build_model

        return build_model(cell, self, hidden, layers, device=device, width=width, sizes=sizes)

    # -- end-of-run reports -----------------------------------------------------------------
    def extras(self, model: torch.nn.Module, device: torch.device | str) -> dict[str, float]:
        """Extra numbers measured once at the end of a run (e.g. copy at unseen lengths)."""
        return {}

    def pictures(self, model: torch.nn.Module, out_dir: Path, device: torch.device | str) -> list[Path]:
        """Task-specific figures written into `out_dir`; returns their paths."""
        return []

    def history_pictures(self, history: list[dict], out_dir: Path) -> list[Path]:
        """Task-specific figures of the learning history (one row per evaluation); returns their paths."""
        return []

    # -- options ----------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


def add_sums(total: Sums, part: Sums) -> Sums:
    for k, (s, w) in part.items():
        s0, w0 = total.get(k, (0.0, 0.0))
        total[k] = (s0 + s, w0 + w)
    return total


def finish(total: Sums) -> dict[str, float]:
    return {k: (s / w if w else math.nan) for k, (s, w) in total.items()}


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, batches: Iterable[Batch], device) -> dict[str, float]:
    """Average `task.score` over `batches` (each metric weighted as the task says)."""
    was_training = model.training
    model.eval()
    total: Sums = {}
    try:
        for b in batches:
            b = b.to(device)
            out, _ = model(b.inputs)
            sums = task.score(out, b)
            sums["loss"] = (float(task.loss(out, b)) * float(b.mask.sum()), float(b.mask.sum()))
            add_sums(total, sums)
    finally:
        model.train(was_training)
    return finish(total)


def pad_time(seqs: list[Tensor], length: int | None = None, value: float = 0.0) -> Tensor:
    """Stack variable-length [T_i, ...] tensors into [T, N, ...], padding at the end with `value`."""
    length = length or max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((length, len(seqs), *seqs[0].shape[1:]), value)
    for n, s in enumerate(seqs):
        out[: s.shape[0], n] = s
    return out


def split_batches(batch_fn, n: int, batch_size: int) -> list[Batch]:
    """`n` sequences as a list of batches of at most `batch_size` (batch_fn(k) makes k)."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return [batch_fn(k) for k in sizes]
