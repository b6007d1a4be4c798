"""`relist data prepare SOURCE`: raw files -> a prepared dataset, through one registry of sources.

Lengths are bounded for every source, with defaults above anything the real data holds (MIND's longest
impression is 283 items and its longest history 425; Taobao lists are at most ``--keep-last``, 30):

- A list longer than ``max_items`` is refused, naming its file and line (MIND, trivago, PRM Public,
  LibRerank: one list per line; Taobao Ad and synthetic lists are bounded by ``--keep-last`` and ``--max-len``, which
  must not exceed it). Cutting a logged list would change which items its labels and metrics are about,
  and a list far longer than any real one is far more likely a corrupt or misread file than data.
- A history longer than ``max_history`` is cut to its newest items, and the number of histories cut is
  ``histories_cut`` in the manifest's info. A history is context for the list, its oldest clicks count
  least, and real logs have long tails of heavy users, so refusing them would fail ordinary files.
- An id (any value of a vocabulary: user, item, category ...) longer than ``max_id_chars`` characters is
  refused: `relist serve` refuses such ids (its ``--max-id-chars``, 256 by default), so a model could never
  be asked about them. MIND names the file, line and field; for the other sources the check on the
  vocabularies names the source and field (their ids are integers, or short codes, in the real files).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from relist.config import option
from relist.data import librerank, mind, prm_public, synthetic, taobao_ad, trivago
from relist.data.store import ListTable, cut_histories, split_fractions, write_dataset

log = logging.getLogger("relist")
PLACEHOLDERS = frozenset({mind.PAD, mind.UNKNOWN, taobao_ad.MISSING, trivago.UNKNOWN})  # the sources' own values


@dataclass
class PrepareConfig:
    source: str = option(
        help="where the lists come from",
        choices=("mind", "trivago", "taobao-ad", "prm-public", "librerank", "synthetic"),
    )
    out: Path = option(help="output directory of the prepared dataset")
    src: Path | None = option(None, help="folder (or file) holding the raw files; not used by synthetic")
    seed: int = option(0, help="seed of the random split (and of the synthetic generator)")
    splits: tuple[float, ...] = option(
        (0.4, 0.4, 0.1, 0.1),
        help="relative sizes of the ranker,train,valid,test splits (LibRerank-style 4:5:1 with a validation part)",
    )
    overwrite: bool = option(False, help="replace OUT if it exists")
    max_hist: int = option(50, help="mind, trivago: keep the user's last N clicked (trivago: viewed) items as history")
    max_items: int = option(1000, help="most items per list; a longer list is refused, naming its file and line")
    max_history: int = option(
        1000, help="most history items read per list; longer histories are cut to their newest, counted in the manifest"
    )
    max_id_chars: int = option(
        256,
        help="most characters of an id (user, item, category ...); a longer one is refused, naming its file and line "
        "(mind) or its field (every source), as relist serve refuses ids longer than its --max-id-chars (256)",
    )
    n_lists: int = option(20000, help="synthetic: number of lists")
    n_users: int = option(2000, help="synthetic: number of users")
    n_items: int = option(5000, help="synthetic: number of items")
    min_len: int = option(10, help="synthetic: shortest candidate list")
    max_len: int = option(30, help="synthetic: longest candidate list")
    logged_order: str = option(
        "random",
        help="synthetic: display order of the logged lists (random: unbiased clicks; production: noisy true relevance)",
        choices=("random", "production"),
    )
    window_seconds: int = option(
        300, help="taobao-ad: a list is the impressions within this many seconds of its newest record"
    )
    keep_last: int = option(30, help="taobao-ad: records kept per window")
    sample: float = option(1.0, help="prm-public: fraction of lists kept at random (LibRerank keeps 0.1)")
    valid_share: float = option(
        0.1, help="librerank: share of data.valid (the re-ranker's training file) held out as our valid split"
    )


def _mind(cfg: PrepareConfig):
    splits = split_fractions(cfg.splits)
    table = mind.build(
        _src(cfg),
        cfg.seed,
        splits,
        max_hist=cfg.max_hist,
        max_items=cfg.max_items,
        max_history=cfg.max_history,
        max_id_chars=cfg.max_id_chars,
    )
    return table, {}


def _trivago(cfg: PrepareConfig):
    splits = split_fractions(cfg.splits)
    return trivago.build(_src(cfg), cfg.seed, splits, max_hist=cfg.max_hist, max_items=cfg.max_items), {}


def _synthetic(cfg: PrepareConfig):
    if cfg.max_len > cfg.max_items:
        raise ValueError(f"synthetic: --max-len {cfg.max_len} is more than --max-items {cfg.max_items}")
    params = replace(synthetic.SyntheticParams(), n_users=cfg.n_users, n_items=cfg.n_items)
    config = synthetic.SyntheticConfig(
        n_lists=cfg.n_lists, min_len=cfg.min_len, max_len=cfg.max_len, logged_order=cfg.logged_order, params=params
    )
    table, model = synthetic.generate(config, cfg.seed, split_fractions(cfg.splits))
    return table, {"truth.safetensors": model.save}


def _taobao(cfg: PrepareConfig):
    if cfg.keep_last > cfg.max_items:
        raise ValueError(f"taobao-ad: --keep-last {cfg.keep_last} is more than --max-items {cfg.max_items}")
    table = taobao_ad.build(
        _src(cfg), cfg.seed, split_fractions(cfg.splits), window_seconds=cfg.window_seconds, keep_last=cfg.keep_last
    )
    return table, {}


def _prm(cfg: PrepareConfig):
    splits = split_fractions(cfg.splits)
    return prm_public.build(_src(cfg), cfg.seed, splits, sample=cfg.sample, max_items=cfg.max_items), {}


def _librerank(cfg: PrepareConfig):
    return librerank.build(_src(cfg), cfg.seed, valid_share=cfg.valid_share, max_items=cfg.max_items), {}


SOURCES: dict[str, Callable[[PrepareConfig], tuple[ListTable, dict]]] = {
    "mind": _mind,
    "trivago": _trivago,
    "taobao-ad": _taobao,
    "prm-public": _prm,
    "librerank": _librerank,
    "synthetic": _synthetic,
}


def _src(cfg: PrepareConfig) -> Path:
    if cfg.src is None:
        raise ValueError(f"source {cfg.source!r} needs --src PATH (the folder holding its raw files)")
    if not Path(cfg.src).exists():
        raise FileNotFoundError(f"--src {cfg.src} does not exist")
    return Path(cfg.src)


def prepare(cfg: PrepareConfig) -> Path:
    """Build the dataset named by ``cfg.source`` and write it atomically to ``cfg.out``."""
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown source {cfg.source!r}; valid: {sorted(SOURCES)}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} already exists (pass --overwrite to replace it)")
    if cfg.max_items < 1 or cfg.max_history < 0 or cfg.max_id_chars < 1:
        raise ValueError(
            "--max-items and --max-id-chars must be positive and --max-history non-negative, got "
            f"{cfg.max_items}, {cfg.max_id_chars} and {cfg.max_history}"
        )
    log.info("preparing %s from %s", cfg.source, cfg.src)
    table, extras = SOURCES[cfg.source](cfg)
    longest = int(np.diff(table.offsets).max()) if table.n_lists else 0
    if longest > cfg.max_items:  # the sources refuse such lists with their line; this guards the rule itself
        raise ValueError(f"{cfg.source}: a list of {longest} items, more than --max-items {cfg.max_items}")
    for field, vocab in table.vocabs.items():  # MIND refuses long ids with their line; this guards every source
        widest = max((v for v in vocab if v not in PLACEHOLDERS), key=len, default="")
        if len(widest) > cfg.max_id_chars:
            raise ValueError(
                f"{cfg.source}: field {field!r} holds an id of {len(widest)} characters "
                f"({widest[:40]!r}{'...' if len(widest) > 40 else ''}), more than --max-id-chars {cfg.max_id_chars}"
            )
    table.info["histories_cut"] = table.info.get("histories_cut", 0) + cut_histories(table, cfg.max_history)
    return write_dataset(
        table, cfg.out, source=cfg.source, seed=cfg.seed, overwrite=cfg.overwrite, config=asdict(cfg), extras=extras
    )
