"""Evaluator, generator and LAST: contracts, decoding, rewards, training, offsets that never touch the weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from relist.batch import rank
from relist.cli import main
from relist.data.store import PreparedDataset
from relist.last import Last, LastConfig, weights_hash
from relist.metrics import per_list_metrics
from relist.rerankers.base import check_reranker, load_reranker
from relist.rerankers.evaluator import Evaluator, EvaluatorConfig, load_evaluator
from relist.rerankers.generator import Generator, GeneratorConfig, discounted_returns, gumbel, ndcg_gains, order_scores
from tests.test_rerankers import SCHEMA, random_batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_world):
    """Synthetic data, a LambdaMART initial ranker, and an evaluator and generator trained by the CLI."""
    root = tmp_path_factory.mktemp("last")
    for name in ("data", "ranker"):  # the shared world, read only; the models are this module's own
        (root / name).symlink_to(synthetic_world / name, target_is_directory=True)
    data = root / "ranker" / "rerank"
    common = ["--data", str(data), "--epochs", "4", "--batch-size", "64", "--no-progress"]
    assert (
        main(
            [
                "train",
                "evaluator",
                *common,
                "--out",
                str(root / "ev"),
                "--model-args",
                "d_model=16,heads=2,gru=16,hidden=64/32",
            ]
        )
        == 0
    )
    assert (
        main(["train", "generator", *common, "--out", str(root / "gen"), "--model-args", "encoder=32,hidden=16"]) == 0
    )
    return root


def small_models(seed: int = 0):
    torch.manual_seed(seed)
    gen = Generator(SCHEMA, GeneratorConfig(encoder=24, hidden=8, heads=2))
    ev = Evaluator(SCHEMA, EvaluatorConfig(d_model=8, heads=2, gru=8, hidden=(16,), dropout=0.0))
    return gen, ev


@pytest.mark.parametrize("cls", [Evaluator, Generator])
def test_contract_and_persistence(cls, tmp_path):
    torch.manual_seed(0)
    model = cls(SCHEMA)
    batch = random_batch(3)
    check_reranker(model, batch)
    model.save(tmp_path / "m")
    assert torch.equal(load_reranker(tmp_path / "m").score(batch), model.score(batch))


def test_evaluator_depends_on_the_display_order():
    _, ev = small_models()
    batch = random_batch(4)
    flipped = torch.where(
        batch.mask, batch.lengths[:, None] - 1 - torch.arange(batch.list_len), torch.arange(batch.list_len)
    )
    a = ev.click_probability(batch)
    b = ev.click_probability(batch.reorder(flipped)).gather(1, torch.argsort(flipped, 1))  # back to item columns
    assert not torch.allclose(a[batch.mask], b[batch.mask], atol=1e-4)
    assert torch.all(a[~batch.mask] == 0)


def test_decoding_gives_permutations_with_padding_last_and_consistent_log_probs():
    gen, _ = small_models()
    batch = random_batch(5, size=20)
    noise = gumbel((20, batch.list_len, batch.list_len), torch.Generator().manual_seed(0))
    for order, log_p in (gen.decode(batch), gen.decode(batch, noise=noise)):
        assert torch.equal(torch.sort(order, 1).values, torch.arange(batch.list_len).expand_as(order))
        assert torch.all(batch.mask.gather(1, order) == batch.mask)  # real items first, padding after
        assert torch.allclose(gen.log_prob(batch, order), log_p.sum(1), atol=1e-5)
        assert torch.all(log_p[:, :][~batch.mask] == 0)
        assert torch.equal(rank(order_scores(order, batch.mask), batch.mask), order)
    assert torch.equal(gen.decode(batch, noise=noise)[0], gen.decode(batch, noise=noise.clone())[0])
    # teacher forcing of a prefix decodes only those steps, with the same log-probabilities
    order, log_p = gen.decode(batch)
    prefix, prefix_log_p = gen.net(gen.inputs(batch), batch.mask, order=order[:, :3])
    assert torch.equal(prefix, order[:, :3]) and torch.allclose(prefix_log_p, log_p[:, :3], atol=1e-6)


def test_sampling_follows_the_pointer_distribution():
    gen, _ = small_models(1)
    batch = random_batch(6, size=2, length=4)[[0]]
    n = 4000
    many = batch[[0] * n]
    first, log_p = gen.decode(many, noise=gumbel((n, 4, 4), torch.Generator().manual_seed(1)))
    counts = torch.bincount(first[:, 0], minlength=4).float() / n
    expected = torch.zeros(4)
    for item in range(4):  # P(first = item) from teacher forcing any order starting with item
        order = torch.tensor([[item, *[j for j in range(4) if j != item]]])
        expected[item] = gen.net(gen.inputs(batch), batch.mask, order=order)[1][0, 0].exp()
    assert torch.allclose(counts, expected, atol=0.03), (counts, expected)


def test_rewards_match_the_metric_module():
    batch = random_batch(7, size=30)
    order = torch.argsort(
        torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(0)).masked_fill(~batch.mask, 2), 1
    )
    shown = batch.reorder(order)
    gains = ndcg_gains(shown.label, shown.mask.float(), batch.label, batch.mask.float())
    reference = per_list_metrics(
        order_scores(order, batch.mask).double(), batch.label.double(), batch.mask, ks=(batch.list_len,)
    )
    assert torch.allclose(gains.sum(1).double(), reference[f"ndcg@{batch.list_len}"], atol=1e-5)
    rewards = torch.tensor([[1.0, 0.0, -2.0, 4.0]])
    g = 0.3
    assert torch.allclose(
        discounted_returns(rewards, g), torch.tensor([[1 - 2 * g**2 + 4 * g**3, -2 * g + 4 * g**2, -2 + 4 * g, 4.0]])
    )


def test_trained_models_learn_from_the_data(runs):
    ev = json.loads((runs / "ev" / "metrics.json").read_text())
    gen = json.loads((runs / "gen" / "metrics.json").read_text())
    assert ev["test"]["auc"] > 0.6  # synthetic clicks follow item and user factors the evaluator can learn
    history = [json.loads(line) for line in (runs / "gen" / "history.jsonl").read_text().splitlines()]
    untrained = history[0]["valid"]["ndcg@10"]
    assert gen["valid"]["ndcg@10"] > untrained + 0.02
    with pytest.raises(ValueError, match="not an evaluator"):
        load_evaluator(runs / "gen")


class Boom(RuntimeError):
    pass


def test_deployed_weights_stay_bit_identical(runs):
    gen, ev = load_reranker(runs / "gen" / "best"), load_evaluator(runs / "ev")
    data = PreparedDataset(runs / "ranker" / "rerank")
    before = weights_hash(gen, ev)
    requests, failures = 0, 0
    rng = torch.Generator().manual_seed(0)
    test = data.split("test")
    for k, (mode, offsets) in enumerate(
        [
            ("parallel", "activations"),
            ("parallel", "decoder"),
            ("serial", "activations"),
            ("serial", "pointer"),
            ("parallel", "all"),
        ]
    ):
        last = Last(gen, ev, LastConfig(mode=mode, offsets=offsets, serial_steps=3))
        for start in range(0, 3 * len(test), 75):
            batch = data.batch(test[[(start + j) % len(test) for j in range(75)]])
            last(batch, rng)
            requests += batch.size
        # a request that fails half-way: the evaluator raises after the generator's gradient was taken
        original = ev.click_probability
        calls = {"n": 0}

        def failing(b, calls=calls, original=original):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Boom("evaluator failed")
            return original(b)

        ev.click_probability = failing
        try:
            with pytest.raises(Boom):
                last(data.batch(test[:50]), rng)
            failures += 1
        finally:
            del ev.click_probability
    assert requests >= 2000 and failures == 5
    assert weights_hash(gen, ev) == before
    assert all(p.grad is None for p in [*gen.parameters(), *ev.parameters()])


def test_parallel_picks_the_best_candidate_and_never_loses_to_greedy(runs):
    gen, ev = load_reranker(runs / "gen" / "best"), load_evaluator(runs / "ev")
    data = PreparedDataset(runs / "ranker" / "rerank")
    batch = data.batch(data.split("test"))
    out = Last(gen, ev)(batch, torch.Generator().manual_seed(3))
    assert out.candidates.shape == (batch.size, 9)
    assert torch.allclose(out.value, out.candidates.max(1).values)
    assert torch.all(out.value >= out.candidates[:, 0])
    served = ev.click_probability(batch.reorder(out.order)).sum(1) / batch.lengths
    assert torch.allclose(served, out.value, atol=1e-5)
    greedy = Last(gen, ev, LastConfig(steps=()))(batch)
    assert torch.equal(greedy.order, gen.decode(batch)[0]) and torch.all(greedy.winner == 0)
    oracle = Last(gen, ev, LastConfig(select="oracle"))(batch, torch.Generator().manual_seed(3))
    assert "oracle" in LastConfig(select="oracle").label

    def ndcg(order):
        scores = order_scores(order, batch.mask).double()
        return per_list_metrics(scores, batch.label.double(), batch.mask, ks=(10,))["ndcg@10"]

    assert ndcg(oracle.order).mean() >= ndcg(out.order).mean()


def test_batched_exploration_equals_the_loop_and_weight_offsets_agree_at_zero_step():
    gen, ev = small_models(2)
    batch = random_batch(8, size=16)
    for offsets in ("activations", "pointer"):
        a = Last(gen, ev, LastConfig(offsets=offsets))(batch, torch.Generator().manual_seed(4))
        b = Last(gen, ev, LastConfig(offsets=offsets, batched=False))(batch, torch.Generator().manual_seed(4))
        assert torch.equal(a.order, b.order) and torch.allclose(a.candidates, b.candidates, atol=1e-6)
    # with step sizes 0 every offset kind is plain sampling: the same noise gives the same lists
    zero = (0.0, 0.0, 0.0)
    lists = [
        Last(gen, ev, LastConfig(offsets=o, steps=zero))(batch, torch.Generator().manual_seed(5)).candidates
        for o in ("activations", "pointer", "all")
    ]
    assert torch.allclose(lists[0], lists[1], atol=1e-6) and torch.allclose(lists[0], lists[2], atol=1e-6)
    # and a non-zero step moves the guided candidates
    moved = Last(gen, ev, LastConfig(offsets="all", steps=(0.0, 50.0)))(batch, torch.Generator().manual_seed(5))
    still = Last(gen, ev, LastConfig(offsets="all", steps=(0.0, 0.0)))(batch, torch.Generator().manual_seed(5))
    assert torch.equal(moved.candidates[:, :2], still.candidates[:, :2])
    assert not torch.allclose(moved.candidates[:, 2], still.candidates[:, 2])


def _relative_error(a, b) -> float:
    """max |a − b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _loop_gradients(net, states, init, mask, order, advantage, one_pass: bool, fused_gru: bool = True):
    states, init = states.detach().clone().requires_grad_(), init.detach().clone().requires_grad_()
    with torch.enable_grad():
        log_p = (
            net.teacher_forced(states, init, mask, order, fused_gru=fused_gru)
            if one_pass
            else net.decode(states, init, mask, order=order)[1]
        )
        return (log_p.detach(), *torch.autograd.grad((advantage * log_p).sum(), (states, init)))


@pytest.mark.parametrize("fused_gru", [True, False])
def test_one_pass_teacher_forcing_equals_the_decoding_loop(fused_gru):
    """LAST's gradient comes from ``teacher_forced`` (all steps at once); it must equal the loop's, padding included."""
    gen, _ = small_models(3)
    net = gen.net.eval()
    batch = random_batch(11, size=10, length=30)  # lists of 1 to 30 items
    with torch.no_grad():
        states, init = net.states(gen.inputs(batch), batch.mask)
        greedy, _ = net.decode(states, init, batch.mask)
        sampled, _ = net.decode(states, init, batch.mask, gumbel((10, 30, 30), torch.Generator().manual_seed(1)))
    advantage = torch.randn(10, 30, generator=torch.Generator().manual_seed(2))
    for order in (greedy, sampled):
        for steps in (30, 7, 1):
            loop = _loop_gradients(net, states, init, batch.mask, order[:, :steps], advantage[:, :steps], False)
            fast = _loop_gradients(
                net, states, init, batch.mask, order[:, :steps], advantage[:, :steps], True, fused_gru
            )
            for a, b in zip(loop, fast):  # log-probabilities, gradients of the states and of the initial state
                assert torch.isfinite(b).all() and _relative_error(b, a) < 1e-4


def test_gru_sequence_backward_is_the_gradient():
    from relist.rerankers.generator import GRUSequence

    g = torch.Generator().manual_seed(0)
    for steps in (1, 6):
        args = [
            torch.randn(shape, generator=g, dtype=torch.double).requires_grad_()
            for shape in ((3, steps, 5), (3, 4), (12, 5), (12, 4), (12,), (12,))
        ]
        assert torch.autograd.gradcheck(GRUSequence.apply, args)


def test_evaluator_skips_the_padding_machinery_on_full_lists_with_the_same_values():
    _, ev = small_models(5)
    ev.eval()  # the shortcut is taken at serving time only
    batch = random_batch(13, size=6, length=8)
    full = batch[torch.nonzero(batch.mask.all(1)).flatten()]
    with_padding = batch[
        torch.cat([torch.nonzero(batch.mask.all(1)).flatten(), torch.nonzero(~batch.mask.all(1)).flatten()[:1]])
    ]
    assert full.size >= 1 and not with_padding.mask.all()
    with torch.no_grad():
        a, b = ev.click_probability(full), ev.click_probability(with_padding)[: full.size]
    assert torch.allclose(a, b, atol=1e-6)


def test_last_with_the_one_pass_gradient_serves_what_the_loop_serves(monkeypatch):
    """The same gradients and the same served lists as step-by-step teacher forcing, for each offset kind."""
    from torch.func import grad, vmap

    from relist.last import _Weights
    from relist.rerankers.generator import PointerNet

    gen, ev = small_models(4)
    batch = random_batch(12, size=12, length=20)
    x, rows = gen.inputs(batch).detach(), torch.arange(12)
    advantage = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))
    configs = [LastConfig(offsets=o) for o in ("activations", "pointer", "all")]
    configs += [LastConfig(mode="serial", serial_steps=3), LastConfig(grad_steps=5)]

    def run():
        out = [Last(gen, ev, c)(batch, torch.Generator().manual_seed(6)) for c in configs]
        with torch.no_grad():
            space = _Weights(gen.net, x, batch.mask, 0.01, "all")
            order = space.decode(space.zero(rows), rows, None)
            with torch.enable_grad():  # raw gradients, before the per-tensor normalisation
                grads = vmap(grad(space._log_p_one))(space.zero(rows), x, batch.mask, order, advantage)
        return out, grads

    fast, fast_grads = run()
    monkeypatch.setattr(
        PointerNet,
        "teacher_forced",
        lambda self, states, h, mask, order, fused_gru=True: self.decode(states, h, mask, order=order)[1],
    )
    slow, slow_grads = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a.order, b.order) and torch.equal(a.winner, b.winner)
        assert torch.allclose(a.candidates, b.candidates, atol=1e-6)
    largest = max(g.abs().max().item() for g in slow_grads.values())
    for name, a in fast_grads.items():
        if name == "key.bias":  # 0 in exact arithmetic (a shift of every attention logit): both are rounding noise
            assert a.abs().max() < 1e-6 * largest and slow_grads[name].abs().max() < 1e-6 * largest
        else:
            assert _relative_error(a, slow_grads[name]) < 1e-4, name


def test_serial_respects_its_budget_and_bad_settings_are_errors():
    gen, ev = small_models(3)
    batch = random_batch(9)
    out = Last(gen, ev, LastConfig(mode="serial", serial_steps=5))(batch, torch.Generator().manual_seed(0))
    assert out.candidates.shape[1] == 6 and torch.all(out.value >= out.candidates[:, 0])
    timed = Last(gen, ev, LastConfig(mode="serial", serial_steps=1000, serial_seconds=0.05))(batch)
    assert 2 <= timed.candidates.shape[1] < 1000
    short = Last(gen, ev, LastConfig(grad_steps=2))(batch, torch.Generator().manual_seed(0))
    full = Last(gen, ev)(batch, torch.Generator().manual_seed(0))
    assert torch.all(short.value >= short.candidates[:, 0])
    assert torch.equal(short.candidates[:, :5], full.candidates[:, :5])  # greedy and pure samples do not depend on it
    with pytest.raises(ValueError, match="non-negative"):
        LastConfig(grad_steps=-1)
    for bad in ({"mode": "both"}, {"offsets": "embeddings"}, {"select": "labels"}):
        with pytest.raises(ValueError, match="LAST: unknown"):
            LastConfig(**bad)
    assert math.isfinite(float(out.value.mean()))


@pytest.fixture(scope="module")
def truth_sim(runs):
    assert (
        main(
            [
                "sim",
                "truth",
                "--data",
                str(runs / "data"),
                "--out",
                str(runs / "sim"),
                "--session-requests",
                "2",
                "--max-sessions",
                "1",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    return runs / "sim"


def test_last_is_a_simulator_policy(runs, truth_sim, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "generator").symlink_to(runs / "gen")
    (run / "evaluator").symlink_to(runs / "ev")
    args = [
        "abtest",
        "--sim",
        str(truth_sim),
        "--policies",
        f"ranker:{runs / 'ranker'},last:{run}",
        "--users",
        "60",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "ab"),
    ]
    assert main(args) == 0
    rows = (tmp_path / "ab" / "results.csv").read_text()
    assert "last:run,clicks_per_request" in rows
    with pytest.raises(FileNotFoundError, match="generator/ and evaluator/"):
        from relist.sim.policies import PolicyContext, make_policy

        make_policy("last", str(tmp_path), PolicyContext(seed=0, device=torch.device("cpu")))


def test_delayed_feedback_learner_waits_for_its_delay_and_leaves_the_generator_alone(runs, truth_sim):
    from relist.experiments.last import DelayedFeedbackLearner
    from relist.sim.store import load_simulator

    sim = load_simulator(truth_sim, torch.device("cpu"))
    gen = load_reranker(runs / "gen" / "best")
    before = weights_hash(gen)
    data = PreparedDataset(runs / "ranker" / "rerank")
    batches = [data.batch(data.split("test")[k : k + 30]) for k in range(0, 120, 30)]
    patient = DelayedFeedbackLearner(gen, sim, delay=10_000, seed=0)
    for batch in batches:  # nothing has arrived yet: it serves the deployed generator's greedy lists
        assert torch.equal(patient(batch), gen.decode(batch)[0])
    assert patient.updates == 0 and len(patient.pending) == 4
    logged = patient.pending[0][1]
    assert set(logged.label.unique().tolist()) <= {0.0, 1.0} and torch.all(logged.label[~logged.mask] == 0)
    eager = DelayedFeedbackLearner(gen, sim, delay=30, seed=0)
    for batch in batches:
        eager(batch)
    assert eager.updates == 3  # each batch's clicks are used once 30 more requests have been served
    assert weights_hash(eager.generator) != before and weights_hash(gen) == before


def test_one_last_serves_eight_threads_with_every_offset_kind_as_it_serves_one():
    """Weight offsets run through ``functional_call``, which swaps a module's parameters while it runs:
    each thread does that on its own copy of the modules, so concurrent calls give the sequential answers
    and the deployed weights stay as they were."""
    from concurrent.futures import ThreadPoolExecutor

    gen, ev = small_models(7)
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    batches = [random_batch(20 + k, size=4) for k in range(8)]
    for offsets in ("activations", "pointer", "decoder", "all"):
        last = Last(gen, ev, LastConfig(offsets=offsets))
        expected = [last(b, torch.Generator().manual_seed(k)) for k, b in enumerate(batches)]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda kb: last(kb[1], torch.Generator().manual_seed(kb[0])), enumerate(batches)))
        for e, g in zip(expected, got):
            assert torch.equal(e.order, g.order) and torch.allclose(e.candidates, g.candidates, atol=1e-6), offsets
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in before.items())
