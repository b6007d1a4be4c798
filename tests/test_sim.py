"""The user simulator: keyed randomness, its contract, seeds, the synthetic ground truth, leaving, gymnasium."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss

from relist.cli import main
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.data.synthetic import SyntheticClickModel
from relist.metrics import calibration_bins, expected_calibration_error, log_loss
from relist.sim import rng
from relist.sim.abtest import simulate
from relist.sim.check import check_simulator, replace_params
from relist.sim.env import ListEnv, SessionVecEnv
from relist.sim.fit import thinned_geometric_mean
from relist.sim.policies import RandomPolicy
from relist.sim.pool import ListPool
from relist.sim.response import Response, TruthResponse
from relist.sim.session import SessionParams, Simulator
from relist.sim.store import load_simulator


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    prepare(PrepareConfig(source="synthetic", out=out, n_lists=1200, n_users=200, n_items=500, seed=0))
    return out


def truth_sim(data_dir, **session) -> Simulator:
    data = PreparedDataset(data_dir)
    response = TruthResponse(SyntheticClickModel.load(data_dir / "truth.safetensors"))
    params = SessionParams(ref_clicks=2.3, leave_bias=-1.0).replace(**session)
    return Simulator(response, ListPool.from_dataset(data, "test"), params)


@pytest.fixture(scope="module")
def learned(synthetic, tmp_path_factory):
    """A learned simulator written by `relist sim train` (2 epochs), and what the command printed."""
    out = tmp_path_factory.mktemp("siml") / "sim"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["sim", "train", "--data", str(synthetic), "--out", str(out), "--epochs", "2", "--session-requests", "3"]
        )
    assert code == 0
    return out, printed.getvalue()


def per_request(users) -> float:
    return float(users["clicks"].sum() / users["requests"].sum())


# --------------------------------------------------------------------------- keyed random numbers


def test_hash_matches_a_plain_python_reference():
    def mix(x: int) -> int:  # the mixer written out on Python integers
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x5BD1E995) % 2**32
        return x ^ (x >> 16)

    values = np.random.default_rng(0).integers(0, 2**32, size=2000, dtype=np.int64)
    mixed = rng.mix32(torch.from_numpy(values))
    assert mixed.tolist() == [mix(int(v)) for v in values]
    keys = torch.tensor([3, 2**31 + 5, 2**32 - 1])
    assert rng.hash_keys(9, rng.CLICK, keys).tolist() == [int(rng.hash_keys(9, rng.CLICK, int(k))) for k in keys]


def test_uniforms_are_uniform_independent_and_keyed():
    users, slots = torch.arange(400)[:, None], torch.arange(250)[None, :]
    u = rng.uniform(1, rng.CLICK, users, 7, slots)
    assert u.shape == (400, 250) and (u > 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    other_stream = rng.uniform(1, rng.LEAVE, users, 7, slots)
    other_seed = rng.uniform(2, rng.CLICK, users, 7, slots)
    for v in (other_stream, other_seed):
        assert abs(float(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1])) < 0.01
    assert torch.equal(u, rng.uniform(1, rng.CLICK, users, 7, slots))
    assert torch.equal(
        u[17], rng.uniform(1, rng.CLICK, torch.tensor([17]), 7, slots)[0]
    )  # a row does not depend on the batch
    z = rng.normal(1, rng.DWELL, users, 7, slots)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


# --------------------------------------------------------------------------- calibration metrics


def test_log_loss_and_calibration_error_against_references():
    g = np.random.default_rng(0)
    prob = g.uniform(0.01, 0.6, size=3000)
    label = (g.uniform(size=3000) < prob * 0.8).astype(np.float64)
    assert log_loss(prob, label) == pytest.approx(sk_log_loss(label, prob), rel=1e-9)
    # equal-width bins by hand
    bins = np.minimum((prob * 10).astype(int), 9)
    expected = sum(
        (bins == b).sum() / len(prob) * abs(prob[bins == b].mean() - label[bins == b].mean())
        for b in range(10)
        if (bins == b).any()
    )
    assert expected_calibration_error(prob, label, n_bins=10, strategy="uniform") == pytest.approx(expected)
    quantile = calibration_bins(prob, label, n_bins=10)
    assert quantile["count"].tolist() == [300.0] * 10
    assert expected_calibration_error(label * 0 + label.mean(), label) == pytest.approx(0.0, abs=1e-12)  # ties: one bin
    assert expected_calibration_error(prob * 0.8, label) < expected_calibration_error(prob, label)


# --------------------------------------------------------------------------- the contract and seeds


@pytest.mark.parametrize("kind", ["truth", "learned"])
def test_simulators_keep_the_contract(kind, synthetic, learned):
    sim = truth_sim(synthetic) if kind == "truth" else load_simulator(learned[0])
    for seed in (0, 1):
        check_simulator(sim, seed=seed, n_users=24)


def test_same_seed_same_outcomes_whatever_the_batching(synthetic, learned):
    for sim_a, sim_b in (
        (truth_sim(synthetic), truth_sim(synthetic)),
        (load_simulator(learned[0]), load_simulator(learned[0])),
    ):
        first = simulate(sim_a, RandomPolicy(3), 300, seed=5, batch_size=300)
        again = simulate(sim_b, RandomPolicy(3), 300, seed=5, batch_size=64)
        other = simulate(sim_a, RandomPolicy(3), 300, seed=6, batch_size=300)
        for name in first:
            np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first["clicks"], other["clicks"])


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_policy_that_knows_the_truth_beats_random(synthetic, seed):
    sim = truth_sim(synthetic)
    oracle = simulate(sim, sim.response.appeal, 400, seed, 400)
    random = simulate(sim, RandomPolicy(seed), 400, seed, 400)
    worst = simulate(sim, lambda batch: -sim.response.appeal(batch), 400, seed, 400)
    # the truth's order gets ~75% more clicks per list than random on this data; demand 40% on every seed
    assert per_request(oracle) > 1.4 * per_request(random)
    assert per_request(worst) < 0.8 * per_request(random)
    assert oracle["clicks"].mean() > 2 * random["clicks"].mean()  # and keeps users longer, so far more per user


# --------------------------------------------------------------------------- leaving and returning


class ConstantResponse:
    """Every shown item is clicked with probability ``p``."""

    def __init__(self, p: float):
        self.p = p

    def respond(self, shown) -> Response:
        return Response(torch.full(shown.mask.shape, self.p) * shown.mask, torch.zeros(shown.mask.shape))


def test_leaving_rises_as_lists_disappoint(synthetic):
    sim = truth_sim(synthetic)
    pool = sim.pool
    leave = {}
    for p in (0.0, 0.1, 0.3, 1.0):
        stub = Simulator(ConstantResponse(p), pool, sim.params)
        users = stub.start(torch.arange(200), 0)
        candidates = stub.candidates(users)
        leave[p] = stub.step(users, candidates, torch.zeros(candidates.mask.shape)).leave_prob.mean().item()
    assert leave[0.0] > leave[0.1] > leave[0.3] > leave[1.0]

    # with the truth: the same users, the best and the worst order of the same candidates
    users_best, users_worst = sim.start(torch.arange(400), 1), sim.start(torch.arange(400), 1)
    candidates = sim.candidates(users_best)
    appeal = sim.response.appeal(candidates)
    best = sim.step(users_best, candidates, appeal)
    worst = sim.step(users_worst, candidates, -appeal)
    assert best.clicks.sum() > worst.clicks.sum()
    assert worst.leave_prob.mean() > best.leave_prob.mean() + 0.1
    # whole sessions: good lists keep users longer, bad ones send them away
    one = replace_params(sim, max_sessions=1)
    lengths = {
        name: simulate(one, policy, 400, 2, 400)["requests"].mean()
        for name, policy in (
            ("best", sim.response.appeal),
            ("random", RandomPolicy(2)),
            ("worst", lambda b: -sim.response.appeal(b)),
        )
    }
    assert lengths["best"] > 1.5 * lengths["random"] > 1.5 * lengths["worst"]
    # the mechanism is the satisfaction term: without it, list quality does not change leaving
    flat = replace_params(sim, leave_sensitivity=0.0, max_sessions=1)
    u_best, u_worst = flat.start(torch.arange(400), 1), flat.start(torch.arange(400), 1)
    assert torch.equal(
        flat.step(u_best, candidates, appeal).leave_prob, flat.step(u_worst, candidates, -appeal).leave_prob
    )


def test_returning_follows_satisfaction_and_the_horizon(synthetic):
    sim = truth_sim(synthetic, max_sessions=4)
    sessions = {
        bias: simulate(replace_params(sim, return_bias=bias), RandomPolicy(0), 300, 0, 300)["sessions"]
        for bias in (-2.0, 0.0, 2.0)
    }
    assert sessions[-2.0].mean() < sessions[0.0].mean() < sessions[2.0].mean()
    assert all(s.max() <= 4 and s.min() >= 1 for s in sessions.values())
    good = simulate(sim, sim.response.appeal, 300, 0, 300)["sessions"].mean()
    assert good > simulate(sim, RandomPolicy(0), 300, 0, 300)["sessions"].mean()  # satisfied users come back more often


def test_thinned_counts_recover_the_full_log():
    g = np.random.default_rng(0)
    for mean, q in ((1.5, 0.05), (3.2, 0.0319), (8.0, 0.2)):
        full = g.geometric(1 / mean, size=300_000)
        kept = g.binomial(full, q)
        assert thinned_geometric_mean(kept[kept > 0].mean(), q) == pytest.approx(mean, rel=0.05)
    assert thinned_geometric_mean(1.3, 1.0) == 1.3
    with pytest.raises(ValueError, match="log_fraction"):
        thinned_geometric_mean(1.1, 0.0)


# --------------------------------------------------------------------------- learned simulator and CLI


def test_sim_train_reports_held_out_fit_and_round_trips(learned, synthetic):
    out, printed = learned
    assert "log_loss" in printed and "auc" in printed and "ece" in printed
    assert "rate per position (test)" in printed and "session fit" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "reliability.png").stat().st_size > 10_000
    assert 0 < metrics["test"]["log_loss"] < metrics["references"]["constant rate"]["log_loss"]
    assert metrics["test"]["auc"] > 0.6
    assert metrics["session_fit"]["logged_requests_per_session"] == pytest.approx(3.0, rel=0.15)
    first, second = load_simulator(out), load_simulator(out)
    data = PreparedDataset(synthetic)
    batch = data.batch(data.split("test")[:32])
    assert torch.equal(first.response.respond(batch).prob, second.response.respond(batch).prob)
    # the response depends on the order: reversing a list changes its click probabilities
    reverse = torch.flip(torch.arange(batch.list_len), [0]).expand(batch.mask.shape)
    assert not torch.allclose(first.response.respond(batch.reorder(reverse)).prob, first.response.respond(batch).prob)


# --------------------------------------------------------------------------- gymnasium


@pytest.mark.filterwarnings("ignore:.*(infinity|symmetric and normalized)")  # scores are unbounded on purpose
def test_list_env_passes_the_gymnasium_checker(synthetic):
    from gymnasium.utils.env_checker import check_env

    env = ListEnv(truth_sim(synthetic), seed=0)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=4)
    assert env.observation_space.contains(obs)
    _, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert terminated and not truncated and reward == info["clicks"].sum()


def test_session_env_autoresets_and_is_reproducible(synthetic):
    sim = truth_sim(synthetic, max_sessions=2)
    envs = [SessionVecEnv(sim, num_envs=16), SessionVecEnv(sim, num_envs=16)]
    obs = [env.reset(seed=3)[0] for env in envs]
    assert envs[0].observation_space.contains(obs[0])
    actions = np.random.default_rng(0).normal(size=(40, 16, sim.pool.width)).astype(np.float32)
    saw_restart = False
    ended = np.zeros(16, dtype=bool)
    for step in range(40):
        results = [env.step(actions[step]) for env in envs]
        (o, r, term, trunc, info), (o2, r2, term2, _, _) = results
        np.testing.assert_array_equal(r, r2)
        np.testing.assert_array_equal(term, term2)
        np.testing.assert_array_equal(o["item_sparse"], o2["item_sparse"])
        assert not trunc.any()
        if ended.any():  # the step after a termination starts a new user: reward 0, a fresh key
            assert (r[ended] == 0).all() and (info["user"][ended] >= 16).all()
            saw_restart = True
        ended = term
    assert saw_restart
