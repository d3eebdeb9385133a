"""The copy task of Graves, Wayne & Danihelka 2014 (NTM paper, section 4.1), in two encodings.

The network sees a sequence of L random 8-bit vectors, then a delimiter, then nothing; after the
delimiter it must emit the L vectors again, in order. Training lengths are uniform in 1..20 as in
the paper. The interesting part is generalisation: the ajithcodesit/lstm_copy_task project (and
the NTM paper, Fig. 5) show that an LSTM copies lengths it was trained on but fails at 40 and 120;
`pictures` draws the same four lengths.

`encoding="ntm"` (default): the NTM paper's layout. T = 2L + 1 steps, channels 0..7 data, 8 the
delimiter; only the answer is scored:

    step        0 .. L-1        L            L+1 .. 2L
    input       pattern         delimiter    zeros
    target      (not scored)    (not scored) pattern

`encoding="lstm_copy_task"`: the layout of ajithcodesit/lstm_copy_task (LSTM_copy_task.py), which
the `graves` preset uses. Every sequence is padded to T = 2 * max_len + 2 steps (42 for lengths
1..20); the input has 10 channels (0 = end marker, 1 = start marker, 2..9 data); every value that
is not a 1 is 0.001, in the inputs and the targets alike (pattern zeros become 0.001 too); the
answer comes one step after the end marker (the "target delay"):

    step        0         1 .. L       L+1          L+2 .. 2L+1     2L+2 .. T-1
    input       start     pattern      end          0.001           0.001
    target      0.001     0.001        0.001        pattern         0.001

and the loss is that project's: the binary cross-entropy averaged over all T steps x 8 bits,
padding included, with the prediction clipped as there: -mean(t log clip(p, 1e-6, 0.9999) +
(1 - t) log(1 - clip(p, 1e-10, 0.9999))). The targets are 0.001, not 0, so this loss cannot reach 0:
its minimum on a sequence is the targets' own entropy, about 0.0069 for lengths 1..20
(`bce_all_floor`, reported with the metrics). That project reached a training loss of about 0.008.

Metrics (both encodings):
- `bits_per_seq`: the BCE of a whole answer, in bits, against the binary pattern (the NTM paper's
  "cost per sequence (bits)", Fig. 3);
- `bce_per_bit`: the same per answer bit, in nats;
- `bit_errors_per_seq`: answer bits wrong after thresholding the output at 0.5;
- `bce_all` (lstm_copy_task encoding): the training loss above, the number the project reports.

Evaluation sets (fixed, the same for every run): `train` and `test`, and `valid`, drawn like `test`
with another seed, so that a learning-rate schedule or a stopping point (`--patience`) can be chosen
without looking at the test set; `compare` then reports the test metric at the best valid point.
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
TEST_SEED = 20141020  # fixed: every run is evaluated on the same sequences (+0 train, +1 test, +2 valid)
# Graves et al. 2014, Fig. 3, LSTM: (sequences seen, cost per sequence in bits), digitised from the
# plot in our reference notes (approximate)
GRAVES_LSTM_CURVE = ((100_000, 4.8), (600_000, 0.5))
ENCODINGS = ("ntm", "lstm_copy_task")
LOW = 0.001  # lstm_copy_task: every "0" (padding, pattern zeros, unset markers) is 0.001
CLIP_LOW_1, CLIP_LOW_0, CLIP_HIGH = 1e-6, 1e-10, 0.9999  # lstm_copy_task's clipping of p in the loss


def clipped_bce(p: Tensor, t: Tensor) -> Tensor:
    """lstm_copy_task's elementwise loss: BCE of probabilities p against targets t, p clipped
    differently inside the two logarithms (gradients vanish where the clip is active, as there)."""
    log_p = torch.log(p.clamp(CLIP_LOW_1, CLIP_HIGH))
    log_not_p = torch.log(1 - p.clamp(CLIP_LOW_0, CLIP_HIGH))
    return -(t * log_p + (1 - t) * log_not_p)


def clipped_bce_floor(t: Tensor) -> Tensor:
    """The least `clipped_bce` can be for each target: the target's entropy, at p = t, except
    that p is clipped at 0.9999, so a target of 1 costs -log(0.9999)."""
    p = t.clamp(CLIP_LOW_1, CLIP_HIGH)
    return clipped_bce(p, t)


@dataclass
class CopyTask(Task):
    """Options: `bits` (vector width), `min_len`/`max_len` (training lengths, inclusive),
    `test_size` (number of test sequences), `encoding` (ntm or lstm_copy_task)."""

    bits: int = 8
    min_len: int = 1
    max_len: int = 20
    test_size: int = 512
    encoding: str = "ntm"

    name: ClassVar[str] = "copy"
    output: ClassVar[str] = "bernoulli"
    metric: ClassVar[str] = "bits_per_seq"
    also_report: ClassVar[tuple[str, ...]] = ("bce_per_bit", "bit_errors_per_seq")
    defaults: ClassVar[Defaults] = Defaults(hidden=64, steps=2000, batch=64, lr=1e-2, eval_every=250)
    reference: ClassVar[str] = (
        "Graves et al. 2014 (Fig. 3) train a 3x256 LSTM (1,352,969 parameters) with RMSProp (lr 3e-5, "
        "elementwise gradient clipping) for up to 1M sequences; digitised from that plot (approximate), "
        "the LSTM is at about 4.8 bits/sequence after 100k sequences and about 0.5 after 600k. "
        "At lengths 30 to 120 (Fig. 5) it fails to generalise. ajithcodesit/lstm_copy_task trains the same "
        "3x256 LSTM with its own encoding and loss (bce_all) to a training loss of about 0.008 after about "
        "40 epochs of 1000 batches of 100 (4M sequences); at length 10 its copy is near perfect, at 20 it "
        "has small errors in the middle, and it does not generalise beyond 20."
    )

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"copy: encoding must be one of {', '.join(ENCODINGS)} (got {self.encoding!r})")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"copy: need 1 <= min_len <= max_len (got {self.min_len}, {self.max_len})")
        markers = self.encoding == "lstm_copy_task"
        self.input_size = self.bits + (2 if markers else 1)
        self.output_size = self.bits
        if markers:
            self.also_report = ("bce_all", "bce_per_bit", "bit_errors_per_seq")

    # -- data -----------------------------------------------------------------------------------
    def steps_for(self, length: int) -> int:
        """Time steps of a batch whose longest sequence is `length`."""
        if self.encoding == "ntm":
            return 2 * length + 1
        return 2 * max(length, self.max_len) + 2  # the project's fixed 2 * max_seq + 2

    def make_batch(self, gen: torch.Generator, lengths: Tensor, steps: int | None = None) -> Batch:
        """Sequences with the given lengths ([N] int64); `steps` defaults to `steps_for(max(L))`."""
        n, longest = lengths.numel(), int(lengths.max())
        T = steps or self.steps_for(longest)
        patterns = torch.randint(0, 2, (longest, n, self.bits), generator=gen).float()
        mask = torch.zeros(T, n, dtype=torch.bool)
        if self.encoding == "ntm":
            inputs = torch.zeros(T, n, self.input_size)
            targets = torch.zeros(T, n, self.bits)
            for j, L in enumerate(lengths.tolist()):
                inputs[:L, j, : self.bits] = patterns[:L, j]
                inputs[L, j, self.bits] = 1.0
                targets[L + 1 : 2 * L + 1, j] = patterns[:L, j]
                mask[L + 1 : 2 * L + 1, j] = True
            return Batch(inputs, targets, mask)
        patterns = patterns.clamp(min=LOW)  # 0 -> 0.001, 1 stays
        inputs = torch.full((T, n, self.input_size), LOW)
        targets = torch.full((T, n, self.bits), LOW)
        for j, L in enumerate(lengths.tolist()):
            inputs[0, j, 1] = 1.0  # start marker
            inputs[1 : L + 1, j, 2:] = patterns[:L, j]
            inputs[L + 1, j, 0] = 1.0  # end marker
            targets[L + 2 : 2 * L + 2, j] = patterns[:L, j]
            mask[L + 2 : 2 * L + 2, j] = True
        return Batch(inputs, targets, mask)

    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        lengths = torch.randint(self.min_len, self.max_len + 1, (batch_size,), generator=gen)
        return self.make_batch(gen, lengths)

    def eval_sets(self) -> dict[str, list[Batch]]:
        if not hasattr(self, "_eval"):
            sets = {}
            for k, name in enumerate(("train", "test", "valid")):  # seeds fixed by position
                gen = torch.Generator().manual_seed(TEST_SEED + k)
                sets[name] = split_batches(lambda m, g=gen: self.train_batch(g, m), self.test_size, 256)
            self._eval = sets
        return self._eval

    # -- objective and metrics ------------------------------------------------------------------
    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        if self.encoding == "ntm":
            return super().loss(out, batch)
        return clipped_bce(torch.sigmoid(out), batch.targets).mean()

    def score(self, out: Tensor, batch: Batch) -> Sums:
        m = batch.mask
        answer = (batch.targets[m] > 0.5).float()  # the binary pattern (lstm_copy_task: 1 and 0.001)
        bce = F.binary_cross_entropy_with_logits(out[m], answer, reduction="sum").item()
        wrong = ((out[m] > 0).float() != answer).sum().item()
        n_bits = float(m.sum()) * self.bits
        n_seq = float(batch.size)
        sums = {
            "bce_per_bit": (bce, n_bits),
            "bits_per_seq": (bce / math.log(2), n_seq),
            "bit_errors_per_seq": (wrong, n_seq),
        }
        if self.encoding == "lstm_copy_task":
            every = float(batch.targets.numel())
            sums["bce_all"] = (float(clipped_bce(torch.sigmoid(out), batch.targets).sum()), every)
            sums["bce_all_floor"] = (float(clipped_bce_floor(batch.targets).sum()), every)
        return sums

    # -- end-of-run reports ---------------------------------------------------------------------
    def fixed_length(self, length: int, n: int, seed: int) -> Batch:
        """n sequences of one length, as long as they need to be (2L+1 or 2L+2 steps)."""
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.full((n,), length, dtype=torch.long)
        steps = 2 * length + (1 if self.encoding == "ntm" else 2)
        return self.make_batch(gen, lengths, steps)

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
        """copy_len{L}.png for each picture length: the whole target sequence above the whole
        prediction (time left to right, bits top to bottom), as the lstm_copy_task README shows."""
        from ..plots import copy_prediction

        paths = []
        was_training = model.training
        model.eval()
        for L in PICTURE_LENGTHS:
            b = self.fixed_length(L, 1, TEST_SEED + 1000 + L).to(device)
            out, _ = model(b.inputs)
            target = b.targets[:, 0].T.cpu()  # [bits, T]
            pred = torch.sigmoid(out[:, 0]).T.cpu()
            wrong = int(((pred > 0.5) != (target > 0.5))[:, b.mask[:, 0].cpu()].sum())
            title = f"copy, length {L} ({wrong} of {L * self.bits} answer bits wrong)"
            paths.append(copy_prediction(target, pred, title, Path(out_dir) / f"copy_len{L}.png"))
        model.train(was_training)
        return paths

    def history_pictures(self, history: list[dict], out_dir: Path) -> list[Path]:
        """copy_learning_curve.png: test cost per sequence vs sequences seen, as Graves et al. Fig. 3
        (their LSTM's approximate points marked), and, for the lstm_copy_task encoding, that
        project's loss with its floor."""
        from ..plots import copy_learning_curve, lr_changes

        rows = [r for r in history if r.get("test_bits_per_seq") is not None]
        seqs = [r["sequences"] for r in rows]
        curves = {"bits": {s: [r.get(f"{s}_bits_per_seq") for r in rows] for s in ("train", "test")}}
        if self.encoding == "lstm_copy_task":
            curves["bce_all"] = {s: [r.get(f"{s}_bce_all") for r in rows] for s in ("train", "test")}
            curves["floor"] = rows[-1].get("test_bce_all_floor")
        path = Path(out_dir) / "copy_learning_curve.png"
        return [copy_learning_curve(seqs, curves, GRAVES_LSTM_CURVE, path, lr_changes(seqs, rows))]
