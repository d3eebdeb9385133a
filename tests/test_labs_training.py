"""Training, resuming, comparing and the commands, with the real celldsl.Recurrent and zoo cells.

Sizes are tiny (hidden 3-4, a few steps): these tests check plumbing and determinism, not learning.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from celldsl.labs import cli
from celldsl.labs.checkpoint import load_checkpoint
from celldsl.labs.compare import CompareConfig, compare
from celldsl.labs.model import build_model, count_parameters, hidden_for_budget
from celldsl.labs.tasks import make_task
from celldsl.labs.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
LSTM, GRU, TANH = (str(ROOT / "cells" / f"{c}.cell") for c in ("lstm", "gru", "rnn_tanh"))
TINY_COPY = {"max_len": 3, "test_size": 8}


def tiny(out, **kw) -> TrainConfig:
    base = dict(task="copy", cell=LSTM, hidden=4, steps=4, batch=4, eval_every=2, task_options=TINY_COPY)
    base.update(pictures=False, progress=False, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def without_timings(history):
    return [{k: v for k, v in row.items() if k != "time_per_step_s"} for row in history]


def test_same_seed_same_run_different_seed_different_run(tmp_path):
    a, b, c = (train(tiny(tmp_path / n, seed=s)) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert without_timings(a["history"]) == without_timings(b["history"])
    assert without_timings(a["history"]) != without_timings(c["history"])
    wa, wb = load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resumed_run_ends_exactly_where_the_uninterrupted_run_ends(tmp_path):
    straight = train(tiny(tmp_path / "straight", steps=6))
    train(tiny(tmp_path / "resumed", steps=2))  # "interrupted" after 2 steps
    assert load_checkpoint(tmp_path / "resumed")["step"] == 2
    resumed = train(tiny(tmp_path / "resumed", steps=6, resume=True))
    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    ws, wr = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert ws["step"] == wr["step"] == 6
    assert all(torch.equal(ws["model"][k], wr["model"][k]) for k in ws["model"])
    assert all(
        torch.equal(a, b)
        for sa, sb in zip(ws["optimizer"]["state"].values(), wr["optimizer"]["state"].values(), strict=True)
        for a, b in zip(sa.values(), sb.values(), strict=True)
    )


def test_a_run_begun_without_a_valid_set_resumes_and_picks_its_best_valid_row_after(tmp_path):
    """Copy runs checkpointed before copy had a valid set: their rows have no valid metrics."""
    from celldsl.labs.checkpoint import save_checkpoint

    train(tiny(tmp_path, steps=2))
    ckpt = load_checkpoint(tmp_path)
    ckpt["history"] = [{k: v for k, v in r.items() if not k.startswith("valid_")} for r in ckpt["history"]]
    save_checkpoint(tmp_path, **ckpt)
    summary = train(tiny(tmp_path, steps=6, resume=True))
    assert [("valid_bits_per_seq" in r) for r in summary["history"]] == [False, False, True, True]
    assert summary["best_valid"]["step"] in (4, 6)


def test_set_lr_on_resume_scales_the_next_update_and_is_kept_by_later_resumes(tmp_path):
    import shutil

    a, b = 1e-2, 2.5e-3
    train(tiny(tmp_path / "base", steps=2, eval_every=1, lr=a))
    shutil.copytree(tmp_path / "base", tmp_path / "same")
    shutil.copytree(tmp_path / "base", tmp_path / "drop")
    before = load_checkpoint(tmp_path / "base")["model"]
    train(tiny(tmp_path / "same", steps=3, eval_every=1, lr=a, resume=True))
    dropped = train(tiny(tmp_path / "drop", steps=3, eval_every=1, lr=a, resume=True, set_lr=b))
    same, drop = load_checkpoint(tmp_path / "same")["model"], load_checkpoint(tmp_path / "drop")["model"]
    # Adam's step from one state and one gradient is lr times the same direction
    for k in before:
        step_a, step_b = same[k] - before[k], drop[k] - before[k]
        big = step_a.abs() > 1e-4
        assert big.any()
        torch.testing.assert_close(step_b[big], step_a[big] * (b / a), rtol=1e-3, atol=1e-7)
    assert dropped["lr_schedule"] == [[0, a], [2, b]]
    assert [row["lr"] for row in dropped["history"]] == [a, a, a, b]
    later = train(tiny(tmp_path / "drop", steps=4, eval_every=1, lr=a, resume=True))
    assert later["lr_schedule"] == [[0, a], [2, b]] and later["history"][-1]["lr"] == b
    assert load_checkpoint(tmp_path / "drop")["optimizer"]["param_groups"][0]["lr"] == b


def test_rows_from_before_the_lr_column_get_their_rate_and_changes_are_marked(tmp_path):
    from celldsl.labs.checkpoint import save_checkpoint
    from celldsl.labs.plots import lr_changes

    train(tiny(tmp_path, steps=2, eval_every=1, lr=1e-2))
    old = load_checkpoint(tmp_path)  # as a checkpoint of a run from before lr_schedule existed
    del old["lr_schedule"]
    for row in old["history"]:
        del row["lr"]
    save_checkpoint(tmp_path, **old)
    resumed = train(tiny(tmp_path, steps=3, eval_every=1, lr=1e-2, resume=True, set_lr=1e-3))
    assert [row["lr"] for row in resumed["history"]] == [1e-2, 1e-2, 1e-2, 1e-3]
    steps = [row["step"] for row in resumed["history"]]
    assert lr_changes(steps, resumed["history"]) == [(2, 1e-3)]  # at the last row of the old rate
    assert lr_changes(steps, resumed["history"][:3]) == []


def test_set_lr_equal_to_the_current_rate_changes_nothing(tmp_path):
    straight = train(tiny(tmp_path / "straight", steps=4, lr=1e-2))
    train(tiny(tmp_path / "resumed", steps=2, lr=1e-2))
    resumed = train(tiny(tmp_path / "resumed", steps=4, lr=1e-2, resume=True, set_lr=1e-2))
    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    assert resumed["lr_schedule"] == [[0, 1e-2]]


def test_set_lr_needs_a_checkpoint_to_resume(tmp_path):
    with pytest.raises(ValueError, match="--set-lr changes the learning rate of a resumed run"):
        train(tiny(tmp_path, set_lr=1e-3))
    with pytest.raises(ValueError, match="--set-lr changes the learning rate of a resumed run"):
        train(tiny(tmp_path, set_lr=1e-3, resume=True))
    train(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match="positive"):
        train(tiny(tmp_path, steps=4, resume=True, set_lr=-1.0))


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path):
    train(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match="hidden"):
        train(tiny(tmp_path, steps=4, hidden=5, resume=True))


def test_run_writes_metrics_csv_json_checkpoint_and_pictures(tmp_path):
    summary = train(tiny(tmp_path, pictures=True))
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "checkpoint.pt",
        "metrics.csv",
        "metrics.json",
        "learning_curve.png",
        *(f"copy_len{L}.png" for L in (10, 20, 40, 120)),
    } <= names
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final"] == summary["final"] and saved["parameters"] == summary["parameters"]
    assert [row["step"] for row in saved["history"]] == [0, 2, 4]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,sequences,batch_loss") and len(csv_lines) == 4
    for key in ("test_bits_per_seq", "test_bce_per_bit", "train_bits_per_seq"):
        assert np.isfinite(summary["final"][key])
    assert set(summary["extras"]) >= {"len40_bits_per_seq", "len120_bits_per_seq"}


@pytest.mark.parametrize(
    "task, options, pictures",
    [
        ("adding", {"T": 20, "test_size": 16}, {"adding_scatter.png"}),
        (
            "arithmetic",
            {"digits": 2, "test_size": 16},
            {"arithmetic_examples.txt", "arithmetic_positions.png"},
        ),
    ],
)
def test_every_task_trains_end_to_end_with_its_pictures(tmp_path, task, options, pictures):
    summary = train(tiny(tmp_path, task=task, cell=GRU, steps=2, task_options=options, pictures=True))
    metric = make_task(task).metric
    assert np.isfinite(summary["final"][f"test_{metric}"])
    assert pictures <= {p.name for p in tmp_path.iterdir()}


def test_chorales_train_on_piano_rolls_and_pick_the_best_valid_point(tmp_path, fake_chorales):
    summary = train(tiny(tmp_path, task="chorales", task_options={}, pictures=True))
    assert {"train_nll", "valid_nll", "test_nll"} <= set(summary["final"])
    assert summary["final"]["test_nll"] > 0
    assert summary["best_valid"]["step"] in (2, 4)
    assert (tmp_path / "chorale_prediction.png").exists()


def test_model_is_recurrent_plus_readout_and_embeds_tokens():
    copy_model = build_model(LSTM, make_task("copy"), 5)
    lstm = torch.nn.LSTM(9, 5)
    assert count_parameters(copy_model) == count_parameters(lstm) + 5 * 8 + 8
    arith = make_task("arithmetic")
    model = build_model(GRU, arith, 6)
    out, h = model(torch.zeros(7, 2, dtype=torch.long))
    assert out.shape == (7, 2, arith.output_size) and h.shape == (1, 2, 6)


def test_a_cell_that_needs_input_as_wide_as_hidden_gets_an_input_projection():
    mut1 = str(ROOT / "cells" / "mut1.cell")
    adding = make_task("adding")
    model = build_model(mut1, adding, 6)
    assert isinstance(model.projection, torch.nn.Linear) and model.projection.in_features == 2
    out, _ = model(torch.zeros(5, 3, 2))
    assert out.shape == (5, 3, 1)
    assert build_model(LSTM, adding, 6).projection is None  # other cells read the input directly


@pytest.mark.parametrize("cell", [LSTM, GRU, TANH])
def test_param_budget_picks_the_largest_hidden_size_that_fits(cell):
    task = make_task("chorales")  # 88 in, 88 out; the data is not loaded to count parameters
    h = hidden_for_budget(cell, task, 20000)
    assert (
        count_parameters(build_model(cell, task, h))
        <= 20000
        < count_parameters(build_model(cell, task, h + 1))
    )


def test_compare_writes_a_table_and_one_plot_with_every_curve(tmp_path):
    result = compare(
        CompareConfig(
            task="copy", cells=[LSTM, GRU], hidden=[4, 3], seeds=2, steps=2, batch=4, eval_every=1,
            task_options=TINY_COPY, out=str(tmp_path), pictures=False, progress=False,
        )
    )  # fmt: skip
    table = (tmp_path / "results.md").read_text()
    assert "| cell | hidden | parameters | train bits_per_seq | test bits_per_seq |" in table
    assert "| lstm | 4 |" in table and "| gru | 3 |" in table
    assert "±" in table and "Reference:" in table
    assert (tmp_path / "curves.png").exists()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["cell"] for r in rows] == ["lstm", "gru"] and [r["seeds"] for r in rows] == [[0, 1], [0, 1]]
    assert {p.name for p in (tmp_path / "lstm").iterdir()} == {"seed0", "seed1"}
    assert result["rows"] == rows


def test_commands_run_and_report_bad_options(tmp_path, capsys):
    common = ["--steps", "2", "--batch", "2", "--eval-every", "1", "-o", "max_len=2", "-o", "test_size=4"]
    common += ["--quiet", "--no-pictures"]
    out = str(tmp_path / "t")
    assert cli.main(["train", "copy", "--cell", LSTM, "--hidden", "3", "--out", out, *common]) == 0
    assert (
        cli.main(["train", "copy", "--cell", LSTM, "--hidden", "3", "--out", out, "--resume", *common]) == 0
    )
    assert "2 steps" in capsys.readouterr().out
    more = [a if a != "2" else "3" for a in common[:2]] + common[2:]  # --steps 3
    drop = ["train", "copy", "--cell", LSTM, "--hidden", "3", "--out", out, "--resume", "--set-lr", "1e-4"]
    assert cli.main([*drop, *more]) == 0
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["lr_schedule"][-1] == [2, 1e-4]
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:  # a bad option is a usage error
        cli.main(["train", "copy", "--cell", LSTM, "-o", "nope=1", "--out", out])
    assert usage.value.code == 2 and "no option 'nope'" in capsys.readouterr().err
    budget = ["compare", "copy", LSTM, GRU, "--param-budget", "400", "--out", str(tmp_path / "c"), *common]
    assert cli.main(budget) == 0
    assert "a parameter budget of 400" in (tmp_path / "c" / "results.md").read_text()
    with pytest.raises(SystemExit):
        cli.main(["compare", "copy", LSTM, "--param-budget", "400", "--hidden", "3"])  # one or the other


def test_register_adds_both_subcommands_to_another_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="celldsl")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(
        ["compare", "chorales", "a.cell", "b.cell", "--hidden", "100,46", "--seeds", "3"]
    )
    assert args.cells == ["a.cell", "b.cell"] and args.hidden == [100, 46] and args.seeds == 3
    assert callable(args.func)
    assert parser.parse_args(["train", "adding", "--cell", "x.cell", "-o", "T=500"]).task_option == ["T=500"]
