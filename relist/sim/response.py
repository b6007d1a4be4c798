"""Click response models: what a user does with a list, in display order, position by position.

Every response model maps a *shown* list batch (items in display order, padding last) to

- ``prob`` (B, L): the probability of a click on each position, 0 on padding;
- ``appeal`` (B, L): an order-free score of how much the user wants the item (what a policy that knew
  the user would sort by; the simulator also lengthens the dwell time of appealing clicks).

Two implementations share that contract:

``FactorisedClickModel`` — learned from logs (``relist sim train``). A factorisation machine for the
user-item appeal plus explicit, interpretable order and context terms:

    appeal a_j = b0 + sum_f b_f[item_f] + w . x_j + w_h . hist_share_j + b_user + <u, v_j>
    logit_j    = a_j + theta[position bucket of j]                    position bias
               + c_sim  * max(0, max_{k<j} cos(v_k, v_j))              similarity to the items above
               + sum_f c_f * share of the items above with j's value of field f   (category, ...)
               + c_casc * log(1 + sum_{k<j} exp a_k)                   cascade: good items above take the click
               + c_list * log(1 + sum_k exp a_k) + c_len * log(n)       what else is in the list, its length

with item vector v_j = sum_f E_f[item_f] + P x_j (x = standardised symlog dense features), user vector
u = sum of the user's sparse-field embeddings + the mean embedding of the clicked history (history
fields share the tables of the item fields of the same name). This is deliberately a different
family from LAST's evaluator (a multi-channel deep network over the whole list: sum-pooling,
self-attention, GRU, pairwise products, MLP): a shallow factorised model whose list context enters
only through the named terms above, so that a policy that exploits its own evaluator's blind spots is
judged by a model that does not share them. It is also fitted on a different split (the ``ranker``
split; see ``relist.sim.train``), and on the logged lists at full length rather than the initial
ranker's top 10.

``TruthResponse`` — the synthetic source's known click model (``relist.data.synthetic``), so tests can
compare a policy with the optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.data.store import Schema
from relist.data.synthetic import SyntheticClickModel
from relist.nn import symlog
from relist.sim.pool import history_share


class Response(NamedTuple):
    prob: Tensor  # (B, L) click probability per displayed position, 0 on padding
    appeal: Tensor  # (B, L) order-free appeal of each item to its user


@dataclass
class ClickModelConfig:
    dim: int = 16
    exact_positions: int = 20  # positions 1..20 get their own bias; later ones share log-spaced buckets
    max_context_vocab: int = 1000  # non-id item fields up to this vocabulary enter the "same value above" terms


def position_bucket(position: Tensor, exact: int) -> Tensor:
    """Positions 0..exact-1 as themselves, then two buckets per doubling (up to ~2**7 times ``exact``)."""
    late = exact + (2.0 * torch.log2((position.float() + 1.0) / exact)).floor().long()
    return torch.where(position < exact, position, late.clamp(max=exact + 15))


class FactorisedClickModel(nn.Module):
    """The learned response model (see the module docstring for the formula)."""

    def __init__(self, schema: Schema, config: ClickModelConfig | None = None, unknown: dict[str, int] | None = None):
        super().__init__()
        self.schema, self.config = schema, config or ClickModelConfig()
        d = self.config.dim
        unknown = unknown or {}
        # one table per field: d factor columns and, last, the value's bias (one lookup fetches both)
        self.item_emb = nn.ModuleList(nn.Embedding(f.vocab, d + 1, padding_idx=0) for f in schema.item_sparse)
        self.user_emb = nn.ModuleList(nn.Embedding(f.vocab, d + 1, padding_idx=0) for f in schema.user_sparse)
        item_names = [f.name for f in schema.item_sparse]
        # history field k -> item field of the same name (shared table), or its own table
        self.hist_to_item = [item_names.index(f.name) if f.name in item_names else -1 for f in schema.user_hist]
        self.hist_emb = nn.ModuleList(
            nn.Embedding(f.vocab, d, padding_idx=0) for f, k in zip(schema.user_hist, self.hist_to_item) if k < 0
        )
        self.share_pairs = [(k, h) for h, k in enumerate(self.hist_to_item) if k >= 0]
        self.share_unknown = [unknown.get(schema.item_sparse[k].name, -1) for k, _ in self.share_pairs]
        self.context_fields = [
            k for k, f in enumerate(schema.item_sparse) if 0 < k and f.vocab <= self.config.max_context_vocab
        ]
        self.context_unknown = [unknown.get(schema.item_sparse[k].name, -1) for k in self.context_fields]
        n_dense = len(schema.item_dense)
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        self.dense_proj = nn.Linear(n_dense, d, bias=False)
        self.dense_weight = nn.Linear(n_dense + len(self.share_pairs), 1)  # its bias is b0
        self.position = nn.Embedding(self.config.exact_positions + 16, 1)
        self.register_buffer(
            "buckets", position_bucket(torch.arange(4096), self.config.exact_positions), persistent=False
        )
        # context coefficients: similarity above, same-value share above per field, cascade, list appeal, log length
        self.context = nn.Parameter(torch.zeros(4 + len(self.context_fields)))
        with torch.no_grad():
            for table in [*self.item_emb, *self.user_emb, *self.hist_emb]:
                nn.init.normal_(table.weight, std=0.05)
            for table in [*self.item_emb, *self.user_emb]:
                table.weight[:, d] = 0.0
            nn.init.zeros_(self.position.weight)

    def fit_dense(self, dense: Tensor) -> None:
        """Standardisation statistics of symlog(dense) from training rows (n, Fd)."""
        x = symlog(dense.float())
        self.dense_mean.copy_(x.mean(dim=0))
        self.dense_std.copy_(x.std(dim=0).clamp_min(1e-6))

    def _shares(self, batch: ListBatch) -> Tensor:
        if not self.share_pairs or batch.user_hist.shape[1] == 0:
            return batch.item_dense.new_zeros(*batch.mask.shape, len(self.share_pairs))
        return torch.stack(
            [
                history_share(batch.item_sparse[..., k], batch.user_hist[..., h], unk, self.schema.item_sparse[k].vocab)
                for (k, h), unk in zip(self.share_pairs, self.share_unknown)
            ],
            dim=2,
        )

    def encode(self, batch: ListBatch) -> tuple[Tensor, Tensor]:
        """Appeal (B, L) and item vectors (B, L, D); nothing here depends on the display order."""
        d, n_dense = self.config.dim, len(self.schema.item_dense)
        # standardisation folded into one linear map: [P; w] ((s - mean) / std) = [P; w] / std . s - [P; w] mean / std
        weight = (
            torch.cat([self.dense_proj.weight, self.dense_weight.weight[:, :n_dense]]) / self.dense_std
        )  # (D + 1, Fd)
        shift = torch.cat([torch.zeros(d, device=weight.device), self.dense_weight.bias]) - weight @ self.dense_mean
        dense = nn.functional.linear(symlog(batch.item_dense.float()), weight, shift)  # (B, L, D + 1)
        item = dense + sum(emb(batch.item_sparse[..., k]) for k, emb in enumerate(self.item_emb))  # (B, L, D + 1)
        user = sum(emb(batch.user_sparse[:, k]) for k, emb in enumerate(self.user_emb))  # (B, D + 1)
        v = item[..., :d]  # (B, L, D)
        bias = item[..., d] + user[:, d:]  # (B, L)
        if self.share_pairs:
            bias = bias + self._shares(batch) @ self.dense_weight.weight[0, n_dense:]
        u = user[:, :d]  # (B, D)
        if batch.user_hist.shape[1] > 0:
            hist_mask = batch.user_hist[..., 0] > 0  # (B, H)
            h = torch.zeros(*hist_mask.shape, self.config.dim, device=u.device)
            own = iter(self.hist_emb)
            for col, k in enumerate(self.hist_to_item):
                h = h + ((self.item_emb[k] if k >= 0 else next(own))(batch.user_hist[..., col]))[..., :d]
            u = u + (h * hist_mask[..., None]).sum(1) / hist_mask.sum(1, keepdim=True).clamp_min(1)
        appeal = bias + (v * u[:, None, :]).sum(-1)
        return appeal, v

    def logits(self, batch: ListBatch) -> tuple[Tensor, Tensor]:
        """Click logits (B, L) in display order, and the appeal (B, L)."""
        mask = batch.mask
        size, length = mask.shape
        appeal, v = self.encode(batch)
        pos = torch.arange(length, device=mask.device)
        logit = appeal + self.position.weight[self.buckets[:length], 0]
        # Padding is last (the ListBatch convention), so the items above a real position are all real: the
        # static triangle is the "above" relation; terms of padding positions are masked out by the caller.
        above = pos[None, :] < pos[:, None]  # (L, L): k above j
        n_above = pos.clamp_min(1).float()  # (L,)
        unit = nn.functional.normalize(v, dim=-1)
        sim_above = (unit @ unit.transpose(1, 2)).masked_fill(~above, 0.0).amax(dim=2).clamp_min(0.0)  # (B, L)
        top = appeal.masked_fill(~mask, -math.inf).max(dim=1, keepdim=True).values.detach()  # (B, 1) for stability
        weight = torch.exp(appeal - top) * mask  # exp(a_k - top), 0 on padding
        above_sum = torch.cumsum(weight, dim=1) - weight  # sum_{k<j} exp(a_k - top)
        # log(1 + sum exp a) = softplus(top + log(sum exp(a - top)))
        cascade = torch.where(above_sum > 0, nn.functional.softplus(top + torch.log(above_sum.clamp_min(1e-30))), 0.0)
        whole = nn.functional.softplus(top + torch.log(weight.sum(1, keepdim=True))).expand(-1, length)
        log_len = torch.log(mask.sum(1, keepdim=True).float().clamp_min(1)).expand(-1, length)
        terms = [sim_above, cascade, whole, log_len]  # each (B, L)
        for k, unk in zip(self.context_fields, self.context_unknown):
            value = batch.item_sparse[..., k]
            valid = (value > 0) & (value != unk)
            same = (torch.where(valid, value, -1)[:, :, None] == torch.where(valid, value, -2)[:, None, :]) & above
            terms.append(same.sum(2).float() / n_above)
        logit = logit + (torch.stack(terms, dim=2) * self.context).sum(-1)
        return logit, appeal

    def respond(self, shown: ListBatch) -> Response:
        logit, appeal = self.logits(shown)
        return Response(torch.sigmoid(logit) * shown.mask, appeal)

    def appeal(self, batch: ListBatch) -> Tensor:
        return self.encode(batch)[0]

    def describe(self) -> dict[str, float]:
        """The order and context coefficients, named (for reports)."""
        names = ["similarity_above", "cascade_appeal_above", "list_appeal", "log_list_length"]
        names += [f"same_{self.schema.item_sparse[k].name}_above" for k in self.context_fields]
        out = {n: float(c) for n, c in zip(names, self.context.detach().cpu())}
        bias = self.position.weight.detach().cpu().squeeze(-1)
        out.update({f"position_{p + 1}": float(bias[p] - bias[0]) for p in (1, 2, 4, 9)})
        return out


class TruthResponse:
    """The synthetic source's ground truth behind the response contract (ids are 1-based in the data)."""

    def __init__(self, truth, device: torch.device | str = "cpu"):
        tensors = {k: v.to(device) for k, v in vars(truth).items() if isinstance(v, Tensor)}
        self.truth = SyntheticClickModel(truth.params, tensors)

    def _ids(self, batch: ListBatch) -> tuple[Tensor, Tensor]:
        return (batch.user_sparse[:, 0] - 1).clamp_min(0), (batch.item_id - 1).clamp_min(0)

    def respond(self, shown: ListBatch) -> Response:
        users, items = self._ids(shown)
        prob = self.truth.click_prob(users, items, shown.mask)
        return Response(prob, self.truth.relevance(users, items))

    def appeal(self, batch: ListBatch) -> Tensor:
        users, items = self._ids(batch)
        return self.truth.relevance(users, items)
