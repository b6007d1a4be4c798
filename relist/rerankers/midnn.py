"""MiDNN — mutual-influence-aware DNN (Zhuang et al., IJCAI 2018, "Globally optimized mutual influence
aware ranking in e-commerce search").

Global feature extension: every item feature x is extended with its position within the list's range,
(x − min) / (max − min) over the list's items, so each item sees the company it keeps; a fully connected
network then predicts each item's click, trained with log loss.

Deviations:
- Trained by default with the listwise softmax cross-entropy, not the paper's log loss (``loss="bce"``
  gives the paper's). On MIND's 2,000 training lists the log loss kept falling by fitting each list's
  click rate while the order within lists never improved on valid: selected on the listwise
  cross-entropy, all 5 seeds kept the untrained network (docs/principled_mind.md).
- The extension is applied to the learned feature vector (embeddings ⊕ dense features ⊕ user), not only
  to raw dense features.
- Where a feature is constant within a list (max = min; 56% of MIND's columns) its extension is 0, not
  (x − min) divided by a small floor, whose float32 gradients were 10–14% off their float64 values.
- An embedding of the input position is added: the list-wise inputs of re-ranking benchmarks carry the
  initial rank, and without it the model ignores the input order entirely.

Cost: the extension depends only on which items share the list, not on their order, and the network's
first layer is linear, so ``encode`` computes W·[x, extended(x)] once per batch and it travels with the
items when a presentation reorders them; each presentation only adds W·position + b (the same result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import mlp
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register


@dataclass
class MiDNNConfig(RerankerConfig):
    hidden: tuple[int, ...] = (128, 64)
    position: bool = True
    loss: str = "softmax"  # the paper's is "bce"; see the module docstring


@register
class MiDNN(Reranker):
    name = "midnn"
    config_class = MiDNNConfig
    loss_kind = "bce"

    def __init__(self, schema, config: MiDNNConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.order_sensitive = c.position
        width = 2 * self.input_dim
        self.position = nn.Embedding(c.max_len, width) if c.position else None
        self.net = mlp([width, *c.hidden, 1], dropout=c.dropout)

    def encode(self, batch: ListBatch) -> Encoded:
        """Items carry the order-free part of the first layer: W·[x, extended(x)] (B, L, hidden[0])."""
        encoded = super().encode(batch)
        x = encoded.items  # (B, L, D)
        real = batch.mask[..., None]
        high = x.masked_fill(~real, float("-inf")).amax(1, keepdim=True)
        low = x.masked_fill(~real, float("inf")).amin(1, keepdim=True)
        span = high - low
        varies = span > 0  # a feature constant within the list has no position in its range: 0, no gradient
        extended = torch.where(varies & real, (x - low) / torch.where(varies, span, 1.0), 0.0)
        return encoded._replace(items=nn.functional.linear(torch.cat([x, extended], dim=-1), self.net[0].weight))

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        first = self.net[0]
        if self.position is not None:  # W·(h + p) + b = W·h + (W·p + b)
            h = encoded.items + first(self.position.weight[: batch.list_len])
        else:
            h = encoded.items + first.bias
        return self.net[1:](h).squeeze(-1)
