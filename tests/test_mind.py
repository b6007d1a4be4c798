"""The MIND source on the 5k-impression subset in shared/data, and on small malformed files.

The tests on the subset take it through the ``prepared`` fixture (``mind_data``), which skips them where the
subset is absent; the tests on files written here always run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from relist.cli import main
from relist.data.errors import DataFormatError
from relist.data.mind import read_behaviors
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from tests.shared_data import MIND_SUBSET as MIND

SPLITS = ("ranker", "train", "valid", "test")


def raw_lines() -> list[bytes]:
    return [line for line in (MIND / "behaviors.tsv").read_bytes().split(b"\n") if line.strip()]


def prepare_from(src: Path, out: Path, seed: int = 0) -> PreparedDataset:
    return PreparedDataset(prepare(PrepareConfig(source="mind", src=src, out=out, seed=seed)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mind_data):
    """seed -> the 5k subset prepared with that seed (each prepared once per module; seed 0 once per run)."""
    root = tmp_path_factory.mktemp("mind")
    cache: dict[int, PreparedDataset] = {0: mind_data}

    def get(seed: int = 0) -> PreparedDataset:
        if seed not in cache:
            cache[seed] = prepare_from(MIND, root / f"seed{seed}", seed)
        return cache[seed]

    return get


# --------------------------------------------------------------------------- counts, splits, order


def test_counts(prepared):
    data = prepared()
    c = data.counts
    assert (c["n_lists"], c["n_labelled"], c["n_clicks"], c["n_users"], c["n_items"]) == (
        5000,
        189359,
        7542,
        4637,
        7457,
    )
    # the manifest agrees with the arrays
    assert data.n_lists == 5000 and len(data.label) == 189359 and int((np.asarray(data.label) > 0).sum()) == 7542
    assert len(np.unique(data.user_sparse[:, 0])) == 4637 and len(np.unique(data.item_sparse[:, 0])) == 7457
    assert sum(c["splits"][s]["n_lists"] for s in SPLITS) == 5000
    assert sum(c["splits"][s]["n_clicks"] for s in SPLITS) == 7542
    assert data.verify()


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_partition_the_lists(prepared, seed):
    data = prepared(seed)
    assert set(data.splits) == set(SPLITS)
    parts = [set(data.split(s).tolist()) for s in SPLITS]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not parts[a] & parts[b], (SPLITS[a], SPLITS[b])
    assert set().union(*parts) == set(range(5000))
    assert [len(p) for p in parts] == [2000, 2000, 500, 500]


def test_splits_depend_on_the_seed(prepared):
    assert not np.array_equal(prepared(0).split("test"), prepared(1).split("test"))


def test_first_list_is_in_logged_order(prepared):
    data = prepared()
    vocab = data.vocab("item_id")
    first = raw_lines()[0].decode().split("\t")
    tokens = [t.rsplit("-", 1) for t in first[4].split()]
    rows = slice(int(data.offsets[0]), int(data.offsets[1]))
    assert [vocab[i] for i in data.item_sparse[rows, 0]] == [t[0] for t in tokens]
    assert data.label[rows].tolist() == [float(t[1]) for t in tokens]
    assert data.vocab("user_id")[int(data.user_sparse[0, 0])] == first[1]


def test_every_list_is_in_logged_order(prepared):
    data = prepared()
    vocab, users = np.array(data.vocab("item_id")), data.vocab("user_id")
    lines = [line.decode().split("\t") for line in raw_lines()]
    assert len(lines) == data.n_lists
    offsets = np.asarray(data.offsets)
    names = vocab[np.asarray(data.item_sparse[:, 0])]
    for k, fields in enumerate(lines):
        tokens = [t.rsplit("-", 1) for t in fields[4].split()]
        rows = slice(offsets[k], offsets[k + 1])
        assert names[rows].tolist() == [t[0] for t in tokens], k
        assert data.label[rows].tolist() == [float(t[1]) for t in tokens], k
        assert users[int(data.user_sparse[k, 0])] == fields[1], k
        history = fields[3].split()[-50:]  # the last max_hist clicked items, oldest first
        hist = data.user_hist[data.hist_offsets[k] : data.hist_offsets[k + 1], 0]
        assert vocab[hist].tolist() == history, k


# --------------------------------------------------------------------------- leakage


def flipped_copy(dest: Path, lists: set[int], only_first: bool = False) -> Path:
    """The raw files with the labels of the given lists (0-based non-blank line numbers) flipped."""
    dest.mkdir()
    shutil.copy(MIND / "news.tsv", dest / "news.tsv")
    out = []
    for k, line in enumerate(raw_lines()):
        if k in lists:
            fields = line.split(b"\t")
            tokens = fields[4].split()
            for t in range(1 if only_first else len(tokens)):
                item, label = tokens[t].rsplit(b"-", 1)
                tokens[t] = item + b"-" + (b"0" if label == b"1" else b"1")
            fields[4] = b" ".join(tokens)
            line = b"\t".join(fields)
        out.append(line + b"\n")
    (dest / "behaviors.tsv").write_bytes(b"".join(out))
    return dest


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_outside_the_ranker_split_do_not_leak_into_features(prepared, tmp_path, seed):
    base = prepared(seed)
    held_out = set(base.split("train").tolist()) | set(base.split("valid").tolist()) | set(base.split("test").tolist())
    flipped = prepare_from(flipped_copy(tmp_path / "raw", held_out), tmp_path / "out", seed)
    for name in SPLITS:
        assert np.array_equal(flipped.split(name), base.split(name))
    # the labels did change on every held-out row and nowhere else ...
    offsets = np.asarray(base.offsets)
    held_rows = np.zeros(len(base.label), dtype=bool)
    for k in held_out:
        held_rows[offsets[k] : offsets[k + 1]] = True
    assert np.array_equal(np.asarray(flipped.label)[held_rows], 1 - np.asarray(base.label)[held_rows])
    assert np.array_equal(np.asarray(flipped.label)[~held_rows], np.asarray(base.label)[~held_rows])
    # ... but no dense feature of any row did
    assert np.array_equal(np.asarray(flipped.item_dense), np.asarray(base.item_dense))


def test_ranker_labels_change_features_but_never_their_own(prepared, tmp_path):
    base = prepared(0)
    k = int(base.split("ranker")[3])
    flipped = prepare_from(flipped_copy(tmp_path / "raw", {k}, only_first=True), tmp_path / "out", 0)
    before, after = np.asarray(base.item_dense), np.asarray(flipped.item_dense)
    assert (before != after).any(axis=1).any()
    # the flipped item's click count changes in every row outside the ranker split; the row itself
    # (and its fold) never sees its own label
    row = int(base.offsets[k])
    item = int(base.item_sparse[row, 0])
    log_clicks = base.schema.item_dense.index("log_clicks")
    row_list = np.repeat(np.arange(base.n_lists), np.diff(np.asarray(base.offsets)))
    outside = ~np.isin(row_list, base.split("ranker"))
    same_item = np.asarray(base.item_sparse[:, 0]) == item
    others = np.flatnonzero(same_item & outside)
    assert len(others) > 0
    assert (before[others, log_clicks] != after[others, log_clicks]).all()
    assert (before[row] == after[row]).all()


# --------------------------------------------------------------------------- malformed input

GOOD = [
    b"1\tU1\t11/12/2019 2:14:46 PM\tN1 N2\tN1-0 N2-1 N3-0\n",
    b"2\tU2\t11/13/2019 5:53:12 AM\t\tN3-1 N1-0\n",
]
NEWS = (
    b"N1\tnews\tsports\tA title\tAn abstract\thttps://x/N1\t[]\t[]\n"
    b"N2\tfinance\tmarkets\tB title\tB abstract\thttps://x/N2\t[]\t[]\n"
)
TIME = b"11/12/2019 2:14:46 PM"

# name -> (bad line, its 1-based line number once written, the field named, a phrase of the message)
BAD = {
    "too_few_columns": (b"3\tU3\t" + TIME + b"\tN1\n", None, "5 fields"),
    "too_many_columns": (b"3\tU3\t" + TIME + b"\tN1\tN1-1\textra\n", None, "5 fields"),
    "bad_label": (b"3\tU3\t" + TIME + b"\tN1\tN1-0 N123-x N2-1\n", "impressions", "N123-x"),
    "empty_impressions": (b"3\tU3\t" + TIME + b"\tN1 N2\t\n", "impressions", "empty"),
    "blank_impressions": (b"3\tU3\t" + TIME + b"\tN1 N2\t   \n", "impressions", "empty"),
    "broken_utf8_user": (b"3\tU\xff\xfe3\t" + TIME + b"\tN1\tN1-1\n", "user_id", "UTF-8"),
    "truncated_mid_token": (b"3\tU3\t" + TIME + b"\tN1 N2\tN1-0 N2-1 N3", "impressions", "truncated"),
    "truncated_mid_label": (b"3\tU3\t" + TIME + b"\tN1 N2\tN1-0 N2-", "impressions", "truncated"),
    "truncated_mid_line": (b"3\tU3\t11/12/20", None, "truncated"),
    "repeated_impression_id": (b"1\tU3\t" + TIME + b"\tN1\tN1-1\n", "impression_id", "1 repeats line 1"),
    "repeated_impression_id_zero_padded": (b"01\tU3\t" + TIME + b"\tN1\tN1-1\n", "impression_id", "1 repeats line 1"),
    "impression_id_in_other_digits": ("\u0663\tU3\t".encode() + TIME + b"\tN1\tN1-1\n", "impression_id", "integer"),
    "impression_id_superscript": ("\u00b2\tU3\t".encode() + TIME + b"\tN1\tN1-1\n", "impression_id", "integer"),
    "long_impression_id_repeated": (
        b"0" * 5000 + b"1\tU3\t" + TIME + b"\tN1\tN1-1\n",
        "impression_id",
        "1 repeats line 1",
    ),
    "user_id_too_long": (
        b"3\t" + b"U" * 257 + b"\t" + TIME + b"\tN1\tN1-1\n",
        "user_id",
        "an id of 257 characters, more than the limit of 256 (--max-id-chars)",
    ),
    "item_id_too_long": (
        b"3\tU3\t" + TIME + b"\tN1\tN1-0 N" + b"7" * 300 + b"-1\n",
        "impressions",
        "item 2: an id of 301 characters, more than the limit of 256",
    ),
    "history_id_too_long": (
        b"3\tU3\t" + TIME + b"\tN1 N" + b"7" * 256 + b" N2\tN1-1\n",
        "history",
        "a clicked item's id of 257 characters, more than the limit of 256",
    ),
    "too_many_items": (
        b"3\tU3\t" + TIME + b"\tN1\t" + b" ".join([b"N1-0"] * 1001) + b"\n",
        "impressions",
        "more than 1000 items, the limit (--max-items): 1001 space-separated entries",
    ),  # fmt: skip
}


def write_bad(folder: Path, bad: bytes) -> tuple[Path, int]:
    """GOOD lines, a blank line (skipped but counted), then the bad line last: it is line 4."""
    folder.mkdir(parents=True)
    (folder / "news.tsv").write_bytes(NEWS)
    path = folder / "behaviors.tsv"
    path.write_bytes(GOOD[0] + b"\n" + GOOD[1] + bad)
    return path, 4


def test_the_good_lines_alone_prepare(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "news.tsv").write_bytes(NEWS)
    (folder / "behaviors.tsv").write_bytes(b"".join(GOOD))
    data = prepare_from(folder, tmp_path / "out")
    assert data.counts["n_lists"] == 2 and data.counts["n_labelled"] == 5 and data.counts["n_clicks"] == 2


def test_a_byte_order_mark_is_not_data(tmp_path):
    """Editors save UTF-8 with a BOM; it is dropped from both files, not kept in the first id."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "news.tsv").write_bytes(b"\xef\xbb\xbf" + NEWS)
    (folder / "behaviors.tsv").write_bytes(b"\xef\xbb\xbf" + b"".join(GOOD))
    data = prepare_from(folder, tmp_path / "out")
    assert data.counts["n_lists"] == 2
    assert "N1" in data.vocab("item_id") and not any(v.startswith("\ufeff") for v in data.vocab("item_id"))
    categories = data.vocab("category")
    assert "news" in categories and not any(v.startswith("\ufeff") for v in categories)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_line_and_field(tmp_path, case):
    bad, field, phrase = BAD[case]
    path, line = write_bad(tmp_path / "raw", bad)
    parent = tmp_path / "prepared"
    parent.mkdir()
    out = parent / "mind"
    with pytest.raises(DataFormatError) as info:
        prepare(PrepareConfig(source="mind", src=tmp_path / "raw", out=out))
    err = info.value
    text = str(err)
    assert f"{path}:{line}:" in text
    assert (err.path, err.line, err.field) == (str(path), line, field)
    if field is not None:
        assert f"field '{field}'" in text
    assert phrase in text
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["bad_label", "broken_utf8_user", "truncated_mid_token", "too_few_columns"])
def test_bad_input_through_the_cli(tmp_path, capsys, case):
    bad, field, phrase = BAD[case]
    path, line = write_bad(tmp_path / "raw", bad)
    out = tmp_path / "prepared" / "mind"
    code = main(["data", "prepare", "mind", "--src", str(tmp_path / "raw"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code != 0
    assert f"{path}:{line}:" in captured.err
    if field is not None:
        assert f"field '{field}'" in captured.err
    assert phrase in captured.err
    assert captured.out == ""
    assert not out.exists()
    assert not out.parent.exists() or not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_long_histories_are_cut_to_their_newest_clicks_and_counted(tmp_path):
    """A history longer than --max-history keeps its newest clicks, and the manifest counts the histories
    cut; the subset's histories (at most 425 items) are all within the default."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "news.tsv").write_bytes(NEWS)
    clicks = [f"H{k}".encode() for k in range(12)]
    long_line = b"3\tU3\t" + TIME + b"\t" + b" ".join(clicks) + b"\tN1-1 N2-0\n"
    (folder / "behaviors.tsv").write_bytes(b"".join(GOOD) + long_line)
    cut = PreparedDataset(prepare(PrepareConfig(source="mind", src=folder, out=tmp_path / "cut", max_history=5)))
    full = PreparedDataset(prepare(PrepareConfig(source="mind", src=folder, out=tmp_path / "full")))
    assert cut.manifest["info"]["histories_cut"] == 1 and full.manifest["info"]["histories_cut"] == 0

    def history(data: PreparedDataset, k: int) -> list[str]:
        vocab = data.vocab("item_id")
        return [vocab[i] for i in data.user_hist[data.hist_offsets[k] : data.hist_offsets[k + 1], 0]]

    assert history(cut, 2) == [c.decode() for c in clicks[-5:]]  # the newest five, oldest first
    assert history(cut, 0) == history(full, 0) == ["N1", "N2"]  # a short history is kept whole
    exact = PreparedDataset(prepare(PrepareConfig(source="mind", src=folder, out=tmp_path / "exact", max_history=12)))
    assert exact.manifest["info"]["histories_cut"] == 0 and history(exact, 2) == [c.decode() for c in clicks]


def test_a_huge_line_is_refused_before_it_is_split(tmp_path):
    """A line of a million items (6 MB) is refused with its file, line and field, and refusing it allocates
    about the line itself (it is read whole) rather than a million item strings (splitting it took over 60 MB)."""
    import tracemalloc

    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "news.tsv").write_bytes(NEWS)
    huge = b"3\tU3\t" + TIME + b"\tN1\t" + b" ".join([b"N1-0"] * 1_000_000) + b"\n"
    (folder / "behaviors.tsv").write_bytes(GOOD[0] + huge + GOOD[1])
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match="more than 1000 items, the limit") as err:
            read_behaviors(folder / "behaviors.tsv")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (err.value.line, err.value.field) == (2, "impressions")
    assert "1000000 space-separated entries" in str(err.value)
    assert peak < 4 * len(huge), peak


def test_the_subset_prepared_with_the_defaults_cuts_and_refuses_nothing(prepared):
    info = prepared().manifest["info"]
    assert info["histories_cut"] == 0
    assert max(np.diff(np.asarray(prepared().offsets))) == 283 < PrepareConfig.max_items
    longest = max(len(line.split(b"\t")[3].split()) for line in raw_lines())
    assert longest == 425 < PrepareConfig.max_history  # the default cuts nothing of the subset
    ids = [line.split(b"\t")[1] for line in raw_lines()]
    ids += [token.rsplit(b"-", 1)[0] for line in raw_lines() for token in line.split(b"\t")[4].split()]
    ids += [item for line in raw_lines() for item in line.split(b"\t")[3].split()]
    news = [line.split(b"\t")[:3] for line in (MIND / "news.tsv").read_bytes().splitlines() if line.strip()]
    assert max(map(len, ids)) == 6  # user and news ids
    assert max(len(field) for row in news for field in row) == 31 < PrepareConfig.max_id_chars  # a subcategory
    assert len({row[0] for row in news}) == len(news)  # no news id repeated: the subset's news.tsv prepares


def test_a_repeated_news_id_names_both_lines(tmp_path):
    """N1 again on line 4 (after a blank line): which category it has would be the file's order."""
    folder = tmp_path / "raw"
    folder.mkdir()
    path = folder / "news.tsv"
    path.write_bytes(NEWS + b"\n" + b"N1\tfinance\tmarkets\tC title\tC abstract\thttps://x/N1b\t[]\t[]\n")
    (folder / "behaviors.tsv").write_bytes(b"".join(GOOD))
    with pytest.raises(DataFormatError) as err:
        prepare(PrepareConfig(source="mind", src=folder, out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 4, "news_id")
    assert "N1 repeats line 1" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("column", [0, 1, 2])
def test_a_news_id_or_category_longer_than_max_id_chars_names_its_line(tmp_path, column):
    folder = tmp_path / "raw"
    folder.mkdir()
    row = [b"N9", b"news", b"sports", b"T", b"A", b"https://x/N9", b"[]", b"[]"]
    row[column] = b"x" * 12
    (folder / "news.tsv").write_bytes(NEWS + b"\t".join(row) + b"\n")
    (folder / "behaviors.tsv").write_bytes(b"".join(GOOD))
    prepare(PrepareConfig(source="mind", src=folder, out=tmp_path / "ok", max_id_chars=12))
    with pytest.raises(DataFormatError, match="an id of 12 characters, more than the limit of 11") as err:
        prepare(PrepareConfig(source="mind", src=folder, out=tmp_path / "out", max_id_chars=11))
    field = ("news_id", "category", "subcategory")[column]
    assert (err.value.path, err.value.line, err.value.field) == (str(folder / "news.tsv"), 3, field)


def test_max_id_chars_through_the_cli(tmp_path, capsys):
    """--max-id-chars is an option of `relist data prepare`: the longest id of the small files (the category
    'finance', 7 characters) passes at 7 and is refused at 6, naming its line."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "news.tsv").write_bytes(NEWS)
    (folder / "behaviors.tsv").write_bytes(b"".join(GOOD))
    args = ["data", "prepare", "mind", "--src", str(folder)]
    assert main([*args, "--out", str(tmp_path / "ok"), "--max-id-chars", "7"]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "out"), "--max-id-chars", "6"]) != 0
    err = capsys.readouterr().err
    assert f"{folder / 'news.tsv'}:2: field 'category': an id of 7 characters, more than the limit of 6" in err
    assert not (tmp_path / "out").exists()
