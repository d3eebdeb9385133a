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
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .files import atomic_write_json, atomic_write_text
from .model import count_parameters
from .optim import make_optimizer
from .rundir import run_folder
from .tasks import Task, evaluate, make_task


@dataclass
class TrainConfig:
    """One run. `None` means "the task's default" (see each task's `defaults`)."""

    task: str
    cell: str
    hidden: int | None = None
    layers: int = 1
    width: int | None = None  # the model width (embedding / input projection); None: hidden
    sizes: dict[str, int] | None = None  # the cell's own sizes (a matrix cell's heads, K, V)
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    resume: bool = False
    overwrite: bool = False  # replace the run already in `out` (without it, and without resume: refused)
    # on resume: go on at this learning rate from the checkpoint's step (a drop by hand); `lr`
    # stays the rate the run started at, and `lr_schedule` in the checkpoint and metrics.json says
    # which rate trained from which step on
    set_lr: float | None = None
    eval_every: int | None = None
    clip: float = 1.0  # gradient-norm clipping (Chung et al. rescale the norm to 1); 0 = none
    clip_value: float = 0.0  # elementwise clipping to [-v, v] (Graves et al. 2014: 10); 0 = none
    optimizer: str = "adam"  # see optim.OPTIMIZERS
    weight_noise: float = 0.0  # std of Gaussian noise added to every weight per step (Chung et al.: 0.075)
    patience: int = 0  # stop after this many evaluations without a better validation metric; 0 = never
    # a learning-rate schedule chosen by the validation set, not by hand or by the test curve:
    # multiply the rate by `lr_factor` once `lr_plateau` evaluations have passed without a better
    # validation metric, counted from the best or from the last change of rate, whichever is later
    # (torch's ReduceLROnPlateau with cooldown 0, on the evaluations); 0 = never
    lr_plateau: int = 0
    lr_factor: float = 10**-0.5  # 1e-4, 3.2e-5, 1e-5, ...: the steps of the hand-dropped LSTM run
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
            hidden=d.hidden if self.hidden is None else self.hidden,
            steps=d.steps if self.steps is None else self.steps,
            batch=d.batch if self.batch is None else self.batch,
            lr=d.lr if self.lr is None else self.lr,
            eval_every=d.eval_every if self.eval_every is None else self.eval_every,
            task_options=task.options(),
        )
        if cfg.out is None:
            cfg.out = str(Path("runs") / cfg.task / f"{Path(cfg.cell).stem}-h{cfg.hidden}-s{cfg.seed}")
        return cfg


# settings that must match between a checkpoint and the run resuming from it
IDENTITY = (
    "task", "cell", "hidden", "layers", "width", "sizes", "batch", "lr", "seed", "optimizer", "clip",
    "clip_value", "weight_noise", "task_options",
)  # fmt: skip
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
SET_LR_NEEDS_RESUME = (
    "--set-lr changes the learning rate of a resumed run (with --resume and a checkpoint); to start "
    "at a learning rate, use --lr"
)


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
        scores = evaluate(task, model, batches, device)
        scores.update(task.corpus_scores(model, batches, device))
        for k, v in scores.items():
            row[f"{set_name}_{k}"] = v
    return row


# settings that must be positive (sizes, rates) or at least 0 (counts where 0 means "off"/"none")
_POSITIVE = ("hidden", "layers", "batch", "lr", "eval_every")
_NOT_NEGATIVE = ("steps", "clip", "clip_value", "weight_noise", "patience", "lr_plateau", "threads")


def check_settings(cfg: TrainConfig) -> None:
    """Refuse a setting out of its range rather than train with something else: a value given is
    used as given, or refused here (ValueError, one line)."""
    for name in (*_POSITIVE, *_NOT_NEGATIVE):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
        if value < 0 or (value == 0 and name in _POSITIVE):
            bound = "positive" if name in _POSITIVE else "0 or more"
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {value}")
    if cfg.set_lr is not None and not cfg.resume:
        raise ValueError(SET_LR_NEEDS_RESUME)
    if cfg.set_lr is not None and not (cfg.set_lr > 0 and math.isfinite(cfg.set_lr)):
        raise ValueError(f"--set-lr must be positive, got {cfg.set_lr}")
    if not 0 < cfg.lr_factor < 1:
        raise ValueError(f"--lr-factor must be between 0 and 1 (a drop), got {cfg.lr_factor}")
    width = cfg.width
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"--width must be a positive integer, got {cfg.width!r}")
    for name, value in (cfg.sizes or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--size {name}: expected a positive integer, got {value!r}")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or continue) one training run; returns the summary also written to metrics.json.

    The output folder is held for the run (rundir.run_folder): checked to be ours, locked against a
    second run, and refused when it holds a run and neither `resume` nor `overwrite` is set."""
    task = make_task(config.task, config.task_options)
    cfg = config.resolved(task)
    if cfg.lr_plateau < 0:
        raise ValueError(f"--lr-plateau must be 0 (never) or a number of evaluations, got {cfg.lr_plateau}")
    check_settings(cfg)
    if (cfg.patience or cfg.lr_plateau) and "valid" not in task.eval_sets():
        raise ValueError(
            f"--patience and --lr-plateau watch the valid set, and {cfg.task} has none "
            f"(its sets: {', '.join(task.eval_sets())})"
        )
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    with run_folder(cfg.out, cfg.resume, cfg.overwrite) as out:
        return _train(task, cfg, out, device)


def _train(task: Task, cfg: TrainConfig, out: Path, device: torch.device) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_gen = seed_everything(cfg.seed)
    shape = {k: v for k, v in (("width", cfg.width), ("sizes", cfg.sizes)) if v}
    model = task.build_model(cfg.cell, cfg.hidden, cfg.layers, device=device, **shape)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    step, history, train_seconds = 0, [], 0.0
    loss_sum, loss_count = 0.0, 0
    lr_schedule = [[0, cfg.lr]]

    ckpt = load_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        old = ckpt.get("config")
        if not isinstance(old, dict):
            raise CheckpointError(f"cannot resume {out}: checkpoint.pt has no run configuration")
        diff = [k for k in IDENTITY if old.get(k, _DEFAULTS.get(k)) != asdict(cfg).get(k)]
        if diff:
            raise ValueError(f"cannot resume {out}: the checkpoint was made with different {', '.join(diff)}")
        _restore(ckpt, model, optimizer, data_gen, out)
        step, history, train_seconds = ckpt["step"], ckpt["history"], ckpt["train_seconds"]
        loss_sum, loss_count = ckpt["loss_sum"], ckpt["loss_count"]
        lr_schedule = ckpt.get("lr_schedule", lr_schedule)
        for row in history:  # rows written before rows said their rate
            row.setdefault("lr", _rate_before(lr_schedule, row["step"]))
    elif cfg.resume:
        print(f"no checkpoint in {out}: starting from step 0", file=sys.stderr)
    if cfg.set_lr is not None:
        if ckpt is None:
            raise ValueError(SET_LR_NEEDS_RESUME)
        if cfg.set_lr != lr_schedule[-1][1]:
            lr_schedule = [*lr_schedule, [step, cfg.set_lr]]
            if cfg.progress:
                print(
                    f"learning rate {lr_schedule[-2][1]:g} -> {cfg.set_lr:g} from step {step}",
                    file=sys.stderr,
                )
    for group in optimizer.param_groups:
        group["lr"] = lr_schedule[-1][1]

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
            lr_schedule=lr_schedule,
        )

    def record() -> dict:
        nonlocal loss_sum, loss_count
        row = {
            "step": step,
            "sequences": step * cfg.batch,
            "batch_loss": loss_sum / loss_count if loss_count else None,  # training batches since last row
            "time_per_step_s": train_seconds / step if step else None,
            "lr": lr_schedule[-1][1],  # the rate of the steps since the last row
            **_eval_all(task, model, device),
        }
        loss_sum, loss_count = 0.0, 0
        history.append(row)
        _write_csv(history, out / "metrics.csv")
        return row

    progress = Progress(cfg, step)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    with _stop_between_steps() as stop:
        try:
            if not history:
                record()
            while step < cfg.steps and not _patience_spent(task, cfg, history) and not stop.requested:
                batch = task.train_batch(data_gen, cfg.batch).to(device)
                t0 = time.perf_counter()
                noise = _add_weight_noise(params, cfg.weight_noise)
                outputs, _ = model(batch.inputs)
                loss = task.loss(outputs, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _remove_weight_noise(params, noise)
                if cfg.clip_value:
                    torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                train_seconds += time.perf_counter() - t0
                step += 1
                value = loss.detach().item()
                loss_sum, loss_count = loss_sum + value, loss_count + 1
                if not math.isfinite(value):
                    progress.close()
                    raise Diverged(
                        f"training loss is {value} at step {step}; try a smaller --lr",
                        _diverged(task, cfg, out, model, history, step, device, train_seconds),
                    )
                progress.step(value, cfg.batch * step / max(train_seconds, 1e-9))
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    row = record()
                    progress.evaluation(step, row, _headline(task, row))
                    lr_schedule = _drop_on_plateau(task, cfg, history, lr_schedule, optimizer, step)
                    checkpoint()
            if stop.requested:
                # between two steps: the state every periodic checkpoint is taken in, so a resumed
                # run goes on exactly as the uninterrupted one
                checkpoint()
                progress.close()
                saved = f"\ninterrupted at step {step}; checkpoint saved, continue with --resume"
                print(saved, file=sys.stderr)
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            progress.close()
            if not stop.requested or stop.count > 1:
                kept = f"\nstopped during step {step + 1}; checkpoint.pt keeps the last one saved"
                print(kept, file=sys.stderr)
            raise
    progress.close()
    if step < cfg.steps and cfg.progress:
        print(f"early stop at step {step}: no better valid {task.metric} in {cfg.patience} evaluations")
    return _finish(task, cfg, out, model, history, train_seconds, device, lr_schedule)


def _restore(ckpt: dict, model, optimizer, data_gen: torch.Generator, out: Path) -> None:
    """Load a checkpoint's states into the run, or say in one line why it does not fit."""
    where = f"cannot resume {out}: checkpoint.pt"
    try:
        weights = ckpt["model"]
        mine = model.state_dict()
        for key in sorted(set(mine) | set(weights)):
            if key not in weights or key not in mine:
                side = "lacks" if key not in weights else "has an extra"
                raise CheckpointError(f"{where} {side} weight {key} (was it made with another cell file?)")
            theirs = getattr(weights[key], "shape", None)
            if theirs != mine[key].shape:
                raise CheckpointError(
                    f"{where} has {key} of shape {list(theirs or [])}, this model {list(mine[key].shape)} "
                    "(was it made with another cell file or size?)"
                )
        model.load_state_dict(weights)
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], data_gen)
        for key in ("step", "history", "train_seconds", "loss_sum", "loss_count"):
            ckpt[key]  # noqa: B018 - present, or the KeyError below says which is missing
    except CheckpointError:
        raise
    except KeyError as err:
        raise CheckpointError(f"{where} lacks {err}: not a complete celldsl checkpoint") from None
    except (ValueError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{where} does not fit this run: {first}") from None


class _StopRequest:
    requested: bool = False
    count: int = 0


@contextmanager
def _stop_between_steps():
    """Let Ctrl-C (SIGINT) and `kill` (SIGTERM, what job schedulers send first; also the only way to
    stop a background job of a non-interactive shell, which has SIGINT ignored) stop a run with a
    checkpoint. The signal only asks: the loop stops after the step in progress (and its
    evaluation and checkpoint), so the checkpoint is one the uninterrupted run passes through too.
    Stopping mid-step instead left a batch drawn, or an update made, that the step count did not
    include, and the resumed run differed. A second signal stops at once (KeyboardInterrupt), with
    the last checkpoint written kept. A SIGINT that is ignored stays ignored."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(signum, frame):
        stop.count += 1
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, ask)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _rate_before(lr_schedule: list, step: int) -> float:
    """The learning rate of the steps that led to `step` (of step 0: the first rate)."""
    rates = [lr for start, lr in lr_schedule if start < step]
    return rates[-1] if rates else lr_schedule[0][1]


def _add_weight_noise(params: list[torch.Tensor], std: float) -> list[torch.Tensor] | None:
    """Perturb every weight by N(0, std^2) for this step (Graves 2011 "weight noise", as Chung et
    al. 2014 used it): the gradient is taken at the noisy weights and applied to the clean ones.
    Returns the clean weights, which `_remove_weight_noise` puts back exactly."""
    if not std:
        return None
    with torch.no_grad():
        clean = [p.detach().clone() for p in params]
        for p in params:
            p.add_(torch.randn_like(p), alpha=std)
    return clean


def _remove_weight_noise(params: list[torch.Tensor], clean: list[torch.Tensor] | None) -> None:
    if clean is not None:
        with torch.no_grad():
            for p, c in zip(params, clean, strict=True):
                p.copy_(c)


def _valid_rows(task: Task, history: list[dict]) -> tuple[list[dict], int]:
    """The evaluated rows with a validation metric (the untrained row at step 0 does not count),
    and the index of the best of them (the first, on ties)."""
    key = f"valid_{task.metric}"
    rows = [r for r in history[1:] if r.get(key) is not None]
    values = [r[key] for r in rows]
    best = (max if task.higher_is_better else min)(range(len(values)), key=values.__getitem__, default=-1)
    return rows, best


def _patience_spent(task: Task, cfg: TrainConfig, history: list[dict]) -> bool:
    """Early stopping: True once `patience` evaluations have passed without a better validation
    metric than the best so far."""
    rows, best = _valid_rows(task, history)
    return bool(cfg.patience and rows) and len(rows) - 1 - best >= cfg.patience


def _drop_on_plateau(task: Task, cfg: TrainConfig, history, lr_schedule: list, optimizer, step: int) -> list:
    """The schedule after this evaluation: one more entry, and the optimizer at the new rate, when
    `_plateau_reached`."""
    if not _plateau_reached(task, cfg, history, lr_schedule):
        return lr_schedule
    old, new = lr_schedule[-1][1], lr_schedule[-1][1] * cfg.lr_factor
    for group in optimizer.param_groups:
        group["lr"] = new
    if cfg.progress:
        print(
            f"learning rate {old:.3g} -> {new:.3g} from step {step}: "
            f"no better valid {task.metric} in {cfg.lr_plateau} evaluations",
            file=sys.stderr,
        )
    return [*lr_schedule, [step, new]]


def _plateau_reached(task: Task, cfg: TrainConfig, history: list[dict], lr_schedule: list) -> bool:
    """True once `lr_plateau` evaluations have passed without a better validation metric, counted
    from the best row or from the last row at the old rate, whichever is later: after a change,
    the new rate gets `lr_plateau` evaluations of its own."""
    rows, best = _valid_rows(task, history)
    if not cfg.lr_plateau or not rows:
        return False
    last_change = lr_schedule[-1][0]
    at_change = sum(r["step"] <= last_change for r in rows) - 1  # -1 when the rate never changed
    return len(rows) - 1 - max(best, at_change) >= cfg.lr_plateau


class Progress:
    """A tqdm bar on a terminal; otherwise (output redirected to a log) one plain line per
    evaluation, so that a log holds what a reader wants and not carriage-return updates."""

    def __init__(self, cfg: TrainConfig, step: int):
        from tqdm import tqdm

        self.enabled = cfg.progress
        self.interactive = cfg.progress and sys.stderr.isatty()
        self.total, self.started = cfg.steps, time.perf_counter()
        self.seq_per_s = 0.0
        self.desc = f"{cfg.task} {Path(cfg.cell).stem} h={cfg.hidden} seed={cfg.seed}"
        self.bar = tqdm(
            total=cfg.steps, initial=step, desc=self.desc, unit="step", disable=not self.interactive,
            dynamic_ncols=True, file=sys.stderr,
        )  # fmt: skip
        if self.enabled and not self.interactive:
            print(f"{self.desc}: step {step} of {cfg.steps}", flush=True)

    def step(self, loss: float, seq_per_s: float) -> None:
        self.seq_per_s = seq_per_s
        if self.interactive:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4g}, {seq_per_s:.0f} seq/s", refresh=False)

    def evaluation(self, step: int, row: dict, headline: str) -> None:
        if not self.enabled:
            return
        text = f"step {step}: batch loss {row['batch_loss']:.4g}, {headline}"
        if self.interactive:
            self.bar.write(text)
        else:
            elapsed = time.perf_counter() - self.started
            speed = f"{self.seq_per_s:.0f} seq/s, {elapsed:.0f} s elapsed"
            print(f"{self.desc} {text}, {speed} ({step}/{self.total})", flush=True)

    def close(self) -> None:
        self.bar.close()


class Diverged(FloatingPointError):
    """The training loss stopped being a finite number; `summary` is the run as far as it went
    (written to metrics.json too), with `diverged_at` the step, so a comparison can list it."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def _diverged(task: Task, cfg: TrainConfig, out: Path, model, history, step: int, device, seconds) -> dict:
    summary = _summary(task, cfg, model, history, seconds, device, [[0, cfg.lr]])
    summary.update(steps=step, diverged_at=step, final={}, extras={}, time_per_step_s=seconds / step)
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _summary(task: Task, cfg: TrainConfig, model, history, train_seconds: float, device, lr_schedule) -> dict:
    from .model import state_per_layer

    steps_done = history[-1]["step"]
    layer_input = getattr(getattr(model, "rnn", None), "input_size", None)
    state = state_per_layer(cfg.cell, layer_input, cfg.hidden, cfg.sizes) if layer_input else None
    return {
        "task": cfg.task,
        "cell": cfg.cell,
        "cell_name": Path(cfg.cell).stem,
        "hidden": cfg.hidden,
        "layers": cfg.layers,
        "width": cfg.width,
        "sizes": cfg.sizes,
        # numbers of recurrent state per layer and sequence (None for a model without one .rnn)
        "state_per_layer": state,
        "parameters": count_parameters(model),
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "steps": steps_done,
        "train_seconds": train_seconds,
        "time_per_step_s": train_seconds / steps_done if steps_done else None,
        "device": str(device),
        "torch": torch.__version__,
        "config": asdict(cfg),
        "lr_schedule": lr_schedule,  # [step, learning rate from that step on]
        "history": history,
    }


def _finish(
    task: Task, cfg: TrainConfig, out: Path, model, history, train_seconds: float, device, lr_schedule: list
) -> dict[str, Any]:
    from .plots import learning_curve

    final = {k: v for k, v in history[-1].items() if k not in ("step", "sequences", "time_per_step_s", "lr")}
    summary = _summary(task, cfg, model, history, train_seconds, device, lr_schedule)
    summary.update(final=final, extras=task.extras(model, device))
    valid = [r for r in history[1:] or history if r.get("valid_" + task.metric) is not None]
    if valid:  # rows of a run begun before its task had a valid set have none
        pick = max if task.higher_is_better else min
        best = pick(valid, key=lambda r: r["valid_" + task.metric])
        summary["best_valid"] = {k: v for k, v in best.items() if k != "time_per_step_s"}
    if cfg.pictures:
        title = f"{cfg.task}: {Path(cfg.cell).stem}, hidden {cfg.hidden}, seed {cfg.seed}"
        paths = [learning_curve(history, task.metric, title, out / "learning_curve.png")]
        paths += task.pictures(model, out, device)
        paths += task.history_pictures(history, out)
        summary["pictures"] = [str(p) for p in paths]
    atomic_write_json(out / "metrics.json", summary)
    return summary
