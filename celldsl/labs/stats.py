"""Which differences between cells are significant: Welch's t-test with Bonferroni correction,
as Greff et al. 2015 (section 5) compared each LSTM variant against the vanilla LSTM.

Each cell's runs (seeds) give one score each; every other cell is compared with the reference
cell (the first one given) by a two-sided Welch's t-test (unequal variances). With m comparisons,
a difference is significant when p < alpha / m (Bonferroni).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass
class Comparison:
    cell: str
    reference: str
    difference: float  # mean(cell) - mean(reference)
    t: float
    df: float
    p: float
    significant: bool


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(t, Welch-Satterthwaite degrees of freedom, two-sided p) for mean(a) - mean(b)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least 2 values per group")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return (math.copysign(math.inf, diff) if diff else math.nan), math.nan, (0.0 if diff else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, float(2 * stats.t.sf(abs(t), df))


def against_reference(scores: dict[str, list[float]], alpha: float = 0.05) -> list[Comparison]:
    """Compare every cell with the first one (see module docstring)."""
    names = list(scores)
    reference, others = names[0], names[1:]
    out = []
    for name in others:
        t, df, p = welch(scores[name], scores[reference])
        diff = statistics.fmean(scores[name]) - statistics.fmean(scores[reference])
        out.append(Comparison(name, reference, diff, t, df, p, p < alpha / len(others)))
    return out


def markdown(comparisons: list[Comparison], what: str, alpha: float = 0.05) -> list[str]:
    if not comparisons:
        return []
    m = len(comparisons)
    ref = comparisons[0].reference
    lines = [
        f"Significance: two-sided Welch's t-test of each cell's {what} against {ref}'s; with Bonferroni "
        f"correction for {m} comparison(s) a difference is significant when p < {alpha}/{m} "
        f"= {alpha / m:.4g}.",
        "",
        f"| cell | difference to {ref} | t | df | p | significant |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.cell} | {c.difference:+.4g} | {c.t:.3g} | {c.df:.3g} | {c.p:.3g} | "
            f"{'yes' if c.significant else 'no'} |"
        )
    return lines
