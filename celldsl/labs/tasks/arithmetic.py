"""Character-level arithmetic (Jozefowicz, Zaremba & Sutskever 2015, the "Arith." task).

The network reads a problem such as `317-42=275.` one character at a time and is trained to
predict the next character; only the characters of the result (after `=`, up to and including
the terminating `.`) are scored, so the score is the accuracy of computing the answer digit by
digit with teacher forcing. Jozefowicz et al. inserted a random number of distractor symbols
between the input characters to make the task harder; `distractors=p` inserts, after each input
character, k ~ Geometric(p) letters from a..j (p = 0 turns them off).

Each operand has a number of digits drawn uniformly from 1..`digits`, then a value with exactly
that many digits; the operator is + or -; the result may be negative (`12-40=-28.`).
The paper's generator details (operand sizes, distractor rate, signs) are not verified here
(see the reference notes), so this is "the task in kind".

Shapes: inputs [T, N] int64 token ids (the model embeds them), targets [T, N] int64 (the next
character), mask [T, N] True where the target is a result character. Padding token id 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from .base import Batch, Defaults, Sums, Task, split_batches

PAD = "_"
DISTRACTORS = "abcdefghij"
VOCAB = PAD + "0123456789+-=." + DISTRACTORS
INDEX = {ch: i for i, ch in enumerate(VOCAB)}
TEST_SEED = 20150001


def encode(text: str) -> Tensor:
    return torch.tensor([INDEX[ch] for ch in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


@dataclass
class ArithmeticTask(Task):
    """Options: `digits` (max digits per operand), `distractors` (geometric rate, 0 = none),
    `ops` (operators to draw from), `test_size`."""

    digits: int = 3
    distractors: float = 0.0
    ops: str = "+-"
    test_size: int = 1000

    name: ClassVar[str] = "arithmetic"
    output: ClassVar[str] = "categorical"
    tokens: ClassVar[bool] = True
    metric: ClassVar[str] = "char_acc"
    also_report: ClassVar[tuple[str, ...]] = ("seq_acc",)
    higher_is_better: ClassVar[bool] = True
    defaults: ClassVar[Defaults] = Defaults(hidden=64, steps=2000, batch=64, lr=1e-2, eval_every=100)
    reference: ClassVar[str] = (
        "Jozefowicz et al. 2015, Table 1 (best next-character accuracy on Arith., from a secondary "
        "summary, unverified): Tanh .295, LSTM .892, LSTM-b .902, GRU .896, MUT1 .921, MUT2 .898, MUT3 .907. "
        "Their generator and model sizes differ from the defaults here."
    )

    def __post_init__(self) -> None:
        if not 0 <= self.distractors < 1:
            raise ValueError(f"arithmetic: distractors must be in [0, 1) (got {self.distractors})")
        if not self.ops or set(self.ops) - set("+-"):
            raise ValueError(f"arithmetic: ops must be made of '+' and '-' (got {self.ops!r})")
        self.input_size = len(VOCAB)
        self.output_size = len(VOCAB)

    def _number(self, gen: torch.Generator) -> int:
        n = int(torch.randint(1, self.digits + 1, (1,), generator=gen))
        low = 0 if n == 1 else 10 ** (n - 1)
        return int(torch.randint(low, 10**n, (1,), generator=gen))

    def problem(self, gen: torch.Generator) -> tuple[str, str]:
        """(prompt with distractors, answer): e.g. ('31c7-42=', '275.')."""
        a, b = self._number(gen), self._number(gen)
        op = self.ops[int(torch.randint(0, len(self.ops), (1,), generator=gen))]
        answer = f"{a + b if op == '+' else a - b}."
        chars = []
        for ch in f"{a}{op}{b}":
            chars.append(ch)
            while self.distractors and float(torch.rand(1, generator=gen)) < self.distractors:
                chars.append(DISTRACTORS[int(torch.randint(0, len(DISTRACTORS), (1,), generator=gen))])
        return "".join(chars) + "=", answer

    def batch_of(self, problems: list[tuple[str, str]]) -> Batch:
        texts = [p + a for p, a in problems]
        T = max(len(t) for t in texts) - 1
        n = len(texts)
        inputs = torch.zeros(T, n, dtype=torch.long)
        targets = torch.zeros(T, n, dtype=torch.long)
        mask = torch.zeros(T, n, dtype=torch.bool)
        for j, ((prompt, _), text) in enumerate(zip(problems, texts, strict=True)):
            ids = encode(text)
            inputs[: len(ids) - 1, j] = ids[:-1]
            targets[: len(ids) - 1, j] = ids[1:]
            mask[len(prompt) - 1 : len(ids) - 1, j] = True  # targets after '=' are the answer
        return Batch(inputs, targets, mask)

    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        return self.batch_of([self.problem(gen) for _ in range(batch_size)])

    def eval_sets(self) -> dict[str, list[Batch]]:
        if not hasattr(self, "_eval"):
            sets = {}
            for k, name in enumerate(("train", "test")):
                gen = torch.Generator().manual_seed(TEST_SEED + k)
                sets[name] = split_batches(lambda m, g=gen: self.train_batch(g, m), self.test_size, 500)
            self._eval = sets
        return self._eval

    def score(self, out: Tensor, batch: Batch) -> Sums:
        m = batch.mask
        correct = out.argmax(-1) == batch.targets
        ce = torch.nn.functional.cross_entropy(out[m], batch.targets[m], reduction="sum")
        seq_ok = (correct | ~m).all(0)
        return {
            "char_acc": (float(correct[m].sum()), float(m.sum())),
            "seq_acc": (float(seq_ok.sum()), float(batch.size)),
            "ce": (float(ce), float(m.sum())),
        }

    @torch.no_grad()
    def solve(self, model, prompt: str, device, max_len: int | None = None) -> str:
        """Greedy decoding: read `prompt`, then feed back the argmax until '.' (uses the state)."""
        max_len = max_len or self.digits + 3
        out, state = model(encode(prompt).unsqueeze(1).to(device))
        answer = ""
        for _ in range(max_len):
            ch = VOCAB[int(out[-1, 0].argmax())]
            answer += ch
            if ch == ".":
                break
            out, state = model(encode(ch).unsqueeze(1).to(device), state)
        return answer

    @torch.no_grad()
    def pictures(self, model, out_dir: Path, device) -> list[Path]:
        from ..files import atomic_write_text
        from ..plots import position_accuracy

        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(TEST_SEED + 99)
        problems = [self.problem(gen) for _ in range(20)]
        lines = []
        for prompt, answer in problems:
            got = self.solve(model, prompt, device)
            lines.append(
                f"{prompt}{got:<{self.digits + 3}}  {'ok' if got == answer else 'expected ' + answer}"
            )
        # accuracy by position in the answer (0 = first result character), teacher forced
        hits: dict[int, list[float]] = {}
        for b in self.eval_sets()["test"]:
            b = b.to(device)
            correct = model(b.inputs)[0].argmax(-1) == b.targets
            pos = torch.cumsum(b.mask.long(), 0) - 1
            for k in range(int(pos.max()) + 1):
                sel = b.mask & (pos == k)
                h = hits.setdefault(k, [0.0, 0.0])
                h[0] += float(correct[sel].sum())
                h[1] += float(sel.sum())
        model.train(was_training)
        out_dir = Path(out_dir)
        paths = [atomic_write_text(out_dir / "arithmetic_examples.txt", "\n".join(lines) + "\n")]
        acc = {k: s / n for k, (s, n) in sorted(hits.items()) if n}
        paths.append(position_accuracy(acc, out_dir / "arithmetic_positions.png"))
        return paths
