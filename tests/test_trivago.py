"""The trivago source (RecSys Challenge 2019 files): lists, labels, histories and splits on small files in the
challenge's exact format, errors naming file, line and field, and the counts of the real Rio subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from relist.data.errors import DataFormatError
from relist.data.store import group_splits
from relist.data.trivago import build, read_clickouts
from tests.shared_data import TRIVAGO_RIO

HEADER = (
    "user_id,session_id,timestamp,step,action_type,reference,platform,city,device,current_filters,impressions,prices"
)
CITY = '"Rio de Janeiro, Brazil"'
FRACTIONS = {"ranker": 0.5, "train": 0.5}


def write(root: Path, rows: list[str], metadata: list[str] | None = None, bom: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = "\n".join([HEADER, *rows]) + "\n"
    (root / "train.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    meta = metadata if metadata is not None else ["11,4 star|good rating|free wifi|pool", "12,3 star|pool", "13,beach"]
    (root / "item_metadata.csv").write_text("\n".join(["item_id,properties", *meta]) + "\n")
    return root


def row(user, session, step, action, reference, impressions="", prices="", ts=1541000000):
    return f"{user},{session},{ts + step},{step},{action},{reference},,{CITY},,,{impressions},{prices}"


GOOD = [
    row("u1", "s1", 1, "interaction item info", "13"),
    row("u1", "s1", 2, "clickout item", "12", "11|12|13", "80|95|120"),
    row("u1", "s1", 3, "clickout item", "99", "11|12|13"),  # clicked hotel not listed: dropped
    row("u1", "s1", 4, "clickout item", "11", "13|11"),
    row("u2", "s2", 1, "clickout item", "13", "13|12|11|14"),
]


def test_lists_labels_histories_and_drops(tmp_path):
    table = build(write(tmp_path / "raw", GOOD, bom=True), seed=0, fractions=FRACTIONS)
    assert table.n_lists == 3 and table.info["n_dropped"] == 1
    assert np.diff(table.offsets).tolist() == [3, 2, 4]
    hotels = [table.vocabs["item_id"][i] for i in table.item_sparse[:, 0]]
    assert hotels == ["11", "12", "13", "13", "11", "13", "12", "11", "14"]  # display order kept
    assert table.label.tolist() == [0, 1, 0, 0, 1, 1, 0, 0, 0]
    names = list(table.schema.item_dense)
    assert table.item_dense[:, names.index("logged_position")].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert table.item_dense[:3, names.index("has_price")].tolist() == [1, 1, 1]
    assert table.item_dense[3:, names.index("has_price")].tolist() == [0] * 6  # no prices: explicit missing
    assert table.item_dense[0, names.index("log_price")] == pytest.approx(np.log1p(80))
    # history: the session's earlier hotels (the viewed 13, the clicked 12, and the dropped list's 99)
    hist = [table.vocabs["item_id"][i] for i in table.user_hist[:, 0]]
    per_list = np.split(np.array(hist, dtype=object), table.hist_offsets[1:-1])
    assert [list(h) for h in per_list] == [["13"], ["13", "12", "99"], []]
    # stars and rating from the metadata; the unknown hotel 14 has neither
    stars = [table.vocabs["stars"][s] for s in table.item_sparse[:, 1]]
    assert stars[:3] == ["4 star", "3 star", "<unknown>"] and stars[-1] == "<unknown>"
    has_metadata = table.item_dense[:, names.index("has_metadata")]
    assert has_metadata[hotels.index("11")] == 1 and has_metadata[hotels.index("14")] == 0
    assert "property:pool" in names and "property:4 star" not in names  # stars are a field of their own


def test_splits_never_divide_a_session():
    sessions = np.repeat(np.arange(50), 3)
    parts = group_splits(sessions, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(150))
    owner = {s: name for name, rows in parts.items() for s in sessions[rows]}
    assert all(sessions[r] in owner and owner[sessions[r]] == name for name, rows in parts.items() for r in rows)
    assert [len(np.unique(sessions[rows])) for rows in parts.values()] == [25, 15, 10]


@pytest.mark.parametrize(
    "rows, line, field",
    [
        ([GOOD[0], row("u1", "s1", 2, "clickout item", "12", "11|12|11")], 3, "impressions"),
        ([row("u1", "s1", 2, "clickout item", "12", "11|12", "80")], 2, "prices"),
        ([row("u1", "s1", 2, "clickout item", "12", "11|12", "80|nan")], 2, "prices"),
        ([row("u1", "s1", 2, "clickout item", "12", "")], 2, "impressions"),
        ([GOOD[1].replace(",2,clickout", ",two,clickout")], 2, "step"),
        ([GOOD[1] + ",extra"], 2, None),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, rows, line, field):
    root = write(tmp_path / "raw", rows)
    with pytest.raises(DataFormatError) as err:
        build(root, seed=0, fractions=FRACTIONS)
    assert err.value.path == str(root / "train.csv") and err.value.line == line and err.value.field == field


def test_bad_header_encoding_and_long_lists(tmp_path):
    root = write(tmp_path / "a", GOOD)
    (root / "train.csv").write_text(HEADER.replace("step", "stage") + "\n" + GOOD[1] + "\n")
    with pytest.raises(DataFormatError, match=r"train.csv:1: expected the header"):
        build(root, seed=0, fractions=FRACTIONS)
    root = write(tmp_path / "b", GOOD)
    (root / "train.csv").write_bytes((HEADER + "\n").encode() + GOOD[1].encode().replace(b"u1", b"u\xff") + b"\n")
    with pytest.raises(DataFormatError, match=r"train.csv:2: not valid UTF-8"):
        build(root, seed=0, fractions=FRACTIONS)
    root = write(tmp_path / "c", GOOD)
    with pytest.raises(DataFormatError, match=r"train.csv:6: field 'impressions': 4 hotels, more than 3"):
        build(root, seed=0, fractions=FRACTIONS, max_items=3)


def test_the_rio_subset(trivago_data):
    data = trivago_data
    counts = data.counts
    assert (counts["n_lists"], counts["n_labelled"], counts["n_clicks"]) == (9114, 223037, 9114)
    assert data.manifest["info"]["n_dropped"] == 8
    # no session's lists in two splits (lists are in the reader's order)
    lists, dropped = read_clickouts(TRIVAGO_RIO / "train.csv")
    assert len(lists) == 9114 and dropped == 8
    split_of = {}
    for name, rows in data.splits.items():
        for r in rows:
            assert split_of.setdefault(lists[r]["session_id"], name) == name
    assert data.verify()
