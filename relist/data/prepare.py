"""`relist data prepare SOURCE`: raw files -> a prepared dataset, through one registry of sources."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from relist.config import option
from relist.data import librerank, mind, prm_public, synthetic, taobao_ad
from relist.data.store import ListTable, split_fractions, write_dataset

log = logging.getLogger("relist")


@dataclass
class PrepareConfig:
    source: str = option(
        help="where the lists come from", choices=("mind", "taobao-ad", "prm-public", "librerank", "synthetic")
    )
    out: Path = option(help="output directory of the prepared dataset")
    src: Path | None = option(None, help="folder (or file) holding the raw files; not used by synthetic")
    seed: int = option(0, help="seed of the random split (and of the synthetic generator)")
    splits: tuple[float, ...] = option(
        (0.4, 0.4, 0.1, 0.1),
        help="relative sizes of the ranker,train,valid,test splits (LibRerank-style 4:5:1 with a validation part)",
    )
    overwrite: bool = option(False, help="replace OUT if it exists")
    max_hist: int = option(50, help="mind: keep the user's last N clicked items as history")
    max_items: int = option(1000, help="mind: refuse an impression of more items than this (file and line named)")
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
    return mind.build(
        _src(cfg), cfg.seed, split_fractions(cfg.splits), max_hist=cfg.max_hist, max_items=cfg.max_items
    ), {}


def _synthetic(cfg: PrepareConfig):
    params = replace(synthetic.SyntheticParams(), n_users=cfg.n_users, n_items=cfg.n_items)
    config = synthetic.SyntheticConfig(
        n_lists=cfg.n_lists, min_len=cfg.min_len, max_len=cfg.max_len, logged_order=cfg.logged_order, params=params
    )
    table, model = synthetic.generate(config, cfg.seed, split_fractions(cfg.splits))
    return table, {"truth.safetensors": model.save}


def _taobao(cfg: PrepareConfig):
    table = taobao_ad.build(
        _src(cfg), cfg.seed, split_fractions(cfg.splits), window_seconds=cfg.window_seconds, keep_last=cfg.keep_last
    )
    return table, {}


def _prm(cfg: PrepareConfig):
    return prm_public.build(_src(cfg), cfg.seed, split_fractions(cfg.splits), sample=cfg.sample), {}


def _librerank(cfg: PrepareConfig):
    return librerank.build(_src(cfg), cfg.seed, valid_share=cfg.valid_share), {}


SOURCES: dict[str, Callable[[PrepareConfig], tuple[ListTable, dict]]] = {
    "mind": _mind,
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
    log.info("preparing %s from %s", cfg.source, cfg.src)
    table, extras = SOURCES[cfg.source](cfg)
    return write_dataset(
        table, cfg.out, source=cfg.source, seed=cfg.seed, overwrite=cfg.overwrite, config=asdict(cfg), extras=extras
    )
