"""PRM Public (Alibaba, from the PRM paper, Pei et al. RecSys 2019).

One list per line: ``uid|profile|spar_ft|dens_ft1|dens_ft2|label``, each field a list literal:
``profile`` the user's feature values, ``spar_ft`` one list of sparse ids per item, ``dens_ft1`` and
``dens_ft2`` one list of dense values per item (concatenated per item here), ``label`` a 0/1 click per
item. ``--src`` is a file or a folder whose ``*.txt*`` files are read in name order (the release ships
``set1.train.txt.part1`` and ``.part2``).

As LibRerank: lines containing "null" are skipped (counted in the manifest), and ``sample`` keeps a
random share of the lists (LibRerank: 0.1). A line of more than ``max_items`` items is refused with its
file and line (``relist.data.prepare`` says why). The uid and the sparse ids are integers (JSON integers,
not floats or booleans; sparse ids within int64), kept exact. Deviation: ids are re-indexed per field from 1
(LibRerank shares one counter across fields); the user id is re-indexed too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from relist.data.errors import DataFormatError, read_lines
from relist.data.records import ListRecords, parse_fields, reindex
from relist.data.store import ListTable, Schema, SparseField, random_splits

FIELDS = ("uid", "profile", "spar_ft", "dens_ft1", "dens_ft2", "label")
MAX_ITEMS = 1000  # a line of more items is refused with its file and line
log = logging.getLogger("relist")


def _files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file() and ".txt" in p.name and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{src}: no PRM Public files (*.txt*, e.g. set1.train.txt.part1)")
    return files


def read(paths: list[Path], sample: float, seed: int, max_items: int = MAX_ITEMS) -> tuple[ListRecords, int]:
    rng = np.random.default_rng(seed)
    records: ListRecords | None = None
    skipped = 0
    for path in paths:
        current = ListRecords(path)
        if records is not None:  # carry accumulated lists and the fixed widths across files
            current.__dict__.update({k: v for k, v in records.__dict__.items() if k != "path"})
        records = current
        for line, raw, ended in read_lines(path):
            if not raw.strip():
                continue
            if b"null" in raw:
                skipped += 1
                continue
            if sample < 1.0 and rng.random() >= sample:
                continue
            parts = raw.split(b"|")
            if len(parts) != len(FIELDS):
                hint = " (the last line has no newline: is the file truncated?)" if not ended else ""
                raise DataFormatError(
                    path,
                    line,
                    None,
                    f"expected {len(FIELDS)} '|'-separated fields ({'|'.join(FIELDS)}), found {len(parts)}{hint}",
                )
            widths = None
            if records.widths is not None:  # fixed by the first list: bounds the fields before they are parsed
                n_profile, n_sparse, n_dense = records.widths
                widths = {"profile": n_profile, "spar_ft": n_sparse, "dens_ft1": n_dense, "dens_ft2": n_dense}
            uid, profile, sparse, dense1, dense2, label = parse_fields(
                path, line, parts, FIELDS, ended, max_items, widths
            )
            if type(uid) is not int:  # not isinstance: JSON true is a bool, an int to isinstance
                raise DataFormatError(path, line, "uid", f"expected an integer, found {uid!r}")
            try:
                dense = [list(a) + list(b) for a, b in zip(dense1, dense2, strict=True)]
            except (TypeError, ValueError):
                raise DataFormatError(
                    path, line, "dens_ft2", "dens_ft1 and dens_ft2 must hold one list per item each"
                ) from None
            records.add(line, uid, profile, sparse, dense, label)
    return records, skipped


def build(
    src: Path, seed: int, fractions: Mapping[str, float], sample: float = 1.0, max_items: int = MAX_ITEMS
) -> ListTable:
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"sample must be in (0, 1], got {sample}")
    paths = _files(Path(src))
    records, skipped = read(paths, sample, seed, max_items)
    if len(records) == 0:
        raise DataFormatError(paths[0], None, None, "no usable lists")
    if skipped:
        log.warning("prm-public: skipped %d lines containing 'null' (as LibRerank does)", skipped)
    return table_from_records(
        records,
        seed,
        splits=random_splits(len(records), fractions, seed),
        info={"skipped_null_lines": skipped, "sample": sample, "files": [p.name for p in paths]},
        dense_names=None,
    )


def table_from_records(
    records: ListRecords,
    seed: int,
    splits: dict,
    info: dict,
    dense_names,
    reindex_items: bool = True,
    item_vocab: int | None = None,
) -> ListTable:
    """Ragged arrays from accumulated records; sparse ids re-indexed per field unless told otherwise."""
    n_profile, n_sparse, n_dense = records.widths
    lengths = np.array([len(lab) for lab in records.labels], dtype=np.int64)
    sparse = np.concatenate(records.sparse)
    dense = np.concatenate(records.dense)
    profile = np.array(records.profiles, dtype=object).reshape(len(records), n_profile).astype(str)
    vocabs: dict[str, list[str]] = {}
    user_ids, vocabs["user_id"] = reindex(np.array([str(u) for u in records.users]))
    user_cols, user_schema = [user_ids], [SparseField("user_id", len(vocabs["user_id"]))]
    for k in range(n_profile):
        ids, vocab = reindex(profile[:, k])
        vocabs[f"profile_{k}"] = vocab
        user_cols.append(ids)
        user_schema.append(SparseField(f"profile_{k}", len(vocab)))
    item_names = ["item_id", "category"] + [f"sparse_{k}" for k in range(2, n_sparse)]
    item_cols, item_schema = [], []
    for k in range(n_sparse):
        if reindex_items:
            ids, vocab = reindex(sparse[:, k])
            vocabs[item_names[k]] = vocab
            size = len(vocab)
        else:
            ids, size = sparse[:, k], item_vocab
        item_cols.append(ids)
        item_schema.append(SparseField(item_names[k], int(size)))
    return ListTable(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        item_sparse=np.stack(item_cols, axis=1),
        item_dense=dense,
        label=np.concatenate(records.labels),
        user_sparse=np.stack(user_cols, axis=1),
        hist_offsets=np.zeros(len(records) + 1, dtype=np.int64),
        user_hist=np.zeros((0, 0), dtype=np.int64),
        schema=Schema(
            tuple(item_schema), tuple(dense_names or [f"dense_{k}" for k in range(n_dense)]), tuple(user_schema), ()
        ),
        splits=splits,
        vocabs=vocabs,
        info=info,
    )
