"""PRM — Personalized Re-ranking Model (Pei et al., RecSys 2019).

Input layer: item features ⊕ a personalised vector ⊕ a learnable position embedding of the input
(initial-ranker) order; N Transformer encoder blocks over the list; a linear layer and a softmax over the
list, trained with listwise cross-entropy on the clicks.

Deviations: the personalised vector is learned end-to-end from the user's id and clicked history (the
paper pre-trains it with the initial ranker); the input projection to ``d_model`` is applied before the
position embedding is added (needed when the raw feature width differs from ``d_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import padding_mask
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register


@dataclass
class PRMConfig(RerankerConfig):
    d_model: int = 64
    n_heads: int = 4
    n_blocks: int = 2
    d_ffn: int = 128


@register
class PRM(Reranker):
    name = "prm"
    config_class = PRMConfig
    loss_kind = "softmax"

    def __init__(self, schema, config: PRMConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.project = nn.Linear(self.input_dim, c.d_model)
        self.position = nn.Embedding(c.max_len, c.d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_ffn, c.dropout, batch_first=True)
            for _ in range(c.n_blocks))
        self.out = nn.Linear(c.d_model, 1)

    def encode_items(self, items: Tensor) -> Tensor:
        return self.project(items)  # (B, L, d_model)

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        length = batch.list_len
        x = encoded.items + self.position(torch.arange(length, device=batch.device))  # (B, L, d)
        ignore = padding_mask(batch.mask)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=ignore)
        return self.out(x).squeeze(-1)  # (B, L)
