"""trivago (ACM RecSys Challenge 2019): train.csv + item_metadata.csv -> one list per click-out.

train.csv: ``user_id,session_id,timestamp,step,action_type,reference,platform,city,device,current_filters,
impressions,prices`` (a header line; ``city`` is quoted, as it holds a comma; ``impressions`` and ``prices``
are ``|``-separated). item_metadata.csv: ``item_id,properties``, properties ``|``-separated. The same reader
serves the Rio de Janeiro subset and the full challenge files.

Lists: every "clickout item" row is one list, its impressions in display order (trivago's own ranking),
label 1 on the clicked hotel (``reference``). A click-out whose hotel is not among its impressions is
dropped and counted (``n_dropped`` in the manifest); an impression list that names a hotel twice is
refused with its line (its label would be ambiguous).

Features
- user sparse: user id, platform, device ("<unknown>" where empty); history: the hotels of the session's
  earlier actions that reference a hotel (``ITEM_ACTIONS``: earlier click-outs and interactions), the last
  ``max_hist``.
- item sparse: hotel id, star rating ("1 star" .. "5 star" among its properties), rating tier
  (satisfactory .. excellent), "<unknown>" where the metadata has none.
- item dense: log impressions, log clicks, smoothed CTR and log history count of the hotel
  (``relist.data.item_stats``: the ``ranker`` split only, out of fold within it); the logged position (0 =
  top: trivago's ranking is strong, and a re-ranking stage has the upstream rank at serving time); log
  price and whether a price is known (the Rio subset has no prices: an explicit missing value); whether the
  hotel has metadata, its number of properties, and a multi-hot of the ``TOP_PROPERTIES`` most frequent
  properties other than stars and ratings.
- splits: by session (``relist.data.store.group_splits``): a session's lists never fall into two splits,
  so a session's later click-outs cannot inform a model about its earlier ones across splits. The split
  fractions are shares of sessions.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np

from relist.data.errors import DataFormatError, read_lines
from relist.data.item_stats import STAT_FOLDS, item_statistics
from relist.data.store import ListTable, Schema, SparseField, first_seen_ids, group_splits

FIELDS = (
    "user_id",
    "session_id",
    "timestamp",
    "step",
    "action_type",
    "reference",
    "platform",
    "city",
    "device",
    "current_filters",
    "impressions",
    "prices",
)
METADATA_FIELDS = ("item_id", "properties")
CLICKOUT = "clickout item"
ITEM_ACTIONS = frozenset(
    {
        CLICKOUT,
        "interaction item image",
        "interaction item info",
        "interaction item rating",
        "interaction item deals",
        "search for item",
    }
)
STARS = ("1 star", "2 star", "3 star", "4 star", "5 star")
RATINGS = ("satisfactory rating", "good rating", "very good rating", "excellent rating")
TOP_PROPERTIES = 32
MAX_ITEMS = 1000
UNKNOWN = "<unknown>"
PAD = "<pad>"


def _find(src: Path, name: str) -> Path:
    path = Path(src) / name
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no {name} (expected the challenge's train.csv and item_metadata.csv here)")
    return path


def _rows(path: Path, names: tuple[str, ...]):
    """(line, fields) of a CSV file with header ``names``; every problem names the file and line."""
    for line, raw, ended in read_lines(path):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFormatError(path, line, None, f"not valid UTF-8 at byte {err.start}") from None
        try:
            fields = next(csv.reader([text], strict=True))
        except csv.Error as err:
            raise DataFormatError(path, line, None, f"not a CSV line ({err})") from None
        if line == 1:
            if tuple(f.strip() for f in fields) != names:
                raise DataFormatError(path, line, None, f"expected the header {','.join(names)}")
            continue
        if len(fields) != len(names):
            hint = " (the last line has no newline: is the file truncated?)" if not ended else ""
            raise DataFormatError(path, line, None, f"expected {len(names)} fields, found {len(fields)}{hint}")
        yield line, fields


def read_metadata(path: Path) -> dict[str, list[str]]:
    """hotel id -> its properties."""
    out: dict[str, list[str]] = {}
    for line, (item, properties) in _rows(path, METADATA_FIELDS):
        if not item:
            raise DataFormatError(path, line, "item_id", "empty hotel id")
        out[item] = [p for p in properties.split("|") if p]
    return out


def _int(path: Path, line: int, name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFormatError(path, line, name, f"expected an integer, got {value!r}") from None


def read_clickouts(path: Path, max_items: int = MAX_ITEMS) -> tuple[list[dict], int]:
    """The click-out lists of train.csv, in session order (each with its session's earlier hotels), and the
    number of click-outs dropped because their hotel is not among their impressions."""
    sessions: dict[str, list[tuple[int, int, dict]]] = {}
    for line, f in _rows(path, FIELDS):
        row = dict(zip(FIELDS, f))
        if not row["session_id"]:
            raise DataFormatError(path, line, "session_id", "empty session id")
        step = _int(path, line, "step", row["step"])
        timestamp = _int(path, line, "timestamp", row["timestamp"])
        entry = {"line": line, "timestamp": timestamp, **row}
        if row["action_type"] == CLICKOUT:
            impressions = row["impressions"].split("|") if row["impressions"] else []
            if not impressions or any(not i for i in impressions):
                raise DataFormatError(path, line, "impressions", "a click-out needs its hotel ids, separated by |")
            if len(impressions) > max_items:
                raise DataFormatError(path, line, "impressions", f"{len(impressions)} hotels, more than {max_items}")
            seen = Counter(impressions)
            twice = [i for i, c in seen.items() if c > 1]
            if twice:
                raise DataFormatError(path, line, "impressions", f"hotel {twice[0]} is listed twice")
            prices = None
            if row["prices"]:
                parts = row["prices"].split("|")
                if len(parts) != len(impressions):
                    raise DataFormatError(
                        path, line, "prices", f"{len(parts)} prices for {len(impressions)} impressions"
                    )
                try:
                    prices = [float(p) for p in parts]
                except ValueError:
                    raise DataFormatError(path, line, "prices", "expected numbers separated by |") from None
                if not all(math.isfinite(p) and p >= 0 for p in prices):
                    raise DataFormatError(path, line, "prices", "expected finite, non-negative prices")
            entry["impressions"], entry["prices"] = impressions, prices
        sessions.setdefault(row["session_id"], []).append((step, line, entry))
    lists, dropped = [], 0
    for rows in sessions.values():
        earlier: list[str] = []
        for _, _, entry in sorted(rows, key=lambda r: (r[0], r[1])):
            if entry["action_type"] == CLICKOUT:
                if entry["reference"] in entry["impressions"]:
                    lists.append({**entry, "history": list(earlier)})
                else:
                    dropped += 1
            if entry["action_type"] in ITEM_ACTIONS and entry["reference"]:
                earlier.append(entry["reference"])
    return lists, dropped


def build(
    src: Path, seed: int, fractions: Mapping[str, float], max_hist: int = 50, max_items: int = MAX_ITEMS
) -> ListTable:
    src = Path(src)
    metadata = read_metadata(_find(src, "item_metadata.csv"))
    lists, dropped = read_clickouts(_find(src, "train.csv"), max_items)
    if not lists:
        raise DataFormatError(_find(src, "train.csv"), None, None, "no click-out whose hotel is among its impressions")

    item_index = first_seen_ids(i for entry in lists for i in entry["impressions"])
    for entry in lists:
        for i in entry["history"]:
            item_index.setdefault(i, len(item_index) + 1)
    n_item_ids = len(item_index) + 1
    # stars and rating tiers as sparse fields; the most frequent other properties as a multi-hot
    counts = Counter(p for props in metadata.values() for p in props if p not in STARS and p not in RATINGS)
    top = [p for p, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_PROPERTIES]]
    star = np.zeros(n_item_ids, dtype=np.int64)
    rating = np.zeros(n_item_ids, dtype=np.int64)
    star[1:], rating[1:] = 1, 1  # 1 = unknown
    multi_hot = np.zeros((n_item_ids, len(top)), dtype=np.float32)
    n_props = np.zeros(n_item_ids, dtype=np.float32)
    known = np.zeros(n_item_ids, dtype=bool)
    top_index = {p: k for k, p in enumerate(top)}
    for hotel, idx in item_index.items():
        props = metadata.get(hotel)
        if props is None:
            continue
        known[idx], n_props[idx] = True, len(props)
        for p in props:
            if p in STARS:
                star[idx] = STARS.index(p) + 2
            elif p in RATINGS:
                rating[idx] = max(rating[idx], RATINGS.index(p) + 2)  # the best tier it is listed under
            elif p in top_index:
                multi_hot[idx, top_index[p]] = 1.0

    lengths = np.array([len(e["impressions"]) for e in lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = int(offsets[-1])
    row_item = np.fromiter((item_index[i] for e in lists for i in e["impressions"]), dtype=np.int64, count=rows)
    label = np.fromiter(
        (float(i == e["reference"]) for e in lists for i in e["impressions"]), dtype=np.float32, count=rows
    )
    position = np.concatenate([np.arange(n) for n in lengths]).astype(np.float32)
    price = np.fromiter(
        (p for e in lists for p in (e["prices"] or [math.nan] * len(e["impressions"]))), dtype=np.float64, count=rows
    )
    has_price = np.isfinite(price)
    row_list = np.repeat(np.arange(len(lists)), lengths)

    histories = [np.array([item_index[i] for i in e["history"]], dtype=np.int64) for e in lists]
    kept = [h[-max_hist:] if max_hist > 0 else h[:0] for h in histories]
    hist_offsets = np.concatenate([[0], np.cumsum([len(h) for h in kept])]).astype(np.int64)
    hist_item = np.concatenate(kept) if kept else np.zeros(0, np.int64)

    session_index = first_seen_ids(e["session_id"] for e in lists)
    splits = group_splits(np.array([session_index[e["session_id"]] for e in lists]), fractions, seed)
    stats = item_statistics(row_item, label, row_list, n_item_ids, splits, seed, histories)

    dense = np.concatenate(
        [
            np.stack(
                [
                    np.log1p(stats.impressions),
                    np.log1p(stats.clicks),
                    stats.ctr,
                    np.log1p(stats.history_count[row_item]),
                    position,
                    np.where(has_price, np.log1p(np.nan_to_num(price)), 0.0),
                    has_price.astype(np.float64),
                    known[row_item].astype(np.float64),
                    n_props[row_item],
                ],
                axis=1,
            ),
            multi_hot[row_item],
        ],
        axis=1,
    ).astype(np.float32)

    users = first_seen_ids(e["user_id"] for e in lists)
    platforms = first_seen_ids([UNKNOWN] + [e["platform"] or UNKNOWN for e in lists])
    devices = first_seen_ids([UNKNOWN] + [e["device"] or UNKNOWN for e in lists])
    user_sparse = np.array(
        [[users[e["user_id"]], platforms[e["platform"] or UNKNOWN], devices[e["device"] or UNKNOWN]] for e in lists],
        dtype=np.int64,
    )
    star_vocab = [PAD, UNKNOWN, *STARS]
    rating_vocab = [PAD, UNKNOWN, *RATINGS]
    schema = Schema(
        item_sparse=(
            SparseField("item_id", n_item_ids),
            SparseField("stars", len(star_vocab)),
            SparseField("rating", len(rating_vocab)),
        ),
        item_dense=(
            "log_impressions",
            "log_clicks",
            "ctr",
            "log_history_count",
            "logged_position",
            "log_price",
            "has_price",
            "has_metadata",
            "n_properties",
            *(f"property:{p}" for p in top),
        ),
        user_sparse=(
            SparseField("user_id", len(users) + 1),
            SparseField("platform", len(platforms) + 1),
            SparseField("device", len(devices) + 1),
        ),
        user_hist=(
            SparseField("item_id", n_item_ids),
            SparseField("stars", len(star_vocab)),
            SparseField("rating", len(rating_vocab)),
        ),
    )
    return ListTable(
        offsets=offsets.astype(np.int64),
        item_sparse=np.stack([row_item, star[row_item], rating[row_item]], axis=1),
        item_dense=dense,
        label=label,
        user_sparse=user_sparse,
        hist_offsets=hist_offsets,
        user_hist=np.stack([hist_item, star[hist_item], rating[hist_item]], axis=1).reshape(-1, 3),
        schema=schema,
        splits=splits,
        vocabs={
            "item_id": [PAD, *item_index],
            "stars": star_vocab,
            "rating": rating_vocab,
            "user_id": [PAD, *users],
            "platform": [PAD, *platforms],
            "device": [PAD, *devices],
        },
        info={
            "n_dropped": dropped,
            "n_sessions": len(session_index),
            "stat_split": stats.stat_split,
            "stat_folds": STAT_FOLDS,
            "hotels_with_metadata": int(known[1:].sum()),
            "lists_with_prices": int(sum(e["prices"] is not None for e in lists)),
            "properties": top,
            "max_hist": max_hist,
            "global_ctr_fit": stats.global_ctr,
            "time_range": [min(e["timestamp"] for e in lists), max(e["timestamp"] for e in lists)],
        },
    )
