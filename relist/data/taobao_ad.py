"""Taobao "Ad Display/Click Data on Taobao.com" (Tianchi dataId 56) with LibRerank's list construction.

Raw files in ``--src``: raw_sample.csv (user, time_stamp, adgroup_id, pid, nonclk, clk),
ad_feature.csv (adgroup_id, cate_id, campaign_id, customer, brand, price) and user_profile.csv
(userid + 8 profile columns), each with a header line.

Lists, as LibRerank's preprocessing builds them: users with more than 2 impressions and at least one
click; each user's records newest first (ties keep file order); a window is the records at most
``window_seconds`` older than its newest record (inclusive); starting from the newest record, a
window without a click is skipped and the next window starts at the first record outside it; the
first window with a click is kept, cut to its ``keep_last`` *oldest* records (LibRerank keeps the last
30 entries of the newest-first window) and stored oldest first. One list per user; label = clk. The
cut can drop the window's clicks, so a few lists have none, as in LibRerank.

Features: item sparse [adgroup, category, campaign, customer, brand], item dense [price] (raw, as
LibRerank), user sparse [user id + the 8 profile columns]. Missing values ("NULL" brands, empty
profile cells, users without a profile row, ads without a feature row) are their own "<missing>"
category. Integers are ASCII numbers within Int64 and prices finite ASCII numbers, as polars reads them; an
adgroup id repeated in ad_feature.csv is refused with both lines. Deviation: ids are re-indexed per field
from 1 (LibRerank shares one counter across fields).

Everything runs vectorised on polars and NumPy; the window walk uses pointer doubling, so 26.6M
records prepare in minutes on two cores.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl

from relist.data.errors import DataFormatError
from relist.data.store import ListTable, Schema, SparseField, random_splits

SAMPLE_COLUMNS = ("user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk")
AD_COLUMNS = ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price")
PROFILE_COLUMNS = (
    "userid",
    "cms_segid",
    "cms_group_id",
    "final_gender_code",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
    "new_user_class_level",
)
MISSING = "<missing>"
PAD = "<pad>"
# what polars reads as an integer: ASCII digits, a sign and leading spaces (str.isdigit also takes Unicode
# digits such as '٣', which polars refuses: those lines then surfaced as polars' own error, without the line)
_INTEGER = re.compile(r"[ \t]*[+-]?[0-9]+")
_PADDED_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")  # user_profile.csv's ids are stripped before they are read
# what polars reads as a float: ASCII digits only, as the integers (float() also takes '١٢', '1_0' and '12 ')
_NUMBER = re.compile(r"[ \t]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[ \t]*[+-]?(?:inf|infinity|nan)", re.IGNORECASE)
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _shown(cell: str, limit: int = 60) -> str:
    """A cell for a message: its repr, cut to ``limit`` characters (a cell can be megabytes long)."""
    return repr(cell) if len(cell) <= limit else f"{cell[:limit]!r}... ({len(cell)} characters)"


def _cells(path: Path, line: int, text: str) -> list[str]:
    """The CSV cells of one line; csv's field size limit (128 KiB, process-wide) is raised for the call to
    the line's length, as polars reads fields of any length."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        return next(csv.reader([text]))
    except csv.Error as err:
        raise DataFormatError(path, line, None, f"not a CSV line ({err})") from None
    finally:
        csv.field_size_limit(limit)


def _fits_int64(cell: str) -> bool:
    """Whether an integer cell polars reads (sign, digits, spaces) is within Int64 (leading zeros allowed)."""
    text = cell.strip()
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > 19:
        return False
    value = -int(digits) if text.startswith("-") else int(digits)
    return _INT64[0] <= value <= _INT64[1]


def _check_header(path: Path, expected: tuple[str, ...]) -> None:
    with open(path, "rb") as handle:
        raw = handle.readline()
    try:
        header = [h.strip() for h in raw.decode("utf-8-sig").rstrip("\r\n").split(",")]  # -sig: a BOM is dropped
    except UnicodeDecodeError:
        raise DataFormatError(path, 1, None, "header is not valid UTF-8") from None
    if header != list(expected):
        raise DataFormatError(path, 1, None, f"expected header {','.join(expected)}, found {','.join(header)}")


def _locate(
    path: Path,
    columns: tuple[str, ...],
    integer: tuple[str, ...],
    number: tuple[str, ...] = (),
    binary: tuple[str, ...] = (),
    padded: bool = False,
) -> None:
    """Scan ``path`` line by line and raise a DataFormatError at the first bad line (slow path, on error only);
    blank lines are skipped, as the fast path drops them. ``padded``: integers may have spaces around them."""
    integer_form = _PADDED_INTEGER if padded else _INTEGER
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if line == 1 or not raw.strip():
                continue
            ended = raw.endswith(b"\n")
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                field = columns[min(raw[: err.start].count(b","), len(columns) - 1)]
                raise DataFormatError(path, line, field, "not valid UTF-8") from None
            cells = _cells(path, line, text)
            if len(cells) != len(columns):
                hint = " (the last line has no newline: is the file truncated?)" if not ended else ""
                raise DataFormatError(
                    path,
                    line,
                    None,
                    f"expected {len(columns)} comma-separated fields ({','.join(columns)}), found {len(cells)}{hint}",
                )
            for name, cell in zip(columns, cells):
                if name in integer:
                    if not integer_form.fullmatch(cell):
                        raise DataFormatError(
                            path, line, name, f"expected an integer (ASCII digits), found {_shown(cell)}"
                        )
                    if not _fits_int64(cell):
                        raise DataFormatError(path, line, name, f"integer out of the 64-bit range: {_shown(cell)}")
                if name in binary and cell.strip() not in ("0", "1"):
                    raise DataFormatError(path, line, name, f"expected 0 or 1, found {_shown(cell)}")
                if name in number:
                    if _NON_FINITE.fullmatch(cell) or (_NUMBER.fullmatch(cell) and not math.isfinite(float(cell))):
                        raise DataFormatError(path, line, name, f"expected a finite number, found {_shown(cell)}")
                    if not _NUMBER.fullmatch(cell):
                        raise DataFormatError(
                            path, line, name, f"expected a number (ASCII digits), found {_shown(cell)}"
                        )


def _refuse_repeats(path: Path, frame: pl.DataFrame, columns: tuple[str, ...], key: str) -> None:
    """Raise a DataFormatError naming the first line whose ``key`` repeats an earlier line's, and that line
    (rows are found by polars; their lines by a scan of the file, as blank lines are not rows)."""
    if not frame[key].is_duplicated().any():
        return
    seen: dict[int, int] = {}
    column = columns.index(key)
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if line == 1 or not raw.strip():
                continue
            text = raw.decode("utf-8").rstrip("\r\n")  # polars read the file: it is valid UTF-8
            value = int(_cells(path, line, text)[column])
            if value in seen:
                raise DataFormatError(path, line, key, f"{value} repeats line {seen[value]}")
            seen[value] = line
    raise DataFormatError(path, None, key, "a value repeats an earlier row's")  # not reached: polars saw one


def _unreadable(path: Path, err: Exception) -> DataFormatError:
    """What polars could not read, when no line was found at fault: the file and polars' first line."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataFormatError(path, None, None, f"cannot be read as CSV: {first}")


def _trailing_blank_lines(path: Path, window: int = 1 << 16) -> int:
    """How many blank lines end the file (counted in its last ``window`` bytes)."""
    with open(path, "rb") as handle:
        handle.seek(max(0, handle.seek(0, 2) - window))
        pieces = handle.read().split(b"\n")
    count = 0
    for piece in reversed(pieces[:-1]):  # the piece after the last newline is not a line
        if piece.strip():
            break
        count += 1
    return count


def _drop_blank_lines(path: Path, frame: pl.DataFrame) -> pl.DataFrame:
    """The frame without the rows of blank lines (every cell null). Rows of empty cells that are not blank
    lines (",,,") are kept, so that the checks of required fields name their line."""
    blank = frame.select(pl.all_horizontal(pl.all().is_null())).to_series()
    n = int(blank.sum())
    if n == 0:
        return frame
    if bool(blank.tail(n).all()) and _trailing_blank_lines(path) >= n:  # the usual case: blank lines at the end
        return frame.head(frame.height - n)
    with open(path, "rb") as handle:
        blank_lines = sum(1 for raw in handle if not raw.strip())
    return frame.filter(~blank) if blank_lines == n else frame


def _read(path: Path, columns: tuple[str, ...], schema: dict, integer=(), number=(), binary=()) -> pl.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent}: no {path.name} (the Taobao Ad raw files are raw_sample.csv, ad_feature.csv, "
            "user_profile.csv)"
        )
    _check_header(path, columns)
    try:
        frame = pl.read_csv(
            path,
            has_header=True,
            new_columns=list(columns),
            schema_overrides=schema,
            infer_schema_length=0 if not schema else 100,
            encoding="utf8",
            null_values=[""],
        )
    except Exception as err:  # noqa: BLE001 - polars raises several types; find and name the line ourselves
        _locate(path, columns, integer, number, binary)
        raise _unreadable(path, err) from err
    frame = _drop_blank_lines(path, frame)
    required = [c for c in integer + number + binary if c in frame.columns]
    bad = (
        frame.with_row_index("_row").filter(pl.any_horizontal([pl.col(c).is_null() for c in required]))
        if required
        else frame.clear()
    )
    if bad.height:
        _locate(path, columns, integer, number, binary)
        row = int(bad["_row"][0])
        raise DataFormatError(path, row + 2, None, "missing value in a required field")
    if number:
        bad = frame.with_row_index("_row").filter(pl.any_horizontal([~pl.col(c).is_finite() for c in number]))
        if bad.height:
            _locate(path, columns, integer, number, binary)  # names the line of the first NaN or infinity
            column = next(c for c in number if not math.isfinite(bad[c][0]))
            raise DataFormatError(
                path, int(bad["_row"][0]) + 2, column, f"expected a finite number, found {bad[column][0]}"
            )
    if binary:
        bad = frame.with_row_index("_row").filter(pl.any_horizontal([~pl.col(c).is_in([0, 1]) for c in binary]))
        if bad.height:
            row = int(bad["_row"][0])
            column = next(c for c in binary if bad[c][0] not in (0, 1))
            raise DataFormatError(path, row + 2, column, f"expected 0 or 1, found {bad[column][0]}")
    return frame


def build_windows(
    user: np.ndarray, ts: np.ndarray, clk: np.ndarray, window_seconds: int, keep_last: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (into the given arrays) of each user's list, oldest first, and the list offsets.

    Inputs are sorted by user, then time newest first, and hold only users with a click.
    """
    n = len(user)
    boundary = np.flatnonzero(np.diff(user)) + 1
    starts = np.concatenate([[0], boundary])
    ends = np.concatenate([boundary, [n]])
    user_code = np.repeat(np.arange(len(starts)), ends - starts)
    age = ts.max() - ts  # ascending within a user
    shift = int(age.max()) + window_seconds + 1
    key = user_code.astype(np.int64) * shift + age  # sorted ascending
    window_end = np.searchsorted(key, key + window_seconds, side="right")  # first record more than window_seconds older
    clicks_before = np.concatenate([[0], np.cumsum(clk, dtype=np.int64)])
    has_click = clicks_before[window_end] - clicks_before[np.arange(n)] > 0
    user_end = np.repeat(ends, ends - starts)
    jump = np.where(has_click | (window_end >= user_end), np.arange(n), window_end)
    while True:  # pointer doubling: every record jumps to the first clicked window at or after it
        nxt = jump[jump]
        if np.array_equal(nxt, jump):
            break
        jump = nxt
    first = jump[starts]
    last = window_end[first]
    lengths = np.minimum(last - first, keep_last)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    rows = np.repeat(last - 1, lengths) - within  # oldest of the kept records first
    return rows, offsets


def _index(values: pl.Series) -> tuple[np.ndarray, list[str]]:
    """Ids from 1 for the distinct values (sorted); missing values become the '<missing>' category."""
    values = values.cast(pl.Utf8).fill_null(MISSING)
    vocab = values.unique().sort()
    mapping = pl.DataFrame({"v": vocab, "id": np.arange(1, len(vocab) + 1, dtype=np.int64)})
    ids = pl.DataFrame({"v": values}).join(mapping, on="v", how="left", maintain_order="left")["id"].to_numpy()
    return ids, [PAD] + vocab.to_list()


def build(
    src: Path, seed: int, fractions: Mapping[str, float], window_seconds: int = 300, keep_last: int = 30
) -> ListTable:
    src = Path(src)
    sample = _read(
        src / "raw_sample.csv",
        SAMPLE_COLUMNS,
        {
            "user": pl.Int64,
            "time_stamp": pl.Int64,
            "adgroup_id": pl.Int64,
            "pid": pl.Utf8,
            "nonclk": pl.Int64,
            "clk": pl.Int64,
        },
        integer=("user", "time_stamp", "adgroup_id"),
        binary=("nonclk", "clk"),
    )
    sample = (
        sample.select("user", "time_stamp", "adgroup_id", "clk")
        .with_row_index("row")
        .filter((pl.len().over("user") > 2) & (pl.col("clk").sum().over("user") > 0))
        .sort(["user", "time_stamp", "row"], descending=[False, True, False])
    )
    if sample.height == 0:
        raise DataFormatError(src / "raw_sample.csv", None, None, "no user has more than 2 impressions and a click")
    rows, offsets = build_windows(
        sample["user"].to_numpy(), sample["time_stamp"].to_numpy(), sample["clk"].to_numpy(), window_seconds, keep_last
    )
    lists = sample[rows].select("user", "adgroup_id", "clk")
    first = offsets[:-1]

    ads = _read(
        src / "ad_feature.csv",
        AD_COLUMNS,
        {
            "adgroup_id": pl.Int64,
            "cate_id": pl.Utf8,
            "campaign_id": pl.Utf8,
            "customer": pl.Utf8,
            "brand": pl.Utf8,
            "price": pl.Float64,
        },
        integer=("adgroup_id",),
        number=("price",),
    )
    _refuse_repeats(src / "ad_feature.csv", ads, AD_COLUMNS, "adgroup_id")  # else the file's order picks the features
    items = lists.join(ads, on="adgroup_id", how="left", maintain_order="left")
    if not (src / "user_profile.csv").is_file():
        raise FileNotFoundError(f"{src}: no user_profile.csv")
    _check_header(src / "user_profile.csv", PROFILE_COLUMNS)
    try:
        profile = pl.read_csv(
            src / "user_profile.csv",
            has_header=True,
            new_columns=list(PROFILE_COLUMNS),
            infer_schema_length=0,
            null_values=[""],
        )
    except Exception as err:  # noqa: BLE001 - as in _read: name the line, or at least the file
        _locate(src / "user_profile.csv", PROFILE_COLUMNS, integer=("userid",), padded=True)
        raise _unreadable(src / "user_profile.csv", err) from err
    profile = _drop_blank_lines(src / "user_profile.csv", profile)
    profile = profile.with_columns(pl.col("userid").str.strip_chars().cast(pl.Int64, strict=False))
    if profile["userid"].null_count():
        _locate(src / "user_profile.csv", PROFILE_COLUMNS, integer=("userid",), padded=True)
        row = int(profile.with_row_index("_r").filter(pl.col("userid").is_null())["_r"][0])
        raise DataFormatError(src / "user_profile.csv", row + 2, "userid", "expected an integer")
    _refuse_repeats(src / "user_profile.csv", profile, PROFILE_COLUMNS, "userid")  # else the first row won
    users = (
        lists[first]
        .select("user")
        .join(
            profile.rename({"userid": "user"}),
            on="user",
            how="left",
            maintain_order="left",
        )
    )

    item_fields = (
        ("item_id", "adgroup_id"),
        ("category", "cate_id"),
        ("campaign", "campaign_id"),
        ("customer", "customer"),
        ("brand", "brand"),
    )
    vocabs, item_cols, item_schema = {}, [], []
    for name, column in item_fields:
        ids, vocab = _index(items[column])
        item_cols.append(ids)
        vocabs[name] = vocab
        item_schema.append(SparseField(name, len(vocab)))
    user_cols, user_schema = [], []
    for name, column in (("user_id", "user"),) + tuple((c, c) for c in PROFILE_COLUMNS[1:]):
        ids, vocab = _index(users[column].cast(pl.Utf8).str.strip_chars())
        user_cols.append(ids)
        vocabs[name] = vocab
        user_schema.append(SparseField(name, len(vocab)))
    n_lists = len(offsets) - 1
    return ListTable(
        offsets=offsets.astype(np.int64),
        item_sparse=np.stack(item_cols, axis=1),
        item_dense=items["price"].fill_null(0.0).to_numpy().astype(np.float32)[:, None],
        label=items["clk"].to_numpy().astype(np.float32),
        user_sparse=np.stack(user_cols, axis=1),
        hist_offsets=np.zeros(n_lists + 1, dtype=np.int64),
        user_hist=np.zeros((0, 0), dtype=np.int64),
        schema=Schema(tuple(item_schema), ("price",), tuple(user_schema), ()),
        splits=random_splits(n_lists, fractions, seed),
        vocabs=vocabs,
        info={
            "window_seconds": window_seconds,
            "keep_last": keep_last,
            "raw_records": int(sample.height),
            "ads_without_features": int(items["cate_id"].null_count()),
        },
    )
