"""Multi-query associative recall (MQAR): Arora et al., "Zoology: Measuring and Improving Recall in
Efficient Language Models", ICLR 2024, arXiv:2312.04927, Sec. 3 and Fig. 2.

A sequence first lists `pairs` key-value pairs, then asks for the keys again, in another order;
at each query the model must output that key's value. Recall needs a memory that holds every pair
until its query comes: the paper shows that at a fixed model dimension gated convolutions and
small-state recurrences fail as the number of pairs grows, while attention keeps recalling.

The layout follows the paper's generator (HazyResearch/zoology, ``multiquery_ar``), drawn here
with the lab's torch generator:

    step     0   1   2   3  ... 2P-1 | 2P ...                               T-1
    input    k1  v1  k2  v2 ... vP   | filler, with each key once at an even offset
    target                           | the key's value at its query step

- keys: `pairs` distinct tokens of 1 .. vocab/2 - 1; values: `pairs` distinct tokens of
  vocab/2 .. vocab - 1 (token 0 is the filler when `random_fill` is off);
- query slots: the query region has (T - 2P) // 2 even offsets; the P keys take P of them, drawn
  without replacement with probability proportional to i^(power_a - 1) for slot i = 1, 2, ...
  (zoology's power law: small power_a puts the queries early; 1 is uniform);
- filler: with `random_fill` (zoology's `random_non_queries`, the default there) every step of the
  query region that is not a query gets a token uniform over the whole vocabulary, so a filler may
  repeat a key; it is never scored.

Shapes: inputs [T, N] int64 token ids (the model embeds them), targets [T, N] int64, mask [T, N]
True exactly at the P query steps of each sequence. Metrics: `acc` (the paper's accuracy: the
fraction of queries whose arg-max output is the value), `seq_acc` (sequences with every query
right), `ce` (cross-entropy on the queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Batch, Defaults, Sums, Task, split_batches

TEST_SEED = 20231208  # fixed: every run is scored on the same sequences (+0 train, +1 test, +2 valid)


@dataclass
class MQARTask(Task):
    """Options: `vocab`, `pairs`, `T` (sequence length), `power_a`, `random_fill`, `test_size`.

    `vocab` is the vocabulary size, `pairs` the key-value pairs per sequence, T >= 4 * pairs;
    `power_a` in (0, 1] places the queries (zoology's power law, 1 = uniform); `random_fill`
    fills the rest of the query region with random tokens (else with 0)."""

    vocab: int = 256
    pairs: int = 8
    T: int = 64
    power_a: float = 0.01
    random_fill: bool = True
    test_size: int = 1000

    name: ClassVar[str] = "mqar"
    output: ClassVar[str] = "categorical"
    tokens: ClassVar[bool] = True
    metric: ClassVar[str] = "acc"
    also_report: ClassVar[tuple[str, ...]] = ("seq_acc",)
    higher_is_better: ClassVar[bool] = True
    defaults: ClassVar[Defaults] = Defaults(hidden=64, steps=2000, batch=64, lr=3e-3, eval_every=200)
    reference: ClassVar[str] = (
        "Arora et al. 2024 (Zoology, Fig. 2) use a vocabulary of 8192, sequence lengths 64 to 512 and "
        "4 to 64 key-value pairs, 2-layer models of width 64 to 512: attention solves MQAR at every "
        "width; gated convolutions and small-state recurrences need a wider model as the pairs grow. "
        "The defaults here are smaller (vocab 256, T 64, 8 pairs) to train on CPU."
    )

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"mqar: pairs must be at least 1 (got {self.pairs})")
        if self.vocab // 2 - 1 < self.pairs:
            raise ValueError(
                f"mqar: vocab must be at least {2 * self.pairs + 2} for {self.pairs} pairs (got "
                f"{self.vocab}): keys are distinct tokens of 1..vocab/2-1, values of vocab/2..vocab-1"
            )
        if self.T < 4 * self.pairs:
            raise ValueError(
                f"mqar: T must be at least 4 * pairs = {4 * self.pairs} (got {self.T}): the pairs "
                "take 2 * pairs steps and each query needs an even slot after them"
            )
        if not 0 < self.power_a <= 1:
            raise ValueError(f"mqar: power_a must be in (0, 1] (got {self.power_a}); 1 is uniform")
        if self.test_size < 1:
            raise ValueError(f"mqar: test_size must be at least 1 (got {self.test_size})")
        self.input_size = self.vocab
        self.output_size = self.vocab

    # -- data -----------------------------------------------------------------------------------
    def slot_probabilities(self) -> Tensor:
        """P(query slot i), i = 1 .. (T - 2P) // 2: proportional to i^(power_a - 1)."""
        slots = (self.T - 2 * self.pairs) // 2
        p = torch.arange(1, slots + 1, dtype=torch.float64) ** (self.power_a - 1)
        return p / p.sum()

    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        n, P, half = batch_size, self.pairs, self.vocab // 2
        # distinct keys and values per sequence: the first P of a random permutation
        keys = torch.rand(n, half - 1, generator=gen).argsort(dim=1)[:, :P] + 1
        values = torch.rand(n, self.vocab - half, generator=gen).argsort(dim=1)[:, :P] + half
        probs = self.slot_probabilities().expand(n, -1)
        slots = torch.multinomial(probs, P, replacement=False, generator=gen)  # [n, P]
        query_at = 2 * P + 2 * slots  # key j is asked at step query_at[:, j]
        if self.random_fill:
            inputs = torch.randint(0, self.vocab, (n, self.T), generator=gen)
        else:
            inputs = torch.zeros(n, self.T, dtype=torch.long)
        inputs[:, 0 : 2 * P : 2] = keys
        inputs[:, 1 : 2 * P : 2] = values
        inputs.scatter_(1, query_at, keys)
        targets = torch.zeros(n, self.T, dtype=torch.long).scatter_(1, query_at, values)
        mask = torch.zeros(n, self.T, dtype=torch.bool).scatter_(1, query_at, True)
        return Batch(inputs.T.contiguous(), targets.T.contiguous(), mask.T.contiguous())

    def eval_sets(self) -> dict[str, list[Batch]]:
        if not hasattr(self, "_eval"):
            sets = {}
            for k, name in enumerate(("train", "test", "valid")):  # seeds fixed by position
                gen = torch.Generator().manual_seed(TEST_SEED + k)
                sets[name] = split_batches(lambda m, g=gen: self.train_batch(g, m), self.test_size, 256)
            self._eval = sets
        return self._eval

    # -- metrics --------------------------------------------------------------------------------
    def score(self, out: Tensor, batch: Batch) -> Sums:
        m = batch.mask
        correct = (out.argmax(-1) == batch.targets) & m
        ce = torch.nn.functional.cross_entropy(out[m], batch.targets[m], reduction="sum")
        return {
            "acc": (float(correct.sum()), float(m.sum())),
            "seq_acc": (float((correct | ~m).all(0).sum()), float(batch.size)),
            "ce": (float(ce), float(m.sum())),
        }
