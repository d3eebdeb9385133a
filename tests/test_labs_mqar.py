"""The MQAR lab task (Arora et al. 2023, Zoology): the sequences' structure, the metric on the
query steps only, the options, and `celldsl train mqar` end to end at a tiny size."""

import json
import math
from pathlib import Path

import pytest
import torch

from celldsl.labs import cli
from celldsl.labs.tasks import make_task
from celldsl.labs.tasks.mqar import TEST_SEED

ROOT = Path(__file__).resolve().parents[1]
LSTM = str(ROOT / "cells" / "lstm.cell")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def metrics(task, out, batch):
    return {k: s / w for k, (s, w) in task.score(out, batch).items()}


@pytest.mark.parametrize("fill", ["true", "false"])
def test_every_query_asks_a_key_given_earlier_with_the_target_as_its_value(fill):
    task = make_task("mqar", {"vocab": "64", "pairs": "5", "T": "40", "random_fill": fill})
    b = task.train_batch(gen(), 50)
    T, N = b.inputs.shape
    assert (T, N) == (40, 50) and b.inputs.dtype == b.targets.dtype == torch.long
    assert b.targets.shape == b.mask.shape == (T, N) and b.mask.dtype == torch.bool
    for j in range(N):
        seq, tgt, m = b.inputs[:, j].tolist(), b.targets[:, j], b.mask[:, j]
        keys, values = seq[0:10:2], seq[1:10:2]
        assert len(set(keys)) == 5 and len(set(values)) == 5  # distinct keys, distinct values
        assert all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        asked = m.nonzero().flatten().tolist()
        assert len(asked) == 5 and all(t >= 10 and (t - 10) % 2 == 0 for t in asked)
        assert sorted(seq[t] for t in asked) == sorted(keys)  # every key asked once
        for t in asked:
            first = seq.index(seq[t])  # the key's first appearance: in the pairs, before t
            assert first < 10 and first % 2 == 0 and first < t
            assert tgt[t].item() == seq[first + 1]  # the answer is the value stored with it
        if fill == "false":
            assert all(seq[t] == 0 for t in range(10, T) if t not in asked)
    if fill == "true":  # the filler is random tokens from the whole vocabulary
        region = b.inputs[10:][~b.mask[10:]]
        assert len(set(region.tolist())) > 50


def test_query_slots_follow_the_power_law():
    uniform = make_task("mqar", {"vocab": "64", "pairs": "1", "T": "22", "power_a": "1"})
    skewed = make_task("mqar", {"vocab": "64", "pairs": "1", "T": "22", "power_a": "0.01"})
    assert torch.allclose(uniform.slot_probabilities(), torch.full((10,), 0.1, dtype=torch.float64))
    pos_u = uniform.train_batch(gen(), 4000).mask.float().argmax(0)
    pos_s = skewed.train_batch(gen(), 4000).mask.float().argmax(0)
    assert abs(pos_u.float().mean().item() - 11) < 0.3  # slots 0..9 at steps 2, 4, .., 20: mean 11
    first_share = (pos_s == 2).float().mean().item()
    assert abs(first_share - skewed.slot_probabilities()[0].item()) < 0.03 and first_share > 0.25


def test_batches_are_deterministic_and_eval_sets_fixed():
    task = make_task("mqar", {"test_size": "10"})
    a, b = task.train_batch(gen(3), 8), task.train_batch(gen(3), 8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, task.train_batch(gen(4), 8).inputs)
    sets = task.eval_sets()
    assert set(sets) == {"train", "test", "valid"}
    again = make_task("mqar", {"test_size": "10"}).eval_sets()
    for split in sets:
        assert torch.equal(sets[split][0].inputs, again[split][0].inputs)
    assert torch.equal(sets["test"][0].inputs, task.train_batch(gen(TEST_SEED + 1), 10).inputs)
    assert not torch.equal(sets["train"][0].inputs, sets["test"][0].inputs)


def test_metric_reads_the_query_steps_only():
    task = make_task("mqar", {"vocab": "32", "pairs": "4", "T": "24"})
    b = task.train_batch(gen(), 200)
    oracle = torch.nn.functional.one_hot(b.targets, 32).double() * 20
    # garbage at every step that is not a query does not change the score
    noise = torch.randn(*b.targets.shape, 32, generator=gen(1), dtype=torch.float64) * 50
    oracle = torch.where(b.mask[..., None], oracle, noise)
    m = metrics(task, oracle, b)
    assert m["acc"] == 1.0 and m["seq_acc"] == 1.0 and m["ce"] < 1e-6
    # right everywhere but at the queries scores 0
    wrong = torch.where(b.mask[..., None], oracle.roll(1, dims=-1), oracle)
    assert metrics(task, wrong, b)["acc"] == 0.0
    # one wrong query: acc drops by one query, seq_acc by one sequence
    t, n = b.mask.nonzero()[0].tolist()
    one = oracle.clone()
    one[t, n] = one[t, n].roll(1)
    m = metrics(task, one, b)
    assert m["acc"] == pytest.approx(1 - 1 / (4 * 200)) and m["seq_acc"] == pytest.approx(1 - 1 / 200)


def test_a_constant_prediction_scores_chance():
    """Always answering token c is right on the queries whose value is c: values are uniform over
    the vocab/2 value tokens, so c scores about 2/vocab there, 0 elsewhere, 1/vocab on average."""
    vocab = 32
    task = make_task("mqar", {"vocab": str(vocab), "pairs": "4", "T": "24"})
    b = task.train_batch(gen(), 2000)
    accs = []
    for c in range(vocab):
        const = torch.zeros(*b.targets.shape, vocab)
        const[..., c] = 1.0
        accs.append(metrics(task, const, b)["acc"])
    assert sum(accs) / vocab == pytest.approx(1 / vocab)  # each query has exactly one answer
    assert all(a == 0 for a in accs[: vocab // 2])  # keys and filler are never the answer
    assert all(abs(a - 2 / vocab) < 0.02 for a in accs[vocab // 2 :])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pairs": "0"}, "pairs must be at least 1"),
        ({"vocab": "16", "pairs": "8"}, "vocab must be at least 18"),
        ({"pairs": "8", "T": "31"}, "T must be at least 4 [*] pairs = 32"),
        ({"power_a": "0"}, "power_a must be in"),
        ({"power_a": "nan"}, "power_a must be in"),
        ({"test_size": "0"}, "test_size must be at least 1"),
        ({"random_fill": "maybe"}, "not a boolean"),
    ],
)
def test_bad_options_are_refused_with_the_range(options, message):
    with pytest.raises(ValueError, match=message):
        make_task("mqar", options)


def test_train_mqar_with_an_lstm_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "mqar", "--cell", LSTM, "--hidden", "4", "--steps", "3", "--batch", "4"]
    args += ["--eval-every", "1", "-o", "vocab=16", "-o", "pairs=2", "-o", "T=12", "-o", "test_size=6"]
    assert cli.main([*args, "--quiet", "--no-pictures", "--out", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    final = saved["final"]
    for key in ("train_acc", "test_acc", "test_seq_acc", "valid_acc"):
        assert 0 <= final[key] <= 1
    assert math.isfinite(final["test_ce"]) and saved["config"]["task_options"]["pairs"] in (2, "2")
    with pytest.raises(SystemExit) as usage:  # an option out of range is a usage error
        cli.main(["train", "mqar", "--cell", LSTM, "-o", "T=3", "--out", str(tmp_path / "bad")])
    assert usage.value.code == 2 and "T must be at least" in capsys.readouterr().err
