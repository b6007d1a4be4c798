"""The multi-stage cascade: matching -> pre-ranking -> ranking (-> re-ranking) in front of the simulated user.

UNEX-RL (arXiv 2401.06470, AAAI'24) optimises the stages of an industrial cascade jointly; no public code
exists for it or for a cascade simulator, so this is our own construction, calibrated on the learned user
simulator (``relist.sim``):

- **Catalogue.** Every item has a vector ``v`` and a prior ``b`` such that the user model's appeal is
  (up to user-side terms) ``b + <u, v>``: for MIND, the learned factorised click model's item vectors and
  item biases, one row per item impressed in the logs (``relist.sim.catalogue.mind_catalogue``; history
  entries are encoded as the click model reads them in histories, so a user tower over them is the click
  model's own user vector, cosine 0.97 on MIND); for synthetic pools (up to 10**6 items) the ground
  truth's factors and biases (``synthetic_catalogue``).
- **Stage models.** Stage s sees an item through its own imperfect view ``x + noise_s * sd(x) * e_s(item)``,
  ``x = [v, b]``, with ``e_s`` a standard normal error fixed per item (the same wherever the item appears) and
  ``sd(x)`` each dimension's spread over the catalogue, so ``noise_s`` is the error relative to the signal
  (default 0.8 at matching falling to 0.2 at the last stage: later stages have better models). It sees
  the user through the mean of its view over the user's history (a two-tower user model: cold users are
  poorly known). Views are built once per item when the cascade is built, never per request. An error
  that is a fixed *function* of x (an earlier version used a random MLP) rotates the inner product and
  reversed relevance at the noisy stages; independent errors blur relevance without reversing it.
- **Predicted scores per stage** (each standardised over a sample of users and items):
  ``relevance`` = the stage's predicted appeal ``<u_s, v_s> + b_s``, ``prior`` = b_s, and from the second
  stage on ``diversity`` = -log(1 + rank of the item within its group by relevance + prior among the stage's
  candidates). With error-free stages relevance is the click model's appeal but for terms that are the
  same for every item of a request (the user's own biases) and the history-share terms (category
  affinity); ``relist sim check-cascade`` measures how far each stage's relevance agrees with the appeal
  (Spearman over the stage's candidates: about 0.3, 0.4 and 0.6 on MIND, 0.55 at every stage on the
  synthetic catalogue of 100,000 items). Relevance includes the prior because on MIND the click model's
  item priors and user-item terms are anti-correlated over items (-0.67): a relevance of ``<u, v>`` alone
  then ranks the candidates a stage receives against their appeal, which made "relevance -1, prior +1"
  the best fusion of an earlier version.
- **Fusion.** A stage keeps its top-K by ``sum_k w_k * score_k``; the weight vector ``w`` (in [-1, 1]) is
  the stage agent's action for this request. Matching's two scores are both inner products, so its
  fusion is one inner product of the query ``[w_1 u_1 / s_1, w_1 / s_1 + w_2 / s_2]`` with the item matrix
  ``[v_1, b_1]`` (s_1, s_2 the two scores' scales): a
  maximum-inner-product search, done by a FAISS IVF index for large pools (``matching="ivf"``) or exactly.
- **Observations.** Stage 1 observes the request context (the user's history vector, history length,
  depth and session of the request, clicks on the previous list); stage i > 1 observes the context and a
  summary of the candidates it receives (mean and max of each of its scores, share of distinct
  item groups), so every upstream action changes every downstream observation.
- **Determinism.** Given the first observation (user row + context) and the actions, the cascade is a
  pure function (``Cascade.forward``): that is what the cascading information chain of UNEX-RL rebuilds.

The last stage's order is the displayed order; responses, dwell, leaving and returning come from the
session model (``relist.sim.session``) through ``CascadeEnv``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from relist.sim.catalogue import Catalogue
from relist.sim.pool import take
from relist.sim.session import Users

STAGE_NAMES = {
    3: ("matching", "preranking", "ranking"),
    4: ("matching", "preranking", "ranking", "reranking"),
    5: ("matching", "preranking", "coarse_ranking", "ranking", "reranking"),
}
HEADS_FIRST = ("relevance", "prior")
HEADS_LATER = ("relevance", "prior", "diversity")
CONTEXT_EXTRA = 4  # history length, depth, session, previous clicks


@dataclass
class CascadeConfig:
    sizes: tuple[int, ...] = (500, 100, 10)  # items kept by each stage; the last is the slate shown
    noise: tuple[float, ...] | None = None  # each stage's model error relative to the signal (default 0.8 -> 0.2)
    matching: str = "auto"  # "ivf" (FAISS), "exact", or "auto" (ivf from 50,000 items)
    nlist: int = 0  # IVF cells (0: 6 sqrt(n))
    nprobe: int = 64  # IVF cells scanned per query
    seed: int = 0  # stage models' errors
    soft_temperature: float = 1.0  # temperature of the relaxed cascading path (see ``forward``)

    def stage_noise(self) -> tuple[float, ...]:
        if self.noise is not None:
            if len(self.noise) != len(self.sizes):
                raise ValueError(f"noise has {len(self.noise)} entries for {len(self.sizes)} stages")
            return tuple(self.noise)
        n = len(self.sizes)
        return tuple(0.8 * (0.25 ** (s / max(n - 1, 1))) for s in range(n))

    def stage_names(self) -> tuple[str, ...]:
        return STAGE_NAMES.get(len(self.sizes), tuple(f"stage{s + 1}" for s in range(len(self.sizes))))


def stage_errors(n_keys: int, dim: int, noise: tuple[float, ...], seed: int) -> list[Tensor]:
    """Per stage, an (n_keys, dim) table of standard normal errors, one row per item key, drawn with ``seed``:
    a stage model's error is fixed per item (the same item gets the same error wherever it appears)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n_keys, dim, generator=g) if n > 0 else torch.zeros(n_keys, dim) for n in noise]


class StageOutput(NamedTuple):
    rows: Tensor  # (B, K) catalogue rows kept, best first
    fused: Tensor  # (B, K) their fused scores (differentiable in the action)


class CascadeOutput(NamedTuple):
    obs: list[Tensor]  # per stage (B, D_s): what the stage agent observed
    actions: list[Tensor]  # per stage (B, m_s): the actions taken
    stages: list[StageOutput]  # per stage: what it kept

    @property
    def slate(self) -> Tensor:
        return self.stages[-1].rows


class Cascade(nn.Module):
    """N stages over a catalogue; ``forward(pop, ctx, actions)`` runs them (see the module docstring)."""

    def __init__(self, catalogue: Catalogue, config: CascadeConfig | None = None):
        super().__init__()
        self.catalogue, self.config = catalogue, config or CascadeConfig()
        c = self.config
        if list(c.sizes) != sorted(c.sizes, reverse=True) or c.sizes[-1] < 1:
            raise ValueError(f"stage sizes must be positive and non-increasing, got {c.sizes}")
        if c.sizes[0] > catalogue.n_items:
            raise ValueError(f"matching keeps {c.sizes[0]} items but the catalogue has {catalogue.n_items}")
        self.names = c.stage_names()
        g = torch.Generator().manual_seed(c.seed)
        x = torch.cat([catalogue.vec, catalogue.bias[:, None]], dim=1)  # (n, d + 1)
        self.dim = catalogue.vec.shape[1]
        # item-side work, once per item: each stage's view x + noise * sd(x) * e, e fixed per item key
        keys = catalogue.item_keys()
        spread = x.std(dim=0, keepdim=True).clamp_min(1e-6)
        n_keys = int(keys.max()) + 1
        if catalogue.hist_vec is not None:
            n_keys = max(n_keys, catalogue.hist_vec.shape[0])
        self.noise, self.spread = c.stage_noise(), spread
        self.errors = [e.to(catalogue.device) for e in stage_errors(n_keys, self.dim + 1, self.noise, c.seed)]
        with torch.no_grad():
            self.item_views = [x + n * spread * e[keys] for n, e in zip(self.noise, self.errors)]  # each (n, d + 1)
            self.hist_views = None
            if catalogue.hist_vec is not None:  # rows are item ids
                xh = torch.cat([catalogue.hist_vec, catalogue.hist_bias[:, None]], dim=1)
                self.hist_views = [xh + n * spread * e[: xh.shape[0]] for n, e in zip(self.noise, self.errors)]
        # user-side work, once per user of the population: each stage's user tower over the user's history
        with torch.no_grad():
            everyone = torch.arange(catalogue.n_users, device=catalogue.device)
            self.user_views = [self.history_mean(everyone, s) for s in range(len(c.sizes))]  # each (N, d)
        self.heads = [HEADS_FIRST] + [HEADS_LATER] * (len(c.sizes) - 1)
        self.rel_scale, self.prior_scale = self._score_scales(g)
        self.index = self._build_index(c)

    # ------------------------------------------------------------------ set-up

    @property
    def n_stages(self) -> int:
        return len(self.config.sizes)

    @property
    def action_dims(self) -> list[int]:
        return [len(h) for h in self.heads]

    @property
    def context_dim(self) -> int:
        return self.dim + CONTEXT_EXTRA

    @property
    def obs_dims(self) -> list[int]:
        return [self.context_dim] + [self.context_dim + 2 * len(h) + 1 for h in self.heads[1:]]

    def _score_scales(self, g: torch.Generator) -> tuple[list[float], list[float]]:
        cat = self.catalogue
        users = torch.randint(0, cat.n_users, (min(cat.n_users, 2000),), generator=g).to(cat.device)
        items = torch.randint(0, cat.n_items, (min(cat.n_items, 2000),), generator=g).to(cat.device)
        rel, prior = [], []
        for s in range(self.n_stages):
            u = self.user_vector(users, s)
            view = self.item_views[s][items]
            rel.append(float((u @ view[:, :-1].T + view[:, -1]).std().clamp_min(1e-6)))
            prior.append(float(view[:, -1].std().clamp_min(1e-6)))
        return rel, prior

    def _build_index(self, c: CascadeConfig):
        n = self.catalogue.n_items
        kind = c.matching if c.matching != "auto" else ("ivf" if n >= 50_000 else "exact")
        if kind == "exact":
            return None
        if kind != "ivf":
            raise ValueError(f"matching must be 'ivf', 'exact' or 'auto', got {c.matching!r}")
        import faiss  # only an IVF matching index needs it

        # maximum inner product search as nearest neighbours in L2: item x -> [x, sqrt(M - |x|^2)],
        # query q -> [q, 0], so |q - x'|^2 = |q|^2 + M - 2 q.x and the nearest items have the largest q.x
        items = self.item_views[0].detach().cpu().numpy().astype(np.float64)
        norms = (items**2).sum(1)
        items = np.concatenate([items, np.sqrt(norms.max() - norms)[:, None]], axis=1).astype(np.float32)
        d = items.shape[1]
        nlist = c.nlist or int(6 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.seed = c.seed
        index.train(items[np.random.default_rng(c.seed).permutation(n)[: min(n, 64 * nlist)]])
        index.add(items)
        index.nprobe = c.nprobe
        return index

    # ------------------------------------------------------------------ per request

    def user_vector(self, pop: Tensor, stage: int) -> Tensor:
        """(B, d) stage ``stage``'s user tower (precomputed per user; see ``history_mean``)."""
        return self.user_views[stage].index_select(0, pop)

    def history_mean(self, pop: Tensor, stage: int) -> Tensor:
        """(B, d) the mean of stage ``stage``'s item tower over the user's clicked history (0 without one)."""
        if self.hist_views is not None:
            ids = take(self.catalogue.user_hist, pop)[..., 0]  # (B, H)
            valid = self.catalogue.hist_known[ids]
            view = take(self.hist_views[stage][:, :-1], ids)  # (B, H, d)
            return (view * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        rows = self.catalogue.history_rows(pop)  # (B, H)
        valid = rows >= 0
        view = take(self.item_views[stage][:, :-1], rows.clamp_min(0))  # (B, H, d)
        return (view * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)

    def context(self, pop: Tensor, users: Users, last_clicks: Tensor) -> Tensor:
        """The first stage's observation (B, d + 4) for users at their next request."""
        hist = self.catalogue.history_known(pop).sum(1).float()
        extra = torch.stack(
            [torch.log1p(hist) / 3.0, users.depth.float() / 10.0, users.session.float(), last_clicks.float() / 2.0],
            dim=1,
        )
        return torch.cat([self.user_vector(pop, 0), extra], dim=1)

    def _match(self, pop: Tensor, weight: Tensor) -> Tensor:
        """(B, K_1) rows with the largest matching fusion (relevance, prior weights ``weight`` (B, 2))."""
        k = self.config.sizes[0]
        # w_rel (<u, v> + b) / s_rel + w_prior b / s_prior = <query, [v, b]>
        u = self.user_vector(pop, 0) / self.rel_scale[0]
        on_prior = weight[:, :1] / self.rel_scale[0] + weight[:, 1:2] / self.prior_scale[0]
        query = torch.cat([weight[:, :1] * u, on_prior], dim=1).detach()  # (B, d + 1)
        if self.index is None:
            scores = query @ self.item_views[0].T  # (B, n)
            return scores.topk(k, dim=1, sorted=False).indices  # the set matters: later stages re-score
        query = torch.cat([query, torch.zeros_like(query[:, :1])], dim=1)
        _, found = self.index.search(query.cpu().numpy().astype(np.float32), k)
        found = torch.from_numpy(found).to(pop.device)
        # an IVF probe can return fewer than k items (-1): fill with the exact scores' next best is overkill;
        # duplicates of the best item keep the shapes fixed and are rare at the default nprobe
        return torch.where(found >= 0, found, found[:, :1])

    def scores(self, pop: Tensor, rows: Tensor, stage: int) -> Tensor:
        """(B, K, m) standardised predicted scores of stage ``stage`` for candidate ``rows`` (B, K)."""
        view = take(self.item_views[stage], rows)  # (B, K, d + 1)
        u = self.user_vector(pop, stage)
        rel = (torch.einsum("bkd,bd->bk", view[..., :-1], u) + view[..., -1]) / self.rel_scale[stage]
        prior = view[..., -1] / self.prior_scale[stage]
        if stage == 0:
            return torch.stack([rel, prior], dim=2)
        return torch.stack([rel, prior, self._diversity(rows, rel + prior)], dim=2)

    def _diversity(self, rows: Tensor, value: Tensor) -> Tensor:
        """-log(1 + rank within the item's category by ``value``) among the candidates (B, K), by one sort on
        (category, -value)."""
        category = take(self.catalogue.category, rows)  # (B, K)
        # standardised scores lie far inside (-100, 100): the key keeps categories apart and values in order
        order = (category.float() * 256.0 - value.clamp(-100.0, 100.0)).argsort(dim=1)  # ties: only duplicates
        cats = category.gather(1, order)  # grouped by category, best first in each
        pos = torch.arange(rows.shape[1], device=rows.device).expand_as(cats)
        start = torch.ones_like(cats, dtype=torch.bool)
        start[:, 1:] = cats[:, 1:] != cats[:, :-1]
        first = torch.where(start, pos, 0).cummax(dim=1).values
        rank = torch.empty_like(pos).scatter_(1, order, pos - first)
        return -torch.log1p(rank.float())

    def _summary(self, scores: Tensor, weight_prev: Tensor | None) -> Tensor:
        """(B, 2m + 1): mean and max of each score over the candidates, share of distinct categories."""
        mean = scores.mean(1)
        if weight_prev is not None:  # straight-through: forward value is the plain mean
            soft = (weight_prev[..., None] * scores).sum(1)
            mean = mean + soft - soft.detach()
        distinct = (scores[..., 2] == 0).float().mean(1, keepdim=True)  # one item per category has diversity 0
        return torch.cat([mean, scores.amax(1), distinct], dim=1)

    def forward(
        self,
        pop: Tensor,
        ctx: Tensor,
        actions: Sequence[Tensor] | Callable[[int, Tensor], Tensor],
        relaxed: bool = False,
        timings: dict[str, float] | None = None,
    ) -> CascadeOutput:
        """Run every stage for users ``pop`` (B,) with first observation ``ctx`` (B, d + 4).

        ``actions``: a list of per-stage actions (B, m_s), or a function (stage, observation) -> action
        called in stage order (how current policies act on observations rebuilt from their upstream
        actions). Actions are fusion weights in [-1, 1]. With ``relaxed``, each downstream observation's
        score means carry a gradient to the upstream action through a softmax over the upstream fused
        scores (straight-through: the values are unchanged); otherwise no gradient crosses a stage.
        The result depends only on (pop, ctx, actions): this is the recomputation CIC relies on.
        ``timings`` (optional) accumulates the seconds spent in each stage, by stage name."""
        obs, acts, stages = [ctx], [], []
        rows, fused_prev = None, None
        act = actions if callable(actions) else (lambda s, _obs: actions[s])
        for s in range(self.n_stages):
            started = time.perf_counter() if timings is not None else 0.0
            if s == 0:
                a = act(0, ctx)
                rows = self._match(pop, a)
                # matching's fused scores matter only to the relaxed path (the index already ordered the items)
                scores = self.scores(pop, rows, 0) if relaxed else None
            else:
                scores = self.scores(pop, rows, s)
                weight_prev = torch.softmax(fused_prev / self.config.soft_temperature, dim=1) if relaxed else None
                obs.append(torch.cat([ctx, self._summary(scores, weight_prev)], dim=1))
                a = act(s, obs[s])  # the stage's agent acts on the observation just built
            acts.append(a)
            if scores is None:
                fused = torch.zeros(rows.shape, device=rows.device)
            else:
                fused = (scores * a[:, None, :]).sum(2)  # (B, K_in)
                fused = fused if relaxed else fused.detach()
            keep = min(self.config.sizes[s], rows.shape[1])
            if s > 0 or keep < rows.shape[1]:  # matching keeps all it retrieved (only the set matters)
                top = fused.detach().topk(keep, dim=1, sorted=True).indices
                rows, fused = rows.gather(1, top), fused.gather(1, top)
            fused_prev = fused
            stages.append(StageOutput(rows, fused_prev))
            if timings is not None:
                timings[self.names[s]] = timings.get(self.names[s], 0.0) + time.perf_counter() - started
        return CascadeOutput(obs, acts, stages)

    def observations(self, pop: Tensor, ctx: Tensor, actions: Sequence[Tensor]) -> list[Tensor]:
        """Every stage's observation rebuilt from the first observation and the upstream actions."""
        with torch.no_grad():
            return self.forward(pop, ctx, actions).obs
