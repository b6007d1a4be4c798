"""Prepared datasets on disk: ragged list arrays, memory-mapped, plus a manifest.

Layout of a prepared directory::

    manifest.json            source, seed, schema, splits, counts, content hash
    arrays/offsets.npy       (n_lists + 1,) int64: list i holds item rows offsets[i]:offsets[i+1]
    arrays/item_sparse.npy   (n_rows, Fs) int64: column 0 is the item id; 0 means padding
    arrays/item_dense.npy    (n_rows, Fd) float32
    arrays/label.npy         (n_rows,) float32
    arrays/user_sparse.npy   (n_lists, Fu) int64: column 0 is the user id
    arrays/hist_offsets.npy  (n_lists + 1,) int64
    arrays/user_hist.npy     (n_hist_rows, Fh) int64: the user's past positive items, oldest first
    splits/<name>.npy        list indices of each split
    vocab/<field>.json       raw value of each id of a sparse field, a JSON list (item k = id k; 0 = padding);
                             datasets written before it hold vocab/<field>.txt, one value per line

Writing goes to a temporary sibling directory that is renamed into place at the end, so a failed
preparation never leaves a half-written dataset behind.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from relist.batch import ListBatch
from relist.io import atomic_directory

FORMAT_VERSION = 1
ARRAY_NAMES = ("offsets", "item_sparse", "item_dense", "label", "user_sparse", "hist_offsets", "user_hist")
SPLIT_NAMES = ("ranker", "train", "valid", "test")
DEFAULT_FRACTIONS = {"ranker": 0.4, "train": 0.4, "valid": 0.1, "test": 0.1}


@dataclass(frozen=True)
class SparseField:
    name: str
    vocab: int  # number of ids including 0 (padding / unknown)


@dataclass(frozen=True)
class Schema:
    item_sparse: tuple[SparseField, ...]
    item_dense: tuple[str, ...]
    user_sparse: tuple[SparseField, ...]
    user_hist: tuple[SparseField, ...] = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping) -> "Schema":
        sparse = lambda items: tuple(SparseField(**f) for f in items)  # noqa: E731
        return cls(
            item_sparse=sparse(raw["item_sparse"]),
            item_dense=tuple(raw["item_dense"]),
            user_sparse=sparse(raw["user_sparse"]),
            user_hist=sparse(raw.get("user_hist", ())),
        )


@dataclass
class ListTable:
    """Lists held in memory as ragged arrays, as a source builds them before writing."""

    offsets: np.ndarray
    item_sparse: np.ndarray
    item_dense: np.ndarray
    label: np.ndarray
    user_sparse: np.ndarray
    hist_offsets: np.ndarray
    user_hist: np.ndarray
    schema: Schema
    splits: dict[str, np.ndarray]
    vocabs: dict[str, Sequence[str]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # source-specific facts recorded in the manifest

    @property
    def n_lists(self) -> int:
        return len(self.offsets) - 1

    def validate(self) -> None:
        n, rows = self.n_lists, int(self.offsets[-1])
        assert self.offsets[0] == 0 and np.all(np.diff(self.offsets) > 0), "every list needs at least one item"
        assert self.item_sparse.shape == (rows, len(self.schema.item_sparse))
        assert self.item_dense.shape == (rows, len(self.schema.item_dense))
        assert self.label.shape == (rows,)
        assert self.user_sparse.shape == (n, len(self.schema.user_sparse))
        assert len(self.hist_offsets) == n + 1 and self.user_hist.shape[0] == self.hist_offsets[-1]
        assert self.user_hist.shape[1] == len(self.schema.user_hist)
        assert np.isfinite(self.item_dense).all(), "dense features must be finite"


def cut_histories(table: ListTable, max_history: int) -> int:
    """Keep each list's newest ``max_history`` history items (in place); returns how many histories were cut."""
    lengths = np.diff(table.hist_offsets)
    over = lengths > max_history
    if not over.any():
        return 0
    kept = np.minimum(lengths, max_history)
    ends = table.hist_offsets[1:]
    rows = np.concatenate([np.arange(end - k, end) for end, k in zip(ends, kept)]) if kept.sum() else np.zeros(0, int)
    table.user_hist = table.user_hist[rows]
    table.hist_offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    return int(over.sum())


def random_splits(n_lists: int, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split list indices at random into named parts of the given relative sizes (sorted indices)."""
    names = list(fractions)
    weights = np.array([fractions[k] for k in names], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative with a positive sum, got {dict(fractions)}")
    bounds = np.round(np.cumsum(weights / weights.sum()) * n_lists).astype(np.int64)
    order = np.random.default_rng(seed).permutation(n_lists)
    parts = np.split(order, bounds[:-1])
    return {name: np.sort(part) for name, part in zip(names, parts)}


def first_seen_ids(values) -> dict[str, int]:
    """Ids from 1 in order of first appearance; 0 is padding."""
    index: dict[str, int] = {}
    for v in values:
        if v not in index:
            index[v] = len(index) + 1
    return index


def group_splits(groups: np.ndarray, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split list indices so that all lists of a group (a session) fall into one part: the distinct groups are
    split at random with the given relative sizes (shares of groups, not of lists), and lists follow."""
    groups = np.asarray(groups)
    distinct, inverse = np.unique(groups, return_inverse=True)
    parts = random_splits(len(distinct), fractions, seed)
    member = np.empty(len(distinct), dtype=np.int64)
    for k, name in enumerate(parts):
        member[parts[name]] = k
    names = list(parts)
    return {name: np.flatnonzero(member[inverse] == k) for k, name in enumerate(names)}


def split_fractions(values: Sequence[float]) -> dict[str, float]:
    """(ranker, train, valid, test) relative sizes -> the fractions of each split, checked."""
    values = [float(v) for v in values]
    if len(values) != len(SPLIT_NAMES) or any(v < 0 for v in values) or min(values[1:]) <= 0:
        raise ValueError(
            "splits must be four non-negative numbers ranker,train,valid,test with train, valid and test > 0, "
            f"got {list(values)}"
        )
    return dict(zip(SPLIT_NAMES, values))


def counts(table_or_dataset: "ListTable | PreparedDataset") -> dict:
    """n_lists, n_labelled, n_clicks, n_users, n_items in total and per split."""
    t = table_or_dataset
    offsets = np.asarray(t.offsets)
    label = np.asarray(t.label)
    item_ids = np.asarray(t.item_sparse[:, 0])
    user_ids = np.asarray(t.user_sparse[:, 0])
    lengths = np.diff(offsets)
    clicks_per_list = (
        np.add.reduceat((label > 0).astype(np.int64), offsets[:-1]) if len(label) else np.zeros(0, dtype=np.int64)
    )
    out = {
        "n_lists": int(len(lengths)),
        "n_labelled": int(lengths.sum()),
        "n_clicks": int(clicks_per_list.sum()),
        "n_users": int(len(np.unique(user_ids))),
        "n_items": int(len(np.unique(item_ids))),
        "list_len": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 3)},
        "splits": {},
    }
    for name, index in t.splits.items():
        out["splits"][name] = {
            "n_lists": int(len(index)),
            "n_labelled": int(lengths[index].sum()),
            "n_clicks": int(clicks_per_list[index].sum()),
        }
    return out


def _hash_dir(root: Path, names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        with open(root / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_dataset(
    table: ListTable,
    out: str | Path,
    source: str,
    seed: int,
    overwrite: bool = False,
    config: Mapping | None = None,
    extras: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write ``table`` to ``out`` atomically and return the path.

    ``extras`` maps a file name to a function that writes that file (e.g. a ground-truth model).
    """
    table.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    with atomic_directory(out) as tmp:
        (tmp / "arrays").mkdir()
        (tmp / "splits").mkdir()
        (tmp / "vocab").mkdir()
        dtypes = {"item_dense": np.float32, "label": np.float32}
        for name in ARRAY_NAMES:
            np.save(
                tmp / "arrays" / f"{name}.npy",
                np.ascontiguousarray(getattr(table, name), dtype=dtypes.get(name, np.int64)),
            )
        for name, index in table.splits.items():
            np.save(tmp / "splits" / f"{name}.npy", np.asarray(index, dtype=np.int64))
        for name, values in table.vocabs.items():
            write_vocab(tmp / "vocab" / f"{name}.json", values)
        hashed = [f"arrays/{n}.npy" for n in ARRAY_NAMES] + [f"splits/{n}.npy" for n in sorted(table.splits)]
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "seed": seed,
            "schema": table.schema.to_json(),
            "split_names": list(table.splits),
            "counts": counts(table),
            "content_hash": _hash_dir(tmp, hashed),
            "info": table.info,
            "config": dict(config or {}),
        }
        for name, write in (extras or {}).items():
            write(tmp / name)
        with open(tmp / "manifest.json", "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, default=str)
    return out


def write_vocab(path: Path, values: Sequence[str]) -> None:
    """The raw values of a field's ids as a JSON list (item k = id k): any string a source can hold comes
    back the same, line breaks of every kind and lone surrogates included."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump([str(v) for v in values], handle, ensure_ascii=True)


VOCAB_SUFFIXES = (".json", ".txt")  # the format, then the one-value-per-line files of older datasets


def vocab_file(directory: Path, field: str) -> Path | None:
    """The vocabulary file of ``field`` in ``directory`` (``<field>.json``, or an older ``<field>.txt``)."""
    for suffix in VOCAB_SUFFIXES:
        path = Path(directory) / f"{field}{suffix}"
        if path.is_file():
            return path
    return None


def read_vocab(path: Path) -> list[str]:
    """The values ``write_vocab`` wrote; an older ``.txt`` vocabulary holds one value per line, split at "\n"
    only (``str.splitlines`` would also split at "\r", "\x1c", "\u2028" and others)."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a readable vocabulary ({err})") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return values
    with open(path, encoding="utf-8", newline="") as handle:
        text = handle.read()
    return text.split("\n")[:-1] if text else []


class PreparedDataset:
    """A prepared directory opened read-only; arrays are memory-mapped, not loaded."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a prepared dataset (no manifest.json); run `relist data prepare` first"
            )
        with open(manifest_path, encoding="utf-8") as handle:
            self.manifest = json.load(handle)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format_version {self.manifest.get('format_version')}, expected {FORMAT_VERSION}"
            )
        self.schema = Schema.from_json(self.manifest["schema"])
        for name in ARRAY_NAMES:
            setattr(self, name, np.load(self.root / "arrays" / f"{name}.npy", mmap_mode="r"))
        self.splits = {n: np.load(self.root / "splits" / f"{n}.npy") for n in self.manifest["split_names"]}

    @property
    def n_lists(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    def vocab(self, field_name: str) -> list[str]:
        path = vocab_file(self.root / "vocab", field_name)
        if path is None:
            raise KeyError(f"{self.root} has no vocabulary for field {field_name!r}")
        return read_vocab(path)

    def verify(self) -> bool:
        """Recompute the content hash and compare with the manifest's."""
        hashed = [f"arrays/{n}.npy" for n in ARRAY_NAMES] + [f"splits/{n}.npy" for n in sorted(self.splits)]
        return _hash_dir(self.root, hashed) == self.manifest["content_hash"]

    def with_splits(self, **splits: np.ndarray) -> "PreparedDataset":
        """The same lists with some splits replaced or added (a view: nothing is copied or written)."""
        view = copy.copy(self)
        view.splits = {**self.splits, **{name: np.asarray(rows, dtype=np.int64) for name, rows in splits.items()}}
        return view

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise KeyError(f"unknown split {name!r}; {self.root} has {sorted(self.splits)}")
        return self.splits[name]

    def lengths(self, index: np.ndarray | None = None) -> np.ndarray:
        offsets = np.asarray(self.offsets)
        if index is None:
            return np.diff(offsets)
        return offsets[index + 1] - offsets[index]

    def batch(self, index: np.ndarray, max_len: int | None = None) -> ListBatch:
        """Gather lists ``index`` into a padded batch (vectorised; one fancy read per array)."""
        index = np.asarray(index, dtype=np.int64)
        starts = np.asarray(self.offsets[index])
        lengths = np.asarray(self.offsets[index + 1]) - starts
        if max_len is not None:
            lengths = np.minimum(lengths, max_len)
        width = int(lengths.max())
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]  # (B, L)
        rows = starts[:, None] + np.minimum(positions[None, :], lengths[:, None] - 1)  # (B, L)
        flat = rows.ravel()
        item_sparse = np.asarray(self.item_sparse[flat]).reshape(len(index), width, -1)
        item_dense = np.asarray(self.item_dense[flat]).reshape(len(index), width, -1)
        label = np.asarray(self.label[flat]).reshape(len(index), width)
        item_sparse = np.where(mask[..., None], item_sparse, 0)
        item_dense = np.where(mask[..., None], item_dense, 0).astype(np.float32, copy=False)
        label = np.where(mask, label, 0).astype(np.float32, copy=False)

        h_starts = np.asarray(self.hist_offsets[index])
        h_lengths = np.asarray(self.hist_offsets[index + 1]) - h_starts
        h_width = int(h_lengths.max()) if len(index) else 0
        h_fields = self.user_hist.shape[1]
        if h_width == 0:
            user_hist = np.zeros((len(index), 0, h_fields), dtype=np.int64)
        else:
            h_pos = np.arange(h_width)
            h_mask = h_pos[None, :] < h_lengths[:, None]
            # Lists without history read any valid row (then masked): clip so the read stays inside the array.
            h_rows = np.minimum(h_starts[:, None] + h_pos[None, :], len(self.user_hist) - 1)
            user_hist = np.asarray(self.user_hist[h_rows.ravel()]).reshape(len(index), h_width, h_fields)
            user_hist = np.where(h_mask[..., None], user_hist, 0)
        return ListBatch(
            item_sparse=torch.from_numpy(np.ascontiguousarray(item_sparse, dtype=np.int64)),
            item_dense=torch.from_numpy(np.ascontiguousarray(item_dense)),
            label=torch.from_numpy(np.ascontiguousarray(label)),
            mask=torch.from_numpy(mask),
            user_sparse=torch.from_numpy(np.ascontiguousarray(self.user_sparse[index], dtype=np.int64)),
            user_hist=torch.from_numpy(np.ascontiguousarray(user_hist, dtype=np.int64)),
            list_id=torch.from_numpy(index.copy()),
        )

    def batches(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        max_len: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[ListBatch]:
        """Iterate a split in batches; shuffled with ``seed`` when asked."""
        index = self.split(split)
        if shuffle:
            index = np.random.default_rng(seed).permutation(index)
        stop = len(index) - (len(index) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.batch(index[start : start + batch_size], max_len=max_len)
