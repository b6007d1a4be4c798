"""LibRerank's processed files, so its users can bring what they already have.

``--src`` holds data.train, data.valid, data.test and data.stat. Each data line is five tab-separated
literals ``uid  profile  spar_ft  dens_ft  label`` (the Ad files nest the profile as ``[[...]]``);
data.stat is JSON with item_num, ft_num, profile_fnum, itm_spar_fnum, itm_dens_fnum and the counts.
LibRerank's ids already share one id space (1 .. ft_num - 1), so they are kept as they are.

Splits: data.train -> ``ranker`` (LibRerank trains the initial ranker on it), data.valid -> ``train``
(LibRerank's re-ranker training file) except a random ``valid_share`` of it held out as ``valid``
(LibRerank has no validation split and selects models on test; relist never does), data.test -> ``test``.
A line of more than ``max_items`` items is refused with its file and line (``relist.data.prepare`` says why).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from relist.data.errors import DataFormatError, read_lines
from relist.data.prm_public import MAX_ITEMS, table_from_records
from relist.data.records import ListRecords, parse_fields

FIELDS = ("uid", "profile", "spar_ft", "dens_ft", "label")
STAT_KEYS = ("ft_num", "profile_fnum", "itm_spar_fnum", "itm_dens_fnum")


def read_stat(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no data.stat (LibRerank's JSON of feature counts)")
    try:
        stat = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark is not data
    except (ValueError, UnicodeDecodeError) as err:
        raise DataFormatError(path, None, None, f"not valid JSON: {err}") from None
    if not isinstance(stat, dict):
        raise DataFormatError(path, None, None, f"expected a JSON object of feature counts, got {type(stat).__name__}")
    missing = [k for k in STAT_KEYS if k not in stat]
    if missing:
        raise DataFormatError(path, None, missing[0], f"missing key(s) {missing}")
    for key in STAT_KEYS:  # counts: a JSON integer (not "5", 5.0, true or null), none negative
        value = stat[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataFormatError(path, None, key, f"expected a non-negative integer, got {value!r}")
    return stat


def build(src: Path, seed: int, valid_share: float = 0.1, max_items: int = MAX_ITEMS):
    if not 0.0 < valid_share < 1.0:
        raise ValueError(f"valid_share must be in (0, 1), got {valid_share}")
    src = Path(src)
    stat = read_stat(src / "data.stat")
    records: ListRecords | None = None
    ranges = {}
    for name in ("train", "valid", "test"):
        path = src / f"data.{name}"
        if not path.is_file():
            raise FileNotFoundError(f"{src}: no data.{name}")
        current = ListRecords(path)
        if records is not None:
            current.__dict__.update({k: v for k, v in records.__dict__.items() if k != "path"})
        records = current
        start = len(records)
        for line, raw, ended in read_lines(path):
            if not raw.strip():
                continue
            parts = raw.split(b"\t")
            if len(parts) != len(FIELDS):
                hint = " (the last line has no newline: is the file truncated?)" if not ended else ""
                raise DataFormatError(
                    path,
                    line,
                    None,
                    f"expected {len(FIELDS)} tab-separated fields ({', '.join(FIELDS)}), found {len(parts)}{hint}",
                )
            widths = {"spar_ft": stat["itm_spar_fnum"], "dens_ft": stat["itm_dens_fnum"]}  # bound before the parse
            uid, profile, sparse, dense, label = parse_fields(
                path, line, parts, FIELDS, ended, max_items, widths, "the widths data.stat gives"
            )
            records.add(line, uid, profile, sparse, dense, label)
            width = records.widths
            if (width[1], width[2]) != (stat["itm_spar_fnum"], stat["itm_dens_fnum"]):
                raise DataFormatError(
                    path,
                    line,
                    "spar_ft",
                    f"{width[1]} sparse / {width[2]} dense values per item, data.stat says "
                    f"{stat['itm_spar_fnum']} / {stat['itm_dens_fnum']}",
                )
            if int(records.sparse[-1].max()) >= stat["ft_num"] or int(records.sparse[-1].min()) < 0:
                raise DataFormatError(path, line, "spar_ft", f"id outside 0..ft_num-1 = {stat['ft_num'] - 1}")
        ranges[name] = np.arange(start, len(records))
        if len(ranges[name]) == 0:
            raise DataFormatError(path, None, None, "no lists in the file")
    held = np.random.default_rng(seed).random(len(ranges["valid"])) < valid_share
    splits = {
        "ranker": ranges["train"],
        "train": ranges["valid"][~held],
        "valid": ranges["valid"][held],
        "test": ranges["test"],
    }
    info = {"data_stat": stat, "valid_share": valid_share}
    return table_from_records(
        records, seed, splits, info, dense_names=None, reindex_items=False, item_vocab=int(stat["ft_num"])
    )
