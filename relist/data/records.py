"""Shared reading of list-per-line formats whose fields are Python/JSON literals (PRM Public, LibRerank)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from relist.data.errors import DataFormatError


def parse_literal(path: Path, line: int, field: str, text: str, ended: bool = True):
    """A JSON/Python literal (lists of numbers); never ``eval``. Nesting deeper than the parser's recursion
    limit is an error naming the file, line and field."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    except RecursionError:
        raise DataFormatError(
            path, line, field, "lists nested too deeply (a list of numbers per item expected)"
        ) from None
    try:
        return ast.literal_eval(text.strip())
    except RecursionError:
        raise DataFormatError(
            path, line, field, "lists nested too deeply (a list of numbers per item expected)"
        ) from None
    except (ValueError, SyntaxError, MemoryError):
        hint = " (the last line has no newline: is the file truncated?)" if not ended else ""
        raise DataFormatError(path, line, field, f"cannot parse {text[:60]!r} as a list literal{hint}") from None


def parse_fields(
    path: Path,
    line: int,
    parts: list[bytes],
    names: tuple[str, ...],
    ended: bool,
    max_items: int,
    widths: Mapping[str, int] | None = None,
    widths_from: str = "the width of earlier lines",
):
    """The literals of a line's fields, the ``label`` field first: a list of more than ``max_items`` labels is
    refused with its file and line before the (far larger) feature fields are parsed, from its commas when it
    has more than ``max_items`` of them (parsing a million labels took 7 times the line's size).

    ``widths`` (field -> values per item; ``profile`` -> values in all), known from ``widths_from``, bounds
    each field's commas before it is parsed: a field holding more commas than the line's items of that width
    can is refused unparsed (a parsed field takes over 10 times its size)."""
    label_part = parts[names.index("label")]
    if label_part.count(b",") > max_items:  # n labels take n - 1 commas (n with a trailing one)
        raise DataFormatError(
            path,
            line,
            "label",
            f"{label_part.count(b',') + 1} comma-separated entries, more than the limit of {max_items} items "
            "(--max-items)",
        )
    values, n = {}, 0
    for name in ("label", *(n for n in names if n != "label")):
        part = parts[names.index(name)]
        if widths and name in widths and n > 0:  # n = 0: a bad label, refused by ListRecords.add before the rest
            _check_commas(path, line, name, part, n, widths[name], widths_from)
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError:
            raise DataFormatError(path, line, name, "not valid UTF-8") from None
        values[name] = parse_literal(path, line, name, text, ended)
        if name == "label" and isinstance(values[name], list) and len(values[name]) > max_items:
            raise DataFormatError(
                path, line, "label", f"{len(values[name])} items, more than the limit of {max_items} (--max-items)"
            )
        if name == "label":
            n = _clicks(values[name])
    return [values[n] for n in names]


def _clicks(label) -> int:
    """The number of labels of a non-empty list of 0/1 labels, else 0."""
    try:
        labels = np.asarray(label, dtype=np.float64)
    except (ValueError, TypeError):
        return 0
    return len(labels) if labels.ndim == 1 and np.isin(labels, (0.0, 1.0)).all() else 0


def _check_commas(path: Path, line: int, name: str, part: bytes, n: int, width: int, widths_from: str) -> None:
    """Refuse a field with more commas than ``n`` items of ``width`` numbers hold: ``n * width - 1``, or up to
    ``n * (width + 1)`` with trailing commas (``profile``: ``width + 1`` in all). A profile with quotes may
    hold strings, whose commas are not separators: it is left to the parse."""
    if name == "profile":
        if b'"' in part or b"'" in part:
            return
        allowed, what = width + 1, f"a profile of {width} values holds"
    else:
        allowed, what = n * (width + 1), f"{n} items of {width} values each hold"
    commas = part.count(b",")
    if commas > allowed:
        raise DataFormatError(path, line, name, f"{commas} commas, more than {what} ({widths_from})")


class ListRecords:
    """Accumulates validated lists: user key, user sparse values, item sparse rows, item dense rows, labels.

    The number of values per item (and per user) is fixed by the first record; every later record
    must match, or a DataFormatError names the line and field.
    """

    def __init__(self, path: Path):
        self.path = path
        self.users: list = []
        self.profiles: list[list] = []
        self.sparse: list[np.ndarray] = []
        self.dense: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.widths: tuple[int, int, int] | None = None

    def _matrix(self, line: int, field: str, value, n_items: int, dtype) -> np.ndarray:
        try:
            array = np.asarray(value, dtype=dtype)
        except (ValueError, TypeError):
            raise DataFormatError(self.path, line, field, "expected one list of numbers per item") from None
        if array.ndim != 2 or array.shape[0] != n_items:
            raise DataFormatError(
                self.path,
                line,
                field,
                f"expected {n_items} items with a list of numbers each, found shape {array.shape}",
            )
        if dtype is np.float64 and not np.isfinite(array).all():
            raise DataFormatError(self.path, line, field, "non-finite value (nan or inf)")
        return array

    def _ids(self, line: int, value, n_items: int) -> np.ndarray:
        """Sparse ids as exact integers: JSON integers within int64 (through float64, ids above 2**53 merged
        and 1e300 wrapped around); floats, booleans and strings are refused."""
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            raise DataFormatError(self.path, line, "spar_ft", "expected one list of integer ids per item") from None
        if array.ndim != 2 or array.shape[0] != n_items:
            raise DataFormatError(
                self.path,
                line,
                "spar_ft",
                f"expected {n_items} items with a list of integer ids each, found shape {array.shape}",
            )
        if array.size == 0:
            return array.astype(np.int64)
        # int64 only when every value is a Python int within it (or a bool among ints: looked for below)
        if array.dtype != np.int64 or any(type(v) is bool for row in value for v in row):
            bad = next((v for row in value for v in row if type(v) is not int or not -(2**63) <= v < 2**63), None)
            raise DataFormatError(
                self.path, line, "spar_ft", f"sparse features must be integer ids within int64, found {bad!r}"
            )
        return array

    def add(self, line: int, user, profile, sparse, dense, label) -> None:
        if not isinstance(label, list) or len(label) == 0:
            raise DataFormatError(self.path, line, "label", "empty list: a list needs at least one item")
        try:
            labels = np.asarray(label, dtype=np.float64)
        except (ValueError, TypeError):
            raise DataFormatError(self.path, line, "label", "expected a list of 0/1 numbers") from None
        if labels.ndim != 1 or not np.isin(labels, (0.0, 1.0)).all():
            raise DataFormatError(self.path, line, "label", f"expected 0/1 click labels, found {label[:10]}")
        n = len(labels)
        sparse_rows = self._ids(line, sparse, n)
        dense_rows = self._matrix(line, "dens_ft", dense, n, np.float64)
        if isinstance(profile, list) and len(profile) == 1 and isinstance(profile[0], list):
            profile = profile[0]  # LibRerank's Ad files nest the profile: [[p1, ..., p8]]
        if not isinstance(profile, list):
            raise DataFormatError(self.path, line, "profile", "expected a list of user feature values")
        widths = (len(profile), sparse_rows.shape[1], dense_rows.shape[1])
        if self.widths is None:
            self.widths = widths
        elif widths != self.widths:
            names = ("profile", "spar_ft", "dens_ft")
            k = next(i for i in range(3) if widths[i] != self.widths[i])
            raise DataFormatError(
                self.path, line, names[k], f"{widths[k]} values per entry, but earlier lines have {self.widths[k]}"
            )
        self.users.append(user)
        self.profiles.append(profile)
        self.sparse.append(sparse_rows)
        self.dense.append(dense_rows.astype(np.float32))
        self.labels.append(labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.users)


def reindex(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Ids from 1 for the sorted distinct values; returns ids and the vocabulary (line 0 = padding)."""
    distinct, inverse = np.unique(values, return_inverse=True)
    return inverse.reshape(values.shape).astype(np.int64) + 1, ["<pad>"] + [str(v) for v in distinct]
