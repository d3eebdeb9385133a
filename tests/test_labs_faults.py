"""The labs under faults and hostile input (issue 24): a planted checkpoint, a run folder that is not
ours, a rerun or a second run into a folder that holds a run, a stop by SIGTERM, a damaged
checkpoint, a full disk, out-of-range options and an unsafe cache. Each ends in a one-line error or
in a run that resumes exactly, never in a traceback, lost data or code run from a file.

Sizes are tiny (hidden 4, a few steps), as in test_labs_training.py.
"""

import errno
import inspect
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from celldsl.labs import cli
from celldsl.labs import train as train_module
from celldsl.labs.checkpoint import CheckpointError, load_checkpoint
from celldsl.labs.files import WriteError
from celldsl.labs.rundir import LOCK, RunFolderError, UnsafeRunFolderError
from celldsl.labs.tasks import make_task
from celldsl.labs.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
LSTM, GRU = (str(ROOT / "cells" / f"{c}.cell") for c in ("lstm", "gru"))
TINY_COPY = {"max_len": 3, "test_size": 8}
CLI_TINY = ["--hidden", "4", "--batch", "4", "--steps", "2", "--eval-every", "1", "-o", "max_len=3"]
CLI_TINY += ["-o", "test_size=8", "--quiet", "--no-pictures"]  # the settings of tiny() below


def tiny(out, **kw) -> TrainConfig:
    base = dict(task="copy", cell=LSTM, hidden=4, steps=4, batch=4, eval_every=2, task_options=TINY_COPY)
    base.update(pictures=False, progress=False, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def without_timings(history):
    return [{k: v for k, v in row.items() if k != "time_per_step_s"} for row in history]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders ended in the same state: step, history, weights and optimizer state."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"]
    assert without_timings(ca["history"]) == without_timings(cb["history"])
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])
    assert (ca["loss_sum"], ca["loss_count"]) == (cb["loss_sum"], cb["loss_count"])


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("celldsl: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- 3: a checkpoint is data, and the run folder must be ours -------------------------------------


class Planted:
    """Unpickling this runs os.mkdir(path): the stand-in for any code a planted checkpoint runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_planted_checkpoint_is_refused_and_runs_no_code(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    train(tiny(run, steps=2))
    ckpt = load_checkpoint(run)
    ckpt["history"] = Planted(str(marker))
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of tensors and plain data .*mkdir"):
        train(tiny(run, steps=4, resume=True))
    code, err = run_cli(capsys, "train", "copy", "--cell", LSTM, "--out", str(run), "--resume", *CLI_TINY)
    assert code == 1 and "refusing" in one_error_line(err)
    assert not marker.exists()


def test_a_checkpoint_of_an_older_celldsl_with_a_numpy_rng_state_still_resumes(tmp_path):
    """Checkpoints written before the RNG states were plain lists held numpy's state as an array: the
    numpy globals that rebuild a uint32 array are the whole allow-list."""
    train(tiny(tmp_path / "straight", steps=4))
    old = tmp_path / "old"
    train(tiny(old, steps=2))
    ckpt = load_checkpoint(old)
    name, keys, pos, has_gauss, cached = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    torch.save(ckpt, old / "checkpoint.pt")
    train(tiny(old, steps=4, resume=True))
    assert_same_run(old, tmp_path / "straight")


def test_a_run_folder_others_can_write_or_that_is_not_ours_is_refused(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(tiny(run, steps=2))
    run.chmod(0o777)
    with pytest.raises(UnsafeRunFolderError, match="others can write to it"):
        train(tiny(run, steps=4, resume=True))
    code, err = run_cli(capsys, "train", "copy", "--cell", LSTM, "--out", str(run), "--resume", *CLI_TINY)
    assert code == 1 and "others can write to it (mode 777)" in one_error_line(err)
    run.chmod(0o755)
    (run / "checkpoint.pt").chmod(0o666)
    with pytest.raises(UnsafeRunFolderError, match="refusing checkpoint .*others can write"):
        train(tiny(run, steps=4, resume=True))
    (run / "checkpoint.pt").chmod(0o600)
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)  # as another user sees the folder
    with pytest.raises(UnsafeRunFolderError, match=f"belongs to uid {me}, not to you"):
        train(tiny(run, steps=4, resume=True))
    monkeypatch.undo()
    train(tiny(run, steps=4, resume=True))  # private again: it resumes


def test_a_new_run_folder_is_not_group_writable_whatever_the_umask(tmp_path):
    before = os.umask(0o002)
    try:
        train(tiny(tmp_path / "run", steps=1))
    finally:
        os.umask(before)
    assert (tmp_path / "run").stat().st_mode & 0o022 == 0


# --- 7 and 8: never overwrite a run by accident; one run at a time --------------------------------


def test_rerunning_into_a_run_folder_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(run, steps=4))
    before = (run / "metrics.csv").read_text(), (run / "checkpoint.pt").read_bytes()
    with pytest.raises(
        RunFolderError, match="already holds a run .*--resume, or replace it with --overwrite"
    ):
        train(tiny(run, steps=2))
    code, err = run_cli(capsys, "train", "copy", "--cell", LSTM, "--out", str(run), *CLI_TINY)
    assert code == 1 and "--overwrite" in one_error_line(err)
    assert ((run / "metrics.csv").read_text(), (run / "checkpoint.pt").read_bytes()) == before
    with pytest.raises(SystemExit) as usage:  # one or the other
        cli.main(["train", "copy", "--cell", LSTM, "--out", str(run), "--resume", "--overwrite", *CLI_TINY])
    assert usage.value.code == 2
    train(tiny(run, steps=2, seed=5, overwrite=True))
    train(tiny(tmp_path / "fresh", steps=2, seed=5))
    assert_same_run(run, tmp_path / "fresh")
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 2  # header, steps 0 and 2


def test_compare_into_a_folder_with_runs_needs_resume_or_overwrite(tmp_path):
    from celldsl.labs.compare import CompareConfig, compare

    base = dict(task="copy", cells=[GRU], hidden=[3], steps=1, batch=4, eval_every=1, task_options=TINY_COPY,
                out=str(tmp_path), pictures=False, progress=False)  # fmt: skip
    compare(CompareConfig(**base))
    with pytest.raises(RunFolderError, match="already holds a run"):
        compare(CompareConfig(**base))
    compare(CompareConfig(**base, overwrite=True))
    compare(CompareConfig(**base, resume=True))


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, monkeypatch, capsys):
    """Run B starts while run A trains in the same folder (from inside A's loss, so the timing is
    exact); whatever B asks (resume, overwrite), the lock refuses it and A ends undisturbed."""
    run = tmp_path / "run"
    cls = type(make_task("copy", TINY_COPY))
    real_loss, refusals = cls.loss, []

    def loss_with_a_second_run(self, out, batch):
        if not refusals:
            for kw in ({"resume": True}, {"overwrite": True}):
                try:
                    train(tiny(run, steps=2, seed=7, **kw))
                    refusals.append(None)
                except RunFolderError as err:
                    refusals.append(str(err))
            code, err = run_cli(
                capsys, "train", "copy", "--cell", LSTM, "--out", str(run), "--resume", *CLI_TINY
            )
            refusals.append(one_error_line(err) if code == 1 else None)
        return real_loss(self, out, batch)

    monkeypatch.setattr(cls, "loss", loss_with_a_second_run)
    train(tiny(run, steps=4))
    monkeypatch.undo()
    assert len(refusals) == 3 and all(r is not None and "in use by another run" in r for r in refusals)
    train(tiny(tmp_path / "alone", steps=4))
    assert_same_run(run, tmp_path / "alone")
    assert (run / LOCK).exists()
    train(tiny(run, steps=6, resume=True))  # the lock went with run A


# --- 9: a stop by SIGTERM resumes exactly; a damaged checkpoint is one line ------------------------


def _sigterm_after(calls: list, k: int, callers: tuple[str, ...] = ()):
    """Send this process SIGTERM right after the k-th call (counted in `calls`) of a wrapped function,
    counting only calls made by a function named in `callers` when given (the training loop draws
    batches and takes losses; so do the evaluation sets and the evaluation)."""

    def wrap(real):
        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            if callers and inspect.currentframe().f_back.f_code.co_name not in callers:
                return result
            calls.append(1)
            if len(calls) == k:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        return wrapper

    return wrap


LOOP = ("_train", "train")  # the function with the training loop (it was `train` before issue 24)


@pytest.mark.parametrize("where", ["data", "forward", "update", "evaluation"])
def test_a_run_stopped_by_sigterm_anywhere_in_a_step_resumes_exactly(tmp_path, monkeypatch, capsys, where):
    """SIGTERM arrives after the batch is drawn, after the forward pass, after the update, or in the
    middle of an evaluation (with the real handler, in this process): the run stops with a checkpoint
    and, resumed, ends with the weights, optimizer state and metrics of the uninterrupted run."""
    train(tiny(tmp_path / "straight", steps=6))
    before = signal.getsignal(signal.SIGTERM)
    calls: list = []
    cls = type(make_task("copy", TINY_COPY))
    if where == "data":
        monkeypatch.setattr(cls, "train_batch", _sigterm_after(calls, 3, LOOP)(cls.train_batch))
    elif where == "forward":
        monkeypatch.setattr(cls, "loss", _sigterm_after(calls, 3, LOOP)(cls.loss))
    elif where == "update":
        monkeypatch.setattr(torch.optim.Adam, "step", _sigterm_after(calls, 3)(torch.optim.Adam.step))
    else:  # the 3rd evaluation: step 4's
        monkeypatch.setattr(train_module, "_eval_all", _sigterm_after(calls, 3)(train_module._eval_all))
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(stopped, steps=6))
    monkeypatch.undo()
    assert "interrupted at step" in capsys.readouterr().err
    assert load_checkpoint(stopped)["step"] in (3, 4)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    train(tiny(stopped, steps=6, resume=True))
    assert_same_run(stopped, tmp_path / "straight")


def test_sigterm_stops_a_cli_run_that_then_resumes_as_if_never_stopped(tmp_path):
    """The same through `python -m celldsl.labs.cli` stopped by `kill` at a moment of the OS's choosing
    (SIGINT ignored, as in a background job): resumed for three more steps, it equals a run of that
    length made in one go."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "celldsl.labs.cli", "train", "copy", "--cell", GRU, "--hidden", "4",
            "--batch", "2", "--steps", "1000000", "--eval-every", "1", "-o", "max_len=2", "-o", "test_size=4",
            "--no-pictures", "--out", str(run)]  # fmt: skip
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    import time

    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    reached = load_checkpoint(run)["step"]
    settings = dict(cell=GRU, batch=2, eval_every=1, task_options={"max_len": "2", "test_size": "4"})
    train(tiny(run, steps=reached + 3, resume=True, **settings))
    train(tiny(tmp_path / "straight", steps=reached + 3, **settings))
    assert_same_run(run, tmp_path / "straight")


def test_a_truncated_checkpoint_ends_resume_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(run, steps=2))
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        train(tiny(run, steps=4, resume=True))
    code, err = run_cli(capsys, "train", "copy", "--cell", LSTM, "--out", str(run), "--resume", *CLI_TINY)
    assert code == 1 and "damaged or truncated" in one_error_line(err)


def test_a_checkpoint_of_another_model_ends_resume_with_one_line(tmp_path, capsys):
    """The cell file was edited between the runs (an LSTM became a GRU: other weights, other sizes)."""
    cell, run = tmp_path / "my.cell", tmp_path / "run"
    cell.write_text(Path(LSTM).read_text())
    train(tiny(run, cell=str(cell), steps=2))
    cell.write_text(Path(GRU).read_text().replace("cell gru", "cell my", 1))
    with pytest.raises(CheckpointError, match="cannot resume .* of shape .*another cell file"):
        train(tiny(run, cell=str(cell), steps=4, resume=True))
    args = ["train", "copy", "--cell", str(cell), "--out", str(run), "--resume", *CLI_TINY]
    code, err = run_cli(capsys, *args)
    assert code == 1 and "of shape" in one_error_line(err)


# --- 10: a full disk keeps the last good checkpoint ---------------------------------------------


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_says_so(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_fsync, room = os.fsync, [1]  # room for one more checkpoint

    def fsync_on_a_full_disk(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            if not room[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    with pytest.raises(
        WriteError, match="No space left on device; the previous checkpoint.pt, if any, is kept"
    ):
        train(tiny(run, steps=4))
    assert load_checkpoint(run)["step"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.csv", LOCK]  # no temp files
    args = ["train", "copy", "--cell", LSTM, "--out", str(run), "--resume", *CLI_TINY, "--steps", "4"]
    code, err = run_cli(capsys, *args, "--eval-every", "2")
    assert code == 1 and "No space left on device" in one_error_line(err)
    monkeypatch.undo()
    assert load_checkpoint(run)["step"] == 2
    train(tiny(tmp_path / "straight", steps=4))
    train(tiny(run, steps=4, resume=True))  # room again: it goes on from the kept checkpoint
    assert_same_run(run, tmp_path / "straight")


# --- 11: a value given is used, or refused ------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [("--lr", "0"), ("--hidden", "0"), ("--eval-every", "0"), ("--threads", "-1"), ("--batch", "0"),
     ("--layers", "0"), ("--lr", "nan"), ("--steps", "-1"), ("--clip", "-1"), ("--lr-factor", "1"),
     ("--device", "gpu")],
)  # fmt: skip
def test_an_out_of_range_option_is_a_usage_error(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as usage:
        cli.main(["train", "copy", "--cell", LSTM, "--out", str(tmp_path / "r"), *CLI_TINY, option, value])
    assert usage.value.code == 2
    assert f"error: argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting", ["lr", "hidden", "eval_every", "batch", "threads"])
def test_a_setting_of_zero_or_less_is_refused_not_replaced_by_the_default(tmp_path, setting):
    value = -1 if setting == "threads" else 0
    with pytest.raises(ValueError, match=f"--{setting.replace('_', '-')} must be"):
        train(tiny(tmp_path, **{setting: value}))


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("not a folder")
    code, err = run_cli(capsys, "train", "copy", "--cell", LSTM, "--out", str(tmp_path / "f"), *CLI_TINY)
    assert code == 1 and "is a file, not a folder" in one_error_line(err)
    code, err = run_cli(
        capsys, "train", "copy", "--cell", LSTM, "--out", str(tmp_path / "f" / "r"), *CLI_TINY
    )
    assert code == 1 and "cannot create the run folder" in one_error_line(err)


# --- 14: an unsafe cache is one line, from either command ---------------------------------------


def test_an_unsafe_cache_is_one_line_from_python_m_celldsl_labs_cli(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    argv = [sys.executable, "-m", "celldsl.labs.cli", "train", "copy", "--cell", LSTM, *CLI_TINY]
    env = {**os.environ, "CELLDSL_CACHE": str(cache)}
    done = subprocess.run([*argv, "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "cache folder" in one_error_line(done.stderr)


def test_a_bad_cell_file_is_reported_as_the_compiler_reports_it(tmp_path, capsys):
    bad = tmp_path / "bad.cell"
    bad.write_text("cell x\ninput x\nstate h\nh = tanh(\n")
    code, err = run_cli(capsys, "train", "copy", "--cell", str(bad), "--out", str(tmp_path / "r"), *CLI_TINY)
    assert code == 1 and err.startswith(f"{bad}:4:10: error: ") and "Traceback" not in err


# --- the chorale cache only saves time: damaged, not private or unwritable costs a re-parse ------


@pytest.fixture
def two_chorales(tmp_path, monkeypatch):
    from celldsl.labs import pianoroll

    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pianoroll, "chorale_names", lambda: ["a", "b"])
    rolls = {"a": np.eye(88, dtype=np.uint8)[:3], "b": np.eye(88, dtype=np.uint8)[5:10]}
    calls = []
    monkeypatch.setattr(pianoroll, "parse_chorale", lambda n: calls.append(n) or rolls[n])
    return pianoroll, rolls, calls


@pytest.mark.parametrize("fault", ["truncated", "writable by others"])
def test_a_bad_chorale_cache_is_parsed_again_with_a_warning(two_chorales, capsys, fault):
    pianoroll, rolls, calls = two_chorales
    pianoroll.load_chorales(progress=False)
    path = pianoroll.cache_path()
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        path.chmod(0o666)
    again = pianoroll.load_chorales(progress=False)
    assert calls == ["a", "b", "a", "b"]
    assert all(np.array_equal(c.roll, rolls[c.name]) for c in again)
    assert "warning: ignoring the chorale cache" in capsys.readouterr().err
    pianoroll.load_chorales(progress=False)  # written again: read from the cache
    assert len(calls) == 4


def test_a_full_disk_for_the_chorale_cache_is_a_warning(two_chorales, monkeypatch, capsys):
    pianoroll, rolls, calls = two_chorales
    real_fsync = os.fsync

    def full(fd):
        if ".jsb-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    chorales = pianoroll.load_chorales(progress=False)
    assert [c.name for c in chorales] == ["a", "b"]
    assert "No space left on device" in capsys.readouterr().err
    assert not pianoroll.cache_path().exists()
