"""Pointwise DNN initial ranker: embeddings + dense features -> MLP -> click logit.

LibRerank's DNN ranker (MLP 500/200/80, BCE on clicks), with user features and the user's history
(mean of history item embeddings, sharing the candidate fields' embedding tables) added; LibRerank's
uses no user features. Dense inputs go through sign(x) * log1p(|x|) and are standardised with
statistics of the training split, so heavy-tailed features (prices, counts) train well.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from relist.batch import ListBatch
from relist.config import from_mapping
from relist.data.store import PreparedDataset, Schema
from relist.io import MODEL_META, load_model, save_model
from relist.metrics import evaluate_lists
from relist.nn import symlog
from relist.train import new_loop_state, shuffled_batches, training_loop

log = logging.getLogger("relist")


@dataclass
class DNNConfig:
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (500, 200, 80)
    dropout: float = 0.1
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    batch_size: int = 128
    max_epochs: int = 20
    patience: int = 3
    use_user: bool = True


class DNNRanker(nn.Module):
    name = "dnn"

    def __init__(self, schema: Schema, config: DNNConfig | None = None):
        super().__init__()
        self.schema, self.config = schema, config or DNNConfig()
        c = self.config
        self.item_tables = nn.ModuleList(
            nn.Embedding(f.vocab, c.embedding_dim, padding_idx=0) for f in schema.item_sparse
        )
        self.user_tables = nn.ModuleList(
            nn.Embedding(f.vocab, c.embedding_dim, padding_idx=0) for f in schema.user_sparse
        )
        item_names = [f.name for f in schema.item_sparse]
        # History fields reuse the candidate table of the same name, so "clicked before" and "candidate" live in
        # one space.
        self.hist_to_item = [item_names.index(f.name) if f.name in item_names else -1 for f in schema.user_hist]
        self.hist_tables = nn.ModuleList(
            nn.Embedding(f.vocab, c.embedding_dim, padding_idx=0)
            for f, k in zip(schema.user_hist, self.hist_to_item)
            if k < 0
        )
        n_dense = len(schema.item_dense)
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        n_user = (len(schema.user_sparse) + len(schema.user_hist)) if c.use_user else 0
        width = c.embedding_dim * (len(schema.item_sparse) + n_user) + n_dense
        layers: list[nn.Module] = []
        for hidden in c.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(c.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, batch: ListBatch) -> torch.Tensor:
        """Click logits (B, L); -inf on padding."""
        size, length = batch.mask.shape
        parts = [table(batch.item_sparse[..., k]) for k, table in enumerate(self.item_tables)]  # each (B, L, E)
        dense = (symlog(batch.item_dense) - self.dense_mean) / self.dense_std
        parts.append(dense)
        if self.config.use_user:
            for k, table in enumerate(self.user_tables):
                parts.append(table(batch.user_sparse[:, k])[:, None, :].expand(size, length, -1))
            hist_mask = (batch.user_hist[..., 0] > 0).float() if batch.user_hist.shape[1] else None
            own = iter(self.hist_tables)
            for k, item_k in enumerate(self.hist_to_item):
                table = self.item_tables[item_k] if item_k >= 0 else next(own)
                if hist_mask is None:
                    pooled = torch.zeros(size, self.config.embedding_dim, device=batch.device)
                else:
                    emb = table(batch.user_hist[..., k])  # (B, H, E), padding rows are zero
                    pooled = emb.sum(dim=1) / hist_mask.sum(dim=1, keepdim=True).clamp_min(1.0)
                parts.append(pooled[:, None, :].expand(size, length, -1))
        logits = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B, L)
        return logits.masked_fill(~batch.mask, float("-inf"))

    @torch.no_grad()
    def score(self, batch: ListBatch) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        scores = self(batch.to(device)).to(batch.device)
        self.train(was_training)
        return scores

    def loss(self, batch: ListBatch) -> dict[str, torch.Tensor]:
        logits = self(batch)
        bce = nn.functional.binary_cross_entropy_with_logits(logits[batch.mask], batch.label[batch.mask])
        return {"loss": bce}

    def _fit_dense_stats(self, data: PreparedDataset, split: str) -> None:
        rows = data.split(split)
        starts, ends = data.offsets[rows], data.offsets[rows + 1]
        dense = torch.cat([torch.from_numpy(data.item_dense[s:e].copy()) for s, e in zip(starts[:2000], ends[:2000])])
        dense = symlog(dense)
        self.dense_mean.copy_(dense.mean(dim=0))
        self.dense_std.copy_(dense.std(dim=0).clamp_min(1e-6))

    def fit(
        self,
        data: PreparedDataset,
        seed: int,
        train_split: str = "ranker",
        valid_split: str = "valid",
        device: torch.device | None = None,
        progress: bool = False,
    ) -> dict:
        """Adam on BCE through relist's one training loop; NDCG@10 on ``valid_split`` after each epoch; keeps
        the best epoch and stops after ``patience`` epochs without improvement."""
        device = device or torch.device("cpu")
        torch.manual_seed(seed)
        self._fit_dense_stats(data, train_split)
        self.to(device)
        c = self.config
        optimiser = torch.optim.Adam(self.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
        train_index = data.split(train_split)
        state, best_state = new_loop_state(), None
        bar = tqdm(total=c.max_epochs, desc="dnn epochs", disable=not progress)

        def loss(rows: np.ndarray) -> dict[str, torch.Tensor]:
            self.train()
            return self.loss(data.batch(rows).to(device))

        def validate(state: dict, _train: dict) -> bool:
            nonlocal best_state
            valid = self.evaluate(data, valid_split)["ndcg@10"]
            state["history"].append(valid)
            bar.update(1)
            bar.set_postfix(valid_ndcg10=f"{valid:.4f}")
            if state["best"] is not None and valid <= state["best"]:
                return False
            state["best"], best_state = valid, copy.deepcopy(self.state_dict())
            return True

        training_loop(
            state,
            epochs=c.max_epochs,
            patience=c.patience,
            epoch_batches=lambda epoch: shuffled_batches(train_index, c.batch_size, seed, epoch),
            loss=loss,
            optimiser=optimiser,
            validate=validate,
        )
        bar.close()
        self.load_state_dict(best_state)
        history = state["history"]
        log.info("dnn: best valid ndcg@10 %.4f after %d epochs", state["best"], len(history))
        return {"valid_ndcg@10_by_epoch": history, "best_epoch": int(history.index(state["best"])) + 1}

    def evaluate(self, data: PreparedDataset, split: str) -> dict[str, float]:
        return evaluate_lists(self.score, data.batches(split, 512), ks=(10,))

    def save(self, directory: Path) -> None:
        meta = {"model": self.name, "config": asdict(self.config), "schema": self.schema.to_json()}
        save_model(Path(directory), meta, self.state_dict())

    @classmethod
    def load(cls, directory: Path) -> "DNNRanker":
        meta, tensors = load_model(Path(directory), legacy_meta="config.json")
        config = from_mapping(DNNConfig, meta["config"], f"{directory}/{MODEL_META}: config")
        ranker = cls(Schema.from_json(meta["schema"]), config)
        ranker.load_state_dict(tensors)
        return ranker
