"""Train one cell on one task: the loop, evaluation points, checkpoints, metrics and plots.

A run writes into its output directory:

    checkpoint.pt        everything needed to continue (`resume=True`), written atomically
    metrics.csv          one row per evaluation point (step, training loss, metrics per set)
    metrics.json         the configuration, final numbers, timings and the same history
    learning_curve.png   training loss and the headline metric vs step
    *.png / *.txt        the task's own pictures (copy predictions, piano rolls, ...)

Runs are deterministic for a given seed on the CPU: the model is initialised from the seeded
global torch RNG and the data comes from its own generator (see `checkpoint.seed_everything`).
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from .files import atomic_write_json, atomic_write_text
from .model import build_model, count_parameters
from .tasks import Task, evaluate, make_task


@dataclass
class TrainConfig:
    """One run. `None` means "the task's default" (see each task's `defaults`)."""

    task: str
    cell: str
    hidden: int | None = None
    layers: int = 1
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    resume: bool = False
    eval_every: int | None = None
    clip: float = 1.0  # gradient-norm clipping (Chung et al. rescale the norm to 1)
    optimizer: str = "adam"  # "adam" or "rmsprop" (the papers' choice; momentum 0.9 as in Graves et al.)
    # torch CPU threads. 1 by default: the labs' models are tiny, so threads only add
    # synchronisation, and on a busy 2-core machine a copy step took 49 ms with 1 thread and
    # 605 ms with 2 (median of 35 steps). 0 leaves torch's default.
    threads: int = 1
    task_options: dict[str, Any] = field(default_factory=dict)
    pictures: bool = True
    progress: bool = True

    def resolved(self, task: Task) -> TrainConfig:
        d = task.defaults
        cfg = replace(
            self,
            hidden=self.hidden or d.hidden,
            steps=self.steps if self.steps is not None else d.steps,
            batch=self.batch or d.batch,
            lr=self.lr or d.lr,
            eval_every=self.eval_every or d.eval_every,
            task_options=task.options(),
        )
        if cfg.out is None:
            cfg.out = str(Path("runs") / cfg.task / f"{Path(cfg.cell).stem}-h{cfg.hidden}-s{cfg.seed}")
        return cfg


# settings that must match between a checkpoint and the run resuming from it
IDENTITY = ("task", "cell", "hidden", "layers", "batch", "lr", "seed", "optimizer", "clip", "task_options")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r} (adam or rmsprop)")


def _headline(task: Task, row: dict[str, Any]) -> str:
    value = row.get(f"test_{task.metric}")
    return f"test {task.metric} {value:.4g}" if value is not None else ""


def _write_csv(history: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    atomic_write_text(path, buf.getvalue())


def _eval_all(task: Task, model, device) -> dict[str, float]:
    row = {}
    for set_name, batches in task.eval_sets().items():
        for k, v in evaluate(task, model, batches, device).items():
            row[f"{set_name}_{k}"] = v
    return row


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or continue) one training run; returns the summary also written to metrics.json."""
    task = make_task(config.task, config.task_options)
    cfg = config.resolved(task)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_gen = seed_everything(cfg.seed)
    model = build_model(cfg.cell, task, cfg.hidden, cfg.layers, device=device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    step, history, train_seconds = 0, [], 0.0
    loss_sum, loss_count = 0.0, 0

    ckpt = load_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        old = ckpt["config"]
        diff = [k for k in IDENTITY if old.get(k) != asdict(cfg).get(k)]
        if diff:
            raise ValueError(f"cannot resume {out}: the checkpoint was made with different {', '.join(diff)}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], data_gen)
        step, history, train_seconds = ckpt["step"], ckpt["history"], ckpt["train_seconds"]
        loss_sum, loss_count = ckpt["loss_sum"], ckpt["loss_count"]
    elif cfg.resume:
        print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr)

    def checkpoint() -> None:
        save_checkpoint(
            out,
            config=asdict(cfg),
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            rng=rng_state(data_gen),
            step=step,
            history=history,
            train_seconds=train_seconds,
            loss_sum=loss_sum,
            loss_count=loss_count,
        )

    def record() -> dict:
        nonlocal loss_sum, loss_count
        row = {
            "step": step,
            "sequences": step * cfg.batch,
            "batch_loss": loss_sum / loss_count if loss_count else None,  # training batches since last row
            "time_per_step_s": train_seconds / step if step else None,
            **_eval_all(task, model, device),
        }
        loss_sum, loss_count = 0.0, 0
        history.append(row)
        _write_csv(history, out / "metrics.csv")
        return row

    if not history:
        record()
    bar = _progress(cfg, step)
    model.train()
    try:
        while step < cfg.steps:
            batch = task.train_batch(data_gen, cfg.batch).to(device)
            t0 = time.perf_counter()
            outputs, _ = model(batch.inputs)
            loss = task.loss(outputs, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - t0
            step += 1
            value = loss.detach().item()
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value} at step {step}; try a smaller --lr")
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.4g}, {cfg.batch * step / max(train_seconds, 1e-9):.0f} seq/s")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row = record()
                if cfg.progress:
                    bar.write(f"step {step}: batch loss {row['batch_loss']:.4g}, {_headline(task, row)}")
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        print(f"\ninterrupted at step {step}; checkpoint saved, continue with --resume", file=sys.stderr)
        raise
    bar.close()
    return _finish(task, cfg, model, history, train_seconds, device)


def _progress(cfg: TrainConfig, step: int):
    from tqdm import tqdm

    desc = f"{cfg.task} {Path(cfg.cell).stem} h={cfg.hidden} seed={cfg.seed}"
    return tqdm(
        total=cfg.steps, initial=step, desc=desc, unit="step", disable=not cfg.progress, dynamic_ncols=True
    )


def _finish(task: Task, cfg: TrainConfig, model, history, train_seconds: float, device) -> dict[str, Any]:
    from .plots import learning_curve

    out = Path(cfg.out)
    final = {k: v for k, v in history[-1].items() if k not in ("step", "sequences", "time_per_step_s")}
    steps_done = history[-1]["step"]
    summary: dict[str, Any] = {
        "task": cfg.task,
        "cell": cfg.cell,
        "cell_name": Path(cfg.cell).stem,
        "hidden": cfg.hidden,
        "layers": cfg.layers,
        "parameters": count_parameters(model),
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "steps": steps_done,
        "train_seconds": train_seconds,
        "time_per_step_s": train_seconds / steps_done if steps_done else None,
        "final": final,
        "extras": task.extras(model, device),
        "device": str(device),
        "torch": torch.__version__,
        "config": asdict(cfg),
        "history": history,
    }
    if any("valid_" + task.metric in row for row in history):
        pick = max if task.higher_is_better else min
        best = pick(history[1:] or history, key=lambda r: r["valid_" + task.metric])
        summary["best_valid"] = {k: v for k, v in best.items() if k != "time_per_step_s"}
    if cfg.pictures:
        title = f"{cfg.task}: {Path(cfg.cell).stem}, hidden {cfg.hidden}, seed {cfg.seed}"
        paths = [learning_curve(history, task.metric, title, out / "learning_curve.png")]
        paths += task.pictures(model, out, device)
        summary["pictures"] = [str(p) for p in paths]
    atomic_write_json(out / "metrics.json", summary)
    return summary
