"""Plumbing the list models share: feature embedding of a list batch, masked attention, list losses.

Model logic lives in each model's own file; only what every model needs identically lives here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from relist.batch import ListBatch
from relist.data.store import PreparedDataset, Schema

NEG_INF = float("-inf")
EMBEDDING_INIT_STD = 0.05


def symlog(x: Tensor) -> Tensor:
    """Sign-preserving log: keeps counts and raw scores on one scale without clipping."""
    return torch.sign(x) * torch.log1p(x.abs())


class FeatureEmbedding(nn.Module):
    """Turns a list batch into per-item feature vectors (B, L, item_dim) and a user vector (B, user_dim).

    Item: one embedding per sparse field (column 0 is the item id) concatenated with the dense features
    (symlog, then standardised with statistics fitted on training lists). User: one embedding per user
    sparse field and the mean embedding of the clicked-history fields; history fields share the table of
    the item field of the same name, so "clicked before" and "candidate" live in one space.
    ``use_user=False`` gives the non-personalised (LibRerank-style) variant: the user vector is zeros.
    """

    def __init__(self, schema: Schema, dim: int = 16, use_user: bool = True, min_id_count: int = 1):
        super().__init__()
        self.schema, self.dim, self.use_user, self.min_id_count = schema, dim, use_user, min_id_count
        self.item_tables = nn.ModuleList(nn.Embedding(f.vocab, dim, padding_idx=0) for f in schema.item_sparse)
        self.user_tables = nn.ModuleList(nn.Embedding(f.vocab, dim, padding_idx=0) for f in schema.user_sparse)
        names = [f.name for f in schema.item_sparse]
        self.hist_to_item = [names.index(f.name) if f.name in names else -1 for f in schema.user_hist]
        self.hist_tables = nn.ModuleList(
            nn.Embedding(f.vocab, dim, padding_idx=0) for f, k in zip(schema.user_hist, self.hist_to_item) if k < 0
        )
        for table in [*self.item_tables, *self.user_tables, *self.hist_tables]:
            # small initial embeddings: N(0, 1) entries would drown the standardised dense features
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()
        # ids seen fewer than min_id_count times in the training split fall back to the padding row (no
        # id information), so the model cannot memorise one-off users and items; see fit()
        for k, f in enumerate(schema.item_sparse):
            self.register_buffer(f"item_keep_{k}", torch.ones(f.vocab, dtype=torch.bool))
        for k, f in enumerate(schema.user_sparse):
            self.register_buffer(f"user_keep_{k}", torch.ones(f.vocab, dtype=torch.bool))
        n_dense = len(schema.item_dense)
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        self.item_dim = dim * len(schema.item_sparse) + n_dense
        self.user_dim = dim * (len(schema.user_sparse) + len(schema.user_hist))

    def fit(self, data: PreparedDataset, split: str, max_rows: int = 200_000) -> None:
        """Fit on ``split`` only: dense standardisation (first ``max_rows`` rows) and the frequent-id masks."""
        rows = data.split(split)
        starts, ends = np.asarray(data.offsets[rows]), np.asarray(data.offsets[rows + 1])
        chunks, total = [], 0
        for s, e in zip(starts, ends):
            chunks.append(torch.from_numpy(data.item_dense[s:e].astype("float32")))
            total += e - s
            if total >= max_rows:
                break
        dense = symlog(torch.cat(chunks))
        self.dense_mean.copy_(dense.mean(dim=0))
        self.dense_std.copy_(dense.std(dim=0).nan_to_num(1.0).clamp_min(1e-6))
        if self.min_id_count <= 1:
            return
        item_rows = (
            np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(rows) else np.zeros(0, np.int64)
        )
        hist_rows = (
            np.concatenate([np.arange(data.hist_offsets[k], data.hist_offsets[k + 1]) for k in rows])
            if len(rows)
            else np.zeros(0, np.int64)
        )
        for k, f in enumerate(self.schema.item_sparse):
            counts = np.bincount(np.asarray(data.item_sparse[item_rows, k]), minlength=f.vocab)
            for h, item_k in enumerate(self.hist_to_item):  # a clicked item in a history counts too
                if item_k == k and len(hist_rows):
                    counts = counts + np.bincount(np.asarray(data.user_hist[hist_rows, h]), minlength=f.vocab)
            getattr(self, f"item_keep_{k}").copy_(torch.from_numpy(counts[: f.vocab] >= self.min_id_count))
        for k, f in enumerate(self.schema.user_sparse):
            counts = np.bincount(np.asarray(data.user_sparse[rows, k]), minlength=f.vocab)
            getattr(self, f"user_keep_{k}").copy_(torch.from_numpy(counts[: f.vocab] >= self.min_id_count))

    def _item_ids(self, ids: Tensor, k: int) -> Tensor:
        return ids * getattr(self, f"item_keep_{k}")[ids]

    def items(self, batch: ListBatch) -> Tensor:
        parts = [
            table(self._item_ids(batch.item_sparse[..., k], k)) for k, table in enumerate(self.item_tables)
        ]  # (B, L, E)
        parts.append((symlog(batch.item_dense) - self.dense_mean) / self.dense_std)
        return torch.cat(parts, dim=-1) * batch.mask[..., None]  # (B, L, item_dim)

    def history(self, batch: ListBatch) -> tuple[Tensor, Tensor]:
        """History embeddings (B, H, dim·fields) and their mask (B, H)."""
        size, width = batch.user_hist.shape[:2]
        hist_mask = (
            batch.user_hist[..., 0] > 0 if width else torch.zeros(size, 0, dtype=torch.bool, device=batch.device)
        )
        own = iter(self.hist_tables)
        parts = []
        for k, item_k in enumerate(self.hist_to_item):
            ids = batch.user_hist[..., k]
            if item_k >= 0:
                parts.append(self.item_tables[item_k](self._item_ids(ids, item_k)))
            else:
                parts.append(next(own)(ids))
        if not parts:
            return torch.zeros(size, width, 0, device=batch.device), hist_mask
        return torch.cat(parts, dim=-1), hist_mask

    def user(self, batch: ListBatch) -> Tensor:
        size = batch.size
        if not self.use_user:
            return torch.zeros(size, self.user_dim, device=batch.device)
        parts = [
            table(batch.user_sparse[:, k] * getattr(self, f"user_keep_{k}")[batch.user_sparse[:, k]])
            for k, table in enumerate(self.user_tables)
        ]
        hist, hist_mask = self.history(batch)
        if hist.shape[-1]:
            pooled = (hist * hist_mask[..., None]).sum(1) / hist_mask.sum(1, keepdim=True).clamp_min(1)
            parts.append(pooled)
        return torch.cat(parts, dim=-1) if parts else torch.zeros(size, 0, device=batch.device)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: each entry is kept with probability 1 − p and scaled by 1/(1 − p), else zeroed.

    The distribution of ``nn.functional.dropout`` at a quarter of its forward cost on the CPU (0.4 of
    forward and backward together); the built-in draws each keep/drop through ``bernoulli_``, a quarter
    of a consistency-trained PRM step at one thread. Here every element gets 32 uniform random bits and
    is kept when they clear a threshold, so the keep probability is 1 − round(p·2³²)/2³², within 2⁻³³
    of 1 − p (a float32 uniform, as in ``rand_like(x) >= p``, resolves only 2⁻²⁴). The bits come from
    numpy's SFC64 generator, twice as fast as torch's CPU generator, on a fresh stream seeded from
    torch's default generator, so ``torch.manual_seed`` still fixes the masks. Other devices and dtypes
    use the built-in.
    """
    if not training or p == 0.0:
        return x
    if not 0.0 < p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if p >= 1.0 - 2.0**-33 or x.device.type != "cpu" or x.dtype != torch.float32:  # (the threshold fits int32)
        return nn.functional.dropout(x, p, True)
    n = x.numel()
    seed = torch.empty(2, dtype=torch.int64).random_().tolist()
    words = np.random.SFC64(seed).random_raw((n + 1) // 2)  # uniform 64-bit words: two int32 lanes each
    lanes = torch.from_numpy(words.view(np.int32))[:n].view(x.shape)
    keep = lanes.view(torch.float32)  # the same memory: each lane becomes 0.0 or 1.0 where it lies
    torch.ge(lanes, round(p * 2**32) - 2**31, out=keep)  # lanes are uniform on [−2³¹, 2³¹)
    return x * keep.mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """``nn.Dropout`` through ``dropout``: the same distribution, drawn faster on the CPU."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(q: Tensor, k: Tensor, v: Tensor, attend: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q·kᵀ/√d, over the keys ``attend`` allows)·v, with dropout on the attention weights.

    ``q``, ``k``, ``v`` (B, heads, L, d); ``attend`` (B, 1, 1, L), True where a key may be attended to
    (every row needs one). Without dropout this is ``scaled_dot_product_attention``; with it, the same
    product written out, so that the weights go through ``dropout``: on the CPU the built-in with
    dropout costs three to four times its forward without, this about 1.6 times.
    """
    if not dropout_p or q.device.type != "cpu" or q.dtype != torch.float32:  # the fused kernels elsewhere
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p)
    size, heads, length, width = q.shape
    q, k, v = (t.reshape(size * heads, length, width) for t in (q, k, v))
    bias = q.new_zeros(size, heads, 1, length).masked_fill_(~attend, NEG_INF)
    scores = torch.baddbmm(bias.view(size * heads, 1, length), q, k.transpose(1, 2), alpha=width**-0.5)
    return torch.bmm(dropout(torch.softmax(scores, dim=-1), dropout_p), v).view(size, heads, length, width)


def mlp(sizes: list[int], dropout: float = 0.0, last_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2 or last_activation:
            layers += [nn.ReLU(), Dropout(dropout)] if dropout else [nn.ReLU()]
    return nn.Sequential(*layers)


class TransformerBlock(nn.Module):
    """A post-norm Transformer encoder block (Vaswani et al., 2017) over padded lists.

    Multi-head self-attention, then a ReLU feed-forward layer, each with dropout, a residual connection and
    layer normalisation: the layout of ``torch.nn.TransformerEncoderLayer``'s defaults, written out so that

    - attention runs through ``scaled_dot_product_attention`` at inference (the built-in layer's
      inference fast path converts padded lists to nested tensors, slow on the CPU) and, in training,
      through ``attention``, whose dropout on the attention weights is ``dropout`` like every other
      dropout here (the same distribution as the built-in's; forward and backward cost two thirds of
      ``scaled_dot_product_attention``'s with dropout on the CPU);
    - the query/key/value projection may be passed in precomputed (``qkv``). It is linear, so a caller
      whose input is an order-free item part plus a position part projects the item part once per batch
      and only adds the projected position part for each presentation of the list.
    """

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float = 0.1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.attention_dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attention_out = nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(), Dropout(dropout), nn.Linear(d_ffn, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, qkv: Tensor | None = None) -> Tensor:
        """``x`` (B, L, d); ``mask`` (B, L), True for real items; ``qkv`` (B, L, 3d) = ``self.qkv(x)`` if given."""
        size, length, width = x.shape
        qkv = self.qkv(x) if qkv is None else qkv
        q, k, v = qkv.view(size, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        attend = (mask | ~mask.any(1, keepdim=True))[:, None, None, :]  # a list with no real item attends to all
        attended = attention(q, k, v, attend, self.attention_dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(size, length, width)
        x = self.norm1(x + self.dropout(self.attention_out(attended)))
        return self.norm2(x + self.dropout(self.ffn(x)))


def padding_mask(mask: Tensor) -> Tensor:
    """``key_padding_mask`` for ``nn.MultiheadAttention``: True where a key must be ignored.

    A list with no real item at all would give NaN rows; its first key is unmasked (its output is masked later).
    """
    ignore = ~mask
    empty = ignore.all(dim=1)
    if empty.any():
        ignore = ignore.clone()
        ignore[empty, 0] = False
    return ignore


def softmax_list_loss(logits: Tensor, label: Tensor, mask: Tensor) -> Tensor:
    """Listwise cross-entropy between softmax(logits) and the normalised labels (lists without a click add 0).

    Mean over lists, so that a batch split across processes averages to the same value.
    """
    log_p = torch.log_softmax(logits.masked_fill(~mask, NEG_INF), dim=1).masked_fill(~mask, 0.0)
    target = label * mask
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return -(target * log_p).sum(dim=1).mean()


def bce_list_loss(logits: Tensor, label: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy per item, averaged within each list, then over lists."""
    per_item = nn.functional.binary_cross_entropy_with_logits(logits.masked_fill(~mask, 0.0), label, reduction="none")
    per_list = (per_item * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_list.mean()


LIST_LOSSES = {"softmax": softmax_list_loss, "bce": bce_list_loss}


def normalised_scores(logits: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Scores on the scale the model's own loss reads them: softmax over the list, or per-item sigmoid."""
    if kind == "softmax":
        return torch.softmax(logits.masked_fill(~mask, NEG_INF), dim=1).masked_fill(~mask, 0.0)
    return torch.sigmoid(logits).masked_fill(~mask, 0.0)
