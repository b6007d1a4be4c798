"""The models a server runs: the generator and evaluator of a run directory, the request parser and LAST.

It lives apart from the app (``relist.serve.app``) so that the model process (``relist.serve.worker``)
loads it without the web framework, and the two import it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from relist.batch import collate
from relist.data.store import read_vocab, vocab_file
from relist.last import Last
from relist.rerankers import load_reranker
from relist.rerankers.evaluator import load_evaluator
from relist.serve.requests import RequestParser
from relist.serve.settings import ServeSettings


def run_vocabularies(run: Path, names: set[str]) -> dict[str, list[str] | None]:
    """The raw-id vocabularies a training run carries in ``RUN/vocab`` (None for a field kept as integers).

    Runs written before runs carried them fall back to the training dataset named in their config.json."""
    vocab = run / "vocab"
    if not vocab.is_dir():
        data = Path(json.loads((run / "config.json").read_text())["data"])
        if not (data / "vocab").is_dir():
            raise FileNotFoundError(f"{run} carries no vocab/ and its training data {data} is not there")
        vocab = data / "vocab"
    files = {name: vocab_file(vocab, name) for name in names}
    return {name: read_vocab(path) if path is not None else None for name, path in files.items()}


class Service:
    """The loaded models, the request parser and LAST."""

    def __init__(self, settings: ServeSettings):
        run = Path(settings.run)
        for part in ("generator", "evaluator"):
            if not (run / part).is_dir():
                raise FileNotFoundError(
                    f"{run} has no {part}/ (expected the outputs of `relist train {part} --out {run / part}`)"
                )
        torch.set_num_threads(max(1, settings.threads))
        gen_dir = run / "generator"
        self.generator = load_reranker(gen_dir / "best" if (gen_dir / "best").is_dir() else gen_dir)
        self.evaluator = load_evaluator(run / "evaluator")
        if self.generator.schema != self.evaluator.schema:
            raise ValueError(f"{run}: the generator and the evaluator were trained on different feature schemas")
        schema = self.generator.schema
        names = {f.name for f in (*schema.item_sparse, *schema.user_sparse, *schema.user_hist)}
        vocabs = run_vocabularies(gen_dir, names)
        limit = self.evaluator.config.max_len
        max_items = min(settings.max_items or limit, limit)
        self.parser = RequestParser(schema, vocabs, max_items, settings.max_history, settings.max_id_chars)
        self.config = settings.last_config()
        self.last = Last(self.generator, self.evaluator, self.config)
        self.noise = torch.Generator().manual_seed(settings.seed)

    def exploration(self, winner: int) -> str:
        if winner == 0:
            return "greedy"
        if self.config.mode == "serial":
            return f"serial round {winner}"
        return f"candidate {winner} (step {self.config.steps[winner - 1]:g})"

    def run(self, examples: list[tuple[dict, list[str]]]) -> list[dict]:
        batch = collate([e for e, _ in examples])
        out = self.last(batch, self.noise)
        results = []
        for b, (_, ids) in enumerate(examples):
            n = len(ids)
            order = out.order[b, :n].tolist()
            results.append(
                {
                    "order": [ids[k] for k in order],
                    "scores": out.scores[b, :n].tolist(),
                    "evaluator_score": float(out.value[b]),
                    "exploration": self.exploration(int(out.winner[b])),
                    "candidates": int(out.candidates.shape[1]),
                }
            )
        return results
