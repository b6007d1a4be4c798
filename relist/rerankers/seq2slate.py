"""Seq2Slate — pointer-network re-ranking (Bello et al., 2018).

An RNN encoder reads the items in input order; a decoder picks the next item of the slate at each step
by attending over the encoder states (a pointer), with already chosen items masked out. Trained with the
paper's supervised sequential cross-entropy (teacher forcing on the clicked items, in input order among
ties); served by greedy decoding, so ``score`` returns L − step for the item chosen at each step.

Deviations: GRU cells instead of LSTM. For the consistency losses, which need per-item scores of one
presentation, the differentiable per-item score is the first decoding step's pointer logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import NEG_INF
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register


@dataclass
class Seq2SlateConfig(RerankerConfig):
    hidden: int = 64


@register
class Seq2Slate(Reranker):
    name = "seq2slate"
    config_class = Seq2SlateConfig
    loss_kind = "softmax"

    def __init__(self, schema, config: Seq2SlateConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.project = nn.Sequential(nn.Linear(self.input_dim, c.hidden), nn.ReLU())
        self.encoder = nn.GRU(c.hidden, c.hidden, batch_first=True)
        self.decoder = nn.GRUCell(c.hidden, c.hidden)
        self.go = nn.Parameter(torch.zeros(c.hidden))
        self.w_enc = nn.Linear(c.hidden, c.hidden, bias=False)
        self.w_dec = nn.Linear(c.hidden, c.hidden)
        self.v = nn.Linear(c.hidden, 1, bias=False)

    def encode_items(self, items: Tensor) -> Tensor:
        return self.project(items)

    def _encode_sequence(self, encoded: Encoded, batch: ListBatch) -> tuple[Tensor, Tensor]:
        lengths = batch.lengths.clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(encoded.items, lengths, batch_first=True, enforce_sorted=False)
        out, last = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=batch.list_len)
        return out, last[-1]  # (B, L, H), (B, H)

    def _pointer(self, keys: Tensor, state: Tensor, available: Tensor) -> Tensor:
        logits = self.v(torch.tanh(keys + self.w_dec(state)[:, None, :])).squeeze(-1)  # (B, L)
        return logits.masked_fill(~available, NEG_INF)

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        states, last = self._encode_sequence(encoded, batch)
        state = self.decoder(self.go.expand(batch.size, -1), last)
        return self._pointer(self.w_enc(states), state, batch.mask).masked_fill(~batch.mask, 0.0)

    def objective(self, encoded: Encoded, batch: ListBatch):
        states, last = self._encode_sequence(encoded, batch)
        keys = self.w_enc(states)
        target = torch.sort(
            (batch.label * batch.mask).masked_fill(~batch.mask, -1.0), dim=1, descending=True, stable=True
        ).indices
        available = batch.mask.clone()
        state = self.decoder(self.go.expand(batch.size, -1), last)
        step_inputs = states  # the decoder is fed the encoding of the item it just chose
        total = torch.zeros(batch.size, device=batch.device)
        first = None
        rows = torch.arange(batch.size, device=batch.device)
        for step in range(batch.list_len):
            logits = self._pointer(keys, state, available)
            if first is None:
                first = logits.masked_fill(~batch.mask, 0.0)
            chosen = target[:, step]
            clicked = batch.label[rows, chosen] > 0
            if not clicked.any():
                break
            log_p = torch.log_softmax(logits.masked_fill(~available.any(1, keepdim=True), 0.0), dim=1)[rows, chosen]
            total = total - torch.where(clicked, log_p, torch.zeros_like(log_p))
            available = available.clone()
            available[rows, chosen] = False
            state = self.decoder(step_inputs[rows, chosen], state)
        return first, {"loss": total.mean()}

    @torch.no_grad()
    def score(self, batch: ListBatch) -> Tensor:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        work = batch.to(device)
        states, last = self._encode_sequence(self.encode(work), work)
        keys = self.w_enc(states)
        available = work.mask.clone()
        state = self.decoder(self.go.expand(work.size, -1), last)
        scores = torch.full(work.mask.shape, NEG_INF, device=device)
        rows = torch.arange(work.size, device=device)
        for step in range(work.list_len):
            logits = self._pointer(keys, state, available)
            chosen = logits.argmax(1)
            live = available[rows, chosen]
            scores[rows[live], chosen[live]] = float(work.list_len - step)
            available[rows, chosen] = False
            state = self.decoder(states[rows, chosen], state)
        self.train(was_training)
        return scores.to(batch.device)
