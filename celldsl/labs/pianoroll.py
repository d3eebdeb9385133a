"""Bach chorales from the music21 corpus as 88-key piano rolls, parsed once and cached.

Conversion rule (`score_to_roll`), chosen to match the JSB Chorales data set of
Boulanger-Lewandowski et al. 2012 that Chung et al. 2014 used (quarter-note frames, 88 keys):

- the score is flattened (all parts together) and sampled on a quarter-note grid starting at
  offset 0 of the flattened score (the first note, pickup included);
- key k (MIDI pitch 21 + k, A0..C8) is on in frame t when a note of that pitch sounds at time t,
  i.e. onset <= t < onset + duration (a tie's halves are separate notes; together they cover the
  tied span). Notes that start and end between two grid points (an eighth-note passing tone on an
  off-beat) are therefore not in the roll, as in sampling-based JSB versions;
- grace notes (zero duration) and pitches outside A0..C8 are dropped; repeats are not expanded.

Which chorales: `music21.corpus.chorales.Iterator()`, the 371 four-part chorales in
Riemenschneider order. Parsing all of them takes about a minute or two (measured in
docs/results/README.md), so the rolls are cached as one .npz under `files.cache_dir()`, written
atomically and keyed by the conversion version and the music21 version. The cache only saves
time: a cache file that is damaged, not ours or writable by others is parsed again instead (it is
data, read with numpy's pickle-free loader, but a planted one would change the data), and one that
cannot be written (a full disk) is a warning.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..lang.errors import printable
from .files import WriteError, atomic_save_with, cache_dir
from .rundir import check_private

LOWEST_MIDI = 21  # A0
KEYS = 88
CONVERSION_VERSION = 1  # bump when the rule above changes: old caches are then ignored
EPS = 1e-9


@dataclass(frozen=True)
class Chorale:
    """One chorale: its Riemenschneider number, corpus name and roll [T, 88] (uint8, 0/1)."""

    number: int
    name: str
    roll: np.ndarray


def score_to_roll(score, step: float = 1.0) -> np.ndarray:
    """A music21 Stream -> piano roll [T, 88] uint8, T = ceil(last note end / step) frames."""
    notes = [n for n in score.flatten().notes if float(n.quarterLength) > 0]
    end = max((float(n.offset) + float(n.quarterLength) for n in notes), default=0.0)
    frames = math.ceil(end / step - EPS)
    roll = np.zeros((frames, KEYS), dtype=np.uint8)
    for n in notes:
        onset = float(n.offset)
        first = math.ceil(onset / step - EPS)
        stop = math.ceil((onset + float(n.quarterLength)) / step - EPS)
        for p in n.pitches:
            key = p.midi - LOWEST_MIDI
            if 0 <= key < KEYS and first < stop:
                roll[first:stop, key] = 1
    return roll


def chorale_names() -> list[str]:
    """Corpus names of the 371 chorales, in Riemenschneider order (index 0 is number 1)."""
    from music21.corpus import chorales

    return list(chorales.Iterator(returnType="filename"))


def parse_chorale(name: str) -> np.ndarray:
    from music21 import corpus

    return score_to_roll(corpus.parse(name))


def cache_path() -> Path:
    import music21

    return cache_dir() / f"jsb-music21-{music21.__version__}-v{CONVERSION_VERSION}.npz"


def load_chorales(progress: bool = True) -> list[Chorale]:
    """All chorales as rolls; parses the corpus on the first call and caches the result."""
    path = cache_path()
    if path.exists():
        cached = _read_cache(path)
        if cached is not None:
            return cached

    from tqdm import tqdm

    names = chorale_names()
    if progress and not sys.stderr.isatty():  # a log gets one line, not carriage-return updates
        print(f"parsing {len(names)} chorales (about a minute; cached afterwards)", file=sys.stderr)
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(names, desc="parsing chorales (cached afterwards)", disable=not interactive)
    rolls = [parse_chorale(n) for n in bar]
    try:
        atomic_save_with(
            path,
            lambda f: np.savez_compressed(
                f,
                rolls=np.concatenate(rolls),
                lengths=np.array([len(r) for r in rolls]),
                names=np.array(names),
            ),
        )
    except WriteError as err:
        print(
            f"celldsl: warning: the chorales are not cached ({err}); they will be parsed again",
            file=sys.stderr,
        )
    return [Chorale(i + 1, n, r) for i, (n, r) in enumerate(zip(names, rolls, strict=True))]


def _read_cache(path: Path) -> list[Chorale] | None:
    """The cached chorales, or None (with a warning) when the file is not to be used."""
    try:
        check_private(path, what="chorale cache", advice="delete it")
        with np.load(path, allow_pickle=False) as z:
            rolls, lengths, names = z["rolls"], z["lengths"], [str(s) for s in z["names"]]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        if bounds[-1] != len(rolls) or rolls.ndim != 2 or rolls.shape[1] != KEYS:
            raise ValueError("its arrays do not fit together")
        return [Chorale(i + 1, names[i], rolls[bounds[i] : bounds[i + 1]]) for i in range(len(names))]
    except PermissionError as err:
        why = str(err)
    except Exception as err:  # noqa: BLE001 - numpy raises many types for a damaged file
        why = f"cannot read {printable(str(path))}: {type(err).__name__}"
    print(f"celldsl: warning: ignoring the chorale cache: {why}; parsing again", file=sys.stderr)
    return None
