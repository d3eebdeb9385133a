"""Translation with attention on a toy language generated at run time (seq2seq/grammar.py).

The model (seq2seq/model.py) is a bidirectional encoder and an attention decoder, both built from
cell files. The cell given to `train --cell` / `compare FILE...` names the family:

- encoder: that file, bidirectional (or the task option `encoder=FILE`, e.g. to keep the encoder
  fixed while comparing decoders);
- decoder: the file itself if it declares a context input (`input x, ctx`), else its context
  version from celldsl/labs/seq2seq/cells/ (cells/lstm.cell -> lstm_ctx.cell, gru -> gru_ctx,
  mut1 -> mut1_ctx); a one-input cell without one is an error that says how to write it.

Training: teacher forcing, cross-entropy per target word (EOS included). Batches are
time-major: inputs a Seq2SeqInput (src [S, N], src_len [N], tgt_in [T, N] = BOS y_1 .. y_n),
targets [T, N] = y_1 .. y_n EOS, mask [T, N] True on the n + 1 real target positions.

Evaluation sets (fixed seeds): `train` and `test` (test_size sentences each, from the training
distribution) and `long` (test_size / 2 sentences nested one level deeper than any training
sentence, 17 to 30 words: generalisation to longer inputs).

Metrics: `token_acc` and `ce` (teacher forced, per target word), `bleu` (sacrebleu corpus BLEU of
greedy translations) and `exact` (fraction translated exactly), at every evaluation. At the end:
`beam{K}_bleu` on test and long with beam width K (task option `beam`) and length normalisation
exponent `alpha`, and pictures: the attention of three test sentences, BLEU against the beam
width, and example translations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..seq2seq.grammar import BOS_ID, EOS_ID, PAD_ID, SOURCE_VOCAB, TARGET_VOCAB, sentence
from ..seq2seq.model import ATTENTIONS, Seq2SeqInput
from .base import Batch, Defaults, Sums, Task

CELLS_DIR = Path(__file__).resolve().parents[1] / "seq2seq" / "cells"
SRC_INDEX = {w: i for i, w in enumerate(SOURCE_VOCAB)}
TGT_INDEX = {w: i for i, w in enumerate(TARGET_VOCAB)}
TEST_SEED = 14091473  # fixed: every run is tested on the same sentences
BEAM_WIDTHS = (1, 2, 3, 5, 8, 12)  # the BLEU-vs-width picture
EVAL_BATCH = 250


def decoder_cell_for(path: str) -> str:
    """The decoder cell file for a family (see module docstring)."""
    import celldsl

    cell = celldsl.compile_cell(path)
    if len(cell.ir.inputs) >= 2:
        return path
    candidate = CELLS_DIR / f"{Path(path).stem}_ctx.cell"
    if candidate.exists():
        return str(candidate)
    have = ", ".join(sorted(p.name for p in CELLS_DIR.glob("*.cell")))
    raise ValueError(
        f"{path}: the translate decoder needs a cell with a context input (`input x, ctx`), and there is "
        f"no {candidate.name} in {CELLS_DIR}; write one (add C_* @ ctx to the pre-activations, as in "
        f"{have}) and give it as the cell, with -o encoder=FILE for the encoder"
    )


def make_batch(pairs: list[tuple[list[str], list[str]]]) -> Batch:
    """Word lists (source, target) -> a Batch (layout in the module docstring)."""
    n = len(pairs)
    S = max(len(s) for s, _ in pairs)
    T = max(len(t) for _, t in pairs) + 1
    src = torch.full((S, n), PAD_ID, dtype=torch.long)
    tgt_in = torch.full((T, n), PAD_ID, dtype=torch.long)
    targets = torch.full((T, n), PAD_ID, dtype=torch.long)
    mask = torch.zeros(T, n, dtype=torch.bool)
    for j, (s, t) in enumerate(pairs):
        ids = [TGT_INDEX[w] for w in t]
        src[: len(s), j] = torch.tensor([SRC_INDEX[w] for w in s])
        tgt_in[: len(t) + 1, j] = torch.tensor([BOS_ID, *ids])
        targets[: len(t) + 1, j] = torch.tensor([*ids, EOS_ID])
        mask[: len(t) + 1, j] = True
    src_len = torch.tensor([len(s) for s, _ in pairs])
    return Batch(Seq2SeqInput(src, src_len, tgt_in), targets, mask)


def source_words(batch: Batch, j: int) -> list[str]:
    n = int(batch.inputs.src_len[j])
    return [SOURCE_VOCAB[i] for i in batch.inputs.src[:n, j].tolist()]


def reference_ids(batch: Batch, j: int) -> list[int]:
    return batch.targets[batch.mask[:, j], j].tolist()[:-1]  # without EOS


@dataclass
class TranslateTask(Task):
    """Options: `attention` (bahdanau, dot, general), `encoder` (cell file; default: the cell),
    `encoder_hidden` (per direction; 0 = hidden/2), `beam` (width), `alpha` (length normalisation),
    `test_size`."""

    attention: str = "bahdanau"
    encoder: str = ""
    encoder_hidden: int = 0
    beam: int = 5
    alpha: float = 1.0
    test_size: int = 500

    name: ClassVar[str] = "translate"
    output: ClassVar[str] = "categorical"
    tokens: ClassVar[bool] = True
    metric: ClassVar[str] = "bleu"
    also_report: ClassVar[tuple[str, ...]] = ("token_acc",)
    higher_is_better: ClassVar[bool] = True
    defaults: ClassVar[Defaults] = Defaults(hidden=64, steps=800, batch=32, lr=3e-3, eval_every=100)
    reference: ClassVar[str] = (
        "No paper number applies: the language is synthetic (seq2seq/grammar.py). Bahdanau et al. 2014 "
        "(additive attention, bidirectional GRU encoder, GRU decoder) and Luong et al. 2015 (global dot/"
        "general attention with input feeding, LSTM decoder) report BLEU on WMT English-French/German; "
        "what carries over is qualitative: attention learns the alignment, visible as a permutation-like "
        "attention matrix, and beam search helps a little over greedy decoding."
    )

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            kinds = ", ".join(ATTENTIONS)
            raise ValueError(f"translate: attention must be one of {kinds}, got {self.attention!r}")
        if self.beam < 1 or self.test_size < 1 or self.encoder_hidden < 0:
            raise ValueError("translate: beam and test_size must be positive, encoder_hidden >= 0")
        self.input_size = len(SOURCE_VOCAB)
        self.output_size = len(TARGET_VOCAB)

    # -- data -----------------------------------------------------------------------------------
    @staticmethod
    def pairs(rng: random.Random, n: int, long: bool = False) -> list[tuple[list[str], list[str]]]:
        """n (source, target) word lists; `long`: the deeper, longer sentences of the long set."""
        out = []
        for _ in range(n):
            s = sentence(rng, 2, True) if long else sentence(rng)
            out.append((s.source(), s.target()))
        return out

    def train_batch(self, gen: torch.Generator, batch_size: int) -> Batch:
        # the grammar draws from python's random; seed it from the run's torch generator
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
        return make_batch(self.pairs(rng, batch_size))

    def eval_sets(self) -> dict[str, list[Batch]]:
        if not hasattr(self, "_eval"):
            sets = {}
            for k, name in enumerate(("train", "test", "long")):
                n = self.test_size if name != "long" else max(1, self.test_size // 2)
                pairs = self.pairs(random.Random(TEST_SEED + k), n, long=name == "long")
                sets[name] = [make_batch(pairs[i : i + EVAL_BATCH]) for i in range(0, len(pairs), EVAL_BATCH)]
            self._eval = sets
        return self._eval

    # -- the model ------------------------------------------------------------------------------
    def build_model(self, cell: str, hidden: int, layers: int = 1, device=None, width=None, sizes=None):
        from ..seq2seq.model import Seq2Seq

        if width is not None or sizes:
            raise ValueError("translate: its encoder-decoder takes --hidden only, not --width or --size")
        enc_hidden = self.encoder_hidden or hidden // 2
        if hidden < 2:
            raise ValueError("translate: hidden must be at least 2")
        return Seq2Seq(
            self.encoder or cell, decoder_cell_for(cell), len(SOURCE_VOCAB), len(TARGET_VOCAB), hidden,
            enc_hidden, self.attention, layers, device=device,
        )  # fmt: skip

    # -- metrics --------------------------------------------------------------------------------
    def score(self, out: Tensor, batch: Batch) -> Sums:
        m = batch.mask
        n = float(m.sum())
        ce = F.cross_entropy(out[m], batch.targets[m], reduction="sum")
        correct = (out.argmax(-1) == batch.targets) & m
        return {"token_acc": (float(correct.sum()), n), "ce": (float(ce), n)}

    @torch.no_grad()
    def translations(self, model, batches: list[Batch], device, width: int = 1) -> tuple[list, list]:
        """(hypotheses, references) as strings for a set: greedy (width 1) or beam search."""
        from ..seq2seq.bleu import words
        from ..seq2seq.decode import beam_search, greedy

        was_training = model.training
        model.eval()
        hyps, refs = [], []
        try:
            for b in batches:
                src, src_len = b.inputs.src.to(device), b.inputs.src_len.to(device)
                if width == 1:
                    out, _ = greedy(model, src, src_len)
                else:
                    out = beam_search(model, src, src_len, width, self.alpha)
                hyps += [words(o) for o in out]
                refs += [words(reference_ids(b, j)) for j in range(b.size)]
        finally:
            model.train(was_training)
        return hyps, refs

    def corpus_scores(self, model, batches: list[Batch], device) -> dict[str, float]:
        from ..seq2seq.bleu import corpus_bleu

        hyps, refs = self.translations(model, batches, device)
        exact = sum(h == r for h, r in zip(hyps, refs, strict=True)) / len(refs)
        return {"bleu": corpus_bleu(hyps, refs), "exact": exact}

    def extras(self, model, device) -> dict[str, float]:
        from ..seq2seq.bleu import corpus_bleu

        res = {}
        for name in ("test", "long"):
            hyps, refs = self.translations(model, self.eval_sets()[name], device, self.beam)
            res[f"{name}_beam{self.beam}_bleu"] = corpus_bleu(hyps, refs)
        return res

    # -- pictures -------------------------------------------------------------------------------
    @torch.no_grad()
    def pictures(self, model, out_dir: Path, device) -> list[Path]:
        from ..files import atomic_write_json, atomic_write_text
        from ..plots import attention_matrices, bleu_by_beam
        from ..seq2seq.bleu import corpus_bleu, words
        from ..seq2seq.decode import greedy

        out_dir = Path(out_dir)
        sets = self.eval_sets()
        test = sets["test"]
        by_width = {name: {} for name in ("test", "long")}
        for name, widths in by_width.items():
            for w in BEAM_WIDTHS:
                hyps, refs = self.translations(model, sets[name], device, w)
                widths[w] = corpus_bleu(hyps, refs)
        paths = [
            bleu_by_beam(by_width, self.alpha, out_dir / "bleu_by_beam.png"),
            atomic_write_json(out_dir / "bleu_by_beam.json", {"alpha": self.alpha, "bleu": by_width}),
        ]
        was_training = model.training
        model.eval()
        b = test[0]
        picks = _interesting(b, 3)
        src, src_len = b.inputs.src[:, picks].to(device), b.inputs.src_len[picks].to(device)
        out, attn = greedy(model, src, src_len)
        model.train(was_training)
        panels = []
        for k, j in enumerate(picks):
            hyp = words(out[k]).split() + ["</s>"]
            panels.append((source_words(b, j), hyp, attn[k][: len(hyp), : int(src_len[k])].numpy()))
        paths.append(attention_matrices(panels, out_dir / "attention.png"))
        greedy_hyps, refs = self.translations(model, [b], device)
        beam_hyps, _ = self.translations(model, [b], device, self.beam)
        lines = []
        for j in range(min(12, b.size)):
            lines += [
                f"source:    {' '.join(source_words(b, j))}",
                f"reference: {refs[j]}",
                f"greedy:    {greedy_hyps[j]}{'' if greedy_hyps[j] == refs[j] else '   (differs)'}",
                f"beam {self.beam}:    {beam_hyps[j]}{'' if beam_hyps[j] == refs[j] else '   (differs)'}",
                "",
            ]
        paths.append(atomic_write_text(out_dir / "translations.txt", "\n".join(lines)))
        return paths


def _interesting(batch: Batch, k: int) -> list[int]:
    """k test sentences for the attention picture: the longest ones (they reorder the most)."""
    lengths = batch.inputs.src_len.tolist()
    return sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))[:k]
