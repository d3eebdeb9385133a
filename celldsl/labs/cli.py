"""`celldsl train` and `celldsl compare`.

    celldsl train copy --cell cells/lstm.cell --steps 2000 --out runs/copy-lstm
    celldsl train copy --cell cells/lstm.cell --preset graves
    celldsl train adding --cell cells/gru.cell -o T=500
    celldsl train copy --cell cells/lstm.cell --steps 4000 --resume --set-lr 3e-5
    celldsl compare chorales cells/rnn_tanh.cell cells/gru.cell cells/lstm.cell --param-budget 20000

The main CLI calls `register(subparsers)`; `python -m celldsl.labs.cli` runs these two commands
on their own.
"""

from __future__ import annotations

import argparse
import math
import sys

from .optim import OPTIMIZERS
from .presets import PRESETS, apply_preset, preset_names
from .tasks import TASKS, parse_options

TASK_HELP = "; ".join(
    f"{name} ({cls.__doc__.split(chr(10))[0].removeprefix('Options: ').rstrip('.')})"
    for name, cls in TASKS.items()
)


def _number(kind, low: float, low_ok: bool, high: float | None = None, what: str = ""):
    """An argparse type: a finite number of `kind` above `low` (or equal to it, with `low_ok`) and below
    `high`; anything else is a usage error that says the range, never a silent default."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        inside = (value >= low if low_ok else value > low) and (high is None or value < high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, 0, False, what="a positive integer")
COUNT = _number(int, 0, True, what="an integer, 0 or more")
POSITIVE = _number(float, 0, False, what="a positive number")
NOT_NEGATIVE = _number(float, 0, True, what="a number, 0 or more")
FRACTION = _number(float, 0, False, 1, what="a number between 0 and 1")


def _device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=sorted(TASKS), help="the benchmark")
    p.add_argument(
        "--preset",
        choices=preset_names(),
        help="a paper's settings; options given here override them: "
        + "; ".join(f"{n} ({PRESETS[n].task})" for n in preset_names()),
    )
    p.add_argument("--layers", type=POSITIVE_INT, help="stacked recurrent layers (default 1)")
    p.add_argument(
        "--width",
        type=POSITIVE_INT,
        metavar="D",
        help="model width: the embedding (or input projection) size; default the hidden size",
    )
    p.add_argument(
        "--size",
        type=_size,
        action="append",
        dest="size",
        metavar="NAME=N",
        help="a size of the cell, repeatable: a matrix cell's heads, K, V, R (default heads=1 and every "
        "width hidden/heads)",
    )
    p.add_argument("--steps", type=COUNT, help="training steps (default: the task's)")
    p.add_argument("--batch", type=POSITIVE_INT, help="sequences per step (default: the task's)")
    p.add_argument("--lr", type=POSITIVE, help="learning rate (default: the task's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    p.add_argument("--clip", type=NOT_NEGATIVE, help="gradient-norm clip, 0 for none (default 1)")
    p.add_argument("--clip-value", type=NOT_NEGATIVE, help="elementwise gradient clip to [-v, v], 0 for none")
    p.add_argument(
        "--weight-noise", type=NOT_NEGATIVE, help="std of Gaussian weight noise per step (default 0)"
    )
    p.add_argument(
        "--patience",
        type=COUNT,
        metavar="K",
        help="early stopping after K evaluations without a better valid metric",
    )
    p.add_argument(
        "--lr-plateau",
        type=COUNT,
        metavar="K",
        help="multiply the learning rate by --lr-factor after K evaluations without a better valid "
        "metric (counted again from each change); default 0, never",
    )
    p.add_argument(
        "--lr-factor", type=FRACTION, metavar="F", help="the factor of --lr-plateau (default 10^-0.5 = 0.316)"
    )
    p.add_argument("--eval-every", type=POSITIVE_INT, help="steps between evaluations and checkpoints")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--threads", type=COUNT, default=1, help="torch CPU threads, 0 = torch's default (default 1)"
    )
    p.add_argument("--out", help="output directory (default under runs/)")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in the output directory"
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the output directory (without this or --resume, such a "
        "folder is refused)",
    )
    p.add_argument(
        "-o",
        "--task-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help=f"task option, repeatable. {TASK_HELP}",
    )
    p.add_argument("--no-pictures", action="store_true", help="skip the plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _size(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not eq or not name.strip() or not name.strip().isidentifier() or number < 1:
        raise argparse.ArgumentTypeError(
            f"expected NAME=N with N a positive integer (e.g. heads=4), got {text!r}"
        )
    return name.strip(), number


def _sizes(pairs: list[tuple[str, int]] | None, usage) -> dict[str, int] | None:
    """--size given as NAME=N pairs -> {name: N}; a name given twice is a usage error."""
    sizes: dict[str, int] = {}
    for name, value in pairs or []:
        if name in sizes:
            usage(f"argument --size: {name} given twice")
        sizes[name] = value
    return sizes or None


def _hidden_list(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or a comma-separated list, got {text!r}"
        ) from None
    if any(h < 1 for h in sizes):
        raise argparse.ArgumentTypeError("hidden sizes must be positive")
    return sizes


# settings shared by train and compare, with their values when neither the command line nor a
# preset gives one (None: the task's default)
SHARED = {
    "layers": 1, "steps": None, "batch": None, "lr": None, "optimizer": "adam", "clip": 1.0,
    "clip_value": 0.0, "weight_noise": 0.0, "patience": 0, "lr_plateau": 0, "lr_factor": 10**-0.5,
    "eval_every": None, "device": "cpu",
    "threads": 1, "out": None, "resume": False, "overwrite": False,
}  # fmt: skip


def settings(args: argparse.Namespace, extra: tuple[str, ...]) -> dict:
    """The run's settings: the command line, then the preset, then the defaults above."""
    given = {k: getattr(args, k) for k in (*SHARED, *extra)}
    given["task_options"] = parse_options(args.task_option)
    out = apply_preset(args.preset, args.task, given)
    for k, default in SHARED.items():
        if out.get(k) is None:
            out[k] = default
    out.update(task=args.task, pictures=not args.no_pictures, progress=not args.quiet)
    return out


def _checked_settings(args: argparse.Namespace, extra: tuple[str, ...], usage) -> dict:
    """settings(), with a bad preset or task option reported as a usage error (exit 2)."""
    from .tasks import make_task

    try:
        s = settings(args, extra)
        make_task(s["task"], s["task_options"])
    except ValueError as err:
        usage(str(err))
    return s


def run_train(args: argparse.Namespace, usage) -> int:
    from .train import SET_LR_NEEDS_RESUME, TrainConfig, train

    s = _checked_settings(args, ("hidden", "set_lr", "width"), usage)
    s["sizes"] = _sizes(args.size, usage)
    if s["set_lr"] is not None and not s["resume"]:
        usage(SET_LR_NEEDS_RESUME)
    summary = train(TrainConfig(cell=args.cell, seed=args.seed, **s))
    final = ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items() if isinstance(v, float))
    name, params = summary["cell_name"], summary["parameters"]
    print(f"{name} on {summary['task']}: {params} parameters, {summary['steps']} steps")
    print(f"final: {final}")
    print(f"wrote {summary['config']['out']}/metrics.json, metrics.csv, checkpoint.pt and plots")
    return 0


def run_compare(args: argparse.Namespace, usage) -> int:
    from .compare import CompareConfig, compare

    s = _checked_settings(args, ("hidden", "param_budget", "width", "state_size"), usage)
    s["sizes"] = _sizes(args.size, usage)
    if isinstance(s["hidden"], int):  # a preset's single size
        s["hidden"] = [s["hidden"]]
    if args.hidden or args.param_budget:  # the command line's choice replaces the preset's
        s["hidden"], s["param_budget"] = args.hidden, args.param_budget
    if s["state_size"] and (s["param_budget"] or (s["hidden"] and len(s["hidden"]) > 1)):
        usage("argument --state-size: not allowed with --param-budget or one --hidden per cell")
    if s["state_size"] and args.hidden and args.width:
        usage("argument --state-size: give the model width with --width or --hidden, not both")
    result = compare(CompareConfig(cells=args.cells, seeds=args.seeds, seed=args.seed, **s))
    diverged = [r["cell"] for r in result["rows"] if any(d is not None for d in r["diverged_at"])]
    if diverged:
        print(f"diverged: {', '.join(diverged)} (see the table)", file=sys.stderr)
    print(result["table"])
    print(f"wrote {result['plot']} and results.md / results.json next to it")
    return 0


def register(subparsers) -> None:
    """Add `train` and `compare` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "train", help="train one cell on a task", description="Train one cell on one task."
    )
    _common(p)
    p.add_argument("--cell", required=True, help="the .cell file")
    p.add_argument("--hidden", type=POSITIVE_INT, help="hidden size (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set-lr",
        type=POSITIVE,
        metavar="LR",
        help="with --resume: go on at this learning rate from the checkpoint's step (a drop by hand; "
        "--lr stays the rate the run started at; metrics.json's lr_schedule records it)",
    )
    p.set_defaults(func=_guard(run_train, p))

    p = subparsers.add_parser(
        "compare",
        help="train several cells on a task and tabulate",
        description="Train several cells on one task (optionally at a matched parameter budget) and write a "
        "markdown table and a plot of every learning curve.",
    )
    _common(p)
    p.add_argument("cells", nargs="+", metavar="FILE", help=".cell files")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--param-budget", type=POSITIVE_INT, metavar="P", help="pick each hidden size to fit P parameters"
    )
    size.add_argument(
        "--hidden", type=_hidden_list, metavar="H", help="hidden size, or one per cell: 100,46,36"
    )
    p.add_argument(
        "--state-size",
        type=POSITIVE_INT,
        metavar="S",
        help="size every cell so one layer's recurrent state holds about S numbers per sequence (LSTM: "
        "hidden S/2 for h and c; a matrix cell: heads x K x V, its output --width wide), in a model "
        "--width wide (default: --hidden, else the task's); the table lists the sizes chosen",
    )
    p.add_argument(
        "--seeds", type=POSITIVE_INT, default=1, metavar="K", help="runs per cell, seeds --seed .. --seed+K-1"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.set_defaults(func=_guard(run_compare, p))


def _guard(func, parser: argparse.ArgumentParser):
    """Turn what a run refuses (a bad cell file, a mismatched or damaged checkpoint, a run folder in
    use or not ours, an unsafe cache, a full disk) into one `celldsl: error: ...` line (a cell
    file's error as the compiler writes it) and exit status 1, never a traceback; Ctrl-C or `kill`
    exits 130. A bad command line is a usage error (argparse's message, exit 2)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args, parser.error)
        except (ValueError, OSError, ArithmeticError) as err:
            print(error_line(err), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return run


def error_line(err: BaseException) -> str:
    """The message of an expected error: a cell file's as the compiler writes it (`file:line:col:
    error: ...`, line and caret included), any other as one `celldsl: error: ...` line."""
    from ..lang.errors import CellError

    if isinstance(err, CellError):
        return str(err)
    if isinstance(err, OSError) and type(err).__str__ is OSError.__str__ and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return "celldsl: error: " + " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celldsl", description="celldsl replication labs")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
