"""Greedy decoding and beam search with length normalisation.

Both work on any model with three methods (Seq2Seq has them; tests use hand-written ones):

    begin(src, src_len)          -> (state, memory)
    step(tokens [B], state, mem) -> (log-probabilities [B, V], state, attention weights [S, B] or None)
    select(state, mem, index)    -> (state, memory) restricted to rows `index` (reordering, copying)

Beam search keeps `width` live hypotheses per sentence. At each step it ranks every extension of
every live hypothesis by its summed log-probability and looks at the best 2 * width. An extension
by EOS ranked among the best `width` is finished, scored by log p(y) / |y|^alpha (|y| counts the
words and the EOS; alpha = 1 is the mean log-probability per word, 0 the raw sum, which favours
short outputs); an EOS ranked lower is dropped. The best `width` other extensions stay live. Each
sentence keeps its `width` best finished hypotheses, and is done once it has `width` of them and
its best live hypothesis, normalised at the current length, scores no better than the worst of
them. At `max_len` the live ones count as finished. The best normalised score wins. (These are
the rules of fairseq's and Hugging Face's beam searches.) With width 1 this is greedy decoding:
the first EOS ranked first finishes it, and nothing live can then score better (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grammar import BOS_ID, EOS_ID


def _max_len(src_len: Tensor) -> int:
    return 2 * int(src_len.max()) + 5


@torch.no_grad()
def greedy(model, src: Tensor, src_len: Tensor, max_len: int | None = None):
    """-> (token lists without BOS/EOS, attention [steps, S] per sentence, or None)."""
    max_len = max_len or _max_len(src_len)
    N = src.shape[1]
    state, memory = model.begin(src, src_len)
    tokens = torch.full((N,), BOS_ID, dtype=torch.long, device=src.device)
    out, attn, done = [], [], torch.zeros(N, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logp, state, weights = model.step(tokens, state, memory)
        tokens = logp.argmax(-1)
        out.append(tokens)
        attn.append(weights)
        done |= tokens == EOS_ID
        if bool(done.all()):
            break
    steps = torch.stack(out).T.tolist()  # [N, steps]
    results, attentions = [], []
    for n, seq in enumerate(steps):
        length = seq.index(EOS_ID) if EOS_ID in seq else len(seq)
        results.append(seq[:length])
        if attn[0] is not None:
            attentions.append(torch.stack([a[:, n] for a in attn[: length + 1]]).cpu())
    return results, (attentions or None)


@torch.no_grad()
def beam_search(
    model, src: Tensor, src_len: Tensor, width: int, alpha: float = 1.0, max_len: int | None = None
) -> list[list[int]]:
    """The best hypothesis per sentence (token lists without BOS/EOS); see the module docstring."""
    if width < 1:
        raise ValueError(f"beam width must be at least 1, got {width}")
    max_len = max_len or _max_len(src_len)
    N, K, device = src.shape[1], width, src.device
    state, memory = model.begin(src, src_len)
    state, memory = model.select(state, memory, torch.arange(N, device=device).repeat_interleave(K))
    tokens = torch.full((N * K,), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((N, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis per sentence at the start
    history: list[list[int]] = [[] for _ in range(N * K)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(N)]
    done = [False] * N

    def norm(score: float, length: int) -> float:
        return score / (length**alpha)

    for t in range(max_len):
        logp, state, _ = model.step(tokens, state, memory)
        V = logp.shape[-1]
        cand = (scores.unsqueeze(-1) + logp.view(N, K, V)).view(N, K * V)
        top, pos = cand.topk(min(2 * K, K * V), dim=1)
        top, pos = top.tolist(), pos.tolist()
        parents, new_tokens = [], []
        new_scores = [[float("-inf")] * K for _ in range(N)]
        for n in range(N):
            live = []
            if not done[n]:
                for rank, (score, p) in enumerate(zip(top[n], pos[n], strict=True)):
                    if score == float("-inf"):
                        break
                    beam, word = divmod(p, V)
                    if word != EOS_ID:
                        live.append((score, n * K + beam, word))
                    elif rank < K:
                        finished[n].append((norm(score, t + 1), history[n * K + beam]))
                    if len(live) == K:
                        break
                finished[n] = sorted(finished[n], key=lambda f: -f[0])[:K]
                best_live = max((score for score, _, _ in live), default=float("-inf"))
                done[n] = len(finished[n]) >= K and norm(best_live, t + 1) <= finished[n][-1][0]
            while len(live) < K:  # dead slots: keep a row, score -inf
                live.append((float("-inf"), n * K, EOS_ID))
            for k, (score, parent, word) in enumerate(live):
                new_scores[n][k] = score if not done[n] else float("-inf")
                parents.append(parent)
                new_tokens.append(word)
        if all(done):
            break
        index = torch.tensor(parents, device=device)
        state, memory = model.select(state, memory, index)
        history = [history[p] + [w] for p, w in zip(parents, new_tokens, strict=True)]
        tokens = torch.tensor(new_tokens, device=device)
        scores = torch.tensor(new_scores, device=device)
    else:  # max_len reached: live hypotheses count as finished
        for n in range(N):
            for k in range(K):
                if scores[n, k] > float("-inf"):
                    finished[n].append((norm(float(scores[n, k]), max_len), history[n * K + k]))
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]
