"""PRM — Personalized Re-ranking Model (Pei et al., RecSys 2019).

Input layer: item features ⊕ a personalised vector ⊕ a learnable position embedding of the input
(initial-ranker) order; N Transformer encoder blocks over the list; a linear layer and a softmax over the
list, trained with listwise cross-entropy on the clicks.

Deviations: the personalised vector is learned end-to-end from the user's id and clicked history (the
paper pre-trains it with the initial ranker); the input projection to ``d_model`` is applied before the
position embedding is added (needed when the raw feature width differs from ``d_model``).

Cost: the first block's query/key/value projection of the item part is computed once per batch in
``encode_items`` and travels with the items when a presentation reorders them; each presentation only
adds the projection of its position embeddings (the projection is linear, so the result is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import TransformerBlock
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
    trims_padding = True

    def __init__(self, schema, config: PRMConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.project = nn.Linear(self.input_dim, c.d_model)
        self.position = nn.Embedding(c.max_len, c.d_model)
        if c.n_blocks < 1:
            raise ValueError(f"PRM needs at least one block, got n_blocks={c.n_blocks}")
        self.blocks = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.d_ffn, c.dropout) for _ in range(c.n_blocks)
        )
        self.out = nn.Linear(c.d_model, 1)

    def encode_items(self, items: Tensor) -> Tensor:
        x = self.project(items)  # (B, L, d_model)
        first = self.blocks[0].qkv
        return torch.cat([x, nn.functional.linear(x, first.weight)], dim=-1)  # item part of the first block's qkv

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        d = self.config.d_model
        position = self.position.weight[: batch.list_len]  # (L, d)
        x, qkv = encoded.items.split([d, 3 * d], dim=-1)  # one split: its backward is one cat, not two zero-fills
        x = x + position
        qkv = qkv + self.blocks[0].qkv(position)
        for k, block in enumerate(self.blocks):
            x = block(x, batch.mask, qkv if k == 0 else None)
        return self.out(x).squeeze(-1)  # (B, L)
