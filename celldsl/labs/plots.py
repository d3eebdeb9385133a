"""Figures for the labs (PNG via matplotlib's object API: no global backend, no pyplot state).

Every function takes plain data and an output path and returns the path it wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import atomic_save_with


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    return atomic_save_with(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _nan(v):
    return np.nan if v is None else v


def _zoom_past_start(ax, series: list[list[float]]) -> None:
    """Set y-limits from the points after the first one: the untrained model's value (e.g. NLL 61
    for 88 keys at p = 0.5) would otherwise flatten the part of the curve worth reading."""
    later = np.array([v for ys in series for v in ys[1:] if v is not None and np.isfinite(v)], dtype=float)
    if later.size:
        lo, hi = later.min(), later.max()
        pad = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
        ax.set_ylim(lo - pad, hi + pad)


def lr_changes(xs: list, history: list[dict]) -> list[tuple]:
    """(x, new rate) where the learning rate changed (`--set-lr`): a row's "lr" is the rate of the
    steps that led to it, so a change shows at the last row of the old rate."""
    return [
        (xs[i - 1], b["lr"])
        for i, (a, b) in enumerate(zip(history, history[1:], strict=False), 1)
        if a.get("lr") is not None and b.get("lr") is not None and a["lr"] != b["lr"]
    ]


def _mark_lr_changes(ax, marks: list[tuple]) -> None:
    for x, lr in marks:
        ax.axvline(x, color="0.45", ls="-.", lw=0.8)
        ax.annotate(
            f"lr {lr:g}",
            (x, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="bottom",
            ha="right",
            fontsize=7,
            color="0.3",
        )


def learning_curve(history: list[dict], metric: str, title: str, path: Path) -> Path:
    """Training loss (left) and the headline metric on each evaluation set (right) vs step."""
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_metric = fig.subplots(1, 2)
    steps = [row["step"] for row in history]
    ax_loss.plot(steps, [_nan(row["batch_loss"]) for row in history], label="training batches")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss (mean over batches since last point)")
    sets = sorted(
        {k[: -len(metric) - 1] for row in history for k in row if k.endswith("_" + metric) and k != metric}
    )
    for s in sets:
        ax_metric.plot(steps, [_nan(row.get(f"{s}_{metric}")) for row in history], label=s)
    _zoom_past_start(ax_metric, [[row.get(f"{s}_{metric}") for row in history] for s in sets])
    ax_metric.set(xlabel="step", ylabel=metric, title=metric)
    ax_metric.legend()
    marks = lr_changes(steps, history)
    for ax in (ax_loss, ax_metric):
        _mark_lr_changes(ax, marks)
    fig.suptitle(title)
    return _save(fig, Path(path))


def compare_curves(curves: dict[str, list[list[dict]]], metric: str, title: str, path: Path) -> Path:
    """Test metric vs step for every run: one colour per cell, one line per seed."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    colours = [f"C{i}" for i in range(10)]
    for i, (label, runs) in enumerate(curves.items()):
        for k, history in enumerate(runs):
            ax.plot(
                [row["step"] for row in history],
                [_nan(row.get(f"test_{metric}")) for row in history],
                color=colours[i % 10],
                alpha=0.9 if len(runs) == 1 else 0.6,
                label=label if k == 0 else None,
            )
    _zoom_past_start(ax, [[row.get(f"test_{metric}") for row in h] for runs in curves.values() for h in runs])
    ax.set(xlabel="training step", ylabel=f"test {metric}", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def copy_prediction(target, pred, title: str, path: Path) -> Path:
    """Target [bits, T] (top) above the predicted probabilities [bits, T] (bottom), time left to
    right: the layout of the lstm_copy_task README's pictures."""
    target, pred = np.asarray(target), np.asarray(pred)
    T = target.shape[1]
    fig = Figure(figsize=(min(2.5 + 0.12 * T, 16), 3.6))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, img, what in ((axes[0], target, "target"), (axes[1], pred, "prediction")):
        ax.imshow(img, aspect="auto", cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(ylabel=what, yticks=[])
    axes[1].set(xlabel="time step")
    fig.suptitle(title)
    return _save(fig, Path(path))


def adding_scatter(target, pred, tolerance: float, path: Path) -> Path:
    """Prediction vs target at the end of each test sequence, with the |error| < tolerance band."""
    target, pred = np.asarray(target), np.asarray(pred)
    fig = Figure(figsize=(9, 4))
    ax, ax_err = fig.subplots(1, 2)
    ok = np.abs(pred - target) < tolerance
    ax.scatter(target[ok], pred[ok], s=4, color="C2", label=f"|error| < {tolerance}")
    ax.scatter(target[~ok], pred[~ok], s=4, color="C3", label="wrong")
    ax.plot([0, 1], [0 - tolerance, 1 - tolerance], "k:", lw=0.8)
    ax.plot([0, 1], [0 + tolerance, 1 + tolerance], "k:", lw=0.8)
    ax.set(xlabel="target 0.5 + (X1+X2)/4", ylabel="prediction", title=f"solved {ok.mean():.1%} of {ok.size}")
    ax.legend(loc="upper left")
    ax_err.hist(pred - target, bins=60, color="C0")
    ax_err.axvline(-tolerance, color="k", ls=":")
    ax_err.axvline(tolerance, color="k", ls=":")
    ax_err.set(xlabel="prediction - target", ylabel="sequences", title="error distribution")
    return _save(fig, Path(path))


def pianoroll_prediction(target, probs, name: str, path: Path) -> Path:
    """Piano roll of a chorale [T, 88] above the model's next-frame probabilities [T, 88]."""
    target, probs = np.asarray(target), np.asarray(probs)
    keys = np.nonzero(target.any(0) | (probs.max(0) > 0.05))[0]
    lo, hi = (keys.min(), keys.max() + 1) if keys.size else (0, 88)
    fig = Figure(figsize=(10, 6))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, img, what in ((axes[0], target, "notes"), (axes[1], probs, "predicted P(note on | past)")):
        ax.imshow(
            img[:, lo:hi].T,
            origin="lower",
            aspect="auto",
            cmap="magma",
            vmin=0,
            vmax=1,
            extent=(-0.5, len(img) - 0.5, lo + 21 - 0.5, hi + 21 - 0.5),
            interpolation="nearest",
        )
        ax.set(ylabel="MIDI pitch", title=f"{name}: {what}")
    axes[1].set(xlabel="quarter-note frame")
    return _save(fig, Path(path))


def position_accuracy(acc: dict[int, float], path: Path) -> Path:
    """Next-character accuracy by position within the answer (0 = its first character)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.bar(list(acc), list(acc.values()), color="C0")
    ax.set(
        xlabel="position in the answer",
        ylabel="accuracy",
        ylim=(0, 1),
        title="arithmetic: accuracy by position",
    )
    return _save(fig, Path(path))


def attention_matrices(panels, path: Path) -> Path:
    """For each (source words, output words, weights [outputs, sources]): the attention matrix,
    source along the top, output down the side (as Bahdanau et al. 2014, Fig. 3)."""
    fig = Figure(figsize=(4.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (src, out, weights) in zip(axes, panels, strict=True):
        ax.imshow(np.asarray(weights), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(src)), src, rotation=90, fontsize=8)
        ax.set_yticks(range(len(out)), out, fontsize=8)
        ax.xaxis.tick_top()
    fig.suptitle("attention (greedy decoding): output word (rows) vs source word (columns)", fontsize=10)
    return _save(fig, Path(path))


def bleu_by_beam(bleu: dict[str, dict[int, float]], alpha: float, path: Path) -> Path:
    """BLEU against the beam width (width 1 = greedy), one line per evaluation set."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name, by_width in bleu.items():
        widths = sorted(by_width)
        ax.plot(widths, [by_width[w] for w in widths], "o-", label=name)
    ax.set(xlabel="beam width (1 = greedy)", ylabel="BLEU", title=f"BLEU vs beam width (alpha {alpha})")
    ax.set_xticks(sorted({w for by_width in bleu.values() for w in by_width}))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def score_boxes(scores: dict[str, list[float]], ylabel: str, title: str, path: Path) -> Path:
    """One box per cell over its runs' scores, with every run as a point (Greff et al. 2015, Fig. 3)."""
    labels = list(scores)
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 4.2))
    ax = fig.subplots()
    ax.boxplot([scores[k] for k in labels], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same picture every time
    for i, k in enumerate(labels, start=1):
        x = i + rng.uniform(-0.12, 0.12, len(scores[k]))
        ax.plot(x, scores[k], "o", color="C0", alpha=0.8, markersize=4)
    if len(labels) > 4:
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    else:
        ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def copy_learning_curve(sequences, curves: dict, graves: tuple, path: Path, lr_marks=()) -> Path:
    """Cost per sequence (bits, log scale) vs sequences seen, with Graves et al.'s approximate LSTM
    points; beside it, if given, lstm_copy_task's loss (BCE over all steps) with its floor.
    lr_marks: (sequences, new rate) where the learning rate changed."""
    has_bce = "bce_all" in curves
    fig = Figure(figsize=(11 if has_bce else 6, 4))
    axes = fig.subplots(1, 2 if has_bce else 1, squeeze=False)[0]
    ax = axes[0]
    for name, ys in curves["bits"].items():
        ax.plot(sequences, [_nan(y) for y in ys], label=f"{name} (lengths 1..20)")
    ax.plot(*zip(*graves, strict=True), "k*", markersize=9, label="Graves et al. 2014 Fig. 3 LSTM (approx.)")
    ax.set_yscale("log")
    ax.set(xlabel="sequences seen", ylabel="cost per sequence (bits)", title="copy: bits per sequence")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if has_bce:
        ax = axes[1]
        for name, ys in curves["bce_all"].items():
            ax.plot(sequences, [_nan(y) for y in ys], label=name)
        if curves.get("floor"):
            floor = curves["floor"]
            ax.axhline(floor, color="k", ls=":", label=f"floor (targets' entropy) {floor:.4f}")
        ax.axhline(0.01, color="C3", ls="--", lw=0.8, label="0.01")
        ax.set_yscale("log")
        ax.set(xlabel="sequences seen", ylabel="BCE over all steps", title="lstm_copy_task's loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in axes:
        _mark_lr_changes(ax, lr_marks)
    return _save(fig, Path(path))
