"""MIND (Microsoft News Dataset): behaviors.tsv + news.tsv -> one list per impression.

behaviors.tsv: ``impression_id  user_id  time  history  impressions``, where history is the user's
clicked news ids (oldest first) and impressions are ``N123-1 N456-0 ...`` in logged order.
news.tsv: ``news_id  category  subcategory  title  abstract  url  title_entities  abstract_entities``.
The same reader serves the 5k subset, MIND-small and MIND-large.

Features
- user sparse: user id; history: the last ``max_hist`` clicked items with their category and
  subcategory ("<unknown>" where news.tsv does not cover the item).
- item sparse: item id, category, subcategory.
- item dense: log impressions, log clicks and a smoothed CTR of the item, and the log count of the item
  in users' histories, from the ``ranker`` split only and out of fold within it
  (``relist.data.item_stats``: no row's own label enters its own features).
  Plus the share of the user's history in the item's category and subcategory, and whether news.tsv
  covers the item.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Mapping

import numpy as np

from relist.data.errors import DataFormatError, read_lines, split_fields
from relist.data.item_stats import STAT_FOLDS, item_statistics
from relist.data.store import ListTable, Schema, SparseField, first_seen_ids, random_splits

BEHAVIOR_FIELDS = ("impression_id", "user_id", "time", "history", "impressions")
MAX_ITEMS = 1000  # the longest impression accepted by default (the 5k subset's longest: 283 items)
MAX_HISTORY = 1000  # history items read per impression by default (the 5k subset's longest: 425)
MAX_ID_CHARS = 256  # as the service's --max-id-chars (the 5k subset's longest id: a subcategory of 31 characters)
NEWS_FIELDS = ("news_id", "category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities")
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
UNKNOWN = "<unknown>"
PAD = "<pad>"
_TOKEN = re.compile(r"^(\S+)-(\S*)$")
_WORD = re.compile(rb"\S+")


def _more_words_than(raw: bytes, start: int, limit: int) -> bool:
    """Whether ``raw[start:]`` holds more than ``limit`` whitespace-separated words, found without copying
    or splitting the line (a 50 MB line of five million items is refused in well under a second)."""
    if raw.count(b" ", start) < limit:  # n words need at least n - 1 separators
        return False
    for count, _ in enumerate(_WORD.finditer(raw, start), start=1):
        if count > limit:
            return True
    return False


def _find(src: Path, name: str) -> Path:
    path = src / name
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no {name} (expected MIND's behaviors.tsv and news.tsv in this folder)")
    return path


def _too_long(path: Path, line: int, field: str, value: str, limit: int, what: str = "an id") -> None:
    if len(value) > limit:
        raise DataFormatError(
            path, line, field, f"{what} of {len(value)} characters, more than the limit of {limit} (--max-id-chars)"
        )


def read_news(path: Path, max_id_chars: int = MAX_ID_CHARS) -> dict[str, tuple[str, str]]:
    """news id -> (category, subcategory). A news id seen twice is refused with both lines (which row's
    category would hold is otherwise the file's order), and a news id, category or subcategory longer than
    ``max_id_chars`` with its line."""
    news: dict[str, tuple[str, str]] = {}
    lines: dict[str, int] = {}
    for line, raw, ended in read_lines(path):
        if not raw.strip():
            continue
        fields = split_fields(path, line, raw, NEWS_FIELDS, b"\t", ended)
        if not fields[0]:
            raise DataFormatError(path, line, "news_id", "empty news id")
        if fields[0] in lines:
            raise DataFormatError(path, line, "news_id", f"{fields[0]} repeats line {lines[fields[0]]}")
        for k in range(3):  # news_id, category, subcategory: the ids of the dataset's vocabularies
            _too_long(path, line, NEWS_FIELDS[k], fields[k], max_id_chars)
        lines[fields[0]] = line
        news[fields[0]] = (fields[1] or UNKNOWN, fields[2] or UNKNOWN)
    return news


def read_behaviors(
    path: Path, max_items: int = MAX_ITEMS, max_history: int = MAX_HISTORY, max_id_chars: int = MAX_ID_CHARS
):
    """Parse behaviors.tsv into per-impression users, times, histories, items, labels and the number of
    histories cut.

    An impression id seen twice, an impression of more than ``max_items`` items, or a user or news id of
    more than ``max_id_chars`` characters is refused with its line (and the first line of a repeated id): a
    repeated id could fall into two splits, a line of thousands of items is far more likely a corrupt file
    than an impression, and the service refuses longer ids. A history longer than ``max_history`` keeps its
    newest clicks (``relist.data.prepare`` says why); only the kept ones are held to ``max_id_chars``."""
    users, times, histories, items, labels = [], [], [], [], []
    cut = 0
    seen: dict[str, int] = {}
    for line, raw, ended in read_lines(path):
        if not raw.strip():
            continue
        if raw.count(b"\t") == len(BEHAVIOR_FIELDS) - 1 and _more_words_than(raw, raw.rfind(b"\t") + 1, max_items):
            entries = raw.count(b" ", raw.rfind(b"\t") + 1) + 1
            raise DataFormatError(
                path,
                line,
                "impressions",
                f"more than {max_items} items, the limit (--max-items): {entries} space-separated entries",
            )
        impression_id, user, time, history, impressions = split_fields(path, line, raw, BEHAVIOR_FIELDS, b"\t", ended)
        key = impression_id.strip()
        if not (key.isascii() and key.isdigit()):  # str.isdigit alone takes other scripts' digits and '²'
            raise DataFormatError(path, line, "impression_id", f"expected an integer, found {impression_id!r}")
        key = key.lstrip("0") or "0"  # '03' and '3' are the same impression (int() refuses 4,301 digits)
        if key in seen:
            raise DataFormatError(path, line, "impression_id", f"{key} repeats line {seen[key]}")
        seen[key] = line
        if not user.strip():
            raise DataFormatError(path, line, "user_id", "empty user id")
        _too_long(path, line, "user_id", user.strip(), max_id_chars)
        try:
            stamp = datetime.strptime(time.strip(), TIME_FORMAT).timestamp()
        except ValueError:
            raise DataFormatError(path, line, "time", f"cannot parse {time!r} as {TIME_FORMAT!r}") from None
        tokens = impressions.split()
        if not tokens:
            raise DataFormatError(path, line, "impressions", "empty list: an impression needs at least one item")
        if len(tokens) > max_items:  # words the byte count above does not split on (Unicode spaces)
            raise DataFormatError(
                path, line, "impressions", f"more than {max_items} items, the limit (--max-items): {len(tokens)}"
            )
        row_items, row_labels = [], []
        for position, token in enumerate(tokens, start=1):
            match = _TOKEN.match(token)
            if match is None or match.group(2) not in ("0", "1"):
                hint = " (the last line has no newline: is the file truncated?)" if not ended else ""
                raise DataFormatError(
                    path,
                    line,
                    "impressions",
                    f"item {position} {token!r}: expected NEWSID-LABEL with label 0 or 1{hint}",
                )
            _too_long(path, line, "impressions", match.group(1), max_id_chars, f"item {position}: an id")
            row_items.append(match.group(1))
            row_labels.append(match.group(2) == "1")
        clicked = history.rsplit(None, max_history)  # the newest max_history, and the rest unsplit before them
        if len(clicked) > max_history:
            clicked, cut = clicked[1:], cut + 1
        if clicked and max(map(len, clicked)) > max_id_chars:
            _too_long(path, line, "history", max(clicked, key=len), max_id_chars, "a clicked item's id")
        users.append(user.strip())
        times.append(stamp)
        histories.append(clicked)
        items.append(row_items)
        labels.append(row_labels)
    if not items:
        raise DataFormatError(path, None, None, "no impressions in the file")
    return users, np.array(times), histories, items, labels, cut


def build(
    src: Path,
    seed: int,
    fractions: Mapping[str, float],
    max_hist: int = 50,
    max_items: int = MAX_ITEMS,
    max_history: int = MAX_HISTORY,
    max_id_chars: int = MAX_ID_CHARS,
) -> ListTable:
    src = Path(src)
    news = read_news(_find(src, "news.tsv"), max_id_chars)
    users, times, histories, items, labels, cut = read_behaviors(
        _find(src, "behaviors.tsv"), max_items, max_history, max_id_chars
    )

    item_index = first_seen_ids(i for row in items for i in row)
    for row in histories:
        for i in row:
            item_index.setdefault(i, len(item_index) + 1)
    user_index = first_seen_ids(users)
    categories = [UNKNOWN] + sorted({c for c, _ in news.values()} - {UNKNOWN})
    subcategories = [UNKNOWN] + sorted({s for _, s in news.values()} - {UNKNOWN})
    cat_id = {c: k + 1 for k, c in enumerate(categories)}
    sub_id = {s: k + 1 for k, s in enumerate(subcategories)}
    n_item_ids = len(item_index) + 1
    item_cat = np.ones(n_item_ids, dtype=np.int64)  # 1 = unknown
    item_sub = np.ones(n_item_ids, dtype=np.int64)
    item_cat[0] = item_sub[0] = 0
    known = np.zeros(n_item_ids, dtype=bool)
    for news_id, idx in item_index.items():
        if news_id in news:
            c, s = news[news_id]
            item_cat[idx], item_sub[idx], known[idx] = cat_id[c], sub_id[s], True

    lengths = np.array([len(r) for r in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    row_item = np.fromiter((item_index[i] for r in items for i in r), dtype=np.int64, count=int(offsets[-1]))
    label = np.fromiter((b for r in labels for b in r), dtype=np.float32, count=int(offsets[-1]))
    row_list = np.repeat(np.arange(len(items)), lengths)

    hist_rows = [[item_index[i] for i in h[-max_hist:]] if max_hist > 0 else [] for h in histories]
    hist_lengths = np.array([len(h) for h in hist_rows], dtype=np.int64)
    hist_offsets = np.concatenate([[0], np.cumsum(hist_lengths)])
    hist_item = np.fromiter((i for h in hist_rows for i in h), dtype=np.int64, count=int(hist_offsets[-1]))
    full_hist_item = [np.fromiter((item_index[i] for i in h), dtype=np.int64, count=len(h)) for h in histories]

    splits = random_splits(len(items), fractions, seed)
    stats = item_statistics(row_item, label, row_list, n_item_ids, splits, seed, full_hist_item)
    imp_row, click_row, ctr_row, hist_pop = stats.impressions, stats.clicks, stats.ctr, stats.history_count

    # Share of the user's history in the item's (sub)category, among history items whose category is known.
    def affinity(table: np.ndarray) -> np.ndarray:
        out = np.zeros(len(row_item), dtype=np.float64)
        for k, h in enumerate(full_hist_item):
            h_known = table[h][known[h]]
            if len(h_known) == 0:
                continue
            rows = slice(offsets[k], offsets[k + 1])
            values, freq = np.unique(h_known, return_counts=True)
            share = dict(zip(values.tolist(), (freq / len(h_known)).tolist()))
            out[rows] = [share.get(c, 0.0) for c in table[row_item[rows]].tolist()]
        return out

    dense = np.stack(
        [
            np.log1p(imp_row),
            np.log1p(click_row),
            ctr_row,
            np.log1p(hist_pop[row_item]),
            affinity(item_cat),
            affinity(item_sub),
            known[row_item].astype(np.float64),
        ],
        axis=1,
    ).astype(np.float32)

    id_vocab = [PAD] + list(item_index)
    schema = Schema(
        item_sparse=(
            SparseField("item_id", n_item_ids),
            SparseField("category", len(categories) + 1),
            SparseField("subcategory", len(subcategories) + 1),
        ),
        item_dense=(
            "log_impressions",
            "log_clicks",
            "ctr",
            "log_history_count",
            "category_affinity",
            "subcategory_affinity",
            "has_metadata",
        ),
        user_sparse=(SparseField("user_id", len(user_index) + 1),),
        user_hist=(
            SparseField("item_id", n_item_ids),
            SparseField("category", len(categories) + 1),
            SparseField("subcategory", len(subcategories) + 1),
        ),
    )
    return ListTable(
        offsets=offsets.astype(np.int64),
        item_sparse=np.stack([row_item, item_cat[row_item], item_sub[row_item]], axis=1),
        item_dense=dense,
        label=label,
        user_sparse=np.array([user_index[u] for u in users], dtype=np.int64)[:, None],
        hist_offsets=hist_offsets.astype(np.int64),
        user_hist=np.stack([hist_item, item_cat[hist_item], item_sub[hist_item]], axis=1).reshape(-1, 3),
        schema=schema,
        splits=splits,
        vocabs={
            "item_id": id_vocab,
            "category": [PAD] + categories,
            "subcategory": [PAD] + subcategories,
            "user_id": [PAD] + list(user_index),
        },
        info={
            "stat_split": stats.stat_split,
            "stat_folds": STAT_FOLDS,
            "items_with_metadata": int(known[1:].sum()),
            "time_range": [float(times.min()), float(times.max())],
            "max_hist": max_hist,
            "global_ctr_fit": stats.global_ctr,
            "histories_cut": cut,
        },
    )
