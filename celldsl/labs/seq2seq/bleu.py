"""Corpus BLEU with sacrebleu, on the target language's words.

Hypotheses and references are token-id lists (no BOS/EOS); they become space-separated words
and go to sacrebleu.corpus_bleu with its defaults (4-gram BLEU, brevity penalty, "13a" tokenizer,
which leaves these lowercase words alone; exponential smoothing). The signature of that setting
is `signature()`.
"""

from __future__ import annotations

from .grammar import EOS_ID, PAD_ID, TARGET_VOCAB

SPECIAL = {PAD_ID, EOS_ID}


def words(ids) -> str:
    """Token ids -> 'miu pres wof ...' (stops at EOS; BOS and PAD are skipped)."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i in SPECIAL or TARGET_VOCAB[i].startswith("<"):
            continue
        out.append(TARGET_VOCAB[i])
    return " ".join(out)


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (0..100) of strings against one reference each."""
    return float(_score(hypotheses, references)[0].score)


def signature() -> str:
    """sacrebleu's description of the setting, e.g. 'nrefs:1|case:mixed|eff:no|tok:13a|...'."""
    return str(_score(["a"], ["a"])[1].get_signature())


def _score(hypotheses: list[str], references: list[str]):
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu = BLEU()
    return bleu.corpus_score(hypotheses, [references]), bleu
