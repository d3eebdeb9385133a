"""Training options of the labs: presets, TensorFlow's RMSProp, elementwise clipping, weight noise,
early stopping, and the progress output when stdout is not a terminal."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from celldsl.labs import cli
from celldsl.labs.optim import TFRMSprop, make_optimizer
from celldsl.labs.presets import PRESETS, apply_preset
from celldsl.labs.train import TrainConfig, _add_weight_noise, _remove_weight_noise, train

ROOT = Path(__file__).resolve().parents[1]
LSTM, GRU = (str(ROOT / "cells" / f"{c}.cell") for c in ("lstm", "gru"))


def test_tf_rmsprop_follows_tensorflow_1s_update_rule():
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    opt = TFRMSprop([w], lr=0.01, momentum=0.9)
    ref_w, ms, mom = w.detach().double().clone(), np.ones(5), np.zeros(5)
    for _ in range(4):
        loss = (w**3).sum()
        opt.zero_grad()
        loss.backward()
        g = 3 * ref_w.numpy() ** 2  # d/dw sum(w^3) at the reference weights
        ms = 0.9 * ms + 0.1 * g**2  # the mean square starts at 1
        mom = 0.9 * mom + 0.01 * g / np.sqrt(ms + 1e-10)
        ref_w = ref_w - torch.from_numpy(mom)
        opt.step()
        assert torch.allclose(w.detach().double(), ref_w, atol=1e-6)
    assert isinstance(make_optimizer("rmsprop-tf", [w], 1e-3), TFRMSprop)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", [w], 1e-3)


def test_presets_fill_only_what_the_command_line_leaves_out():
    given = {"hidden": None, "lr": 1e-3, "task_options": {"test_size": "10"}}
    s = apply_preset("graves", "copy", given)
    assert s["hidden"] == 256 and s["layers"] == 3 and s["lr"] == 1e-3  # the given lr wins
    assert s["optimizer"] == "rmsprop-tf" and s["clip"] == 0 and s["clip_value"] == 10
    assert s["task_options"] == {"encoding": "lstm_copy_task", "test_size": "10"}
    with pytest.raises(ValueError, match="for the copy task"):
        apply_preset("graves", "adding", {})
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset("nope", "copy", {})
    assert all(p.doc for p in PRESETS.values())


def test_train_command_with_the_graves_preset_writes_its_settings(tmp_path, capsys):
    out = tmp_path / "g"
    args = ["train", "copy", "--cell", LSTM, "--preset", "graves", "--hidden", "3", "--layers", "2"]
    args += ["--steps", "2", "--eval-every", "1", "-o", "test_size=4", "-o", "max_len=3", "--no-pictures"]
    assert cli.main([*args, "--out", str(out)]) == 0
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert (cfg["hidden"], cfg["layers"], cfg["batch"], cfg["lr"]) == (3, 2, 100, 3e-5)
    assert (cfg["optimizer"], cfg["clip"], cfg["clip_value"]) == ("rmsprop-tf", 0.0, 10.0)
    assert cfg["task_options"]["encoding"] == "lstm_copy_task"
    text = capsys.readouterr().out
    assert "\r" not in text  # not a terminal: plain lines, one per evaluation
    assert [line for line in text.splitlines() if " step 1: " in line or " step 2: " in line]
    assert "seq/s" in text
    with pytest.raises(SystemExit) as usage:
        cli.main(["train", "adding", "--cell", LSTM, "--preset", "graves", "--out", str(out)])
    assert usage.value.code == 2 and "for the copy task" in capsys.readouterr().err


def test_elementwise_clipping_bounds_every_gradient_entry(tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_value_

    def spy(params, clip_value):
        real(params, clip_value)
        seen.append(max(float(p.grad.abs().max()) for p in params))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", spy)
    cfg = TrainConfig(task="copy", cell=GRU, hidden=3, steps=2, batch=4, eval_every=2, clip=0,
                      clip_value=1e-4, task_options={"max_len": 3, "test_size": 4}, out=str(tmp_path),
                      pictures=False, progress=False)  # fmt: skip
    train(cfg)
    assert len(seen) == 2 and max(seen) <= 1e-4


def test_weight_noise_is_taken_off_exactly():
    torch.manual_seed(0)
    params = [torch.randn(3, 4), torch.randn(4)]
    before = [p.clone() for p in params]
    clean = _add_weight_noise(params, 0.075)
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    noise_std = torch.cat([(p - b).flatten() for p, b in zip(params, before, strict=True)]).std()
    assert 0.02 < float(noise_std) < 0.2
    _remove_weight_noise(params, clean)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert _add_weight_noise(params, 0.0) is None


def test_early_stopping_ends_the_run_when_valid_stops_improving(tmp_path, fake_chorales):
    # lr so large that the validation NLL gets worse after the first steps
    cfg = TrainConfig(task="chorales", cell=GRU, hidden=4, steps=200, batch=4, eval_every=1, lr=3.0,
                      patience=2, out=str(tmp_path), pictures=False, progress=False)  # fmt: skip
    summary = train(cfg)
    valid = [r["valid_nll"] for r in summary["history"][1:]]
    best = int(np.argmin(valid))
    assert summary["steps"] == best + 1 + 2 < 200  # stopped 2 evaluations after the best
    assert summary["best_valid"]["step"] == best + 1


def test_welch_t_test_matches_scipy_and_a_hand_computed_case():
    from scipy import stats as sp

    from celldsl.labs.stats import against_reference, welch

    a, b = [1.0, 2.0, 3.0, 4.5], [2.0, 3.1, 5.0, 6.0, 7.0]
    t, df, p = welch(a, b)
    ref = sp.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    # by hand: var(a)/4 = 2.0625/4, var(b)/5 = 4.163/5; Welch-Satterthwaite df
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5
    assert t == pytest.approx((np.mean(a) - np.mean(b)) / np.sqrt(va + vb))
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 4))
    # Bonferroni: with 2 comparisons, p must be below 0.025
    scores = {"ref": [0.0, 0.1, -0.1], "far": [5.0, 5.1, 4.9], "near": [0.05, 0.15, -0.05]}
    res = {c.cell: c for c in against_reference(scores)}
    assert res["far"].significant and not res["near"].significant
    assert res["far"].p < 0.025 and res["far"].difference == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least 2"):
        welch([1.0], [2.0, 3.0])


def test_compare_with_seeds_reports_significance_and_draws_the_scores(tmp_path):
    from celldsl.labs.compare import CompareConfig, compare

    result = compare(
        CompareConfig(
            task="copy", cells=[LSTM, GRU], hidden=[3], seeds=2, steps=2, batch=4, eval_every=1,
            task_options={"max_len": 3, "test_size": 8}, out=str(tmp_path), pictures=False, progress=False,
        )
    )  # fmt: skip
    text = (tmp_path / "results.md").read_text()
    assert "Welch's t-test" in text and "| gru |" in text.split("Significance")[1]
    assert (tmp_path / "scores.png").exists()
    assert [c["cell"] for c in result["significance"]] == ["gru"]


def test_plateau_rule_counts_from_the_best_or_the_last_change_of_rate():
    from celldsl.labs.tasks import make_task
    from celldsl.labs.train import _plateau_reached

    task = make_task("copy", {})  # valid bits_per_seq, lower is better
    cfg = TrainConfig(task="copy", cell=GRU, lr_plateau=2)

    def history(values):
        return [{"step": 0}] + [{"step": 10 * (i + 1), "valid_bits_per_seq": v} for i, v in enumerate(values)]

    one_rate = [[0, 1e-3]]
    assert not _plateau_reached(task, cfg, history([5, 4, 4.5]), one_rate)  # one evaluation since the best
    assert _plateau_reached(task, cfg, history([5, 4, 4.5, 4.2]), one_rate)  # two
    assert not _plateau_reached(task, cfg, history([5, 4, 4.5, 3.9]), one_rate)  # a new best
    # after a change at step 40 the new rate gets two evaluations of its own, even with no new best
    changed = [[0, 1e-3], [40, 3e-4]]
    assert not _plateau_reached(task, cfg, history([5, 4, 4.5, 4.2, 4.3]), changed)
    assert _plateau_reached(task, cfg, history([5, 4, 4.5, 4.2, 4.3, 4.1]), changed)
    assert not _plateau_reached(task, TrainConfig(task="copy", cell=GRU), history([5, 4, 9, 9, 9]), one_rate)


def test_plateau_drops_the_rate_in_the_run_records_it_and_resumes_with_it(tmp_path, fake_chorales):
    from celldsl.labs.checkpoint import load_checkpoint

    # lr so large that the validation NLL gets worse after the first steps: the rule must fire
    base = dict(task="chorales", cell=GRU, hidden=4, batch=4, eval_every=1, lr=3.0, lr_plateau=2,
                lr_factor=0.5, out=str(tmp_path), pictures=False, progress=False)  # fmt: skip
    summary = train(TrainConfig(steps=12, **base))
    schedule = summary["lr_schedule"]
    assert len(schedule) >= 2 and schedule[0] == [0, 3.0]
    for (_, before), (_, after) in itertools.pairwise(schedule):
        assert after == pytest.approx(before * 0.5)
    # every change happened where the rule says, on the history as it stood at that evaluation
    from celldsl.labs.tasks import make_task
    from celldsl.labs.train import _plateau_reached

    task, cfg, hist = make_task("chorales", {}), TrainConfig(**{**base, "steps": 12}), summary["history"]
    fired = [
        r["step"]
        for i, r in enumerate(hist[1:], 1)
        if _plateau_reached(task, cfg, hist[: i + 1], [s for s in schedule if s[0] < r["step"]])
    ]
    assert fired == [s for s, _ in schedule[1:]]
    # the rows say the rate they trained at, and the optimizer was left at the last one
    assert [r["lr"] for r in hist[1:]] == [[lr for s, lr in schedule if s < r["step"]][-1] for r in hist[1:]]
    assert load_checkpoint(tmp_path)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(schedule[-1][1])
    resumed = train(TrainConfig(steps=14, resume=True, **base))
    assert resumed["lr_schedule"][: len(schedule)] == schedule


def test_plateau_options_are_checked():
    with pytest.raises(ValueError, match="--lr-factor must be between 0 and 1"):
        train(TrainConfig(task="copy", cell=GRU, lr_plateau=2, lr_factor=2.0, pictures=False, progress=False))
    with pytest.raises(ValueError, match="--lr-plateau must be 0"):
        train(TrainConfig(task="copy", cell=GRU, lr_plateau=-1, pictures=False, progress=False))
    for option in ({"lr_plateau": 3}, {"patience": 3}):  # they would watch nothing
        with pytest.raises(ValueError, match="adding has none \\(its sets: train, test\\)"):
            train(TrainConfig(task="adding", cell=GRU, pictures=False, progress=False, **option))


def test_sigterm_stops_a_run_with_a_checkpoint_at_the_step_reached(tmp_path):
    """`kill` (SIGTERM) acts as Ctrl-C does; a shell's background job has SIGINT ignored, so SIGTERM is
    how it is stopped. The run is in a child process started with SIGINT ignored, as such a job is."""
    import signal
    import subprocess
    import sys
    import time

    from celldsl.labs.checkpoint import load_checkpoint

    argv = [sys.executable, "-m", "celldsl.labs.cli", "train", "copy", "--cell", GRU, "--hidden", "4",
            "--batch", "2", "--steps", "1000000", "--eval-every", "1", "-o", "max_len=2", "-o", "test_size=4",
            "--no-pictures", "--out", str(tmp_path)]  # fmt: skip
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    reached = int(err.split("interrupted at step ")[1].split(";")[0])
    assert reached >= 1 and load_checkpoint(tmp_path)["step"] == reached
