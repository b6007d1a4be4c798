"""The re-ranker contract, its registry, save/load and the contract checker.

A re-ranker scores every item of a list batch given the order the items are presented in. It is split
in two so that the consistency losses of ``relist.principled`` can share work across presentations:

- ``encode(batch) -> Encoded``: everything that does not depend on the presentation order (feature
  embeddings, per-item encoders, the user and history). Computed once per batch.
- ``context(encoded, batch) -> logits (B, L)``: the order-dependent layers (positions, attention,
  recurrence), run once per presentation; ``encoded.items`` arrives in the batch's order.

``forward(batch)`` is ``context(encode(batch), batch)``; ``score`` ranks; ``loss`` returns named parts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from relist.batch import INITIAL_SCORE, ListBatch
from relist.config import from_mapping
from relist.data.store import PreparedDataset, Schema
from relist.io import MODEL_META, MODEL_WEIGHTS, CorruptFileError, load_model, save_model
from relist.nn import LIST_LOSSES, NEG_INF, FeatureEmbedding, normalised_scores, symlog


@dataclass
class RerankerConfig:
    """Settings every re-ranker shares; each model extends it with its paper's defaults."""

    embedding_dim: int = 16
    use_user: bool = True  # personalised; False gives LibRerank's non-personalised variant
    dropout: float = 0.1
    max_len: int = 64  # longest list the position tables cover
    min_id_count: int = 5  # ids seen fewer times in the training split share the "no id" embedding
    initial_skip: bool = True  # add the initial ranker's score to the logits: the network learns a correction
    gate_init: float = 0.3  # initial weight of the network's correction (0: serve the initial order at first)
    loss: str = ""  # training loss: "" for the model's own (its paper's), "softmax" (listwise) or "bce" (pointwise)


class Encoded(NamedTuple):
    """Order-free encodings: ``items`` follows the batch's item order; the rest are per request."""

    items: Tensor  # (B, L, D)
    user: Tensor  # (B, U)
    hist: Tensor | None = None  # (B, H, Dh)
    hist_mask: Tensor | None = None  # (B, H)

    def reorder(self, perm: Tensor) -> "Encoded":
        index = perm.unsqueeze(-1).expand(-1, -1, self.items.shape[-1])
        return self._replace(items=self.items.gather(1, index))


class Reranker(nn.Module):
    """Base class: subclasses set ``name``, ``config_class``, ``loss_kind`` and implement ``context``."""

    name: ClassVar[str]
    config_class: ClassVar[type] = RerankerConfig
    loss_kind: ClassVar[str] = "softmax"  # "softmax" (listwise) or "bce" (pointwise)
    uses_history: ClassVar[bool] = False  # encode() also embeds the history sequence
    order_sensitive: ClassVar[bool] = True  # whether scores may depend on the presentation order
    # whether a real item's logit never depends on padding behind it (masked attention, per-item layers):
    # then ``logits`` runs ``context`` on groups of similar length, each cut to its longest list
    trims_padding: ClassVar[bool] = False
    loss_fixed: ClassVar[bool] = False  # the model's loss is part of what it is (an evaluator's click probability)

    def __init__(self, schema: Schema, config: RerankerConfig | None = None):
        super().__init__()
        self.schema = schema
        self.config = config or self.config_class()
        if self.config.max_len < 1:
            raise ValueError(f"max_len must be positive, got {self.config.max_len}")
        if self.config.loss and self.config.loss != self.loss_kind:
            if self.loss_fixed:
                raise ValueError(f"{self.name}: its loss is {self.loss_kind!r} and cannot be changed")
            if self.config.loss not in LIST_LOSSES:
                raise ValueError(f"{self.name}: unknown loss {self.config.loss!r}; valid: {', '.join(LIST_LOSSES)}")
            self.loss_kind = self.config.loss
        self.features = FeatureEmbedding(
            schema, self.config.embedding_dim, self.config.use_user, self.config.min_id_count
        )
        # A re-ranker refines the order it is given: with the skip, logits = a·z + b + g·network, where z is
        # the initial ranker's standardised score and a, b, g are learned. ``calibrate_skip`` starts a and b
        # at their best values for the model's own loss with the network off, and g at gate_init·a.
        # Uncalibrated (a = 1) the listwise loss on MIND wants a ≈ 0.3: the network's first steps then
        # learn to flatten the initial scores, noisily, and valid NDCG fell by 0.02–0.03 before recovering.
        # g = 0 serves exactly the initial order until training moves it, as in ReZero; on MIND that held
        # the models at the initial order (valid never improved on it). gate_init = 0.3 was chosen on
        # valid NDCG@10 among 0.1, 0.3 and 1 (six models × 3 seeds: means 0.4053, 0.4062, 0.4054).
        self.skip_column = schema.item_dense.index(INITIAL_SCORE) if INITIAL_SCORE in schema.item_dense else None
        use_skip = self.config.initial_skip and self.skip_column is not None
        self.skip_weight = nn.Parameter(torch.ones(())) if use_skip else None
        self.skip_bias = nn.Parameter(torch.zeros(())) if use_skip else None
        self.gate = nn.Parameter(torch.tensor(float(self.config.gate_init))) if use_skip else None

    @property
    def input_dim(self) -> int:
        """Width of an item's features with the user vector appended."""
        return self.features.item_dim + self.features.user_dim

    def item_inputs(self, batch: ListBatch) -> tuple[Tensor, Tensor]:
        """(items ⊕ tiled user (B, L, input_dim), user (B, U))."""
        user = self.features.user(batch)
        items = self.features.items(batch)
        tiled = user[:, None, :].expand(-1, batch.list_len, -1)
        return torch.cat([items, tiled], dim=-1), user

    def encode(self, batch: ListBatch) -> Encoded:
        items, user = self.item_inputs(batch)
        hist, hist_mask = self.features.history(batch) if self.uses_history else (None, None)
        return Encoded(self.encode_items(items), user, hist, hist_mask)

    def encode_items(self, items: Tensor) -> Tensor:
        """Per-item, order-free encoder; identity unless a model has one."""
        return items

    def context(self, encoded: Encoded, batch: ListBatch) -> Tensor | tuple[Tensor, dict]:
        raise NotImplementedError

    def logits(self, encoded: Encoded, batch: ListBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits (B, L) of one presentation and any auxiliary loss parts the context produced."""
        if batch.list_len > self.config.max_len:
            raise ValueError(
                f"lists of {batch.list_len} items are longer than this model's max_len {self.config.max_len}"
            )
        # measured on the CPU only; on a GPU the grouping's host synchronisations may cost more than padding
        groups = length_groups(batch.mask) if self.trims_padding and batch.mask.device.type == "cpu" else None
        if groups is None:
            out = self.context(encoded, batch)
            logits, aux = out if isinstance(out, tuple) else (out, {})
        else:
            logits, aux = self._context_by_length(encoded, batch, groups), {}
        if self.skip_weight is not None:
            logits = self.gate * logits + (self.skip_weight * self.initial_logit(batch) + self.skip_bias) * batch.mask
        return logits, aux

    def _context_by_length(self, encoded: Encoded, batch: ListBatch, groups: list[tuple[Tensor, int]]) -> Tensor:
        """``context`` run once per group of lists (rows, width), each cut to its ``width`` positions, and the
        logits put back in the batch's row order with zeros on the cut padding."""
        parts, rows_in_order = [], []
        for rows, width in groups:
            part = Encoded(
                encoded.items.index_select(0, rows)[:, :width],
                *(None if t is None else t.index_select(0, rows) for t in encoded[1:]),
            )
            logits = self.context(part, batch[rows].truncate(width))
            if isinstance(logits, tuple):
                raise TypeError(f"{self.name}: a model whose context returns loss parts cannot trim padding")
            parts.append(nn.functional.pad(logits, (0, batch.list_len - width)))
            rows_in_order.append(rows)
        return torch.cat(parts).index_select(0, torch.argsort(torch.cat(rows_in_order)))

    def initial_logit(self, batch: ListBatch) -> Tensor:
        """z: the initial ranker's score, symlog'd and standardised like every dense feature (B, L)."""
        col = self.skip_column
        return (symlog(batch.item_dense[..., col]) - self.features.dense_mean[col]) / self.features.dense_std[col]

    def calibrate_skip(self, data: PreparedDataset, split: str = "train", max_lists: int = 50_000) -> None:
        """Fit the skip's a and b to this model's loss on ``split`` (up to ``max_lists`` lists) with the
        network off — a two-parameter convex problem, solved with L-BFGS — and start the gate at
        gate_init·|a|, so the network starts with the same share of the logits whatever a is."""
        if self.skip_weight is None:
            return
        device = self.skip_weight.device
        rows = data.split(split)[:max_lists]
        if len(rows) == 0:
            return
        batch = data.batch(rows).to(device)
        with torch.no_grad():
            z = self.initial_logit(batch) * batch.mask
        params = torch.tensor([1.0, 0.0], device=device, requires_grad=True)
        optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
        loss_fn = LIST_LOSSES[self.loss_kind]

        def closure():
            optimiser.zero_grad()
            loss = loss_fn(params[0] * z + params[1] * batch.mask, batch.label, batch.mask)
            loss.backward()
            return loss

        optimiser.step(closure)
        a, b = (float(v) for v in params.detach())
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"calibrating the initial score's weight on {split} failed (a={a}, b={b})")
        with torch.no_grad():
            self.skip_weight.fill_(a)
            self.skip_bias.fill_(b)
            self.gate.fill_(self.config.gate_init * abs(a))

    def objective(self, encoded: Encoded, batch: ListBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """(logits (B, L), named loss parts) of one presentation; ``"loss"`` is the model's own loss."""
        logits, aux = self.logits(encoded, batch)
        return logits, {"loss": LIST_LOSSES[self.loss_kind](logits, batch.label, batch.mask), **aux}

    def forward(self, batch: ListBatch) -> Tensor:
        return self.logits(self.encode(batch), batch)[0]

    def loss(self, batch: ListBatch) -> dict[str, Tensor]:
        return self.objective(self.encode(batch), batch)[1]

    def normalise(self, logits: Tensor, mask: Tensor) -> Tensor:
        """Scores on the scale of the model's own loss (used by the consistency losses)."""
        return normalised_scores(logits, mask, self.loss_kind)

    @torch.no_grad()
    def score(self, batch: ListBatch) -> Tensor:
        """Ranking scores (B, L) in eval mode, -inf on padding, on the batch's device."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        scores = self(batch.to(device)).to(batch.device)
        self.train(was_training)
        return scores.masked_fill(~batch.mask, NEG_INF)

    # ---- persistence: relist.io's model format (JSON + safetensors, checksummed, never unpickled) ----
    def save(self, directory: str | Path) -> None:
        meta = {"model": self.name, "config": dataclasses.asdict(self.config), "schema": self.schema.to_json()}
        save_model(Path(directory), meta, self.state_dict())


def length_groups(mask: Tensor, group_cost: int = 4) -> list[tuple[Tensor, int]] | None:
    """At most three groups of lists by length, chosen so that cutting each group to its longest list
    computes the fewest positions: [(rows, width), ...]; None when the whole batch at full width is best,
    or when some list's padding is not all at its end. An extra group costs as much as ``group_cost`` full
    lists (the fixed cost of one more pass). On MIND at list length 30 (mean length 20) this takes 7–10%
    off a consistency-trained PRM or SetRank step and 2–4% off a plain one; MiDNN, whose context is one
    small MLP per item, was slower with it and does not use it."""
    size, length = mask.shape
    lengths = mask.sum(1)
    if size < 2 or not torch.equal(mask, torch.arange(length, device=mask.device) < lengths[:, None]):
        return None
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].cpu().numpy()
    top = int(sorted_lengths[-1])
    # a cut at index i puts sorted rows [.., i) in a group as wide as its last list
    cuts = np.flatnonzero(np.diff(sorted_lengths)) + 1
    best_cost, best = size * length, ()
    if top < length:
        best_cost, best = size * top, ()
    for i in cuts:  # two groups
        cost = i * sorted_lengths[i - 1] + (size - i) * top + group_cost * length
        if cost < best_cost:
            best_cost, best = cost, (i,)
    if len(cuts) >= 2:  # three groups
        i, j = np.meshgrid(cuts, cuts, indexing="ij")
        cost = i * sorted_lengths[i - 1] + (j - i) * sorted_lengths[j - 1] + (size - j) * top + 2 * group_cost * length
        cost = np.where(j > i, cost, np.iinfo(np.int64).max)
        k = np.unravel_index(np.argmin(cost), cost.shape)
        if cost[k] < best_cost:
            best_cost, best = cost[k], (int(i[k]), int(j[k]))
    if not best and top == length:
        return None
    bounds = (0, *best, size)
    return [(order[a:b], max(int(sorted_lengths[b - 1]), 1)) for a, b in zip(bounds[:-1], bounds[1:])]


REGISTRY: dict[str, type[Reranker]] = {}


def register(cls: type[Reranker]) -> type[Reranker]:
    if cls.name in REGISTRY:
        raise ValueError(f"re-ranker name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def reranker_class(name: str) -> type[Reranker]:
    if name not in REGISTRY:
        raise ValueError(f"unknown re-ranker {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_reranker(name: str, schema: Schema, **overrides) -> Reranker:
    """A registered re-ranker with its paper's defaults, changed by ``overrides`` (unknown keys are errors)."""
    cls = reranker_class(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {unknown}; valid: {sorted(fields)}")
    return cls(schema, cls.config_class(**overrides))


def load_reranker(directory: str | Path) -> Reranker:
    """A re-ranker saved by ``Reranker.save`` (checksums verified; every field of model.json checked): a model
    directory, or the output of `relist train reranker|evaluator|generator` (its selected model, best/)."""
    directory = Path(directory)
    if not (directory / MODEL_META).is_file() and (directory / "best" / MODEL_META).is_file():
        directory = directory / "best"
    if not (directory / MODEL_META).is_file():
        raise FileNotFoundError(
            f"{directory} holds no re-ranker (no {MODEL_META} there or in best/, where a training run keeps it)"
        )
    meta, tensors = load_model(directory)
    where = str(directory / MODEL_META)
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("schema"), dict):
        raise CorruptFileError(f"{where}: expected the model's config and schema (a mapping each)")
    unknown = sorted(set(meta) - {"model", "config", "schema"})
    if unknown:  # what Reranker.save writes, and nothing else: a key misspelt by hand is not silently ignored
        raise CorruptFileError(f"{where}: unknown key(s) {unknown}; valid: ['config', 'model', 'schema']")
    if meta.get("model") not in REGISTRY:
        raise ValueError(
            f"{where}: a {meta.get('model')!r} model is not a re-ranker (valid: {', '.join(sorted(REGISTRY))}); "
            "initial rankers load with relist.rankers.load_ranker"
        )
    cls = reranker_class(meta["model"])
    settings = dict(meta.get("config", {}))
    settings.setdefault("loss", "")  # saved before the setting existed: trained with the model's own loss
    config = from_mapping(cls.config_class, settings, f"{where}: config")
    model = cls(Schema.from_json(meta["schema"]), config)
    if tensors is None:
        raise FileNotFoundError(f"{directory} has no {MODEL_WEIGHTS}")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CorruptFileError(f"{directory / MODEL_WEIGHTS}: does not fit the model of {where} ({err})") from None
    return model


def check_reranker(model: Reranker, batch: ListBatch) -> None:
    """Checks the contract on ``batch``: shapes, finite scores on real items, padding ignored, gradients flow.

    Raises ``AssertionError`` naming the broken rule.
    """
    model.eval()
    scores = model.score(batch)
    assert scores.shape == batch.mask.shape, (
        f"{model.name}: scores {tuple(scores.shape)} for mask {tuple(batch.mask.shape)}"
    )
    assert torch.isfinite(scores[batch.mask]).all(), f"{model.name}: non-finite score on a real item"
    assert torch.isneginf(scores[~batch.mask]).all(), f"{model.name}: padding must score -inf"
    # Padding content must not leak into real items' scores.
    noisy = dataclasses.replace(
        batch,
        item_sparse=torch.where(batch.mask[..., None], batch.item_sparse, 1),
        item_dense=torch.where(batch.mask[..., None], batch.item_dense, 7.0),
    )
    assert torch.allclose(model.score(noisy)[batch.mask], scores[batch.mask], atol=1e-5), f"{model.name}: padding leaks"
    model.train()
    parts = model.loss(batch)
    assert parts["loss"].dim() == 0 and torch.isfinite(parts["loss"]), f"{model.name}: loss must be a finite scalar"
    parts["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{model.name}: no gradient reaches the parameters"
    model.zero_grad(set_to_none=True)
