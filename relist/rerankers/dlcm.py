"""DLCM — Deep Listwise Context Model (Ai et al., SIGIR 2018).

Item features go through a one-layer ELU abstraction; a GRU reads the list from the lowest- to the
highest-ranked item of the input order, so the last state s_n has just seen the top items; each item's
output o_i is scored by the local ranking function φ(o_i, s_n) = Vᵀ(o_i ⊙ tanh(W s_n + b)). Trained with
the paper's attention rank loss (cross-entropy between softmax(scores) and the normalised labels).

Deviation: user features (id, clicked history) are appended to every item's features (the paper is not
personalised; ``use_user=False`` restores it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.rerankers.base import Encoded, Reranker, RerankerConfig, register


@dataclass
class DLCMConfig(RerankerConfig):
    hidden: int = 64


def reversed_index(mask: Tensor) -> Tensor:
    """Per list, the index that reverses its real items and leaves padding at the end: (B, L)."""
    length = mask.sum(1, keepdim=True)  # (B, 1)
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
    return torch.where(positions < length, length - 1 - positions, positions)


@register
class DLCM(Reranker):
    name = "dlcm"
    config_class = DLCMConfig
    loss_kind = "softmax"

    def __init__(self, schema, config: DLCMConfig | None = None):
        super().__init__(schema, config)
        c = self.config
        self.abstraction = nn.Sequential(nn.Linear(self.input_dim, c.hidden), nn.ELU())
        self.gru = nn.GRU(c.hidden, c.hidden, batch_first=True)
        self.state_proj = nn.Linear(c.hidden, c.hidden)
        self.v = nn.Linear(c.hidden, 1, bias=False)

    def encode_items(self, items: Tensor) -> Tensor:
        return self.abstraction(items)  # (B, L, H)

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor:
        rev = reversed_index(batch.mask)
        x = encoded.items.gather(1, rev[..., None].expand_as(encoded.items))  # lowest-ranked first
        lengths = batch.lengths.clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, last = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=batch.list_len)  # (B, L, H)
        out = out.gather(1, rev[..., None].expand_as(out))  # back to input order (the reversal is its own inverse)
        s_n = torch.tanh(self.state_proj(last[-1]))[:, None, :]  # (B, 1, H)
        return self.v(out * s_n).squeeze(-1)  # (B, L)
