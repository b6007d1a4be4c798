"""The list evaluator E(u, L) of LAST (arXiv 2406.14004): per-position click probability of a list as shown.

The official code's "CMR evaluator": each item's features ⊕ the tiled user vector go through five
channels — sum-pooling over the list, a per-item fully connected layer, multi-head self-attention, a GRU
read in display order, and the row of pairwise dot products with the other items — whose outputs,
concatenated with the input, feed an MLP (512/256/128) ending in one logit per position; trained with
binary cross-entropy on the clicks of logged lists. LAST scores a list by the mean of the per-position
click probabilities (``relist.last``).

It is a re-ranker in the sense of ``relist.rerankers.base`` (``score`` gives one logit per item of the
list in the order given), so the one ``Trainer`` fits it, with the ``bce`` loss and the group AUC on
``valid`` (the AUC within each list, averaged over lists: how well it orders a list's items, which is
what LAST asks of it) as the selection metric; before, the pooled AUC over all items selected it.

Deviations: the items are first projected to ``d_model`` (self-attention and the dot products work in
that space, not on the raw concatenation); a learned position embedding is added there, so position
bias need not be inferred by the GRU alone; the pairwise row is padded to ``max_len`` columns. Trained on
the lists of a re-ranking dataset in their stored order (the initial ranker's order for data written by
``relist train ranker``, as LibRerank trains its evaluator), with those lists' labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import mlp, padding_mask
from relist.rerankers.base import (
    Encoded,
    Reranker,
    RerankerConfig,
    load_reranker,
    register,
)


@dataclass
class EvaluatorConfig(RerankerConfig):
    d_model: int = 64
    heads: int = 8  # self-attention heads (official: 8)
    gru: int = 64  # GRU width (official: 64)
    hidden: tuple[int, ...] = (512, 256, 128)  # the MLP on the concatenated channels (official)
    initial_skip: bool = False  # the evaluator predicts clicks; the initial score is one of its features


@register
class Evaluator(Reranker):
    name = "evaluator"
    config_class = EvaluatorConfig
    loss_kind = "bce"
    loss_fixed = True

    def __init__(self, schema, config: EvaluatorConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        if c.d_model % c.heads:
            raise ValueError(f"evaluator: d_model {c.d_model} must be divisible by heads {c.heads}")
        self.project = nn.Linear(self.input_dim, c.d_model)
        self.position = nn.Embedding(c.max_len, c.d_model)
        nn.init.normal_(self.position.weight, std=0.02)
        self.item_fc = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.ReLU())
        self.attention = nn.MultiheadAttention(c.d_model, c.heads, dropout=c.dropout, batch_first=True)
        self.gru = nn.GRU(c.d_model, c.gru, batch_first=True)
        width = self.input_dim + 3 * c.d_model + c.gru + c.max_len
        self.head = mlp([width, *c.hidden, 1], dropout=c.dropout)

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        mask = batch.mask
        length = batch.list_len
        if length > self.config.max_len:
            raise ValueError(f"evaluator: list of {length} items, longer than its max_len {self.config.max_len}")
        x = encoded.items  # (B, L, D): item ⊕ user
        h = self.project(x) + self.position.weight[:length]  # (B, L, d)
        h = h * mask[..., None]
        pooled = h.sum(1, keepdim=True).expand(-1, length, -1)  # (B, L, d) sum-pooling channel
        fc = self.item_fc(h)  # (B, L, d)
        # in eval mode, batches without padding (a request served alone) skip the padding mask and the packing:
        # the same values to float rounding, without the slower masked kernels; training is left as it was
        full = not self.training and bool(mask.all())
        key_padding = None if full else padding_mask(mask)
        attended, _ = self.attention(h, h, h, key_padding_mask=key_padding, need_weights=False)  # (B, L, d)
        if full:
            recurrent, _ = self.gru(h)  # (B, L, g)
        else:
            lengths = batch.lengths.clamp_min(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            recurrent, _ = self.gru(packed)
            recurrent, _ = nn.utils.rnn.pad_packed_sequence(
                recurrent, batch_first=True, total_length=length
            )  # (B, L, g)
        pairs = torch.bmm(h, h.transpose(1, 2)) * mask[:, None, :] / h.shape[-1] ** 0.5  # (B, L, L)
        pairs = nn.functional.pad(pairs, (0, self.config.max_len - length))  # (B, L, max_len)
        features = torch.cat([x, pooled, fc, attended, recurrent, pairs], dim=-1)
        return self.head(features).squeeze(-1).masked_fill(~mask, 0.0)  # (B, L)

    def click_probability(self, batch: ListBatch) -> Tensor:
        """Per-position click probability (B, L) of each list as shown, 0 on padding (keeps gradients)."""
        return torch.sigmoid(self(batch)).masked_fill(~batch.mask, 0.0)


def load_evaluator(run: str | Path) -> Evaluator:
    """The best evaluator of a `relist train evaluator` run (or a model directory), in eval mode."""
    run = Path(run)
    model = load_reranker(run / "best" if (run / "best").is_dir() else run)
    if model.name != "evaluator":
        raise ValueError(f"{run} holds a {model.name!r} model, not an evaluator")
    return model.eval()
