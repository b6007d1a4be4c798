"""ListBatch, rank, collate and PreparedDataset.batch / batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from relist.batch import ListBatch, collate, rank
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import ListTable, PreparedDataset, Schema, SparseField, write_dataset

FIELDS = [f.name for f in dataclasses.fields(ListBatch)]


def identity_batch(seed, size=6, width=7, n_sparse=3, n_dense=2):
    """Every per-item feature encodes its item: id = 100 * (b + 1) + j + 1; padding is all zeros."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, size=size)
    lengths[0] = width
    ids = torch.tensor([[100 * (b + 1) + j + 1 for j in range(width)] for b in range(size)], dtype=torch.long)
    mask = torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]
    ids = ids * mask
    item_sparse = torch.stack([ids * (f + 1) for f in range(n_sparse)], dim=-1)
    item_dense = torch.stack([ids.float() + 0.25 * f for f in range(n_dense)], dim=-1) * mask[..., None]
    label = (ids % 3 == 0).float()
    return ListBatch(
        item_sparse=item_sparse,
        item_dense=item_dense,
        label=label,
        mask=mask,
        user_sparse=torch.arange(size)[:, None] + 1,
        user_hist=torch.ones(size, 2, 1, dtype=torch.long),
        list_id=torch.arange(size) + 10,
    )


def assert_batches_equal(a: ListBatch, b: ListBatch):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name


# --------------------------------------------------------------------------- reorder and rank


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reorder_moves_every_per_item_field_together(seed):
    batch = identity_batch(seed)
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(batch.list_len, generator=g) for _ in range(batch.size)])
    moved = batch.reorder(perm)
    for b in range(batch.size):
        for j in range(batch.list_len):
            src = int(perm[b, j])
            assert torch.equal(moved.item_sparse[b, j], batch.item_sparse[b, src])
            assert torch.equal(moved.item_dense[b, j], batch.item_dense[b, src])
            assert moved.label[b, j] == batch.label[b, src]
            assert moved.mask[b, j] == batch.mask[b, src]
    # the features of each position still describe one and the same item
    ids = moved.item_sparse[..., 0]
    for f in range(moved.item_sparse.shape[-1]):
        assert torch.equal(moved.item_sparse[..., f], ids * (f + 1))
    assert torch.equal(moved.item_dense[..., 0], ids.float())
    assert torch.equal(moved.label, (ids % 3 == 0).float())
    assert torch.equal(moved.mask, ids > 0)
    # per-list fields do not move
    for name in ("user_sparse", "user_hist", "list_id"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    # the inverse permutation restores the batch
    assert_batches_equal(moved.reorder(perm.argsort(dim=1)), batch)


def test_reorder_rejects_a_wrong_shape():
    batch = identity_batch(0)
    with pytest.raises(ValueError):
        batch.reorder(torch.zeros(batch.size, batch.list_len + 1, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_rank_puts_padding_last_and_keeps_ties_in_input_order(seed):
    rng = np.random.default_rng(seed)
    size, width = 8, 9
    lengths = rng.integers(1, width + 1, size=size)
    mask = torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]
    scores = torch.as_tensor(rng.integers(0, 3, size=(size, width)), dtype=torch.float32)
    scores[~mask] = 100.0  # padding scores above every real one must still go last
    order = rank(scores, mask)
    for b in range(size):
        n = int(lengths[b])
        expected = sorted(range(n), key=lambda j: -float(scores[b, j]))  # stable
        assert order[b, :n].tolist() == expected
        assert sorted(order[b, n:].tolist()) == list(range(n, width))
    batch = identity_batch(seed, size=size, width=width)
    batch = dataclasses.replace(batch, mask=mask)
    assert torch.equal(batch.reorder(order).mask, mask)  # real items first, padding after


def test_rank_with_constant_scores_is_the_input_order():
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    order = rank(torch.zeros(2, 4), mask)
    assert order.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    order = rank(torch.tensor([[1.0, 3.0, 3.0, 5.0], [2.0, 2.0, 1.0, 2.0]]), mask)
    assert order.tolist() == [[1, 2, 0, 3], [0, 1, 3, 2]]


# --------------------------------------------------------------------------- collate


def example(n, seed, hist=2, with_label=True, list_id=None):
    rng = np.random.default_rng(seed)
    e = {
        "item_sparse": rng.integers(1, 50, size=(n, 2)),
        "item_dense": rng.normal(size=(n, 3)).astype(np.float32),
        "user_sparse": np.array([seed + 1, 7]),
        "user_hist": rng.integers(1, 50, size=(hist, 2)),
    }
    if with_label:
        e["label"] = (rng.random(n) < 0.5).astype(np.float32)
    if list_id is not None:
        e["list_id"] = list_id
    return e


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collate_pads_with_zeros_and_mask_false(seed):
    lengths = [3, 1, 5, 2]
    hists = [2, 0, 4, 1]
    examples = [example(n, seed * 10 + b, hist=h, list_id=40 + b) for b, (n, h) in enumerate(zip(lengths, hists))]
    batch = collate(examples)
    assert batch.item_sparse.shape == (4, 5, 2) and batch.item_sparse.dtype == torch.long
    assert batch.item_dense.shape == (4, 5, 3) and batch.item_dense.dtype == torch.float32
    assert batch.label.shape == (4, 5) and batch.mask.dtype == torch.bool
    assert batch.user_hist.shape == (4, 4, 2)
    assert batch.lengths.tolist() == lengths
    assert batch.list_id.tolist() == [40, 41, 42, 43]
    for b, (e, n, h) in enumerate(zip(examples, lengths, hists)):
        assert batch.mask[b].tolist() == [True] * n + [False] * (5 - n)
        assert np.array_equal(batch.item_sparse[b, :n].numpy(), e["item_sparse"])
        assert np.array_equal(batch.item_dense[b, :n].numpy(), e["item_dense"])
        assert np.array_equal(batch.label[b, :n].numpy(), e["label"])
        assert np.array_equal(batch.user_sparse[b].numpy(), e["user_sparse"])
        assert np.array_equal(batch.user_hist[b, :h].numpy(), e["user_hist"])
        assert (batch.item_sparse[b, n:] == 0).all() and (batch.item_dense[b, n:] == 0).all()
        assert (batch.label[b, n:] == 0).all() and (batch.user_hist[b, h:] == 0).all()
    assert torch.equal(batch.item_id, batch.item_sparse[..., 0])


def test_collate_defaults_without_label_or_list_id():
    batch = collate([example(2, 0, with_label=False), example(3, 1, with_label=False)])
    assert (batch.label == 0).all()
    assert batch.list_id.tolist() == [0, 1]


@pytest.mark.parametrize("max_len", [1, 2, 4, 9])
def test_collate_truncates_to_max_len(max_len):
    lengths = [3, 1, 5, 2]
    examples = [example(n, b) for b, n in enumerate(lengths)]
    batch = collate(examples, max_len=max_len)
    kept = [min(n, max_len) for n in lengths]
    assert batch.list_len == max(kept)
    assert batch.lengths.tolist() == kept
    for b, (e, n) in enumerate(zip(examples, kept)):
        assert np.array_equal(batch.item_sparse[b, :n].numpy(), e["item_sparse"][:n])
        assert np.array_equal(batch.item_dense[b, :n].numpy(), e["item_dense"][:n])
        assert np.array_equal(batch.label[b, :n].numpy(), e["label"][:n])
        assert (batch.label[b, n:] == 0).all() and (batch.item_sparse[b, n:] == 0).all()


def test_collate_rejects_empty_input():
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(ValueError):
        collate([example(2, 0), example(0, 1)])


# --------------------------------------------------------------------------- to, slicing, truncate


def test_to_cpu_and_slicing():
    batch = identity_batch(3)
    moved = batch.to("cpu")
    assert moved.device == torch.device("cpu")
    assert_batches_equal(moved, batch)
    part = batch[1:3]
    assert len(part) == 2 and part.list_len == batch.list_len
    for name in FIELDS:
        assert torch.equal(getattr(part, name), getattr(batch, name)[1:3]), name
    picked = batch[[4, 0]]
    for name in FIELDS:
        assert torch.equal(getattr(picked, name), getattr(batch, name)[torch.tensor([4, 0])]), name
    cut = batch.truncate(3)
    assert cut.list_len == 3
    for name in ("item_sparse", "item_dense", "label", "mask"):
        assert torch.equal(getattr(cut, name), getattr(batch, name)[:, :3]), name
    assert torch.equal(cut.list_id, batch.list_id)


# --------------------------------------------------------------------------- PreparedDataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    return PreparedDataset(prepare(PrepareConfig(source="synthetic", n_lists=300, out=out)))


def check_batch_against_arrays(data: PreparedDataset, batch: ListBatch, index, max_len=None):
    offsets, hist_offsets = np.asarray(data.offsets), np.asarray(data.hist_offsets)
    assert batch.list_id.tolist() == list(index)
    width = 0
    for b, i in enumerate(index):
        start, stop = offsets[i], offsets[i + 1]
        if max_len is not None:
            stop = min(stop, start + max_len)
        n = stop - start
        width = max(width, n)
        assert batch.mask[b].tolist() == [True] * n + [False] * (batch.list_len - n)
        assert np.array_equal(batch.item_sparse[b, :n].numpy(), data.item_sparse[start:stop])
        assert np.array_equal(batch.item_dense[b, :n].numpy(), data.item_dense[start:stop])
        assert np.array_equal(batch.label[b, :n].numpy(), data.label[start:stop])
        assert np.array_equal(batch.user_sparse[b].numpy(), data.user_sparse[i])
        h = hist_offsets[i + 1] - hist_offsets[i]
        assert np.array_equal(batch.user_hist[b, :h].numpy(), data.user_hist[hist_offsets[i] : hist_offsets[i + 1]])
        assert (batch.user_hist[b, h:] == 0).all()
    assert batch.list_len == width
    pad = ~batch.mask
    assert (batch.item_sparse[pad] == 0).all()
    assert (batch.item_dense[pad] == 0).all()
    assert (batch.label[pad] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prepared_batch_matches_ragged_arrays(synthetic, seed):
    rng = np.random.default_rng(seed)
    index = rng.choice(synthetic.n_lists, size=25, replace=False)
    batch = synthetic.batch(index)
    assert batch.item_sparse.dtype == torch.long and batch.item_dense.dtype == torch.float32
    assert batch.label.dtype == torch.float32 and batch.mask.dtype == torch.bool
    check_batch_against_arrays(synthetic, batch, index)
    # max_len keeps the first items of each list
    check_batch_against_arrays(synthetic, synthetic.batch(index, max_len=12), index, max_len=12)


def test_prepared_lists_have_varying_lengths(synthetic):
    lengths = synthetic.lengths()
    assert lengths.min() >= 10 and lengths.max() <= 30 and lengths.min() < lengths.max()
    assert synthetic.counts["n_lists"] == 300


@pytest.mark.parametrize("shuffle,seed", [(False, 0), (True, 0), (True, 1), (True, 2)])
@pytest.mark.parametrize("split", ["ranker", "train", "valid", "test"])
def test_batches_cover_each_list_of_the_split_once(synthetic, split, shuffle, seed):
    index = synthetic.split(split)
    seen = []
    for batch in synthetic.batches(split, batch_size=16, shuffle=shuffle, seed=seed):
        assert 1 <= batch.size <= 16
        assert (batch.item_sparse[~batch.mask] == 0).all() and (batch.item_dense[~batch.mask] == 0).all()
        seen.extend(batch.list_id.tolist())
    assert len(seen) == len(set(seen)) == len(index)
    assert sorted(seen) == sorted(index.tolist())
    if shuffle and len(index) > 8:
        assert seen != sorted(seen)
    else:
        assert seen == index.tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_batches_drop_last(synthetic, seed):
    index = synthetic.split("ranker")
    seen = [
        i
        for batch in synthetic.batches("ranker", 7, shuffle=True, seed=seed, drop_last=True)
        for i in batch.list_id.tolist()
    ]
    assert len(seen) == len(index) - len(index) % 7 == len(set(seen))
    assert set(seen) <= set(index.tolist())


def test_splits_partition_the_lists(synthetic):
    parts = [synthetic.split(name).tolist() for name in ("ranker", "train", "valid", "test")]
    together = sorted(i for p in parts for i in p)
    assert together == list(range(synthetic.n_lists))


def test_batch_with_empty_history_in_last_list(tmp_path):
    schema = Schema(
        item_sparse=(SparseField("item_id", 10),),
        item_dense=("x",),
        user_sparse=(SparseField("user_id", 3),),
        user_hist=(SparseField("item_id", 10),),
    )
    table = ListTable(
        offsets=np.array([0, 2, 5]),
        item_sparse=np.array([[1], [2], [3], [4], [5]]),
        item_dense=np.ones((5, 1), np.float32),
        label=np.array([0, 1, 0, 0, 1], np.float32),
        user_sparse=np.array([[1], [2]]),
        hist_offsets=np.array([0, 2, 2]),
        user_hist=np.array([[6], [7]]),
        schema=schema,
        splits={"ranker": np.array([0]), "train": np.array([1])},
    )
    data = PreparedDataset(write_dataset(table, tmp_path / "data", source="test", seed=0))
    batch = data.batch(np.array([0, 1]))
    assert batch.user_hist[:, :, 0].tolist() == [[6, 7], [0, 0]]


def test_vocabularies_round_trip_any_string(synthetic, tmp_path):
    """Ids and categories may hold any character a source reads: line breaks of every kind (which
    ``str.splitlines`` splits at), separators, a lone surrogate. Each comes back as it went in, at its id."""
    from relist.data.store import read_vocab, write_vocab

    awkward = ["", "plain", "carriage\rreturn", "new\nline", "v\x0btab", "f\x0cfeed", "fs\x1c", "gs\x1d", "rs\x1e",
               "nel\x85", "ls\u2028", "ps\u2029", "lone \ud800 surrogate", "wéather ☂"]  # fmt: skip
    write_vocab(tmp_path / "category.json", awkward)
    assert read_vocab(tmp_path / "category.json") == awkward
    data = synthetic
    table = ListTable(
        offsets=np.asarray(data.offsets),
        item_sparse=np.asarray(data.item_sparse),
        item_dense=np.asarray(data.item_dense),
        label=np.asarray(data.label),
        user_sparse=np.asarray(data.user_sparse),
        hist_offsets=np.asarray(data.hist_offsets),
        user_hist=np.asarray(data.user_hist),
        schema=data.schema,
        splits=data.splits,
        vocabs={"category": awkward},
    )
    written = PreparedDataset(write_dataset(table, tmp_path / "d", "synthetic", 0))
    assert written.vocab("category") == awkward
    (tmp_path / "old.txt").write_text("a\rb\nc\u2028d\n", encoding="utf-8", newline="")  # an older dataset's file
    assert read_vocab(tmp_path / "old.txt") == ["a\rb", "c\u2028d"]
