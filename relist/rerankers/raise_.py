"""RAISE — intention-aware re-ranking (after "Towards Intention-aware Re-ranking", Lin et al., 2023).

The paper infers each user's intentions from review text, then re-ranks with one set-attention channel
per intention and mixes the channels by how strongly the user holds each intention. Our datasets carry
no review text, so intentions are learned from what they do carry: K intention prototypes live in the
item embedding space; an item's intention distribution is a softmax of its similarity to the prototypes
(item id and categories drive it), and the user's intention mix is the same softmax over the mean of
their clicked history. Each intention channel is a self-attention over the list whose keys are
re-weighted by the items' affinity to that intention; the channels are mixed by the user's intention
mix and a position-aware MLP predicts each click (BCE).

Deviations:
- Intentions come from ids and categories, not review text.
- Trained by default with the listwise softmax cross-entropy, not BCE (``loss="bce"`` gives the
  paper's). With BCE on MIND's 2,000 training lists the base model mostly kept the untrained network
  (selected on valid listwise cross-entropy: step 0 or the first epochs), and the listwise loss reached
  a lower valid cross-entropy (docs/principled_mind.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.nn import mlp
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register


@dataclass
class RAISEConfig(RerankerConfig):
    d_model: int = 64
    n_intentions: int = 4
    hidden: int = 64
    loss: str = "softmax"  # the paper's is "bce"; see the module docstring


@register
class RAISE(Reranker):
    name = "raise"
    config_class = RAISEConfig
    loss_kind = "bce"
    uses_history = True

    def __init__(self, schema, config: RAISEConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.project = nn.Linear(self.input_dim, c.d_model)
        self.hist_project = nn.Linear(c.embedding_dim * max(len(schema.user_hist), 1), c.d_model)
        self.prototypes = nn.Parameter(torch.randn(c.n_intentions, c.d_model) / c.d_model**0.5)
        self.position = nn.Embedding(c.max_len, c.d_model)
        self.query = nn.Linear(c.d_model, c.d_model)
        self.key = nn.Linear(c.d_model, c.d_model)
        self.value = nn.Linear(c.d_model, c.d_model)
        self.head = mlp([2 * c.d_model, c.hidden, 1], dropout=c.dropout)

    def encode(self, batch: ListBatch) -> Encoded:
        encoded = super().encode(batch)
        items = self.project(encoded.items)  # (B, L, d)
        hist = encoded.hist
        if hist.shape[-1] == 0:
            hist = torch.zeros(*hist.shape[:2], self.hist_project.in_features, device=batch.device)
        hist = self.hist_project(hist)  # (B, H, d)
        weights = encoded.hist_mask[..., None].float()
        if not self.config.use_user:
            weights = torch.zeros_like(weights)
        pooled = (hist * weights).sum(1) / weights.sum(1).clamp_min(1)  # (B, d); zeros without history
        user_mix = torch.softmax(pooled @ self.prototypes.T, dim=-1)  # (B, K)
        return encoded._replace(items=items, user=user_mix, hist=None, hist_mask=None)

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        size, length = batch.mask.shape
        items = encoded.items + self.position(torch.arange(length, device=batch.device))  # (B, L, d)
        affinity = torch.log_softmax(encoded.items @ self.prototypes.T, dim=-1)  # (B, L, K): item's intention mix
        q, k, v = self.query(items), self.key(items), self.value(items)
        logits = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # (B, L, L)
        # Channel c attends to item j in proportion to softmax(q_i·k_j + log p(c | j)).
        channel_logits = logits[:, None] + affinity.permute(0, 2, 1)[:, :, None, :]  # (B, K, L, L)
        channel_logits = channel_logits.masked_fill(~batch.mask[:, None, None, :], float("-inf"))
        attention = torch.softmax(channel_logits, dim=-1).nan_to_num(0.0)
        channels = attention @ v[:, None]  # (B, K, L, d)
        mixed = (channels * encoded.user[:, :, None, None]).sum(1)  # (B, L, d)
        return self.head(torch.cat([items, mixed], dim=-1)).squeeze(-1)
