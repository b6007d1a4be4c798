"""Re-rankers and the consistency losses: the contract, invariances, persistence, perturbations, obedience."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import relist.nn
from relist.batch import ListBatch, rank
from relist.data.store import Schema, SparseField
from relist.io import CorruptFileError
from relist.nn import Dropout, dropout
from relist.principled import (
    PERTURBATIONS,
    PrincipledConfig,
    PrincipledObjective,
    cs_loss,
    inverse,
    obedience,
    perturb,
    present,
)
from relist.rerankers import REGISTRY, build_reranker, check_reranker, load_reranker
from relist.rerankers.base import length_groups

SCHEMA = Schema(
    item_sparse=(SparseField("item_id", 60), SparseField("category", 6)),
    item_dense=("a", "b", "init_score"),
    user_sparse=(SparseField("user_id", 20),),
    user_hist=(SparseField("item_id", 60), SparseField("category", 6)),
)


def random_batch(seed: int, size: int = 12, length: int = 8, hist: int = 5) -> ListBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (size,), generator=g)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    # distinct item ids within a list, so orders can be compared by id
    ids = torch.stack([torch.randperm(59, generator=g)[:length] + 1 for _ in range(size)])
    item_sparse = torch.stack([ids, ids % 5 + 1], dim=-1) * mask[..., None]
    dense = torch.randn(size, length, 3, generator=g) * mask[..., None]
    label = (torch.rand(size, length, generator=g) < 0.3).float() * mask
    h_ids = torch.randint(1, 60, (size, hist), generator=g)
    h_ids[1] = 0  # a user without history
    user_hist = torch.stack([h_ids, (h_ids % 5 + 1) * (h_ids > 0)], dim=-1)
    return ListBatch(
        item_sparse=item_sparse,
        item_dense=dense,
        label=label,
        mask=mask,
        user_sparse=torch.randint(1, 20, (size, 1), generator=g),
        user_hist=user_hist,
        list_id=torch.arange(size),
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("use_user", [True, False])
def test_every_reranker_keeps_the_contract(name, use_user):
    torch.manual_seed(0)
    model = build_reranker(name, SCHEMA, use_user=use_user)
    check_reranker(model, random_batch(0))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_save_then_load_gives_the_same_scores(name, tmp_path):
    torch.manual_seed(1)
    model = build_reranker(name, SCHEMA)
    batch = random_batch(1)
    model.save(tmp_path / name)
    loaded = load_reranker(tmp_path / name)
    assert type(loaded) is type(model)
    assert torch.equal(model.score(batch), loaded.score(batch))


def test_a_saved_model_is_checked_before_it_is_loaded(tmp_path):
    """A flipped bit, a truncated file or a hand-edited model.json is an error naming the file, not a model
    that silently differs; a model.json whose settings are of the wrong type is named too."""
    build_reranker("prm", SCHEMA).save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    pristine = weights.read_bytes()
    flipped = bytearray(pristine)
    flipped[-5] ^= 0x10
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match="model.safetensors: contents differ"):
        load_reranker(tmp_path / "m")
    weights.write_bytes(pristine[: len(pristine) // 2])
    (tmp_path / "m" / "checksums.json").unlink()  # even unchecked, a truncated file is named
    with pytest.raises(CorruptFileError, match="model.safetensors: not a readable safetensors file"):
        load_reranker(tmp_path / "m")
    weights.write_bytes(pristine)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["config"]["d_model"] = "32"
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.json: config.d_model: expected int, got '32'"):
        load_reranker(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta)[:40])
    with pytest.raises(CorruptFileError, match="model.json: not valid JSON"):
        load_reranker(tmp_path / "m")


@pytest.mark.parametrize("name", ["evaluator", "generator"])
def test_a_saved_last_model_loads_by_name_in_a_fresh_interpreter(name, tmp_path):
    """Nothing but ``relist.rerankers`` is imported there: the registry must already know LAST's models."""
    torch.manual_seed(3)
    model = build_reranker(name, SCHEMA).eval()
    model.save(tmp_path / name)
    torch.save(random_batch(3), tmp_path / "batch.pt")
    torch.save(model.score(random_batch(3)), tmp_path / "scores.pt")
    code = (  # the same torch threads as here: another count may sum in another order (not bit-equal)
        f"import sys, torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
        "from relist.rerankers import load_reranker\n"
        f"model = load_reranker({str(tmp_path / name)!r}).eval()\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=False)\n"
        f"assert model.name == {name!r}, model.name\n"
        f"assert torch.equal(model.score(batch), torch.load({str(tmp_path / 'scores.pt')!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_names_and_settings_are_errors():
    with pytest.raises(ValueError, match="unknown re-ranker 'nope'; valid: .*prm"):
        build_reranker("nope", SCHEMA)
    with pytest.raises(ValueError, match="unknown setting"):
        build_reranker("prm", SCHEMA, d_modle=8)
    with pytest.raises(ValueError, match="prm: unknown loss 'hinge'; valid: softmax, bce"):
        build_reranker("prm", SCHEMA, loss="hinge")
    with pytest.raises(ValueError, match="evaluator: its loss is 'bce' and cannot be changed"):
        build_reranker("evaluator", SCHEMA, loss="softmax")


def test_a_model_saved_without_a_loss_setting_loads_with_its_papers_loss(tmp_path):
    """Files written before the ``loss`` setting existed were trained with the model's own (paper's) loss."""
    build_reranker("midnn", SCHEMA).save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["config"].pop("loss") == "softmax"
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    (tmp_path / "m" / "checksums.json").unlink()  # such files were written before checksums, too
    assert load_reranker(tmp_path / "m").loss_kind == "bce"


def test_setrank_without_ordinals_is_permutation_equivariant():
    torch.manual_seed(2)
    model = build_reranker("setrank", SCHEMA, ordinal=False, initial_skip=True)
    batch = random_batch(2)
    perm = perturb(batch.mask, PrincipledConfig(perturbation="window", window=8), torch.Generator().manual_seed(0))
    scores = model.score(batch)
    moved = model.score(batch.reorder(perm))
    assert torch.allclose(moved.gather(1, inverse(perm))[batch.mask], scores[batch.mask], atol=1e-5)
    # with ordinal embeddings the order matters
    ordered = build_reranker("setrank", SCHEMA, ordinal=True, initial_skip=False)
    a, b = ordered.score(batch), ordered.score(batch.reorder(perm)).gather(1, inverse(perm))
    assert not torch.allclose(a[batch.mask], b[batch.mask], atol=1e-4)


@pytest.mark.parametrize("strategy", PERTURBATIONS)
def test_perturbations_permute_real_items_only(strategy):
    batch = random_batch(3, size=200, length=9)
    perm = perturb(batch.mask, PrincipledConfig(perturbation=strategy), torch.Generator().manual_seed(1))
    assert torch.equal(torch.sort(perm, dim=1).values, torch.arange(9).expand(200, -1))
    # padding stays where it is and real items stay among the real positions
    assert torch.equal(batch.mask.gather(1, perm), batch.mask)
    moved = (perm != torch.arange(9)).any(1)
    several = batch.lengths >= 2
    assert not moved[~several].any()
    if strategy in ("adjacent", "pair"):
        assert moved[several].all() and ((perm != torch.arange(9)).sum(1)[several] == 2).all()
    if strategy == "adjacent":
        where = (perm != torch.arange(9)).float().argmax(1)
        rows = torch.arange(200)[several]
        assert torch.equal(perm[rows, where[several]], where[several] + 1)
    assert moved[several].float().mean() > 0.5


def test_cs_loss_by_hand():
    scores_a = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    scores_b = torch.tensor([[0.4, 0.3, 0.1, 0.9]])
    pos_a = torch.tensor([[0, 1, 2, 3]])
    pos_b = torch.tensor([[2, 1, 0, 3]])
    mask = torch.tensor([[True, True, True, False]])
    # |0-2|·0.1² + |1-1|·0 + |2-0|·0.1² ; the padded item contributes nothing
    assert cs_loss(scores_a, scores_b, pos_a, pos_b, mask).item() == pytest.approx(0.04)
    assert cs_loss(scores_a, scores_a, pos_a, pos_b, mask).item() == 0.0


@pytest.mark.parametrize("name", ["prm", "setrank", "midnn", "pear"])
def test_principled_objective_adds_both_consistency_losses(name):
    torch.manual_seed(4)
    model = build_reranker(name, SCHEMA)
    batch = random_batch(4)
    base = PrincipledObjective(model, PrincipledConfig())(batch)
    parts = PrincipledObjective(model, PrincipledConfig(p1_weight=1.0, p2_weight=2.0))(
        batch, torch.Generator().manual_seed(0)
    )
    assert {"loss_cs_p1", "loss_cs_p2", "loss_base"} <= set(parts)
    model.eval()  # no dropout: the base part is deterministic
    base = PrincipledObjective(model, PrincipledConfig())(batch)["loss"]
    parts = PrincipledObjective(model, PrincipledConfig(p1_weight=1.0, p2_weight=2.0))(
        batch, torch.Generator().manual_seed(0)
    )
    assert parts["loss_base"].item() == pytest.approx(base.item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(
        (parts["loss_base"] + parts["loss_cs_p1"] + 2.0 * parts["loss_cs_p2"]).item(), rel=1e-5
    )
    assert parts["loss_cs_p1"] > 0 and parts["loss_cs_p2"] > 0
    parts["loss"].backward()


def test_input_only_gradients_keep_the_loss_values():
    torch.manual_seed(8)
    model = build_reranker("prm", SCHEMA).eval()
    batch = random_batch(8)
    both = PrincipledObjective(model, PrincipledConfig(p1_weight=1, p2_weight=1))(
        batch, torch.Generator().manual_seed(3)
    )
    inputs = PrincipledObjective(model, PrincipledConfig(p1_weight=1, p2_weight=1, cs_gradient="input"))(
        batch, torch.Generator().manual_seed(3)
    )
    for key in ("loss", "loss_cs_p1", "loss_cs_p2"):
        assert inputs[key].item() == pytest.approx(both[key].item(), rel=1e-6)
    grads = []
    for parts in (both, inputs):
        model.zero_grad()
        parts["loss_cs_p2"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert not torch.allclose(grads[0], grads[1])  # the targets' side no longer contributes


def test_consistency_losses_vanish_for_an_order_free_model():
    torch.manual_seed(5)
    model = build_reranker("setrank", SCHEMA, ordinal=False).eval()
    parts = PrincipledObjective(model, PrincipledConfig(p1_weight=1.0, p2_weight=1.0))(random_batch(5))
    assert parts["loss_cs_p1"].item() < 1e-9 and parts["loss_cs_p2"].item() < 1e-9


@pytest.mark.parametrize("name", ["prm", "setrank", "midnn"])
def test_shared_encoding_matches_separate_forward_passes(name):
    """The stacked, encode-once path scores each presentation exactly as a separate forward pass would."""
    torch.manual_seed(6)
    model = build_reranker(name, SCHEMA).eval()
    batch = random_batch(6)
    perm = perturb(batch.mask, PrincipledConfig(perturbation="pair"), torch.Generator().manual_seed(2))
    encoded = model.encode(batch)
    shared, _ = model.logits(encoded.reorder(perm), batch.reorder(perm))
    separate = model(batch.reorder(perm))
    assert torch.allclose(shared[batch.reorder(perm).mask], separate[batch.reorder(perm).mask], atol=1e-5)
    rows = torch.tensor([3, 0, 3])  # ``present``: chosen lists, each in its own order, in one selection
    n = int(batch.lengths[3])
    backwards = torch.cat([torch.arange(n).flip(0), torch.arange(n, batch.list_len)])  # real items reversed
    perms = torch.stack([perm[3], torch.arange(batch.list_len), backwards])
    chosen = batch[rows].reorder(perms)
    shared, _ = model.logits(present(encoded, rows, perms), chosen)
    assert torch.allclose(shared[chosen.mask], model(chosen)[chosen.mask], atol=1e-5)


def test_length_groups_cover_every_list_once_and_only_cut_padding():
    lengths = torch.tensor([3, 30, 7, 30, 2, 18, 30, 5, 30, 30, 4, 29, 30, 6, 30, 3] * 4)
    mask = torch.arange(30)[None, :] < lengths[:, None]
    groups = length_groups(mask)
    assert groups is not None and 2 <= len(groups) <= 3
    rows = torch.cat([r for r, _ in groups])
    assert torch.equal(rows.sort().values, torch.arange(len(lengths)))
    assert all(int(lengths[r].max()) == width for r, width in groups)
    assert length_groups(torch.ones(8, 30, dtype=torch.bool)) is None  # nothing to cut
    assert length_groups(mask[:, [29, *range(1, 29), 0]]) is None  # padding before a real item: never cut
    short = torch.arange(30)[None, :] < torch.tensor([10, 12, 11, 12])[:, None]
    assert [w for _, w in length_groups(short)] == [12]  # one group, cut to the longest list


@pytest.mark.parametrize("name", sorted(n for n, cls in REGISTRY.items() if cls.trims_padding))
def test_cutting_padding_by_length_group_changes_no_logit_or_gradient(name, monkeypatch):
    """A model that trims padding scores, and learns, exactly as it would on the full padded batch."""
    torch.manual_seed(4)
    model = build_reranker(name, SCHEMA, dropout=0.0)
    batch = random_batch(4, size=40, length=12)
    assert length_groups(batch.mask) is not None

    def run():
        model.zero_grad()
        logits = model(batch)
        relist.nn.softmax_list_loss(logits, batch.label, batch.mask).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    cut_logits, cut_grads = run()
    monkeypatch.setattr(type(model), "trims_padding", False)
    full_logits, full_grads = run()
    assert torch.allclose(cut_logits[batch.mask], full_logits[batch.mask], atol=1e-5)
    assert len(cut_grads) == len(full_grads)
    for a, b in zip(cut_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_midnn_shared_first_layer_is_the_papers_network():
    """MiDNN's encode-once split of its first layer gives the network on [x, extended(x)] + position."""
    torch.manual_seed(9)
    model = build_reranker("midnn", SCHEMA, initial_skip=False).eval()
    batch = random_batch(9)
    x, _ = model.item_inputs(batch)
    real = batch.mask[..., None]
    high = x.masked_fill(~real, float("-inf")).amax(1, keepdim=True)
    low = x.masked_fill(~real, float("inf")).amin(1, keepdim=True)
    extended = ((x - low) / (high - low).clamp_min(1e-6)).masked_fill(~real, 0.0)
    h = torch.cat([x, extended], dim=-1) + model.position.weight[: batch.list_len]
    direct = model.net(h).squeeze(-1)
    assert torch.allclose(model(batch)[batch.mask], direct[batch.mask], atol=1e-5)


def test_objective_matches_separate_presentations_and_skips_unmoved_lists():
    """The objective's CS terms equal those of separate forward passes over every list, although lists a
    presentation leaves in place (here: P1 for the lists the model already ranks as given) are not rerun."""
    torch.manual_seed(10)
    model = build_reranker("prm", SCHEMA).eval()
    batch = random_batch(10, size=16)
    first = rank(model(batch), batch.mask)
    batch = batch.reorder(torch.where((torch.arange(16) % 3 == 0)[:, None], first, torch.arange(batch.list_len)))
    config = PrincipledConfig(p1_weight=1, p2_weight=1)
    parts = PrincipledObjective(model, config)(batch, torch.Generator().manual_seed(4))
    p1 = rank(model(batch), batch.mask)
    unmoved = (p1 == torch.arange(batch.list_len)).all(1)
    assert 3 <= int(unmoved.sum()) < 16
    p2 = perturb(batch.mask, config, torch.Generator().manual_seed(4))
    base = model.normalise(model(batch), batch.mask)
    identity = torch.arange(batch.list_len).expand(16, -1)
    for name, perm in (("loss_cs_p1", p1), ("loss_cs_p2", p2)):
        shown = batch.reorder(perm)
        scores = model.normalise(model(shown), shown.mask).gather(1, inverse(perm))
        expected = cs_loss(base, scores, identity, inverse(perm), batch.mask)
        assert parts[name].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)


def test_fast_dropout_keep_rate_scaling_and_independence(monkeypatch):
    torch.manual_seed(11)
    x = torch.full((401, 1001), 2.0, requires_grad=True)  # odd size: the last 64-bit draw is half used
    for p in (0.1, 0.5, 0.03):
        y = dropout(x, p)
        kept = y != 0
        n = kept.numel()
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
        assert torch.equal(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))  # inverted dropout scaling
        # neighbours share a 64-bit draw (one 32-bit half each): they must be independent
        both = (kept[:, :-1] & kept[:, 1:]).float().mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5
        x.grad = None
        y.backward(torch.ones_like(y))
        assert torch.equal(x.grad, kept.float() / (1 - p))  # gradient through the same mask
    assert not torch.equal(dropout(x, 0.5) != 0, dropout(x, 0.5) != 0)  # fresh masks
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert not dropout(x, 1.0).any()
    torch.manual_seed(3)
    a = dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.2))  # torch.manual_seed fixes the masks
    builtin = torch.nn.functional.dropout
    calls = []
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(a[0].dtype) or builtin(*a, **k))
    wide = dropout(x.double(), 0.5)  # other dtypes: the built-in
    assert calls == [torch.float64] and wide.dtype == torch.float64
    dropout(x, 0.5)
    assert calls == [torch.float64]  # float32 on the CPU: the fast path
    layer = Dropout(0.2)
    assert torch.equal(layer.eval()(x), x) and (layer.train()(x) == 0).any()


def test_explicit_attention_is_scaled_dot_product_attention(monkeypatch):
    """Training attention is written out so that its weights go through ``dropout``; without the dropout
    it is ``scaled_dot_product_attention``."""
    torch.manual_seed(12)
    q, k, v = torch.randn(3, 5, 2, 7, 4).unbind(0)
    attend = (torch.arange(7) < torch.tensor([7, 3, 1, 5, 7])[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    assert torch.allclose(relist.nn.attention(q, k, v, attend), expected, atol=1e-6)
    seen = []
    monkeypatch.setattr(relist.nn, "dropout", lambda x, p, training=True: seen.append((x, p)) or x)
    assert torch.allclose(relist.nn.attention(q, k, v, attend, dropout_p=0.1), expected, atol=1e-6)
    ((weights, p),) = seen  # dropout ran once, on the attention weights: softmax rows over the allowed keys
    assert p == 0.1 and torch.allclose(weights.sum(-1), torch.ones(()))
    assert (weights.view(5, 2, 7, 7)[~attend.expand(-1, 2, 7, -1)] == 0).all()


def test_obedience_rates():
    batch = random_batch(7, size=50)
    by_feature = lambda b: b.item_dense[..., 0].masked_fill(~b.mask, float("-inf"))  # noqa: E731  order-free scorer
    rates = obedience(by_feature, [batch], ks=(3,))
    assert all(v == 1.0 for v in rates.values())
    # a scorer that prefers what is presented last flips the order every time it re-ranks
    by_position = lambda b: torch.arange(b.list_len, dtype=torch.float32).expand(b.size, -1).clone()  # noqa: E731
    rates = obedience(by_position, [batch], ks=(3,))
    several = (batch.lengths >= 2).float().mean().item()
    assert rates["obedience_p1@full"] == pytest.approx(1 - several)
    # ranking is stable: a re-ranked list re-ranked by the same scores is a fixed point
    order = rank(by_feature(batch), batch.mask)
    assert torch.equal(
        rank(by_feature(batch.reorder(order)), batch.mask), torch.arange(batch.list_len).expand(batch.size, -1)
    )


def test_bad_principled_settings_are_errors():
    with pytest.raises(ValueError, match="unknown perturbation 'flip'"):
        PrincipledConfig(perturbation="flip")
    with pytest.raises(ValueError, match="non-negative"):
        PrincipledConfig(p1_weight=-1)
    assert dataclasses.asdict(PrincipledConfig())["perturbation"] == "adjacent"


def test_midnn_extension_gradients_match_float64_where_features_are_constant_within_lists():
    """The list-wise min-max extension of a feature that is constant within a list is 0; its float32
    gradients equal the float64 ones (a 1e-6 floor under max - min made them 10-14% off)."""
    torch.manual_seed(5)
    batch = random_batch(5)
    constant = batch.item_dense.clone()
    constant[..., 0] = 1.5 * batch.mask  # one dense feature the same for every item of every list
    batch = dataclasses.replace(batch, item_dense=constant)
    model = build_reranker("midnn", SCHEMA, dropout=0.0)
    grads = []
    for dtype in (torch.float32, torch.float64):
        copy = build_reranker("midnn", SCHEMA, dropout=0.0).to(dtype)
        copy.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()})
        typed = dataclasses.replace(batch, item_dense=batch.item_dense.to(dtype), label=batch.label.to(dtype))
        copy.train()
        copy.loss(typed)["loss"].backward()
        grads.append({n: p.grad.double() for n, p in copy.named_parameters() if p.grad is not None})
    for name, g32 in grads[0].items():
        g64 = grads[1][name]
        assert torch.allclose(g32, g64, rtol=1e-3, atol=1e-6), (name, (g32 - g64).abs().max())
    encoded = model.eval().encode(batch)
    assert torch.isfinite(encoded.items).all()
