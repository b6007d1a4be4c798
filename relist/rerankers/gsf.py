"""GSF — Groupwise Scoring Functions (Ai et al., ICTIR 2019).

A scoring network reads a group of m items together and returns m scores; an item's final score is the
mean of its scores over all the groups it appears in. With m = 2 every ordered pair of a list is a group
(lists here are short, so all L(L−1) pairs are scored rather than sampled). Trained with softmax
cross-entropy over the list.

Deviations: group size fixed at 2 and all pairs used (the paper samples groups for long lists); an
embedding of the input position joins each item's features (the paper's GSF sees no positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import mlp
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register


@dataclass
class GSFConfig(RerankerConfig):
    d_item: int = 48
    hidden: tuple[int, ...] = (64, 32)
    position: bool = True


@register
class GSF(Reranker):
    name = "gsf"
    config_class = GSFConfig
    loss_kind = "softmax"

    def __init__(self, schema, config: GSFConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.order_sensitive = c.position
        self.project = nn.Sequential(nn.Linear(self.input_dim, c.d_item), nn.ReLU())
        self.position = nn.Embedding(c.max_len, c.d_item) if c.position else None
        self.group = mlp([2 * c.d_item, *c.hidden, 2], dropout=c.dropout)

    def encode_items(self, items: Tensor) -> Tensor:
        return self.project(items)

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        x = encoded.items
        if self.position is not None:
            x = x + self.position(torch.arange(batch.list_len, device=batch.device))
        size, length, dim = x.shape
        pairs = torch.cat(
            [x[:, :, None, :].expand(-1, -1, length, -1), x[:, None, :, :].expand(-1, length, -1, -1)], dim=-1
        )  # (B, L, L, 2d): (i, j)
        out = self.group(pairs)  # (B, L, L, 2): score of i and of j within the group (i, j)
        valid = batch.mask[:, :, None] & batch.mask[:, None, :] & ~torch.eye(length, dtype=torch.bool, device=x.device)
        valid = valid.float()
        as_first = (out[..., 0] * valid).sum(2)  # (B, L)
        as_second = (out[..., 1] * valid).sum(1)
        count = (valid.sum(2) + valid.sum(1)).clamp_min(1)
        return (as_first + as_second) / count  # a list of one item has no pair and scores 0
