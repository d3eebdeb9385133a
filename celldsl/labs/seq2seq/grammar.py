"""A toy translation task, generated at run time: English-like sentences into a head-final language.

Nothing is downloaded. The source language has the English word order (subject, verb, object,
adverb; determiner and adjectives before the noun; prepositional phrases and relative clauses
after it). The target language is head-final, like Japanese or Turkish: subject, object, verb,
with the adverb just before the verb; adjectives after the noun in mirrored order; the definite
article as a particle after the noun phrase (the indefinite article is dropped); postpositions;
relative clauses before the noun, closed by the particle `no`; case particles after the subject
(`ga`) and the object (`o`). So the translation reorders words at four levels (clause, noun
phrase, prepositional phrase, relative clause), drops some words and inserts others: an attention
model has non-monotonic alignments to learn. The translation is a function, so BLEU 100 is
reachable.

Source grammar (probabilities in brackets):

    S   -> NP VERB NP [ADV]           ADV [0.3]
    NP  -> DET ADJ^k NOUN [PP | RC]   k = 0, 1, 2 [0.4, 0.4, 0.2], distinct; PP [0.2], RC [0.2]
    PP  -> PREP NP'
    RC  -> that VERB NP'
    NP' -> DET ADJ^k NOUN             k = 0, 1 [0.6, 0.4] (no nested PP or RC)
    DET -> the | a [0.5 each]; ADJ, NOUN, VERB, PREP, ADV uniform over the lexicon

Translation T (X' is the lexicon's word for X):

    T(NP VERB NP2 [ADV])            = T(NP) ga T(NP2) o [ADV'] VERB'
    T(DET A1 .. Ak NOUN [PP | RC])  = [T(PP) | T(RC)] NOUN' Ak' .. A1' [ka if DET is "the"]
    T(PREP NP')                     = T(NP') PREP'
    T(that VERB NP')                = T(NP') o VERB' no

For example "the big dog that sees a cat chases the small red bird quickly" becomes
"miu o vid no wof gro ka ga pip ru min ka o hai kur". Sources have 5 to 20 words (10 on average),
targets 5 to 24.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NOUNS = {"dog": "wof", "cat": "miu", "bird": "pip", "horse": "hin", "farmer": "bor", "teacher": "lek",
         "child": "kin", "king": "rex", "queen": "ren", "fish": "pis", "baker": "pan",
         "wolf": "lup"}  # fmt: skip
ADJECTIVES = {"big": "gro", "small": "min", "red": "ru", "blue": "bla", "old": "sen", "young": "jun",
              "happy": "fel", "angry": "ira", "tall": "alt", "quiet": "tak"}  # fmt: skip
VERBS = {"sees": "vid", "likes": "am", "chases": "kur", "feeds": "nut", "follows": "seq", "helps": "aju",
         "calls": "vok", "finds": "tro"}  # fmt: skip
PREPOSITIONS = {"near": "pres", "behind": "post", "with": "kun", "under": "sub"}
ADVERBS = {"quickly": "hai", "slowly": "len", "often": "oft"}
DETERMINERS = ("the", "a")
THAT = "that"
DEFINITE, SUBJECT, OBJECT, RELATIVE = "ka", "ga", "o", "no"

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SOURCE_VOCAB = (PAD, *DETERMINERS, THAT, *ADJECTIVES, *NOUNS, *VERBS, *PREPOSITIONS, *ADVERBS)
TARGET_VOCAB = (PAD, BOS, EOS, DEFINITE, SUBJECT, OBJECT, RELATIVE, *ADJECTIVES.values(), *NOUNS.values(),
                *VERBS.values(), *PREPOSITIONS.values(), *ADVERBS.values())  # fmt: skip
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class NounPhrase:
    determiner: str
    adjectives: tuple[str, ...]
    noun: str
    pp: tuple[str, NounPhrase] | None = None  # (preposition, noun phrase)
    rc: tuple[str, NounPhrase] | None = None  # (verb, object of the relative clause)

    def source(self) -> list[str]:
        words = [self.determiner, *self.adjectives, self.noun]
        if self.pp:
            words += [self.pp[0], *self.pp[1].source()]
        if self.rc:
            words += [THAT, self.rc[0], *self.rc[1].source()]
        return words

    def target(self) -> list[str]:
        words = []
        if self.pp:
            words += [*self.pp[1].target(), PREPOSITIONS[self.pp[0]]]
        if self.rc:
            words += [*self.rc[1].target(), OBJECT, VERBS[self.rc[0]], RELATIVE]
        words += [NOUNS[self.noun], *(ADJECTIVES[a] for a in reversed(self.adjectives))]
        if self.determiner == "the":
            words.append(DEFINITE)
        return words


@dataclass(frozen=True)
class Sentence:
    subject: NounPhrase
    verb: str
    object: NounPhrase
    adverb: str | None = None

    def source(self) -> list[str]:
        adverb = [self.adverb] if self.adverb else []
        return [*self.subject.source(), self.verb, *self.object.source(), *adverb]

    def target(self) -> list[str]:
        adverb = [ADVERBS[self.adverb]] if self.adverb else []
        return [*self.subject.target(), SUBJECT, *self.object.target(), OBJECT, *adverb, VERBS[self.verb]]


def _choice(rng: random.Random, options, weights=None):
    return rng.choices(list(options), weights=weights)[0]


def noun_phrase(rng: random.Random, level: int = 0, depth: int = 1, always: bool = False) -> NounPhrase:
    """A noun phrase at nesting `level`; phrases above `depth` may carry a PP or RC (with the
    grammar's probabilities, or always, half PP and half RC)."""
    k = _choice(rng, (0, 1, 2), (0.4, 0.4, 0.2)) if level == 0 else _choice(rng, (0, 1), (0.6, 0.4))
    adjectives = tuple(rng.sample(sorted(ADJECTIVES), k))
    det, noun = _choice(rng, DETERMINERS), _choice(rng, sorted(NOUNS))
    pp = rc = None
    if level < depth:
        u = rng.random() * (0.4 if always else 1.0)
        if u < 0.2:
            pp = (_choice(rng, sorted(PREPOSITIONS)), noun_phrase(rng, level + 1, depth, always))
        elif u < 0.4:
            rc = (_choice(rng, sorted(VERBS)), noun_phrase(rng, level + 1, depth, always))
    return NounPhrase(det, adjectives, noun, pp, rc)


def sentence(rng: random.Random, depth: int = 1, always: bool = False) -> Sentence:
    """A sentence of the grammar (depth 1); depth 2 with `always` gives the longer sentences of
    the `long` test set: every noun phrase but the innermost has a PP or RC, so phrases nest one
    level deeper than in training, and sources have 17 to 30 words (training: 5 to 20)."""
    subject = noun_phrase(rng, 0, depth, always)
    verb, obj = _choice(rng, sorted(VERBS)), noun_phrase(rng, 0, depth, always)
    adverb = _choice(rng, sorted(ADVERBS)) if rng.random() < 0.3 else None
    return Sentence(subject, verb, obj, adverb)


def parse(words: list[str], depth: int = 1) -> Sentence:
    """The inverse of Sentence.source (recursive descent), so that tests can check that every
    generated source is in the grammar. Raises ValueError for a sentence outside it."""
    pos = 0

    def peek(allowed) -> bool:
        return pos < len(words) and words[pos] in allowed

    def take(allowed) -> str:
        nonlocal pos
        if not peek(allowed):
            got = words[pos] if pos < len(words) else "the end"
            raise ValueError(f"word {pos}: expected one of {sorted(allowed)}, got {got!r}")
        pos += 1
        return words[pos - 1]

    def np(level: int) -> NounPhrase:
        det = take(DETERMINERS)
        adjectives = []
        while peek(ADJECTIVES):
            adjectives.append(take(ADJECTIVES))
        if len(adjectives) > (2 if level == 0 else 1) or len(set(adjectives)) < len(adjectives):
            raise ValueError(f"bad adjectives {adjectives}")
        noun = take(NOUNS)
        pp = rc = None
        if level < depth and peek(PREPOSITIONS):
            pp = (take(PREPOSITIONS), np(level + 1))
        elif level < depth and peek((THAT,)):
            take((THAT,))
            rc = (take(VERBS), np(level + 1))
        return NounPhrase(det, tuple(adjectives), noun, pp, rc)

    subject, verb, obj = np(0), take(VERBS), np(0)
    adverb = take(ADVERBS) if peek(ADVERBS) else None
    if pos != len(words):
        raise ValueError(f"words left over from {pos}: {words[pos:]}")
    return Sentence(subject, verb, obj, adverb)
