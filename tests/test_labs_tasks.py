"""The lab task generators: shapes, target correctness, determinism; the piano-roll conversion."""

import numpy as np
import pytest
import torch

from celldsl.labs.tasks import TASKS, make_task, parse_options
from celldsl.labs.tasks.arithmetic import VOCAB, decode
from celldsl.labs.tasks.chorales import rolls_to_batch, split_of
from celldsl.labs.tasks.copy import TEST_SEED


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def same_batch(a, b):
    return all(torch.equal(x, y) for x, y in ((a.inputs, b.inputs), (a.targets, b.targets), (a.mask, b.mask)))


@pytest.mark.parametrize("name", ["copy", "adding", "arithmetic"])
def test_generated_batches_are_deterministic_given_the_generator(name):
    task = make_task(name)
    assert same_batch(task.train_batch(gen(3), 8), task.train_batch(gen(3), 8))
    assert not same_batch(task.train_batch(gen(3), 8), task.train_batch(gen(4), 8))


@pytest.mark.parametrize("name", ["copy", "adding", "arithmetic"])
def test_eval_sets_are_fixed_and_differ_between_train_and_test(name):
    a, b = make_task(name, {"test_size": "20"}), make_task(name, {"test_size": "20"})
    sa, sb = a.eval_sets(), b.eval_sets()
    assert set(sa) == ({"train", "test", "valid"} if name == "copy" else {"train", "test"})
    for split in sa:
        assert same_batch(sa[split][0], sb[split][0])
    assert not same_batch(sa["train"][0], sa["test"][0])
    if "valid" in sa:  # held out from both
        assert not same_batch(sa["valid"][0], sa["test"][0])
        assert not same_batch(sa["valid"][0], sa["train"][0])


def test_copy_eval_sets_keep_their_sequences():
    """The valid set came after train and test: those are the sequences earlier runs were scored on."""
    task = make_task("copy", {"test_size": "4"})
    sets = task.eval_sets()
    for k, split in enumerate(("train", "test")):
        want = task.train_batch(torch.Generator().manual_seed(TEST_SEED + k), 4)
        assert same_batch(sets[split][0], want)


def test_copy_target_is_the_input_pattern_after_the_delimiter():
    task = make_task("copy")
    b = task.train_batch(gen(), 16)
    T, N, _ = b.inputs.shape
    assert b.inputs.shape[2] == 9 and b.targets.shape == (T, N, 8) and b.mask.shape == (T, N)
    for j in range(N):
        L = int(b.mask[:, j].sum())
        assert 1 <= L <= 20
        delim = b.inputs[:, j, 8].nonzero().flatten().tolist()
        assert delim == [L]  # one delimiter, right after the pattern
        assert torch.equal(b.targets[L + 1 : 2 * L + 1, j], b.inputs[:L, j, :8])
        assert b.mask[L + 1 : 2 * L + 1, j].all() and int(b.mask[:, j].sum()) == L
        assert not b.inputs[L + 1 :, j].any()  # no input during the answer
    assert T == 2 * int(b.mask.sum(0).max()) + 1


def test_copy_lengths_cover_one_to_twenty():
    b = make_task("copy").train_batch(gen(), 2000)
    assert set(b.mask.sum(0).tolist()) == set(range(1, 21))


def test_copy_metrics_perfect_prediction_gives_zero_errors():
    task = make_task("copy")
    b = task.train_batch(gen(), 8)
    logits = (b.targets * 2 - 1) * 30.0  # confident and right
    m = {k: s / w for k, (s, w) in task.score(logits, b).items()}
    assert m["bit_errors_per_seq"] == 0 and m["bits_per_seq"] < 1e-6
    chance = {k: s / w for k, (s, w) in task.score(torch.zeros_like(logits), b).items()}
    assert chance["bce_per_bit"] == pytest.approx(np.log(2))  # p = 0.5 everywhere
    assert chance["bits_per_seq"] == pytest.approx(8 * b.mask.sum().item() / b.size)  # 1 bit per target bit


@pytest.mark.parametrize("T", [20, 100, 500])
def test_adding_follows_hochreiter_schmidhuber_experiment_4(T):
    task = make_task("adding", {"T": str(T)})
    b = task.train_batch(gen(T), 64)
    assert b.inputs.shape[1:] == (64, 2) and b.targets.shape[1:] == (64, 1)
    for j in range(64):
        L = int(b.mask[:, j].nonzero()) + 1
        assert T <= L <= T + T // 10
        x = b.inputs[:L, j]
        assert not b.inputs[L:, j].any()
        assert x[:, 0].abs().max() <= 1
        marked = (x[:, 1] == 1).nonzero().flatten().tolist()
        assert len(marked) == 2
        assert marked[0] < 10 and marked[1] < T // 2  # X1 in the first 10, X2 in the first T/2-1 unmarked
        assert set(x[:, 1].tolist()) <= {-1.0, 0.0, 1.0}
        for end in (0, L - 1):
            assert x[end, 1] == (1.0 if end in marked else -1.0)
        if 0 in marked:
            assert x[0, 0] == 0  # "we set X1 to zero"
        expected = 0.5 + (x[marked[0], 0] + x[marked[1], 0]) / 4
        assert b.targets[L - 1, j, 0] == pytest.approx(float(expected), abs=1e-6)
        assert 0 <= float(expected) <= 1


def test_adding_solved_means_error_below_0_04():
    task = make_task("adding", {"T": "20"})
    b = task.train_batch(gen(), 4)
    out = b.targets.clone()
    out[b.mask] += torch.tensor([[0.0], [0.039], [-0.041], [0.5]])
    m = {k: s / w for k, (s, w) in task.score(out, b).items()}
    assert m["solved"] == 0.5


def test_adding_rejects_too_short_sequences():
    with pytest.raises(ValueError, match="at least 20"):
        make_task("adding", {"T": "10"})


@pytest.mark.parametrize("distractors", ["0", "0.5"])
def test_arithmetic_answers_are_correct_and_only_they_are_scored(distractors):
    task = make_task("arithmetic", {"digits": "4", "distractors": distractors})
    b = task.train_batch(gen(), 64)
    assert b.inputs.dtype == torch.long and b.inputs.shape == b.targets.shape == b.mask.shape
    for j in range(64):
        n = int((b.inputs[:, j] != 0).sum())
        text = decode(b.inputs[:n, j]) + VOCAB[int(b.targets[n - 1, j])]
        assert torch.equal(b.inputs[1:n, j], b.targets[: n - 1, j])  # targets are the next characters
        prompt, answer = text.split("=")
        clean = "".join(ch for ch in prompt if ch in "0123456789+-")
        op = "+" if "+" in clean else "-"
        a, c = clean.split(op)
        assert len(a) <= 4 and len(c) <= 4
        assert answer == f"{int(a) + int(c) if op == '+' else int(a) - int(c)}."
        if distractors == "0":
            assert prompt == clean
        scored = decode(b.targets[:, j][b.mask[:, j]])
        assert scored == answer


def test_task_options_are_checked():
    assert make_task("copy", {"max_len": "5"}).max_len == 5
    assert parse_options(["T=500", "test_size = 10"]) == {"T": "500", "test_size": "10"}
    with pytest.raises(ValueError, match="no option"):
        make_task("copy", {"T": "5"})
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["T"])
    assert set(TASKS) == {"copy", "adding", "chorales", "arithmetic", "translate", "mqar"}


def test_chorale_split_rule_gives_the_documented_sizes():
    splits = [split_of(r) for r in range(1, 372)]
    assert (splits.count("train"), splits.count("valid"), splits.count("test")) == (222, 75, 74)
    assert split_of(5) == "test" and split_of(6) == "valid" and split_of(7) == "train"


def test_chorale_batch_predicts_each_frame_from_the_previous_ones():
    rolls = [np.eye(88, dtype=np.uint8)[[60, 64, 67]], np.eye(88, dtype=np.uint8)[[40, 41]]]
    b = rolls_to_batch(rolls)
    assert b.inputs.shape == (3, 2, 88)
    assert not b.inputs[0].any()  # frame 0 is predicted from silence
    assert torch.equal(b.inputs[1:, 0], b.targets[:2, 0])
    assert b.mask[:, 0].tolist() == [True, True, True] and b.mask[:, 1].tolist() == [True, True, False]


# -- piano rolls -------------------------------------------------------------------------------------


def test_score_to_roll_samples_sounding_notes_on_the_quarter_grid():
    from music21 import chord, note, stream

    from celldsl.labs.pianoroll import score_to_roll

    s = stream.Stream()
    s.insert(0, note.Note("C4", quarterLength=2))  # frames 0, 1
    s.insert(2, chord.Chord(["E4", "G4"], quarterLength=1))  # frame 2
    s.insert(3.5, note.Note("D4", quarterLength=0.5))  # between grid points: not in the roll
    s.insert(3.5, note.Note("A0", quarterLength=1))  # sounds at 4.0: frame 4
    s.insert(0, note.Note("C8", quarterLength=1.5))  # top key, frames 0 and 1
    roll = score_to_roll(s)
    assert roll.shape == (5, 88) and roll.dtype == np.uint8
    on = [sorted((np.nonzero(f)[0] + 21).tolist()) for f in roll]
    assert on == [[60, 108], [60, 108], [64, 67], [], [21]]


def test_a_real_chorale_converts_to_the_expected_piano_roll():
    from celldsl.labs.pianoroll import parse_chorale

    roll = parse_chorale("bach/bwv269")  # Riemenschneider no. 1, "Aus meines Herzens Grunde"
    assert roll.shape == (63, 88)
    first = [sorted((np.nonzero(f)[0] + 21).tolist()) for f in roll[:3]]
    assert first == [[43, 59, 62, 67], [55, 59, 62, 67], [52, 60, 64, 67]]
    assert 3 <= roll.sum(1).max() <= 4  # four voices (some may share a key or rest)


def test_chorale_cache_is_written_once_and_read_back(tmp_path, monkeypatch):
    from celldsl.labs import pianoroll

    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(pianoroll, "chorale_names", lambda: ["a", "b"])
    rolls = {"a": np.eye(88, dtype=np.uint8)[:3], "b": np.eye(88, dtype=np.uint8)[5:10]}
    calls = []
    monkeypatch.setattr(pianoroll, "parse_chorale", lambda n: calls.append(n) or rolls[n])
    first = pianoroll.load_chorales(progress=False)
    second = pianoroll.load_chorales(progress=False)
    assert calls == ["a", "b"]  # parsed once, then read from the cache
    assert [c.name for c in second] == ["a", "b"] and [c.number for c in second] == [1, 2]
    for x, y in zip(first, second, strict=True):
        assert np.array_equal(x.roll, y.roll)
    assert [p.name for p in tmp_path.iterdir()] == [pianoroll.cache_path().name]  # no temp files left


# -- copy in the lstm_copy_task encoding (the graves preset) ----------------------------------------


def test_copy_lstm_copy_task_encoding_matches_that_project_step_by_step():
    task = make_task("copy", {"encoding": "lstm_copy_task"})
    assert task.input_size == 10 and task.output_size == 8
    b = task.train_batch(gen(5), 32)
    assert b.inputs.shape == (42, 32, 10) and b.targets.shape == (42, 32, 8)  # fixed 2 * 20 + 2 steps
    values = torch.cat([b.inputs.unique(), b.targets.unique()]).unique()
    assert torch.equal(values, torch.tensor([0.001, 1.0]))  # every 0 is 0.001
    for j in range(32):
        L = int(b.mask[:, j].sum())
        x, y = b.inputs[:, j], b.targets[:, j]
        assert (x[:, 1] == 1).nonzero().flatten().tolist() == [0]  # start marker, channel 1, step 0
        assert (x[:, 0] == 1).nonzero().flatten().tolist() == [L + 1]  # end marker, channel 0
        pattern = x[1 : L + 1, 2:]
        assert torch.equal(y[L + 2 : 2 * L + 2], pattern)  # the answer, one step after the end marker
        assert b.mask[:, j].nonzero().flatten().tolist() == list(range(L + 2, 2 * L + 2))
        low = torch.tensor(0.001)
        assert torch.all(x[L + 2 :] == low) and torch.all(x[1 : L + 1, :2] == low)
        assert torch.all(y[: L + 2] == low) and torch.all(y[2 * L + 2 :] == low)


def test_copy_lstm_copy_task_loss_is_the_clipped_bce_over_every_step_and_bit():
    task = make_task("copy", {"encoding": "lstm_copy_task"})
    b = task.train_batch(gen(6), 8)
    out = torch.randn(b.targets.shape, generator=gen(7)) * 4
    p, t = torch.sigmoid(out).double().numpy(), b.targets.double().numpy()
    by_hand = -(t * np.log(np.clip(p, 1e-6, 0.9999)) + (1 - t) * np.log(1 - np.clip(p, 1e-10, 0.9999)))
    assert float(task.loss(out, b)) == pytest.approx(float(by_hand.mean()), rel=1e-5)
    m = {k: s / w for k, (s, w) in task.score(out, b).items()}
    assert m["bce_all"] == pytest.approx(float(by_hand.mean()), rel=1e-5)
    # the floor is the targets' entropy: 0.001 costs H(0.001), 1.0 costs -log(0.9999)
    h = -(0.001 * np.log(0.001) + 0.999 * np.log(0.999))
    ones = float((b.targets == 1).sum())
    expected_floor = (ones * -np.log(0.9999) + (b.targets.numel() - ones) * h) / b.targets.numel()
    assert m["bce_all_floor"] == pytest.approx(expected_floor, rel=1e-4)
    perfect = {k: s / w for k, (s, w) in task.score(torch.logit(b.targets), b).items()}
    assert perfect["bce_all"] == pytest.approx(perfect["bce_all_floor"], rel=1e-4)
    assert perfect["bit_errors_per_seq"] == 0


def test_copy_fixed_length_batches_are_as_long_as_they_need_to_be():
    for encoding, extra in (("ntm", 1), ("lstm_copy_task", 2)):
        task = make_task("copy", {"encoding": encoding})
        for L in (10, 40):
            b = task.fixed_length(L, 3, seed=1)
            assert b.inputs.shape[0] == 2 * L + extra and (b.mask.sum(0) == L).all()


def test_copy_rejects_an_unknown_encoding():
    with pytest.raises(ValueError, match="encoding"):
        make_task("copy", {"encoding": "graves"})
