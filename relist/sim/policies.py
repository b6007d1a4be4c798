"""Policies for the simulator and the A/B harness, and the registry that builds them from a spec.

The contract is one function: a policy maps a ``ListBatch`` of candidates (in the pool's input order)
to per-item scores (B, L); higher is shown earlier; the simulator orders by ``relist.batch.rank``, so
padding always goes last whatever a policy gives it. Policies never see labels or simulator state.

A spec is ``NAME`` or ``NAME:ARG``; ``--policies random,logged,ranker:/tmp/r1`` builds three. To add a
kind (LAST, say), add one ``POLICIES`` entry: a factory
``(arg, PolicyContext) -> Policy`` plus a line of help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from relist.batch import ListBatch, initial_top, rank
from relist.data.store import PreparedDataset
from relist.io import read_json
from relist.last import Last, LastConfig
from relist.metrics import logged_order_scores
from relist.rankers import is_ranker_dir, load_ranker
from relist.rerankers import load_reranker
from relist.rerankers.evaluator import load_evaluator
from relist.sim import rng


class Policy(Protocol):
    def __call__(self, batch: ListBatch) -> Tensor: ...


@dataclass
class PolicyContext:
    """What a factory may use: the seed of the run, the device and the simulator the policy faces."""

    seed: int
    device: torch.device
    simulator: object | None = None


class RandomPolicy:
    """A uniformly random order per request, keyed by (seed, user, list, item): reproducible, and the same
    whatever the batching (a user shown the same candidate list twice sees the same random order)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, batch: ListBatch) -> Tensor:
        return rng.uniform(self.seed, rng.POLICY, batch.user_sparse[:, :1], batch.list_id[:, None], batch.item_id)


def _random(arg: str | None, ctx: PolicyContext) -> Policy:
    return RandomPolicy(ctx.seed if arg is None else int(arg))


def _logged(arg: str | None, ctx: PolicyContext) -> Policy:
    return logged_order_scores


def _what_is_there(directory: str | Path) -> str | None:
    """The policy kind whose directory ``directory`` looks like (a hint for a spec of the wrong kind), if any."""
    directory = Path(directory)
    if is_ranker_dir(directory):
        return "ranker"
    if (directory / "generator").is_dir() and (directory / "evaluator").is_dir():
        return "last"
    if (directory / "best" / "model.json").is_file() and (directory / "config.json").is_file():
        try:
            trained = read_json(directory / "config.json")
        except ValueError:
            return None
        return "reranker" if isinstance(trained, dict) and "model" in trained else None  # LAST's models: no model
    return None


def _hint(kind: str, arg: str) -> str:
    """'; it holds ...: use KIND:ARG' when ``arg`` holds what another policy kind reads, else ''."""
    there = _what_is_there(arg)
    if there is None or there == kind:
        return ""
    runs = {
        "ranker": "an initial ranker (`relist train ranker`)",
        "reranker": "a training run (`relist train reranker`)",
        "last": "generator/ and evaluator/ runs (LAST)",
    }
    also = f" or greedy:{arg}" if there == "last" and "greedy" in POLICIES else ""
    return f"; it holds {runs[there]}: use {there}:{arg}{also}"


def _load_ranker(arg: str | None, ctx: PolicyContext):
    if not arg:
        raise ValueError("policy 'ranker' needs a directory: ranker:DIR (written by `relist train ranker`)")
    if not is_ranker_dir(arg):
        raise FileNotFoundError(
            f"policy ranker:{arg}: no initial ranker there; expected a directory written by `relist train ranker`"
            + _hint("ranker", arg)
        )
    ranker = load_ranker(arg)
    schema = getattr(getattr(ctx.simulator, "pool", None), "schema", None)
    if schema is not None and ranker.schema != schema:
        raise ValueError(
            f"policy ranker:{arg} was trained on data with another feature schema than the simulator's "
            "request pool; train it on the dataset the simulator draws its lists from"
        )
    return ranker


def _ranker(arg: str | None, ctx: PolicyContext) -> Policy:
    return _load_ranker(arg, ctx).score


def score_order(model) -> Callable[[ListBatch], Tensor]:
    """A scoring model (a re-ranker) as the second stage of a ``RerankPolicy``: the order of its scores."""
    return lambda top: rank(model.score(top), top.mask)


class LastStage:
    """LAST as the second stage of a ``RerankPolicy``: the list it serves, as an order of the top list's
    items (no scores in between). The sampling noise comes from one generator seeded by the run's seed."""

    def __init__(self, last: Last, seed: int):
        self.last, self.noise = last, torch.Generator().manual_seed(seed)

    def __call__(self, top: ListBatch) -> Tensor:
        return self.last(top, self.noise).order.to(top.device)


class RerankPolicy:
    """The two-stage order re-rankers are trained for: the initial ranker orders every candidate, its first
    ``list_len`` go to the second stage with the ranker's score appended as the ``init_score`` feature (as
    ``relist train ranker`` writes the re-ranking dataset), and the second stage's order of those comes
    first, the rest follow in the ranker's order. ``second`` maps that top list to an order (B, K) of its
    items (``score_order(model)`` for a re-ranker, ``LastStage`` for LAST)."""

    def __init__(self, ranker, second: Callable[[ListBatch], Tensor], list_len: int):
        self.ranker, self.second, self.list_len = ranker, second, list_len

    def __call__(self, batch: ListBatch) -> Tensor:
        top, order = initial_top(batch, self.ranker.score(batch), self.list_len)
        second = self.second(top)  # (B, K): ranker positions in the second stage's order
        width = batch.list_len
        priority = (
            (width - torch.arange(width, device=batch.device, dtype=torch.float32)).expand(batch.size, -1).clone()
        )
        priority[:, : top.list_len].scatter_(
            1,
            second,
            (2 * width - torch.arange(top.list_len, device=batch.device, dtype=torch.float32)).expand(batch.size, -1),
        )
        return torch.empty_like(priority).scatter_(1, order, priority)  # back to the candidates' positions


def initial_stage(run: Path, what: str) -> tuple[Path, int]:
    """The initial ranker a training run's re-ranking data was written by, and the list length it cut to.

    The re-ranking dataset names its ranker in its manifest (``info.initial_ranker_dir``, relative to the
    dataset, so the two can move together); datasets written before that sit in the ranker's ``rerank/``."""
    rerank_data = Path(read_json(run / "config.json")["data"])
    if not (rerank_data / "manifest.json").is_file():
        raise FileNotFoundError(f"{what}: its training data {rerank_data} is not there")
    info = PreparedDataset(rerank_data).manifest["info"]
    ranker_dir = (rerank_data / info.get("initial_ranker_dir", "..")).resolve()
    if "list_len" not in info or not is_ranker_dir(ranker_dir):
        raise FileNotFoundError(
            f"{what}: its training data {rerank_data} was not written by `relist train ranker`, so its initial "
            "ranker cannot be found"
        )
    return ranker_dir, int(info["list_len"])


def _reranker(arg: str | None, ctx: PolicyContext) -> Policy:
    if not arg:
        raise ValueError("policy 'reranker' needs a directory: reranker:DIR (written by `relist train reranker`)")
    run = Path(arg)
    if not (run / "best" / "model.json").is_file() or not (run / "config.json").is_file():
        raise FileNotFoundError(
            f"policy reranker:{arg}: expected a `relist train reranker` run directory (config.json, best/)"
            + _hint("reranker", arg)
        )
    ranker_dir, list_len = initial_stage(run, f"policy reranker:{arg}")
    ranker = _load_ranker(str(ranker_dir), ctx)  # checks the schema against the simulator's pool
    reranker = load_reranker(run / "best").to(ctx.device).eval()
    return RerankPolicy(ranker, score_order(reranker), list_len)


def _generator_policy(kind: str, arg: str | None, ctx: PolicyContext, config: LastConfig) -> Policy:
    if not arg:
        raise ValueError(f"policy '{kind}' needs a directory: {kind}:DIR holding generator/ and evaluator/ runs")
    run = Path(arg)
    if not (run / "generator" / "best").is_dir() or not (run / "evaluator").is_dir():
        raise FileNotFoundError(
            f"policy {kind}:{arg}: expected generator/ and evaluator/ (`relist train generator|evaluator` runs)"
            + _hint("last", arg)
        )
    ranker_dir, list_len = initial_stage(run / "generator", f"policy {kind}:{arg}")
    ranker = _load_ranker(str(ranker_dir), ctx)
    generator = load_reranker(run / "generator" / "best").to(ctx.device)
    last = Last(generator, load_evaluator(run / "evaluator").to(ctx.device), config)
    return RerankPolicy(ranker, LastStage(last, ctx.seed), list_len)


def _last(arg: str | None, ctx: PolicyContext) -> Policy:
    return _generator_policy("last", arg, ctx, LastConfig())


def _greedy(arg: str | None, ctx: PolicyContext) -> Policy:
    return _generator_policy("greedy", arg, ctx, LastConfig(steps=()))


def _oracle(arg: str | None, ctx: PolicyContext) -> Policy:
    response = getattr(ctx.simulator, "response", None)
    if response is None or not hasattr(response, "truth"):
        raise ValueError(
            "policy 'oracle' sorts by the true appeal, so it needs a simulator with known ground truth "
            "(`relist sim truth`)"
        )
    return response.appeal


# name -> (factory, help); the factory gets the text after "NAME:" (or None)
POLICIES: dict[str, tuple[Callable[[str | None, PolicyContext], Policy], str]] = {
    "random": (_random, "uniformly random order"),
    "logged": (_logged, "the candidates' input order (the logged display order)"),
    "ranker": (_ranker, "ranker:DIR, an initial ranker written by `relist train ranker`"),
    "reranker": (_reranker, "reranker:DIR, a `relist train reranker` run on the rerank/ data of `relist train ranker`"),
    "last": (
        _last,
        "last:DIR, LAST parallel over DIR/generator and DIR/evaluator; the initial ranker of their data "
        "orders the candidates, LAST reorders its top list",
    ),
    "greedy": (
        _greedy,
        "greedy:DIR, the generator of DIR/generator decoding greedily (LAST without its search): LAST's baseline",
    ),
    "oracle": (_oracle, "sorts by the true appeal (synthetic ground-truth simulators only)"),
}


def policy_kinds() -> str:
    """Every policy kind as it is written in a spec: "random, logged, ranker:DIR, ..."."""
    forms = []
    for name, (_, help_text) in POLICIES.items():
        head = help_text.split(",")[0].split(" ")[0]
        forms.append(head if head.startswith(f"{name}:") else name)
    return ", ".join(forms)


def parse_spec(spec: Sequence[str]) -> list[tuple[str, str | None]]:
    """('random', 'logged', 'ranker:/x') -> [('random', None), ('logged', None), ('ranker', '/x')], validated."""
    parts = [p.strip() for p in spec if p.strip()]
    if not parts:
        raise ValueError("--policies needs at least one policy, e.g. random,logged")
    out = []
    for part in parts:
        name, _, arg = part.partition(":")
        if name not in POLICIES:
            valid = ", ".join(f"{n} ({h})" for n, (_, h) in POLICIES.items())
            raise ValueError(f"unknown policy {name!r} in --policies {','.join(parts)}; valid: {valid}")
        out.append((name, arg or None))
    if len(set(out)) != len(out):
        raise ValueError(f"--policies {','.join(parts)} names the same policy twice")
    return out


def policy_labels(parsed: Sequence[tuple[str, str | None]]) -> list[str]:
    """Each policy's name in tables: ``kind:last-folder`` (``ranker:r1``), or ``kind:DIR`` in full where two
    runs share their last folder's name (``reranker:a/prm`` and ``reranker:b/prm``)."""
    short = [name if arg is None else f"{name}:{Path(arg).name or arg}" for name, arg in parsed]
    return [
        f"{name}:{arg}" if arg is not None and short.count(label) > 1 else label
        for (name, arg), label in zip(parsed, short)
    ]


def make_policy(name: str, arg: str | None, ctx: PolicyContext) -> Policy:
    factory, _ = POLICIES[name]
    return factory(arg, ctx)
