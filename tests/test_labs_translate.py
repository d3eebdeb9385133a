"""The translate lab: the toy grammar and its translation, batches, the one-step decoder cell,
attention, greedy and beam search, BLEU, and a tiny end-to-end comparison."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from celldsl.labs.compare import CompareConfig, compare
from celldsl.labs.seq2seq import grammar as g
from celldsl.labs.seq2seq.bleu import corpus_bleu, words
from celldsl.labs.seq2seq.decode import beam_search, greedy
from celldsl.labs.seq2seq.step import step_cell
from celldsl.labs.tasks import make_task
from celldsl.labs.tasks.translate import TGT_INDEX, decoder_cell_for, reference_ids, source_words

ROOT = Path(__file__).resolve().parents[1]
LSTM, GRU, MUT1, TANH = (str(ROOT / "cells" / f"{c}.cell") for c in ("lstm", "gru", "mut1", "rnn_tanh"))
CTX_CELLS = ROOT / "celldsl" / "labs" / "seq2seq" / "cells"


# -- the grammar ------------------------------------------------------------------------------------


def test_translation_follows_the_documented_rules_on_a_hand_built_sentence():
    cat = g.NounPhrase("a", (), "cat")
    bird = g.NounPhrase("the", ("small", "red"), "bird", ("near", g.NounPhrase("a", ("old",), "king")))
    s = g.Sentence(g.NounPhrase("the", ("big",), "dog", rc=("sees", cat)), "chases", bird, "quickly")
    source = "the big dog that sees a cat chases the small red bird near a old king quickly"
    assert " ".join(s.source()) == source
    # T(NP) ga T(NP2) o ADV' VERB'; RC and PP before the noun; adjectives mirrored; "a" dropped
    assert " ".join(s.target()) == "miu o vid no wof gro ka ga rex sen pres pip ru min ka o hai kur"


@pytest.mark.parametrize("depth, always, lengths", [(1, False, (5, 20)), (2, True, (17, 30))])
def test_generated_sentences_parse_back_and_keep_their_lengths(depth, always, lengths):
    rng = random.Random(1)
    for _ in range(500):
        s = g.sentence(rng, depth, always)
        assert g.parse(s.source(), depth) == s  # every source is in the grammar, parsed unambiguously
        assert lengths[0] <= len(s.source()) <= lengths[1]
        assert set(s.target()) <= set(g.TARGET_VOCAB[3:])
        # every content word is translated exactly once: the lexicon maps words one to one
        content = [w for w in s.source() if w not in ("the", "a", "that")]
        lexicon = {**g.NOUNS, **g.ADJECTIVES, **g.VERBS, **g.PREPOSITIONS, **g.ADVERBS}
        particles = {g.DEFINITE, g.SUBJECT, g.OBJECT, g.RELATIVE}
        assert sorted(lexicon[w] for w in content) == sorted(w for w in s.target() if w not in particles)
    with pytest.raises(ValueError, match="expected"):
        g.parse("the dog sees".split())


def test_the_grammar_reorders_so_alignments_are_not_monotonic():
    rng = random.Random(2)
    lexicon = {**g.NOUNS, **g.ADJECTIVES, **g.VERBS, **g.PREPOSITIONS, **g.ADVERBS}
    checked = crossing = 0
    for _ in range(300):
        s = g.sentence(rng)
        content = [w for w in s.source() if w in lexicon]
        if len(set(content)) < len(content):
            continue  # a repeated word would make the alignment ambiguous
        order = [s.target().index(lexicon[w]) for w in content]
        checked += 1
        crossing += order != sorted(order)
    assert checked > 100 and crossing == checked  # the verb alone always moves to the end


def test_batches_are_deterministic_and_targets_are_shifted_translations():
    task = make_task("translate", {"test_size": "10"})
    a = task.train_batch(torch.Generator().manual_seed(3), 8)
    b = task.train_batch(torch.Generator().manual_seed(3), 8)
    c = task.train_batch(torch.Generator().manual_seed(4), 8)
    assert torch.equal(a.inputs.src, b.inputs.src) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs.src, c.inputs.src) if a.inputs.src.shape == c.inputs.src.shape else True
    for j in range(8):
        src = source_words(a, j)
        expected = g.parse(src).target()
        n = len(expected)
        assert words(reference_ids(a, j)) == " ".join(expected)
        assert a.inputs.tgt_in[0, j] == g.BOS_ID
        assert torch.equal(a.inputs.tgt_in[1 : n + 1, j], a.targets[:n, j])
        assert a.targets[n, j] == g.EOS_ID and a.mask[:, j].sum() == n + 1
        assert int(a.inputs.src_len[j]) == len(src) and (a.inputs.src[len(src) :, j] == g.PAD_ID).all()
    sets = task.eval_sets()
    assert set(sets) == {"train", "test", "long"}
    again = make_task("translate", {"test_size": "10"}).eval_sets()
    assert torch.equal(sets["test"][0].inputs.src, again["test"][0].inputs.src)
    assert int(sets["long"][0].inputs.src_len.min()) >= 17


# -- the model pieces -------------------------------------------------------------------------------


def test_the_step_cell_stepped_over_time_equals_the_layer_over_the_sequence():
    import celldsl

    torch.manual_seed(0)
    path = str(CTX_CELLS / "lstm_ctx.cell")
    step = step_cell(path, 5, 6, {"ctx": 4})
    layer = celldsl.Recurrent(path, 5, 6, input_sizes={"ctx": 4})
    layer.load_state_dict(step.layer.state_dict())
    x, ctx = torch.randn(7, 3, 5), torch.randn(7, 3, 4)
    out, (h, c) = layer(x, ctx=ctx)
    state, outs = None, []
    for t in range(7):
        o, state = step(x[t], state, ctx=ctx[t])
        outs.append(o)
    assert torch.allclose(torch.stack(outs), out, atol=1e-6)
    assert torch.allclose(state[0], h[0], atol=1e-6) and torch.allclose(state[1], c[0], atol=1e-6)


@pytest.mark.parametrize("cell, expected", [(LSTM, "lstm_ctx"), (GRU, "gru_ctx"), (MUT1, "mut1_ctx")])
def test_each_family_finds_its_context_decoder(cell, expected):
    assert Path(decoder_cell_for(cell)).stem == expected
    ctx = str(CTX_CELLS / "bahdanau_gru.cell")
    assert decoder_cell_for(ctx) == ctx  # a cell with a context input is its own decoder


def test_a_cell_without_a_context_version_is_an_error_that_says_what_to_write():
    with pytest.raises(ValueError, match="input x, ctx"):
        decoder_cell_for(TANH)


@pytest.mark.parametrize("attention", ["bahdanau", "dot", "general"])
def test_attention_weights_sum_to_one_over_the_real_source_words(attention):
    task = make_task("translate", {"attention": attention, "test_size": "6"})
    torch.manual_seed(0)
    model = task.build_model(GRU, 8)
    batch = task.eval_sets()["test"][0]
    logp, weights = model(batch.inputs)
    S = batch.inputs.src.shape[0]
    assert logp.shape == (batch.targets.shape[0], batch.size, task.output_size)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(()), atol=1e-5)
    mask = torch.arange(S).unsqueeze(1) < batch.inputs.src_len.unsqueeze(0)
    assert torch.allclose(weights.sum(1), torch.ones(()), atol=1e-5)
    assert (weights[:, ~mask] == 0).all()  # no weight on padding


def test_dot_attention_needs_matching_widths():
    task = make_task("translate", {"attention": "dot", "encoder_hidden": "3"})
    with pytest.raises(ValueError, match="dot attention"):
        task.build_model(GRU, 8)


# -- decoding ---------------------------------------------------------------------------------------

PAD, BOS, EOS, A, B = range(5)


class TableModel:
    """A hand-built 'model' whose next-word distribution depends on the previous word only:
    after BOS: a 0.6, b 0.4; after a: EOS 0.3, a 0.4, b 0.3; after b: EOS 0.9, a 0.05, b 0.05.
    The most probable output is 'b' (p = 0.36); greedy takes 'a' and then repeats it."""

    table = torch.tensor(
        [[0, 0, 1 / 3, 1 / 3, 1 / 3], [0, 0, 0, 0.6, 0.4], [0, 0, 1.0, 0, 0], [0, 0, 0.3, 0.4, 0.3],
         [0, 0, 0.9, 0.05, 0.05]]
    ).log()  # fmt: skip

    def begin(self, src, src_len):
        return None, None

    def step(self, tokens, state, memory):
        return self.table[tokens], state, None

    def select(self, state, memory, index):
        return state, memory


def test_beam_search_finds_the_best_sequence_where_greedy_does_not():
    src, src_len = torch.zeros(3, 1, dtype=torch.long), torch.tensor([3])
    model = TableModel()
    out, _ = greedy(model, src, src_len, max_len=6)
    assert out == [[A] * 6]  # greedy: a, then a again (0.4 > 0.3 for EOS), up to the limit
    assert beam_search(model, src, src_len, width=1, max_len=6) == out
    for width in (2, 3):
        assert beam_search(model, src, src_len, width=width, max_len=6) == [[B]]
    assert math.isclose(float(model.table[BOS, B] + model.table[B, EOS]), math.log(0.36), rel_tol=1e-6)


def test_width_one_beam_equals_greedy_on_a_trained_model(tmp_path):
    from celldsl.labs.train import TrainConfig, train

    cfg = TrainConfig(task="translate", cell=GRU, hidden=16, steps=30, batch=16, lr=1e-2, eval_every=30,
                      task_options={"test_size": 40}, out=str(tmp_path), pictures=False,
                      progress=False)  # fmt: skip
    train(cfg)
    task = make_task("translate", {"test_size": "40"})
    model = task.build_model(GRU, 16)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"])
    model.eval()
    b = task.eval_sets()["test"][0]
    out, attn = greedy(model, b.inputs.src, b.inputs.src_len)
    assert beam_search(model, b.inputs.src, b.inputs.src_len, width=1) == out
    assert len(attn) == b.size and attn[0].shape[1] == b.inputs.src.shape[0]
    assert any(o for o in out)  # it says something
    with pytest.raises(ValueError, match="width"):
        beam_search(model, b.inputs.src, b.inputs.src_len, width=0)


# -- BLEU -------------------------------------------------------------------------------------------


def test_bleu_on_known_strings():
    assert corpus_bleu(["wof ka ga miu o vid"], ["wof ka ga miu o vid"]) == pytest.approx(100)
    # one extra word: precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty -> (3/7)^(1/4)
    assert corpus_bleu(["wof ka ga miu o vid am"], ["wof ka ga miu o vid"]) == pytest.approx(
        100 * (3 / 7) ** 0.25
    )
    # one word short: the same precisions 5/5.. -> 1, brevity penalty exp(1 - 6/5)
    short = corpus_bleu(["wof ka ga miu o"], ["wof ka ga miu o vid"])
    assert short == pytest.approx(100 * math.exp(1 - 6 / 5))
    ids = [TGT_INDEX[w] for w in "wof ka ga".split()] + [g.EOS_ID, TGT_INDEX["miu"]]
    assert words([g.BOS_ID, *ids]) == "wof ka ga"  # BOS skipped, stops at EOS
    with pytest.raises(ValueError, match="references"):
        corpus_bleu(["a"], [])


# -- end to end -------------------------------------------------------------------------------------


def test_tiny_translate_compare_writes_a_table_bleu_and_an_attention_picture(tmp_path):
    result = compare(
        CompareConfig(
            task="translate", cells=[LSTM, GRU], hidden=[4], steps=2, batch=4, eval_every=1,
            task_options={"test_size": 6, "beam": 2}, out=str(tmp_path), progress=False,
        )
    )  # fmt: skip
    table = (tmp_path / "results.md").read_text()
    assert "| cell | hidden | parameters | train bleu | test bleu | long bleu |" in table
    assert "test_beam2_bleu" in table and "| lstm | 4 |" in table and "| gru | 4 |" in table
    for cell in ("lstm", "gru"):
        run = tmp_path / cell / "seed0"
        assert {"attention.png", "bleu_by_beam.png", "translations.txt", "learning_curve.png"} <= {
            p.name for p in run.iterdir()
        }
        by_set = json.loads((run / "bleu_by_beam.json").read_text())["bleu"]
        assert set(by_set) == {"test", "long"}
        for widths in by_set.values():
            assert set(widths) == {"1", "2", "3", "5", "8", "12"}
            assert all(0 <= v <= 100 for v in widths.values())
    assert [r["cell"] for r in result["rows"]] == ["lstm", "gru"]
