"""Encoder-decoder with attention, built from cell files.

Encoder: embedding -> bidirectional celldsl.Recurrent (any one-input cell file), run on a
PackedSequence so that the backward direction starts at each sentence's own last word. Its
outputs, the annotations h_j = [fwd h_j; bwd h_j], are what the decoder attends to.

Decoder: one step at a time through `step.step_cell` (the celldsl.Cell interface), with a cell
that reads a context input (`input x, ctx`; x is the previous target word's embedding). Its first
state is s_0 = tanh(W_s bwd h_1) as in Bahdanau et al. (every state of the cell gets its own slice
of W_s; "bwd h_1" is the backward encoder's output at the first word). Two attention families:

- "bahdanau" (Bahdanau, Cho & Bengio 2014, section 3.1 and appendix A): the query is the previous
  decoder output s_{i-1}; e_ij = v^T tanh(W_a s_{i-1} + U_a h_j); c_i = sum_j softmax_j(e_ij) h_j is
  the cell's context input; the readout is a maxout (pool 2) of U_o s_{i-1} + V_o E y_{i-1} + C_o c_i
  followed by W_o, as in their appendix A.
- "dot" / "general" (Luong, Pham & Manning 2015, section 3.1, global attention with input feeding,
  section 3.3): the cell runs first, h_t = cell(E y_{t-1}, ctx = h~_{t-1}); score(h_t, h_j) = h_t^T h_j
  (dot, which needs annotations as wide as the decoder) or h_t^T W_a h_j (general); c_t = sum_j a_t(j)
  h_j; h~_t = tanh(W_c [c_t; h_t]); p(y_t) = softmax(W_s h~_t); h~_0 = 0.

The decoding functions (decode.py) use only `begin`, `step` and `select`, so a hand-written model
with the same three methods can be decoded too (tests do that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .grammar import PAD_ID
from .step import reorder_state, step_cell

ATTENTIONS = ("bahdanau", "dot", "general")


@dataclass
class Seq2SeqInput:
    """src [S, N] int64 (padded with PAD_ID), src_len [N] int64, tgt_in [T, N] int64 (BOS, y_1, ...)."""

    src: Tensor
    src_len: Tensor
    tgt_in: Tensor

    def to(self, device) -> Seq2SeqInput:
        return Seq2SeqInput(self.src.to(device), self.src_len.to(device), self.tgt_in.to(device))


@dataclass
class Memory:
    """What the decoder attends to: annotations [S, N, A], their precomputed keys [S, N, K]
    (U_a h_j or W_a h_j; the annotations for dot), the source mask [S, N]."""

    annotations: Tensor
    keys: Tensor
    mask: Tensor

    def select(self, index: Tensor) -> Memory:
        return Memory(*(t.index_select(1, index) for t in (self.annotations, self.keys, self.mask)))


class Attention(nn.Module):
    """score(query [N, Q], memory) -> context [N, A] and weights [S, N] (softmax over the source)."""

    def __init__(self, kind: str, query_size: int, annotation_size: int, device=None):
        super().__init__()
        if kind not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {kind!r}")
        if kind == "dot" and query_size != annotation_size:
            raise ValueError(
                f"dot attention needs the decoder as wide as the annotations (hidden {query_size}, "
                f"annotations 2 x encoder hidden = {annotation_size}); use general or bahdanau, or match them"
            )
        self.kind = kind
        if kind == "bahdanau":
            self.W_a = nn.Linear(query_size, query_size, bias=False, device=device)
            self.U_a = nn.Linear(annotation_size, query_size, device=device)
            self.v_a = nn.Linear(query_size, 1, bias=False, device=device)
        elif kind == "general":
            self.W_a = nn.Linear(annotation_size, query_size, bias=False, device=device)

    def keys(self, annotations: Tensor) -> Tensor:
        if self.kind == "bahdanau":
            return self.U_a(annotations)
        if self.kind == "general":
            return self.W_a(annotations)  # h_t^T W_a h_j = h_t . (W_a h_j)
        return annotations

    def forward(self, query: Tensor, memory: Memory) -> tuple[Tensor, Tensor]:
        if self.kind == "bahdanau":
            scores = self.v_a(torch.tanh(self.W_a(query) + memory.keys)).squeeze(-1)
        else:
            scores = (memory.keys * query).sum(-1)
        weights = scores.masked_fill(~memory.mask, float("-inf")).softmax(dim=0)
        return (weights.unsqueeze(-1) * memory.annotations).sum(0), weights


class Seq2Seq(nn.Module):
    """forward(Seq2SeqInput) -> (logits [T, N, V], attention weights [T, S, N]) with teacher forcing."""

    def __init__(
        self,
        encoder_cell,
        decoder_cell,
        source_vocab: int,
        target_vocab: int,
        hidden: int,
        encoder_hidden: int,
        attention: str = "bahdanau",
        layers: int = 1,
        device=None,
    ):
        super().__init__()
        import celldsl

        A = 2 * encoder_hidden
        self.attention_kind, self.hidden, self.encoder_hidden = attention, hidden, encoder_hidden
        self.src_embedding = nn.Embedding(source_vocab, encoder_hidden, padding_idx=PAD_ID, device=device)
        self.encoder = celldsl.Recurrent(
            encoder_cell, encoder_hidden, encoder_hidden, num_layers=layers, bidirectional=True, device=device
        )
        decoder = celldsl.compile_cell(decoder_cell)
        inputs = decoder.ir.inputs
        if len(inputs) != 2:
            raise ValueError(
                f"the decoder cell {decoder.name!r} declares the inputs {', '.join(inputs)}; it needs two: "
                "the previous word and a context (`input x, ctx`)"
            )
        self.ctx_name = inputs[1]
        ctx_size = A if attention == "bahdanau" else hidden  # Luong feeds h~_{t-1} (size H)
        self.tgt_embedding = nn.Embedding(target_vocab, hidden, device=device)
        self.cell = step_cell(decoder_cell, hidden, hidden, {self.ctx_name: ctx_size}, device=device)
        self.n_states = len(decoder.states)
        self.bridge = nn.Linear(encoder_hidden, self.n_states * hidden, device=device)
        self.attention = Attention(attention, hidden, A, device=device)
        if attention == "bahdanau":
            self.readout = nn.Linear(hidden + hidden + A, 2 * hidden, device=device)  # U_o, V_o, C_o
            self.output = nn.Linear(hidden, target_vocab, device=device)  # W_o
        else:
            self.combine = nn.Linear(A + hidden, hidden, bias=False, device=device)  # W_c
            self.output = nn.Linear(hidden, target_vocab, device=device)  # W_s

    # -- the three methods decoding uses ---------------------------------------------------------
    def begin(self, src: Tensor, src_len: Tensor):
        """Encode; returns (decoder state, memory)."""
        S = src.shape[0]
        packed = pack_padded_sequence(self.src_embedding(src), src_len.cpu(), enforce_sorted=False)
        out, _ = self.encoder(packed)
        annotations, _ = pad_packed_sequence(out, total_length=S)
        mask = torch.arange(S, device=src.device).unsqueeze(1) < src_len.unsqueeze(0)
        memory = Memory(annotations, self.attention.keys(annotations), mask)
        first = torch.tanh(self.bridge(annotations[0, :, self.encoder_hidden :])).chunk(self.n_states, dim=-1)
        cell_state = first[0] if self.n_states == 1 else tuple(first)
        carry = first[0] if self.attention_kind == "bahdanau" else annotations.new_zeros(first[0].shape)
        return (cell_state, carry), memory

    def step(self, tokens: Tensor, state, memory: Memory):
        """One target word: tokens [N] (the previous words) -> (log-probabilities [N, V], state,
        attention weights [S, N])."""
        cell_state, carry = state
        emb = self.tgt_embedding(tokens)
        if self.attention_kind == "bahdanau":
            context, weights = self.attention(carry, memory)  # carry: s_{i-1}
            t = self.readout(torch.cat([carry, emb, context], dim=-1))
            logits = self.output(t.view(*t.shape[:-1], -1, 2).amax(-1))  # maxout, pool 2
            out, cell_state = self.cell(emb, cell_state, **{self.ctx_name: context})
            return F.log_softmax(logits, -1), (cell_state, out), weights
        h, cell_state = self.cell(emb, cell_state, **{self.ctx_name: carry})  # carry: h~_{t-1}
        context, weights = self.attention(h, memory)
        h_tilde = torch.tanh(self.combine(torch.cat([context, h], dim=-1)))
        return F.log_softmax(self.output(h_tilde), -1), (cell_state, h_tilde), weights

    @staticmethod
    def select(state, memory: Memory, index: Tensor):
        cell_state, carry = state
        return (reorder_state(cell_state, index), carry.index_select(0, index)), memory.select(index)

    # -- training -------------------------------------------------------------------------------
    def forward(self, inp: Seq2SeqInput, state=None):
        dec_state, memory = self.begin(inp.src, inp.src_len)
        logits, weights = [], []
        for t in range(inp.tgt_in.shape[0]):
            logp, dec_state, w = self.step(inp.tgt_in[t], dec_state, memory)
            logits.append(logp)
            weights.append(w)
        return torch.stack(logits), torch.stack(weights)


__all__ = ["ATTENTIONS", "Attention", "Memory", "Seq2Seq", "Seq2SeqInput"]
