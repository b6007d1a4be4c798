"""SetRank — permutation-equivariant re-ranking with self-attention (Pang et al., SIGIR 2020).

A per-item encoder, then stacked multi-head self-attention blocks (MSAB: attention + row-wise FFN, each
with a residual connection and layer normalisation) and a linear scorer, trained with the paper's
attention rank loss (softmax cross-entropy against the normalised labels). Without positions the model is
permutation-equivariant: the score of an item does not depend on where it was presented.

``ordinal=True`` (default) adds the paper's ordinal embeddings of the initial ranking (its SetRank_re
variant), which is what makes the initial ranker's order — and the consistency losses — matter.
Deviations: MSAB rather than the induced IMSAB (lists here are at most a few hundred items); user
features are appended to every item (``use_user=False`` for the paper's non-personalised model).
The first block's query/key/value projection of the items is computed once per batch (as in PRM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import TransformerBlock
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register


@dataclass
class SetRankConfig(RerankerConfig):
    d_model: int = 64
    n_heads: int = 4
    n_blocks: int = 2
    d_ffn: int = 128
    ordinal: bool = True


@register
class SetRank(Reranker):
    name = "setrank"
    config_class = SetRankConfig
    loss_kind = "softmax"
    trims_padding = True

    def __init__(self, schema, config: SetRankConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.order_sensitive = c.ordinal
        self.project = nn.Sequential(nn.Linear(self.input_dim, c.d_model), nn.ReLU(), nn.Linear(c.d_model, c.d_model))
        self.ordinal = nn.Embedding(c.max_len, c.d_model) if c.ordinal else None
        if c.n_blocks < 1:
            raise ValueError(f"SetRank needs at least one block, got n_blocks={c.n_blocks}")
        self.blocks = nn.ModuleList(
            TransformerBlock(c.d_model, c.n_heads, c.d_ffn, c.dropout) for _ in range(c.n_blocks)
        )
        self.out = nn.Linear(c.d_model, 1)

    def encode_items(self, items: Tensor) -> Tensor:
        x = self.project(items)
        first = self.blocks[0].qkv
        return torch.cat([x, nn.functional.linear(x, first.weight)], dim=-1)  # item part of the first block's qkv

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        d = self.config.d_model
        x, qkv = encoded.items.split([d, 3 * d], dim=-1)  # one split: its backward is one cat, not two zero-fills
        qkv = qkv + self.blocks[0].qkv.bias
        if self.ordinal is not None:
            ordinal = self.ordinal.weight[: batch.list_len]  # (L, d)
            x = x + ordinal
            qkv = qkv + nn.functional.linear(ordinal, self.blocks[0].qkv.weight)
        for k, block in enumerate(self.blocks):
            x = block(x, batch.mask, qkv if k == 0 else None)
        return self.out(x).squeeze(-1)
