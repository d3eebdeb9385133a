"""The copy task of Graves, Wayne & Danihelka 2014 (NTM paper, section 4.1).

The network sees a sequence of L random 8-bit vectors, then a delimiter flag on its own
channel, then nothing; after the delimiter it must emit the L vectors again, in order.
Training lengths are uniform in 1..20 as in the paper. The interesting part is generalisation:
the ajithcodesit/lstm_copy_task project (and the NTM paper, Fig. 5) show that an LSTM copies
lengths it was trained on but fails at 40 and 120; `pictures` draws the same four panels.

Layout of one sequence of length L (T = 2L + 1 steps, channels 0..7 data, 8 delimiter):

    step        0 .. L-1        L            L+1 .. 2L
    input       pattern         delimiter    zeros
    target      (not scored)    (not scored) pattern

Outputs are sigmoid units trained with binary cross-entropy. Reported:
- `bce_per_bit`: mean BCE (nats) over the scored target bits;
- `bits_per_seq`: the BCE of a whole sequence's target, in bits (the NTM paper's
  "cost per sequence (bits)", Fig. 3);
- `bit_errors_per_seq`: target bits wrong after thresholding the output at 0.5.

Differences from lstm_copy_task: that project uses 0.001 instead of 0, a start marker, one step
of delay, and averages BCE over all 42 steps including padding, so its loss (~0.008) is not
comparable to `bce_per_bit` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, Defaults, Sums, Task, evaluate, split_batches

PICTURE_LENGTHS = (10, 20, 40, 120)
TEST_SEED = 20141020  # fixed: every run is tested on the same sequences


@dataclass
class CopyTask(Task):
    """Options: `bits` (vector width), `min_len`/`max_len` (training lengths, inclusive),
    `test_size` (number of test sequences)."""

    bits: int = 8
    min_len: int = 1
    max_len: int = 20
    test_size: int = 512

    name: ClassVar[str] = "copy"
    output: ClassVar[str] = "bernoulli"
    metric: ClassVar[str] = "bits_per_seq"
    also_report: ClassVar[tuple[str, ...]] = ("bce_per_bit", "bit_errors_per_seq")
    defaults: ClassVar[Defaults] = Defaults(hidden=64, steps=2000, batch=64, lr=1e-2, eval_every=250)
    reference: ClassVar[str] = (
        "Graves et al. 2014 (Fig. 3) train a 3x256 LSTM (1,352,969 parameters) with RMSProp (lr 3e-5, "
        "elementwise gradient clipping) for up to 1M sequences; digitised from that plot (approximate), "
        "the LSTM is at about 4.8 bits/sequence after 100k sequences and about 0.5 after 600k. "
        "At lengths 30 to 120 (Fig. 5) it fails to generalise. The runs here are far smaller (see Settings)."
    )

    def __post_init__(self) -> None:
        self.input_size = self.bits + 1
        self.output_size = self.bits

    def make_batch(self, gen: torch.Generator, lengths: Tensor) -> Batch:
        """Sequences with the given lengths ([N] int64), padded to T = 2*max(L)+1."""
        n = lengths.numel()
        T = 2 * int(lengths.max()) + 1
        patterns = torch.randint(0, 2, (int(lengths.max()), n, self.bits), generator=gen).float()
        inputs = torch.zeros(T, n, self.input_size)
        targets = torch.zeros(T, n, self.bits)
        mask = torch.zeros(T, n, dtype=torch.bool)
        for j, L in enumerate(lengths.tolist()):
            inputs[:L, j, : self.bits] = patterns[:L, j]
            inputs[L, j, self.bits] = 1.0
            targets[L + 1 : 2 * L + 1, j] = patterns[:L, j]
            mask[L + 1 : 2 * L + 1, j] = True
        return Batch(inputs, targets, mask)

    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        lengths = torch.randint(self.min_len, self.max_len + 1, (batch_size,), generator=gen)
        return self.make_batch(gen, lengths)

    def eval_sets(self) -> dict[str, list[Batch]]:
        if not hasattr(self, "_eval"):
            sets = {}
            for k, name in enumerate(("train", "test")):
                gen = torch.Generator().manual_seed(TEST_SEED + k)
                sets[name] = split_batches(lambda m, g=gen: self.train_batch(g, m), self.test_size, 256)
            self._eval = sets
        return self._eval

    def score(self, out: Tensor, batch: Batch) -> Sums:
        m = batch.mask
        bce = F.binary_cross_entropy_with_logits(out[m], batch.targets[m], reduction="sum").item()
        wrong = ((out[m] > 0).float() != batch.targets[m]).sum().item()
        n_bits = float(m.sum()) * self.bits
        n_seq = float(batch.size)
        return {
            "bce_per_bit": (bce, n_bits),
            "bits_per_seq": (bce / math.log(2), n_seq),
            "bit_errors_per_seq": (wrong, n_seq),
        }

    def fixed_length(self, length: int, n: int, seed: int) -> Batch:
        gen = torch.Generator().manual_seed(seed)
        return self.make_batch(gen, torch.full((n,), length, dtype=torch.long))

    def extras(self, model, device) -> dict[str, float]:
        """bits/sequence and bit errors at the picture lengths (40 and 120 were never trained on)."""
        res = {}
        for L in PICTURE_LENGTHS:
            m = evaluate(self, model, [self.fixed_length(L, 64, TEST_SEED + L)], device)
            res[f"len{L}_bits_per_seq"] = m["bits_per_seq"]
            res[f"len{L}_bit_errors_per_seq"] = m["bit_errors_per_seq"]
        return res

    @torch.no_grad()
    def pictures(self, model, out_dir: Path, device) -> list[Path]:
        from ..plots import copy_predictions

        panels = []
        was_training = model.training
        model.eval()
        for L in PICTURE_LENGTHS:
            b = self.fixed_length(L, 1, TEST_SEED + 1000 + L).to(device)
            out, _ = model(b.inputs)
            target = b.targets[L + 1 :, 0].T.cpu()  # [bits, L]
            pred = torch.sigmoid(out[L + 1 :, 0]).T.cpu()
            panels.append((L, target, pred))
        model.train(was_training)
        return [copy_predictions(panels, Path(out_dir) / "copy_predictions.png")]
