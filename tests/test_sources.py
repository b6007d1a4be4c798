"""The taobao-ad, prm-public, librerank and synthetic sources, on files written in their exact formats."""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch

from relist.data.errors import DataFormatError
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.data.synthetic import SyntheticClickModel
from relist.data.taobao_ad import build_windows
from tests.rawfiles import write_librerank, write_prm, write_taobao


def librerank_lists(rows, window=300, keep=30):
    """LibRerank's per-user loop, written plainly: the reference for the vectorised window walk."""
    by_user = {}
    for position, (user, t, ad, _pid, _nonclk, clk) in enumerate(rows):
        by_user.setdefault(user, []).append((t, position, ad, clk))
    out = {}
    for user, records in by_user.items():
        if len(records) <= 2 or not any(r[3] for r in records):
            continue
        records.sort(key=lambda r: (-r[0], r[1]))  # newest first, ties in file order
        start = 0
        while True:
            end = start + 1
            while end < len(records) and records[start][0] - records[end][0] <= window:
                end += 1
            chosen = records[start:end]
            if any(r[3] for r in chosen) or end >= len(records):
                break
            start = end
        kept = chosen[-keep:][::-1]
        out[user] = [(r[2], r[3]) for r in kept]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_taobao_lists_match_librerank_construction(tmp_path, seed):
    raw = write_taobao(tmp_path / "raw", seed)
    expected = librerank_lists(raw["rows"])
    data = PreparedDataset(
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out", seed=seed))
    )
    item_vocab, user_vocab = data.vocab("item_id"), data.vocab("user_id")
    got = {}
    for k in range(data.n_lists):
        rows = slice(data.offsets[k], data.offsets[k + 1])
        user = int(user_vocab[data.user_sparse[k, 0]])
        got[user] = [(int(item_vocab[i]), int(c)) for i, c in zip(data.item_sparse[rows, 0], data.label[rows])]
    assert got == expected
    assert data.counts["n_lists"] == len(expected) > 0
    assert max(len(v) for v in expected.values()) <= 30


def test_window_walk_skips_clickless_windows_and_keeps_oldest():
    # one user, newest first: two windows without a click, then a window of 40 records with clicks
    ts = np.array([10_000, 9_900] + [9_000] + list(range(8_000, 8_000 - 40 * 5, -5)))
    clk = np.zeros(len(ts), dtype=np.int64)
    clk[5] = 1
    user = np.zeros(len(ts), dtype=np.int64)
    rows, offsets = build_windows(user, ts, clk, 300, 30)
    assert offsets.tolist() == [0, 30]
    assert rows.tolist() == list(range(42, 12, -1))  # the 30 oldest of records 3..42, oldest first


def test_taobao_features_and_missing_values(tmp_path):
    write_taobao(tmp_path / "raw", 5)
    data = PreparedDataset(prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out")))
    names = [f.name for f in data.schema.item_sparse]
    assert names == ["item_id", "category", "campaign", "customer", "brand"]
    assert data.schema.item_dense == ("price",)
    assert len(data.schema.user_sparse) == 9
    assert "NULL" in data.vocab("brand")
    assert "<missing>" in data.vocab("cms_segid")  # users without a profile row
    assert "<missing>" in data.vocab("pvalue_level")  # empty profile cells
    assert (np.asarray(data.item_dense) > 0).all()


@pytest.mark.parametrize(
    "damage, field",
    [
        (lambda s: s.replace("430548_1007,1,0", "430548_1007,1,x", 1), "clk"),
        (lambda s: s.replace(",430548_1007,", ",430548_1007,1,", 1), None),
        (lambda s: s[: s.rindex(",")], None),
    ],
)
def test_taobao_bad_rows_name_file_and_line(tmp_path, damage, field):
    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / "raw_sample.csv"
    path.write_text(damage(path.read_text()))
    with pytest.raises(DataFormatError) as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    assert err.value.path == str(path) and err.value.line is not None and err.value.line > 1
    if field:
        assert err.value.field == field
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prm_public_reads_lists_and_skips_null_lines(tmp_path):
    expected = write_prm(tmp_path / "set1.train.txt.part1", 0)
    data = PreparedDataset(prepare(PrepareConfig(source="prm-public", src=tmp_path, out=tmp_path / "out")))
    assert data.n_lists == len(expected)
    assert data.manifest["info"]["skipped_null_lines"] == 3
    assert len(data.schema.item_dense) == 19 and len(data.schema.item_sparse) == 5 and len(data.schema.user_sparse) == 4
    items = data.vocab("item_id")
    for k in (0, 7, len(expected) - 1):
        rows = slice(data.offsets[k], data.offsets[k + 1])
        assert [int(items[i]) for i in data.item_sparse[rows, 0]] == [s[0] for s in expected[k]["spar"]]
        np.testing.assert_allclose(data.item_dense[rows], np.array(expected[k]["dense"]), rtol=1e-5)
        assert data.label[rows].tolist() == expected[k]["label"]


def test_prm_public_sample_keeps_a_share(tmp_path):
    write_prm(tmp_path / "part1.txt", 1, n_lists=400, n_null=0)
    data = PreparedDataset(
        prepare(PrepareConfig(source="prm-public", src=tmp_path / "part1.txt", out=tmp_path / "out", sample=0.25))
    )
    assert 60 <= data.n_lists <= 140


@pytest.mark.parametrize(
    "field, value, expected_field",
    [
        ("label", "[0, x, 1]", "label"),  # unparsable label
        ("label", "[]", "label"),  # empty list
        ("label", "[0, 2, 1]", "label"),  # not a click label
        ("dens_ft1", "[[0.1, 0.2]]", "dens_ft1"),  # wrong number of items
        ("spar_ft", "[[1, 2]", "spar_ft"),  # truncated literal
    ],
)
def test_prm_public_bad_fields(tmp_path, field, value, expected_field):
    write_prm(tmp_path / "p.txt", 2, n_null=0)
    path = tmp_path / "p.txt"
    lines = path.read_text().splitlines(keepends=True)
    parts = lines[4].rstrip("\n").split("|")
    parts[("uid", "profile", "spar_ft", "dens_ft1", "dens_ft2", "label").index(field)] = value
    lines[4] = "|".join(parts) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(DataFormatError) as err:
        prepare(PrepareConfig(source="prm-public", src=path, out=tmp_path / "out"))
    assert (err.value.path, err.value.line) == (str(path), 5)
    assert err.value.field in (expected_field, "dens_ft2" if expected_field == "dens_ft1" else expected_field)
    assert not (tmp_path / "out").exists()


def test_prm_public_truncated_last_line(tmp_path):
    write_prm(tmp_path / "p.txt", 3, n_null=0)
    path = tmp_path / "p.txt"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])
    with pytest.raises(DataFormatError, match="truncated") as err:
        prepare(PrepareConfig(source="prm-public", src=path, out=tmp_path / "out"))
    assert err.value.line == text.count("\n")


def test_librerank_files_keep_ids_and_split(tmp_path):
    written = write_librerank(tmp_path / "lr", 0)
    data = PreparedDataset(
        prepare(PrepareConfig(source="librerank", src=tmp_path / "lr", out=tmp_path / "out", valid_share=0.25))
    )
    splits = {k: len(v) for k, v in data.splits.items()}
    assert splits["ranker"] == 30 and splits["test"] == 10 and splits["train"] + splits["valid"] == 40
    assert splits["valid"] > 0
    assert all(f.vocab == 500 for f in data.schema.item_sparse)
    first = written["train"][0]
    rows = slice(data.offsets[0], data.offsets[1])
    assert data.item_sparse[rows].tolist() == first[2]  # ids unchanged
    assert data.label[rows].tolist() == first[4]
    assert len(data.schema.user_sparse) == 9  # user id + 8 profile fields from the nested [[...]] profile


def test_librerank_rejects_ids_beyond_ft_num(tmp_path):
    write_librerank(tmp_path / "lr", 1)
    path = tmp_path / "lr" / "data.valid"
    lines = path.read_text().splitlines(keepends=True)
    parts = lines[2].split("\t")
    items = ast.literal_eval(parts[2])
    items[0][0] = 9999  # data.stat says ft_num = 500
    parts[2] = str(items)
    lines[2] = "\t".join(parts)
    path.write_text("".join(lines))
    with pytest.raises(DataFormatError, match=r"data.valid:3: field 'spar_ft'"):
        prepare(PrepareConfig(source="librerank", src=tmp_path / "lr", out=tmp_path / "out"))


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_is_seeded_and_saves_its_truth(tmp_path, seed):
    a = prepare(PrepareConfig(source="synthetic", out=tmp_path / "a", n_lists=500, seed=seed))
    b = prepare(PrepareConfig(source="synthetic", out=tmp_path / "b", n_lists=500, seed=seed))
    c = prepare(PrepareConfig(source="synthetic", out=tmp_path / "c", n_lists=500, seed=seed + 10))
    hashes = [PreparedDataset(p).manifest["content_hash"] for p in (a, b, c)]
    assert hashes[0] == hashes[1] != hashes[2]
    data = PreparedDataset(a)
    truth = SyntheticClickModel.load(a / "truth.safetensors")
    # the stored clicks follow the saved truth: observed CTR per position bucket within 4 standard errors
    batch = data.batch(np.arange(data.n_lists))
    prob = truth.click_prob(batch.user_sparse[:, 0] - 1, batch.item_sparse[..., 0] - 1, batch.mask)
    expected, observed = prob[batch.mask].sum().item(), batch.label[batch.mask].sum().item()
    assert abs(observed - expected) < 4 * np.sqrt(expected)
    assert data.verify()


def test_synthetic_click_model_has_position_bias_and_context_effect():
    from relist.data.synthetic import SyntheticParams

    truth = SyntheticClickModel.sample(SyntheticParams(n_users=50, n_items=300), seed=3)
    users = torch.arange(50)
    items = torch.randint(0, 300, (50, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(50, 10, dtype=torch.bool)
    p = truth.click_prob(users, items, mask)
    flipped = truth.click_prob(users, items.flip(1), mask).flip(1)
    # the same item is clicked more often shown first than shown last
    assert (p[:, 0] > flipped[:, 0]).float().mean() > 0.9
    # an item shown after items of its own category is clicked less than after items of other categories
    category = truth.item_category
    for c in range(truth.params.n_categories):
        own = torch.nonzero(category == c).flatten()
        other = torch.nonzero(category != c).flatten()
        if len(own) < 10:
            continue
        target = own[9:10]
        after_same = torch.cat([own[:9], target])[None, :]
        after_other = torch.cat([other[:9], target])[None, :]
        for u in range(5):
            user = torch.tensor([u])
            p_same = truth.click_prob(user, after_same, mask[:1])[0, 9]
            p_other = truth.click_prob(user, after_other, mask[:1])[0, 9]
            assert p_same < p_other


@pytest.mark.parametrize("name", ["raw_sample.csv", "ad_feature.csv", "user_profile.csv"])
def test_taobao_blank_lines_are_not_records(tmp_path, name):
    """Blank lines (at the end, with CR LF, or between records) prepare the same lists as the file without
    them; a line of empty fields is still refused with its line."""
    write_taobao(tmp_path / "raw", 4)
    clean = PreparedDataset(prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "a")))
    path = tmp_path / "raw" / name
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + "\n" + "".join(lines[5:]) + "\n\r\n\n")
    blank = PreparedDataset(prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "b")))
    assert blank.manifest["content_hash"] == clean.manifest["content_hash"]
    assert blank.vocab("user_id") == clean.vocab("user_id")
    path.write_text("".join(lines[:5]) + "," * (lines[0].count(",")) + "\n" + "".join(lines[5:]) + "\n")
    with pytest.raises(DataFormatError) as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "c"))
    assert (err.value.path, err.value.line) == (str(path), 6)


@pytest.mark.parametrize("price", ["nan", "inf", "-inf", "NaN"])
def test_taobao_non_finite_price_names_file_line_and_field(tmp_path, price):
    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / "ad_feature.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[7] = lines[7].rsplit(",", 1)[0] + f",{price}\n"
    path.write_text("".join(lines))
    with pytest.raises(DataFormatError, match="expected a finite number") as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 8, "price")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["spar_ft", "label", "profile"])
def test_prm_public_deep_nesting_names_file_line_and_field(tmp_path, field):
    write_prm(tmp_path / "p.txt", 2, n_null=0)
    path = tmp_path / "p.txt"
    lines = path.read_text().splitlines(keepends=True)
    parts = lines[4].rstrip("\n").split("|")
    parts[("uid", "profile", "spar_ft", "dens_ft1", "dens_ft2", "label").index(field)] = "[" * 100_000 + "]" * 100_000
    lines[4] = "|".join(parts) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(DataFormatError, match="nested too deeply") as err:
        prepare(PrepareConfig(source="prm-public", src=path, out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 5, field)


def longest_label_lines(path, sep: str, field: int) -> list[tuple[int, int]]:
    """(line number, number of labels) of every list line of a file, null lines left out."""
    return [
        (k, len(ast.literal_eval(line.split(sep)[field])))
        for k, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip() and "null" not in line
    ]


@pytest.mark.parametrize("source", ["prm-public", "librerank"])
def test_a_list_longer_than_max_items_is_refused_with_file_and_line(tmp_path, source):
    """The longest list of the files passes at a limit of its own length and is refused one below it, at the
    first line that holds more items than the limit; nothing is written."""
    if source == "prm-public":
        write_prm(tmp_path / "p.txt", 4)
        src, files, sep, field = tmp_path / "p.txt", [tmp_path / "p.txt"], "|", 5
    else:
        write_librerank(tmp_path / "lr", 4)
        src, sep, field = tmp_path / "lr", "\t", 4
        files = [tmp_path / "lr" / f"data.{n}" for n in ("train", "valid", "test")]
    lines = [(path, k, n) for path in files for k, n in longest_label_lines(path, sep, field)]
    longest = max(n for _, _, n in lines)
    prepare(PrepareConfig(source=source, src=src, out=tmp_path / "ok", max_items=longest))
    path, line, n = next((p, k, n) for p, k, n in lines if n > longest - 1)
    with pytest.raises(DataFormatError, match=f"{n} items, more than the limit of {longest - 1}") as err:
        prepare(PrepareConfig(source=source, src=src, out=tmp_path / "out", max_items=longest - 1))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, "label")
    assert not (tmp_path / "out").exists()


def test_taobao_and_synthetic_lists_fit_max_items_by_construction(tmp_path):
    write_taobao(tmp_path / "raw", 0)
    with pytest.raises(ValueError, match="--keep-last 30 is more than --max-items 20"):
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "t", max_items=20))
    short = PreparedDataset(
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "t", max_items=20, keep_last=20))
    )
    assert max(short.lengths()) <= 20
    with pytest.raises(ValueError, match="--max-len 30 is more than --max-items 12"):
        prepare(PrepareConfig(source="synthetic", out=tmp_path / "s", n_lists=50, max_items=12))
    assert not (tmp_path / "s").exists()


def test_synthetic_histories_cut_to_max_history_keep_the_newest(tmp_path):
    full = PreparedDataset(prepare(PrepareConfig(source="synthetic", out=tmp_path / "a", n_lists=80, seed=3)))
    cut = PreparedDataset(
        prepare(PrepareConfig(source="synthetic", out=tmp_path / "b", n_lists=80, seed=3, max_history=4))
    )
    assert full.manifest["info"]["histories_cut"] == 0 and cut.manifest["info"]["histories_cut"] == 80
    for k in (0, 41, 79):
        whole = np.asarray(full.user_hist[full.hist_offsets[k] : full.hist_offsets[k + 1]])
        kept = np.asarray(cut.user_hist[cut.hist_offsets[k] : cut.hist_offsets[k + 1]])
        assert len(whole) == 10 and np.array_equal(kept, whole[-4:])
    assert np.array_equal(np.asarray(cut.item_sparse), np.asarray(full.item_sparse))


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name", ["raw_sample.csv", "ad_feature.csv", "user_profile.csv"])
def test_taobao_byte_order_mark_is_not_data(tmp_path, name):
    """A file saved with a UTF-8 byte-order mark prepares the same dataset as the file without it."""
    write_taobao(tmp_path / "raw", 6)
    clean = PreparedDataset(prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "a")))
    path = tmp_path / "raw" / name
    path.write_bytes(BOM + path.read_bytes())
    marked = PreparedDataset(prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "b")))
    assert marked.manifest["content_hash"] == clean.manifest["content_hash"]
    for field in ("user_id", "item_id", "cms_segid"):
        assert marked.vocab(field) == clean.vocab(field)


def test_prm_public_byte_order_mark_is_not_data(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_prm(tmp_path / "a" / "p.txt", 5, n_null=0)
    (tmp_path / "b" / "p.txt").write_bytes(BOM + (tmp_path / "a" / "p.txt").read_bytes())
    hashes = [
        PreparedDataset(prepare(PrepareConfig(source="prm-public", src=tmp_path / d, out=tmp_path / f"out-{d}")))
        for d in ("a", "b")
    ]
    assert hashes[0].manifest["content_hash"] == hashes[1].manifest["content_hash"]
    assert hashes[0].vocab("user_id") == hashes[1].vocab("user_id")


@pytest.mark.parametrize(
    "key, value", [("ft_num", "500"), ("ft_num", None), ("itm_spar_fnum", "5"), ("itm_dens_fnum", -1)]
)
def test_librerank_data_stat_of_the_wrong_type_names_file_and_key(tmp_path, key, value):
    import json

    write_librerank(tmp_path / "lr", 2)
    path = tmp_path / "lr" / "data.stat"
    stat = json.loads(path.read_text())
    path.write_text(json.dumps({**stat, key: value}))
    with pytest.raises(DataFormatError, match=f"field '{key}'.*non-negative integer"):
        prepare(PrepareConfig(source="librerank", src=tmp_path / "lr", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["data.stat", "data.train", "data.test"])
def test_librerank_byte_order_mark_is_not_data(tmp_path, name):
    write_librerank(tmp_path / "lr", 2)
    clean = PreparedDataset(prepare(PrepareConfig(source="librerank", src=tmp_path / "lr", out=tmp_path / "a")))
    path = tmp_path / "lr" / name
    path.write_bytes(BOM + path.read_bytes())
    marked = PreparedDataset(prepare(PrepareConfig(source="librerank", src=tmp_path / "lr", out=tmp_path / "b")))
    assert marked.manifest["content_hash"] == clean.manifest["content_hash"]
    assert marked.manifest["info"]["data_stat"] == clean.manifest["info"]["data_stat"]


@pytest.mark.parametrize(
    "name, column, value",
    [
        ("raw_sample.csv", 0, "\u0663\u0664"),  # Arabic-Indic digits: str.isdigit() says yes, polars no
        ("raw_sample.csv", 2, "\uff11\uff12"),  # fullwidth digits
        ("raw_sample.csv", 1, "12 "),  # a trailing space polars does not read as part of an integer
        ("ad_feature.csv", 0, "\u0663"),
        ("user_profile.csv", 0, "\u0663\u0664"),
    ],
)
def test_taobao_integers_in_other_digits_name_file_line_and_field(tmp_path, name, column, value):
    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / name
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    cells = lines[6].rstrip("\n").split(",")
    cells[column] = value
    lines[6] = ",".join(cells) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataFormatError, match="expected an integer") as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    field = lines[0].strip().split(",")[column]
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 7, field)
    assert not (tmp_path / "out").exists()


def replace_cell(path, line: int, column: int, value: str) -> None:
    """Write ``value`` into one cell of a Taobao CSV line (1-based)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    cells = lines[line - 1].rstrip("\n").split(",")
    cells[column] = value
    lines[line - 1] = ",".join(cells) + "\n"
    path.write_text("".join(lines), encoding="utf-8")


def test_taobao_line_longer_than_the_csv_field_limit_names_file_line_and_field(tmp_path):
    """A 200 KB cell (csv's default limit is 128 KiB) on a bad line: the line's fault is named, not csv's
    limit, and csv's process-wide limit is left as it was."""
    import csv

    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / "raw_sample.csv"
    replace_cell(path, 7, 3, "p" * 200_000)  # pid: any text
    replace_cell(path, 7, 5, "y")  # clk
    limit = csv.field_size_limit()
    with pytest.raises(DataFormatError, match="expected 0 or 1") as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 7, "clk")
    assert csv.field_size_limit() == limit


@pytest.mark.parametrize(
    "price",
    [
        "\u0661\u0662.5",  # Arabic-Indic digits: float() reads them, polars does not
        "\uff11\uff12.5",  # fullwidth digits
        "1_000",  # float() reads underscores
        "12.5 ",  # float() strips a trailing space, polars does not
    ],
)
def test_taobao_prices_in_other_digits_name_file_line_and_field(tmp_path, price):
    """Prices are ASCII numbers, as the ids are. Prices polars reads (leading spaces, exponents, signs, a bare
    point) on earlier lines are passed over: the line named is the bad one."""
    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / "ad_feature.csv"
    for line, good in zip(range(2, 8), [" 12.5", "1e3", "+12", ".5", "5.", "-.5E-2"]):
        replace_cell(path, line, 5, good)
    replace_cell(path, 9, 5, price)
    with pytest.raises(DataFormatError, match="expected a number \\(ASCII digits\\)") as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 9, "price")


@pytest.mark.parametrize(
    "name, column, value",
    [
        ("raw_sample.csv", 0, "9223372036854775808"),  # 2**63
        ("raw_sample.csv", 1, "-" + "9" * 30),  # time_stamp
        ("ad_feature.csv", 0, "1" + "0" * 5000),  # past int()'s 4,300 digits too
    ],
)
def test_taobao_integers_beyond_64_bits_name_file_line_and_field(tmp_path, name, column, value):
    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / name
    first = path.read_text().splitlines()[1].split(",")[column]
    replace_cell(path, 2, column, "0" * 5000 + first)  # leading zeros polars reads: not the fault
    replace_cell(path, 6, column, value)
    with pytest.raises(DataFormatError, match="out of the 64-bit range") as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    field = path.read_text().splitlines()[0].split(",")[column]
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 6, field)


@pytest.mark.parametrize("spelling", ["7", "007"])
def test_taobao_repeated_adgroup_id_names_both_lines(tmp_path, spelling):
    """Ad 7 a second time (after a blank line, counted) is refused with both lines: the file's order would pick
    its features."""
    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / "ad_feature.csv"
    lines = path.read_text().splitlines(keepends=True)
    assert lines[7].startswith("7,")
    path.write_text("".join(lines) + "\n" + f"{spelling},1,2,3,4,5.0\n")
    with pytest.raises(DataFormatError, match="7 repeats line 8") as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), len(lines) + 2, "adgroup_id")
    assert not (tmp_path / "out").exists()


def test_taobao_repeated_user_profile_names_both_lines(tmp_path):
    """User 1's profile a second time (padded, as the file's ids may be) is refused with both lines: the first
    row used to win silently."""
    write_taobao(tmp_path / "raw", 0)
    path = tmp_path / "raw" / "user_profile.csv"
    lines = path.read_text().splitlines(keepends=True)
    assert lines[1].startswith("1,")
    path.write_text("".join(lines) + " 1 ,0,5,2,3,2,3,0,1\n")
    with pytest.raises(DataFormatError, match="1 repeats line 2") as err:
        prepare(PrepareConfig(source="taobao-ad", src=tmp_path / "raw", out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), len(lines) + 1, "userid")
    assert not (tmp_path / "out").exists()


def set_prm_field(path, line: int, field: str, value: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    parts = lines[line - 1].rstrip("\n").split("|")
    parts[("uid", "profile", "spar_ft", "dens_ft1", "dens_ft2", "label").index(field)] = value
    lines[line - 1] = "|".join(parts) + "\n"
    path.write_text("".join(lines))


def set_first_sparse_id(path, line: int, value: str) -> None:
    """Write ``value`` (a literal) as the first item's first sparse id of a PRM line."""
    spar = path.read_text().splitlines()[line - 1].split("|")[2]
    set_prm_field(path, line, "spar_ft", "[[" + value + spar[spar.index(",", 2) :])


def test_prm_public_sparse_ids_above_2_53_stay_exact(tmp_path):
    """2**53 and 2**53 + 1 are one float64: read through floats they were one item."""
    path = tmp_path / "p.txt"
    write_prm(path, 2, n_lists=6, n_null=0)
    set_first_sparse_id(path, 2, str(2**53))
    set_first_sparse_id(path, 3, str(2**53 + 1))
    set_first_sparse_id(path, 4, str(2**63 - 1))
    data = PreparedDataset(prepare(PrepareConfig(source="prm-public", src=path, out=tmp_path / "out")))
    items = data.vocab("item_id")
    firsts = [items[data.item_sparse[data.offsets[k], 0]] for k in (1, 2, 3)]
    assert firsts == [str(2**53), str(2**53 + 1), str(2**63 - 1)]


@pytest.mark.parametrize(
    "field, value",
    [
        ("spar_ft", "1e300"),  # wrapped to -2**63 through float64
        ("spar_ft", "2.0"),
        ("spar_ft", "true"),  # JSON true: 1 to numpy
        ("spar_ft", str(2**63)),  # past int64
        ("spar_ft", str(-(2**63) - 1)),
        ("uid", "true"),
        ("uid", "false"),
    ],
)
def test_prm_public_ids_that_are_not_exact_integers_name_file_line_and_field(tmp_path, field, value):
    path = tmp_path / "p.txt"
    write_prm(path, 2, n_lists=6, n_null=0)
    if field == "uid":
        set_prm_field(path, 4, "uid", value)
    else:
        set_first_sparse_id(path, 4, value)
    with pytest.raises(DataFormatError, match="integer") as err:
        prepare(PrepareConfig(source="prm-public", src=path, out=tmp_path / "out"))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 4, field)


def test_librerank_sparse_ids_must_be_json_integers(tmp_path):
    write_librerank(tmp_path / "lr", 1)
    path = tmp_path / "lr" / "data.test"
    lines = path.read_text().splitlines(keepends=True)
    parts = lines[1].split("\t")
    parts[2] = "[[true" + parts[2][parts[2].index(",", 2) :]  # read as 1 through float64
    lines[1] = "\t".join(parts)
    path.write_text("".join(lines))
    with pytest.raises(DataFormatError, match=r"data.test:2: field 'spar_ft': .*integer ids.*True"):
        prepare(PrepareConfig(source="librerank", src=tmp_path / "lr", out=tmp_path / "out"))


def refused_with_peak(call) -> tuple[DataFormatError, int]:
    """The DataFormatError ``call`` raises, and the peak bytes Python allocated while it ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError) as err:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return err.value, peak


def test_prm_public_long_lines_are_refused_before_they_are_parsed(tmp_path):
    """A label of a million entries is refused from its commas, and so are features wider than the first
    list's: refusing them allocates about three copies of the line (it is read, cut at its newline and
    split), where parsing them took 7 and 13 times its size."""
    from relist.data.prm_public import read

    path = tmp_path / "p.txt"
    write_prm(path, 3, n_lists=3, n_null=0)
    good = path.read_bytes()
    long_label = "7|[1, 2, 3]|[[1, 2, 3, 4, 5]]|[[0.1]]|[[0.2]]|" + str([0] * 1_000_000) + "\n"
    path.write_bytes(good + long_label.encode())
    err, peak = refused_with_peak(lambda: read([path], 1.0, 0))
    assert (err.line, err.field) == (4, "label")
    assert "1000000 comma-separated entries, more than the limit of 1000 items" in str(err)
    assert peak < 4 * len(long_label), peak

    wide = str([[0.5] * 2000] * 200)  # 200 items of 2,000 dense values, where the first lists have 19
    wide_line = f"7|[1, 2, 3]|{[[1, 2, 3, 4, 5]] * 200}|{wide}|{[[0.2]] * 200}|{[0] * 200}\n"
    path.write_bytes(good + wide_line.encode())
    err, peak = refused_with_peak(lambda: read([path], 1.0, 0))
    assert (err.line, err.field) == (4, "dens_ft1")
    assert "399999 commas, more than 200 items of 19 values each hold (the width of earlier lines)" in str(err)
    assert peak < 4 * len(wide_line), peak


def test_max_id_chars_guards_every_source(tmp_path):
    """PRM Public's longest id (user 1000..) passes at its own length and is refused one below, naming the
    field; a non-positive limit is refused."""
    write_prm(tmp_path / "p.txt", 0, n_lists=10, n_null=0)
    src = tmp_path / "p.txt"
    prepare(PrepareConfig(source="prm-public", src=src, out=tmp_path / "ok", max_id_chars=4))
    with pytest.raises(ValueError, match="field 'user_id' holds an id of 4 characters \\('1000'\\).*--max-id-chars 3"):
        prepare(PrepareConfig(source="prm-public", src=src, out=tmp_path / "out", max_id_chars=3))
    with pytest.raises(ValueError, match="--max-id-chars must be positive"):
        prepare(PrepareConfig(source="prm-public", src=src, out=tmp_path / "out", max_id_chars=0))
    assert not (tmp_path / "out").exists()
