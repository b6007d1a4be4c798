"""Principled learning for re-rankers (arXiv 2504.04188): convergence and adversarial consistency.

- P1, convergence consistency: re-ranking the model's own re-ranked list changes nothing.
- P2, adversarial consistency: a small perturbation of the input order changes nothing.

Both are trained through the contrastive-similarity loss between two presentations A and B of the same
items, with scores aligned per item: L_CS = Σ_i |pos_A(i) − pos_B(i)| · (R_A(i) − R_B(i))², summed over
a list and averaged over lists. R is the model's score on the scale of its own loss (softmax over the
list, or per-item sigmoid). Training loss = base + λ1·L_CS(P, P') + λ2·L_CS(P, P̂), where P' is the order
the model's scores on P give (treated as a constant, as the paper does) and P̂ a perturbation of P.

Sharing: the model's order-free encoder runs once per batch; only its order-dependent layers run per
presentation, and the two extra presentations go through them as one stacked batch. A list that a
presentation leaves in its input order adds exactly 0 to that term (every weight |pos_A − pos_B| is 0),
so it is left out of the stacked batch; the mean is still over all lists.

Perturbations (the paper uses the first; the others answer its open question):
``adjacent`` one random adjacent swap; ``pair`` one random pair swap; ``k_adjacent`` k adjacent swaps;
``window`` a shuffle of a random window of ``window`` consecutive items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from relist.batch import ListBatch, rank
from relist.rerankers.base import Encoded, Reranker

PERTURBATIONS = ("adjacent", "pair", "k_adjacent", "window")


@dataclass
class PrincipledConfig:
    p1_weight: float = 0.0  # λ1; the paper's +P1 variant uses 1
    p2_weight: float = 0.0  # λ2; the paper's +P2 variant uses 1
    perturbation: str = "adjacent"
    swaps: int = 3  # k_adjacent: number of adjacent swaps
    window: int = 4  # window: length of the shuffled window
    # "both": gradients flow through both presentations of each CS term (the paper's loss); "input": the
    # re-ranked and perturbed presentations are targets without gradient, so only the input presentation
    # is pulled towards them — no backward pass through the extra presentations, about half their cost
    cs_gradient: str = "both"

    def __post_init__(self):
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {self.perturbation!r}; valid: {', '.join(PERTURBATIONS)}")
        if self.cs_gradient not in ("both", "input"):
            raise ValueError(f"cs_gradient must be 'both' or 'input', got {self.cs_gradient!r}")
        if self.p1_weight < 0 or self.p2_weight < 0:
            raise ValueError("consistency weights must be non-negative")

    @property
    def active(self) -> bool:
        return self.p1_weight > 0 or self.p2_weight > 0


def _swap(perm: Tensor, i: Tensor, j: Tensor) -> Tensor:
    rows = torch.arange(perm.shape[0], device=perm.device)
    out = perm.clone()
    out[rows, i], out[rows, j] = perm[rows, j], perm[rows, i]
    return out


def perturb(mask: Tensor, config: PrincipledConfig, generator: torch.Generator | None = None) -> Tensor:
    """A permutation (B, L) of each list's real items, padding left in place; lists of one item stay put."""
    size, length = mask.shape
    device = mask.device
    lengths = mask.sum(1)
    perm = torch.arange(length, device=device).expand(size, -1).clone()
    movable = lengths >= 2
    span = (lengths - 1).clamp_min(1).float()

    def uniform() -> Tensor:
        return torch.rand(size, generator=generator, device="cpu").to(device)

    if config.perturbation in ("adjacent", "k_adjacent"):
        for _ in range(1 if config.perturbation == "adjacent" else config.swaps):
            i = (uniform() * span).long()  # adjacent pair (i, i+1) inside the real items
            swapped = _swap(perm, i, i + 1)
            perm = torch.where(movable[:, None], swapped, perm)
    elif config.perturbation == "pair":
        i = (uniform() * lengths.float()).long().clamp_max(length - 1)
        j = (i + 1 + (uniform() * span).long()) % lengths.clamp_min(1)  # j ≠ i among the real items
        perm = torch.where(movable[:, None], _swap(perm, i, j), perm)
    else:  # window
        width = torch.minimum(lengths, torch.tensor(config.window, device=device))
        start = (uniform() * (lengths - width + 1).float()).long()
        keys = torch.rand(size, length, generator=generator, device="cpu").to(device)
        positions = torch.arange(length, device=device)[None, :]
        inside = (positions >= start[:, None]) & (positions < (start + width)[:, None])
        # Outside the window a key is its own position; inside, the window's start plus a random fraction
        # of its width, so sorting keys shuffles the window and leaves the rest alone.
        sort_keys = torch.where(inside, start[:, None] + keys * width[:, None].float() - 0.5, positions.float())
        perm = torch.sort(sort_keys, dim=1, stable=True).indices
    return perm


def inverse(perm: Tensor) -> Tensor:
    return torch.argsort(perm, dim=1)


def cs_loss(
    scores_a: Tensor, scores_b: Tensor, pos_a: Tensor, pos_b: Tensor, mask: Tensor, lists: int | None = None
) -> Tensor:
    """Contrastive similarity: Σ_i |pos_A(i) − pos_B(i)| (R_A(i) − R_B(i))² per list, mean over lists.

    All tensors are aligned per item (same item in the same column). ``lists``: divide the sum by this
    many lists rather than the number given (lists left out because they add 0 still count)."""
    weight = (pos_a - pos_b).abs().float() * mask
    per_list = (weight * (scores_a - scores_b) ** 2).sum(1)
    return per_list.mean() if lists is None else per_list.sum() / max(lists, 1)


def present(encoded: Encoded, rows: Tensor, perm: Tensor) -> Encoded:
    """The encodings of the lists ``rows`` presented in the orders ``perm`` (one row of ``perm`` each).

    One ``index_select`` of item rows: its backward adds whole rows back, much cheaper than the
    per-element scatter behind ``Encoded.reorder``'s ``gather`` and a concatenation's copies."""
    size, length, width = encoded.items.shape
    flat = (rows[:, None] * length + perm).reshape(-1)
    items = encoded.items.reshape(size * length, width).index_select(0, flat).view(len(rows), length, width)
    return Encoded(items, *(None if t is None else t.index_select(0, rows) for t in encoded[1:]))


class PrincipledObjective(nn.Module):
    """The training objective: a re-ranker's own loss plus the P1 / P2 consistency losses.

    ``forward(batch)`` returns named loss parts with ``"loss"`` the total, so that the module can be
    wrapped in DistributedDataParallel as a whole.

    A list that a presentation leaves in its input order (P1 when the model already ranks it as given;
    P2 when it has one item) adds exactly 0 to that CS term and to its gradient — every item keeps its
    position, so every weight |pos_A − pos_B| is 0 — and is not run through the model again.
    """

    def __init__(self, model: Reranker, config: PrincipledConfig | None = None):
        super().__init__()
        self.model, self.config = model, config or PrincipledConfig()

    def forward(self, batch: ListBatch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        model, c = self.model, self.config
        encoded = model.encode(batch)
        logits, parts = model.objective(encoded, batch)
        if not c.active:
            return parts
        identity = torch.arange(batch.list_len, device=batch.device).expand(batch.size, -1)
        presentations: list[tuple[str, Tensor, float]] = []
        if c.p1_weight > 0:
            presentations.append(("loss_cs_p1", rank(logits.detach(), batch.mask), c.p1_weight))
        if c.p2_weight > 0:
            presentations.append(("loss_cs_p2", perturb(batch.mask, c, generator), c.p2_weight))
        moved = [(perm != identity).any(1).nonzero().squeeze(1) for _, perm, _ in presentations]  # lists reordered
        rows = torch.cat(moved)
        perms = torch.cat([perm[m] for (_, perm, _), m in zip(presentations, moved)])
        total = parts["loss"]
        if len(rows):
            stacked_batch = batch[rows].reorder(perms)
            with torch.set_grad_enabled(torch.is_grad_enabled() and c.cs_gradient == "both"):
                stacked_logits, _ = model.logits(present(encoded, rows, perms), stacked_batch)
            stacked_scores = model.normalise(stacked_logits, stacked_batch.mask)
            base_scores = model.normalise(logits, batch.mask)
        start = 0
        for (name, _, weight), m in zip(presentations, moved):
            if len(m):
                at = slice(start, start + len(m))
                position = inverse(perms[at])  # where each input item sits in this presentation
                aligned = stacked_scores[at].gather(1, position)  # back to the input's item columns
                parts[name] = cs_loss(base_scores[m], aligned, identity[m], position, batch.mask[m], lists=batch.size)
                start += len(m)
            else:
                parts[name] = torch.zeros((), device=batch.device)
            total = total + weight * parts[name]
        parts["loss_base"] = parts["loss"]
        parts["loss"] = total
        return parts


@torch.no_grad()
def obedience(score_fn, batches, ks=(5, 10), config: PrincipledConfig | None = None, seed: int = 0) -> dict[str, float]:
    """The two obedience rates over ``batches``: the share of lists whose order (top-k and full) is unchanged

    - P1: when the model re-ranks its own output (a fixed point);
    - P2: when the input order is perturbed (``config.perturbation``, adjacent swap by default).
    """
    config = config or PrincipledConfig(perturbation="adjacent")
    generator = torch.Generator().manual_seed(seed)
    same = {f"obedience_{p}@{k}": 0 for p in ("p1", "p2") for k in (*ks, "full")}
    n = 0
    for batch in batches:
        first = rank(score_fn(batch), batch.mask)  # positions -> input columns
        items = batch.item_id.gather(1, first)
        again = batch.reorder(first)
        second = again.item_id.gather(1, rank(score_fn(again), again.mask))
        perm = perturb(batch.mask, config, generator)
        shaken = batch.reorder(perm)
        third = shaken.item_id.gather(1, rank(score_fn(shaken), shaken.mask))
        real = batch.mask.gather(1, first)  # padding sits at the end of every ranked order
        for name, other in (("p1", second), ("p2", third)):
            equal = (other == items) | ~real
            for k in ks:
                same[f"obedience_{name}@{k}"] += int(equal[:, :k].all(1).sum())
            same[f"obedience_{name}@full"] += int(equal.all(1).sum())
        n += batch.size
    return {key: value / max(n, 1) for key, value in same.items()}
