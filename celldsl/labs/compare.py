"""Train several cells on one task and write a comparison: a markdown table and one plot.

Hidden sizes come from `--hidden` (one value for all cells, or one per cell), from a parameter
budget, as Chung et al. 2014 did (about 20k parameters per model on the music data): each cell
gets the largest hidden size whose whole model (recurrent layer + readout) fits the budget, or
from a state size (`--state-size S`, as Arora et al. 2023/2024 compare recall): each cell is sized
so one layer's recurrent state holds about S numbers per sequence, in a model of one width.

A run whose loss stops being finite is kept in the table as diverged (with its step); the other
runs go on.

Output directory layout:

    DIR/<cell>/seed<k>/   one `train` run each (resumable)
    DIR/results.md        the table, the settings and what the papers report
    DIR/results.json      the same numbers, machine-readable
    DIR/curves.png        test metric vs step for every run
    DIR/scores.png        each run's test score per cell (box and points), as Greff et al. Fig. 3

With two or more seeds per cell, results.md also says which cells differ significantly from the
first one (stats.py: Welch's t-test, Bonferroni-corrected, as Greff et al. 2015).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write_json, atomic_write_text
from .model import hidden_for_budget, sizes_for_state
from .tasks import make_task
from .train import Diverged, TrainConfig, train


@dataclass
class CompareConfig:
    task: str
    cells: list[str]
    hidden: list[int] | None = None  # one for all, or one per cell
    param_budget: int | None = None
    state_size: int | None = None  # numbers of recurrent state per layer (model.sizes_for_state)
    width: int | None = None  # model width; with state_size default: one --hidden, else the task's
    sizes: dict[str, int] | None = None  # cell sizes (heads, K, V, ...), each given to the cells that have it
    seeds: int = 1
    seed: int = 0  # seeds used: seed, seed+1, ..., seed+seeds-1
    layers: int = 1
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    device: str = "cpu"
    out: str | None = None
    resume: bool = False
    overwrite: bool = False  # replace the runs already in the folders (see train.TrainConfig)
    eval_every: int | None = None
    clip: float = 1.0
    clip_value: float = 0.0
    optimizer: str = "adam"
    weight_noise: float = 0.0
    patience: int = 0
    lr_plateau: int = 0
    lr_factor: float = 10**-0.5
    threads: int = 1
    task_options: dict[str, Any] = field(default_factory=dict)
    pictures: bool = True
    progress: bool = True


def labels_for(cells: list[str]) -> list[str]:
    """File stems, made unique (lstm, gru, lstm-2) so runs do not share a directory."""
    labels: list[str] = []
    for c in cells:
        stem, k = Path(c).stem, 1
        label = stem
        while label in labels:
            k += 1
            label = f"{stem}-{k}"
        labels.append(label)
    return labels


def hidden_sizes(cfg: CompareConfig) -> list[int]:
    task = make_task(cfg.task, cfg.task_options)
    if cfg.hidden and cfg.param_budget:
        raise ValueError("give either hidden sizes or a parameter budget, not both")
    if cfg.param_budget:
        return [hidden_for_budget(c, task, cfg.param_budget, cfg.layers) for c in cfg.cells]
    if not cfg.hidden:
        return [task.defaults.hidden] * len(cfg.cells)
    if len(cfg.hidden) == 1:
        return list(cfg.hidden) * len(cfg.cells)
    if len(cfg.hidden) != len(cfg.cells):
        raise ValueError(
            f"{len(cfg.hidden)} hidden sizes for {len(cfg.cells)} cells: give one, or one per cell"
        )
    return list(cfg.hidden)


def shapes(cfg: CompareConfig) -> list[tuple[int, int | None, dict[str, int] | None]]:
    """(hidden, model width, cell sizes) per cell: from the state size, or hidden_sizes() with
    --width and --size as given (each size given only to the cells that declare it)."""
    if cfg.state_size:
        if cfg.param_budget or (cfg.hidden and len(cfg.hidden) > 1):
            raise ValueError("--state-size sizes every cell: give no --param-budget or per-cell --hidden")
        default = cfg.hidden[0] if cfg.hidden else make_task(cfg.task, cfg.task_options).defaults.hidden
        width = cfg.width or default
        chosen = [sizes_for_state(c, cfg.state_size, width, cfg.sizes) for c in cfg.cells]
        return [(h, width, s or None) for h, s, _ in chosen]
    hidden = hidden_sizes(cfg)
    if not cfg.sizes:
        return [(h, cfg.width, None) for h in hidden]
    own = [_declared_sizes(c) for c in cfg.cells]
    unknown = sorted(set(cfg.sizes) - set().union(*own))
    if unknown:
        raise ValueError(f"--size {', '.join(unknown)}: no cell here declares it")
    mine = [{k: v for k, v in cfg.sizes.items() if k in o} or None for o in own]
    return [(h, cfg.width, m) for h, m in zip(hidden, mine, strict=True)]


def _declared_sizes(cell: str) -> set[str]:
    import celldsl

    ir = celldsl.compile_cell(cell).ir
    if isinstance(ir.widths, dict):  # a vector cell (nn/arguments.declared_width_sizes)
        return {*ir.widths.values(), *getattr(ir, "init_sizes", ())} - {"H", "row", *ir.inputs}
    return {"heads", *ir.widths, *ir.init_sizes}


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every (cell, seed), then write results.md, results.json and curves.png; a run that
    diverges is recorded as such (train.Diverged) and the others go on."""
    if cfg.seeds < 1:
        raise ValueError("seeds must be at least 1")
    out = Path(cfg.out or Path("runs") / f"compare-{cfg.task}")
    runs: dict[str, list[dict]] = {}
    chosen = shapes(cfg)
    for cell, label, (hidden, width, sizes) in zip(cfg.cells, labels_for(cfg.cells), chosen, strict=True):
        for k in range(cfg.seeds):
            run = TrainConfig(
                task=cfg.task,
                cell=cell,
                hidden=hidden,
                width=width,
                sizes=sizes,
                layers=cfg.layers,
                steps=cfg.steps,
                batch=cfg.batch,
                lr=cfg.lr,
                seed=cfg.seed + k,
                device=cfg.device,
                out=str(out / label / f"seed{cfg.seed + k}"),
                resume=cfg.resume,
                overwrite=cfg.overwrite,
                eval_every=cfg.eval_every,
                clip=cfg.clip,
                clip_value=cfg.clip_value,
                optimizer=cfg.optimizer,
                weight_noise=cfg.weight_noise,
                patience=cfg.patience,
                lr_plateau=cfg.lr_plateau,
                lr_factor=cfg.lr_factor,
                threads=cfg.threads,
                task_options=cfg.task_options,
                pictures=cfg.pictures,
                progress=cfg.progress,
            )
            try:
                summary = train(run)
            except Diverged as err:
                print(f"{label} seed {run.seed}: {err}; recorded as diverged", file=sys.stderr)
                summary = err.summary
            runs.setdefault(label, []).append(summary)
    return write_results(cfg, runs, out)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def _num(x: float, digits: int) -> str:
    """Significant digits, but never scientific notation for table-sized numbers."""
    return f"{x:.0f}" if abs(x) >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def fmt(values: list[float]) -> str:
    """'mean ± sample std' (or the value for one seed): 4 significant digits, std 2."""
    if any(v is None for v in values):
        return "n/a"
    m, s = mean_std(values)
    return _num(m, 4) if s is None else f"{_num(m, 4)} ± {_num(s, 2)}"


def _settings_line(c: dict, how: str) -> str:
    """One sentence with every training setting of a run's config `c`."""
    clipping = [f"gradient-norm clip {c['clip']}" if c["clip"] else "no gradient-norm clip"]
    if c.get("clip_value"):
        clipping.append(f"elementwise gradient clip ±{c['clip_value']}")
    parts = [
        f"hidden sizes from {how}",
        f"{c['layers']} layer(s)",
        f"batch {c['batch']}",
        f"{c['optimizer']} lr {c['lr']}",
        *clipping,
    ]
    if c.get("weight_noise"):
        parts.append(f"weight noise std {c['weight_noise']}")
    if c.get("patience"):
        parts.append(f"early stopping after {c['patience']} evaluations without a better valid metric")
    if c.get("lr_plateau"):
        parts.append(
            f"learning rate times {c['lr_factor']:.3g} after {c['lr_plateau']} evaluations "
            "without a better valid metric"
        )
    parts += [f"task options {c['task_options']}", f"{c['threads']} CPU thread(s)"]
    return "Settings: " + "; ".join(parts) + "."


def write_results(cfg: CompareConfig, runs: dict[str, list[dict]], out: Path) -> dict[str, Any]:
    from .plots import compare_curves, score_boxes
    from .stats import against_reference, markdown

    task = make_task(cfg.task, cfg.task_options)
    metric = task.metric
    done = [r for s in runs.values() for r in s if "diverged_at" not in r]
    first = done[0] if done else next(iter(runs.values()))[0]
    sets = [k[: -len(metric) - 1] for k in first["final"] if k.endswith("_" + metric)]
    extras = [k for k in first["extras"] if k.endswith(metric)]
    has_valid = "best_valid" in first
    shaped = bool(cfg.state_size or cfg.sizes or cfg.width)
    diverged = len(done) < sum(len(s) for s in runs.values())

    also = [f"test_{m}" for m in task.also_report if f"test_{m}" in first["final"]]
    header = ["cell", "hidden"] + (["width", "sizes", "state/layer"] if shaped else []) + ["parameters"]
    header += [f"{s} {metric}" for s in sets]
    header += [a.replace("_", " ", 1) for a in also]
    header += ([f"test {metric} at best valid"] if has_valid else []) + extras
    steps_differ = len({r["steps"] for s in runs.values() for r in s}) > 1
    header += (["steps"] if steps_differ else []) + (["diverged at step"] if diverged else [])
    header += ["time/step (ms)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for label, summaries in runs.items():
        fin = [r for r in summaries if "diverged_at" not in r]  # the runs that finished
        row = {
            "cell": label,
            "file": summaries[0]["cell"],
            "hidden": summaries[0]["hidden"],
            "width": summaries[0].get("width"),
            "sizes": summaries[0].get("sizes"),
            "state_per_layer": summaries[0].get("state_per_layer"),
            "parameters": summaries[0]["parameters"],
            **{f"{s}_{metric}": [r["final"][f"{s}_{metric}"] for r in fin] for s in sets},
            **{a: [r["final"][a] for r in fin] for a in also},
            **{e: [r["extras"][e] for r in fin] for e in extras},
            "time_per_step_ms": [
                1000 * r["time_per_step_s"] if r["time_per_step_s"] else None for r in summaries
            ],
            "seeds": [r["config"]["seed"] for r in summaries],
            "diverged_at": [r.get("diverged_at") for r in summaries],
        }
        if has_valid:
            row["test_at_best_valid"] = [r["best_valid"][f"test_{metric}"] for r in fin]
        rows.append(row)
        show = fmt if fin else (lambda _: "diverged")
        cells = [label, str(row["hidden"])]
        if shaped:
            sizes = " ".join(f"{k}={v}" for k, v in (row["sizes"] or {}).items()) or "—"
            cells += [str(row["width"] or row["hidden"]), sizes, str(row["state_per_layer"])]
        cells += [str(row["parameters"])] + [show(row[f"{s}_{metric}"]) for s in sets]
        cells += [show(row[a]) for a in also]
        cells += ([show(row["test_at_best_valid"])] if has_valid else []) + [show(row[e]) for e in extras]
        row["steps"] = [r["steps"] for r in summaries]
        cells += [fmt(row["steps"])] if steps_differ else []
        cells += [", ".join("—" if d is None else str(d) for d in row["diverged_at"])] if diverged else []
        cells += [fmt(row["time_per_step_ms"]), str(len(summaries))]
        lines.append("| " + " | ".join(cells) + " |")

    c = first["config"]
    how = (
        f"a state size of {cfg.state_size} numbers per layer (model width {rows[0]['width']})"
        if cfg.state_size
        else f"a parameter budget of {cfg.param_budget}"
        if cfg.param_budget
        else "--hidden"
    )
    better = "higher" if task.higher_is_better else "lower"
    seeds = ", ".join(map(str, rows[0]["seeds"]))
    score_key = "test_at_best_valid" if has_valid else f"test_{metric}"
    what = f"test {metric}" + (" at the best validation point" if has_valid else "")
    scores = {row["cell"]: row[score_key] for row in rows if row.get(score_key)}
    enough = len(scores) > 1 and all(len(v) > 1 and None not in v for v in scores.values())
    comparisons = against_reference(scores) if enough else []
    ending = (
        "final values at the end of each run (early stopping: see the steps column)"
        if steps_differ
        else f"final values after {first['steps']} steps"
    )
    text = "\n".join(
        [
            f"# {cfg.task}: {', '.join(runs)}",
            "",
            *lines,
            "",
            f"`{metric}`: {better} is better; mean ± sample std over seeds {seeds}; "
            f"{ending}. Time/step: forward + backward + update on "
            f"{first['device']} (torch {first['torch']}), data generation excluded.",
            *(
                [
                    "Diverged: a run whose training loss stopped being finite, at the step given; the "
                    "means and the test of significance use the runs that finished."
                ]
                if diverged
                else []
            ),
            _settings_line(c, how),
            "",
            *markdown(comparisons, what),
            *([""] if comparisons else []),
            f"Reference: {task.reference}",
            "",
        ]
    )
    atomic_write_text(out / "results.md", text)
    plot = compare_curves(
        {label: [r["history"] for r in s] for label, s in runs.items()},
        metric,
        f"{cfg.task}: test {metric}",
        out / "curves.png",
    )
    boxes = None
    if scores:
        boxes = score_boxes(scores, f"{what} ({better} is better)", f"{cfg.task}: {what}", out / "scores.png")
    result = {
        "task": cfg.task, "metric": metric, "rows": rows, "table": text, "plot": str(plot),
        "scores_plot": str(boxes) if boxes else None, "significance": [vars(c) for c in comparisons],
    }  # fmt: skip
    atomic_write_json(out / "results.json", {k: v for k, v in result.items() if k != "table"})
    return result
