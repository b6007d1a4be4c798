"""The cascade simulator: determinism given actions, matching through the index, scores, CQR, PettingZoo
and Gymnasium; the committed environments are sound (check-cascade), users held out, worlds seeded."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from relist.config import load_yaml
from relist.data.synthetic import SyntheticClickModel, SyntheticParams
from relist.rl.replay import quantile_rescale
from relist.sim.cascade import Cascade, CascadeConfig
from relist.sim.cascade_check import check_cascade, passed
from relist.sim.cascade_env import CascadeEnvConfig, build_env, session_metrics, split_people
from relist.sim.cascade_interfaces import CascadeAECEnv, CascadeGymEnv
from relist.sim.catalogue import synthetic_catalogue
from relist.sim.pool import synthetic_item_pool


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env():
    built, _ = build_env(
        CascadeEnvConfig(source="synthetic", n_items=1500, n_users=300, sizes=(150, 40, 8), session_requests=3.0)
    )
    return built


def random_actions(cascade, size, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, m, generator=g) * 2 - 1 for m in cascade.action_dims]


def test_cascade_is_a_function_of_first_observation_and_actions(env):
    state = env.start(torch.arange(64), 3)
    pop, ctx = env.first(state)
    actions = random_actions(env.cascade, 64, 0)
    a = env.cascade(pop, ctx, actions)
    b = env.cascade(pop, ctx, actions)
    # the same requests in other batches (halves, reversed) give the same candidates and observations
    half = env.cascade(pop[32:], ctx[32:], [x[32:] for x in actions])
    rev = torch.arange(63, -1, -1)
    flipped = env.cascade(pop[rev], ctx[rev], [x[rev] for x in actions])
    for s in range(env.cascade.n_stages):
        assert torch.equal(a.stages[s].rows.sort(1).values, b.stages[s].rows.sort(1).values)
        assert torch.equal(a.stages[s].rows[32:].sort(1).values, half.stages[s].rows.sort(1).values)
        assert torch.equal(a.stages[s].rows[rev].sort(1).values, flipped.stages[s].rows.sort(1).values)
        assert torch.equal(a.obs[s][32:], half.obs[s])
    assert torch.equal(a.slate, b.slate)  # the shown order too
    # observations rebuilt from the first observation and the actions are the forward pass's
    rebuilt = env.cascade.observations(pop, ctx, actions)
    assert all(torch.equal(x, y) for x, y in zip(rebuilt, a.obs))
    # and an upstream action changes the downstream observations
    other = [actions[0].flip(0)] + actions[1:]
    changed = env.cascade.observations(pop, ctx, other)
    assert not torch.equal(changed[1], a.obs[1]) and not torch.equal(changed[2], a.obs[2])
    assert torch.equal(changed[0], a.obs[0])


def test_stages_keep_their_top_k_by_the_fused_scores(env):
    cascade = env.cascade
    state = env.start(torch.arange(16), 1)
    pop, ctx = env.first(state)
    actions = random_actions(cascade, 16, 1)
    out = cascade(pop, ctx, actions)
    sizes = cascade.config.sizes
    for s in range(1, cascade.n_stages):
        candidates = out.stages[s - 1].rows
        fused = (cascade.scores(pop, candidates, s) * actions[s][:, None, :]).sum(2)
        expected = candidates.gather(1, fused.topk(sizes[s], dim=1).indices)
        assert torch.equal(out.stages[s].rows, expected)
    # exact matching keeps the catalogue's best by relevance (predicted appeal) and prior weights
    u = cascade.user_vector(pop, 0)
    view = cascade.item_views[0]
    relevance = (u @ view[:, :-1].T + view[:, -1]) / cascade.rel_scale[0]
    fused = actions[0][:, :1] * relevance + actions[0][:, 1:] * view[:, -1] / cascade.prior_scale[0]
    best = fused.topk(sizes[0], dim=1).indices.sort(1).values
    assert torch.equal(out.stages[0].rows.sort(1).values, best)
    assert out.slate.shape == (16, sizes[-1])


def test_diversity_is_the_rank_within_the_category():
    truth = SyntheticClickModel.sample(replace(SyntheticParams(), n_items=300, n_users=20, n_categories=4), seed=0)
    cascade = Cascade(synthetic_catalogue(truth, synthetic_item_pool(truth)), CascadeConfig(sizes=(100, 20, 5)))
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:50].view(2, 25)
    value = torch.randn(2, 25, generator=torch.Generator().manual_seed(1))
    got = cascade._diversity(rows, value)
    category = truth.item_category[rows]
    for b in range(2):
        for j in range(25):
            better = ((category[b] == category[b, j]) & (value[b] > value[b, j])).sum()
            assert got[b, j] == pytest.approx(-math.log1p(int(better)))


def test_ivf_matching_probing_every_cell_is_exact():
    truth = SyntheticClickModel.sample(replace(SyntheticParams(), n_items=4000, n_users=100), seed=2)
    catalogue = synthetic_catalogue(truth, synthetic_item_pool(truth))
    exact = Cascade(catalogue, CascadeConfig(sizes=(200, 50, 10), matching="exact"))
    ivf = Cascade(catalogue, CascadeConfig(sizes=(200, 50, 10), matching="ivf", nlist=32, nprobe=32))
    pop = torch.arange(40)
    weights = torch.rand(40, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a, b = exact._match(pop, weights), ivf._match(pop, weights)
    overlap = (a.sort(1).values[:, :, None] == b[:, None, :]).any(2).float().mean()
    assert overlap > 0.999  # the MIPS -> L2 transform loses nothing when every cell is scanned
    partial = Cascade(catalogue, CascadeConfig(sizes=(200, 50, 10), matching="ivf", nlist=32, nprobe=4))._match(
        pop, weights
    )
    assert (a[:, :, None] == partial[:, None, :]).any(2).float().mean() < overlap  # probing fewer cells is approximate


def test_quantile_rescaling_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    ref_reward = torch.cat([torch.zeros(300), torch.rand(700, generator=g) * 500]).round()
    ref_cell = torch.randint(0, 6, (1000,), generator=g)
    reward = torch.cat([torch.rand(50, generator=g) * 600, torch.zeros(10)]).round()
    cell = torch.randint(0, 7, (60,), generator=g)  # cell 6 has no reference rewards
    got = quantile_rescale(reward, cell, ref_reward, ref_cell)
    for r, c, q in zip(reward.numpy(), cell.numpy(), got.numpy()):
        ref = ref_reward[ref_cell == int(c)].numpy()
        expected = stats.percentileofscore(ref, r, kind="mean") / 100 if len(ref) else 0.5
        assert q == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("relaxed", [False, True])
def test_the_relaxed_path_carries_the_gradient_upstream_and_leaves_the_values(env, relaxed):
    """Without relaxation no gradient crosses a stage (the top-K is discrete: the stop-gradient of the
    cascading path); with it, each stage's observation carries a gradient to the stage above's action
    through a softmax over that stage's fused scores, while every value (observations, kept items, the
    slate) stays what it was."""
    state = env.start(torch.arange(32), 5)
    pop, ctx = env.first(state)
    actions = [a.requires_grad_(True) for a in random_actions(env.cascade, 32, 1)]
    out = env.cascade(pop, ctx, actions, relaxed=relaxed)
    plain = env.cascade(pop, ctx, [a.detach() for a in actions])
    for s in range(env.cascade.n_stages):
        assert torch.allclose(out.obs[s], plain.obs[s], atol=1e-6)
        assert torch.equal(out.stages[s].rows, plain.stages[s].rows)
    for s in range(1, env.cascade.n_stages):
        if not relaxed:
            assert not out.obs[s].requires_grad
            continue
        (grad,) = torch.autograd.grad(out.obs[s].sum(), actions[s - 1], retain_graph=True)
        assert grad.abs().sum() > 0, f"stage {s}"


def test_same_seed_same_sessions_and_default_beats_random_weights(env):
    a = env.evaluate(None, 200, 5)
    b = env.evaluate(None, 200, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    default, rnd = session_metrics(a), []
    for seed in range(3):
        weights = random_actions(env.cascade, 1, seed)
        rnd.append(
            session_metrics(env.evaluate(lambda s, obs: weights[s].expand(obs.shape[0], -1), 200, 5))["session_dwell"]
        )
    assert default["session_dwell"] > np.mean(rnd)
    assert 1.0 <= default["session_length"] < 20


def test_pettingzoo_api(env):
    from pettingzoo.test import api_test

    aec = CascadeAECEnv(env, seed=0)
    api_test(aec, num_cycles=40)
    aec.reset(seed=4)
    assert aec.agent_selection == "matching"
    rewards = []
    for agent in aec.agent_iter(max_iter=3 * 30):
        obs, reward, terminated, truncated, info = aec.last()
        assert aec.observation_space(agent).shape == obs.shape
        rewards.append(reward)
        aec.step(None if terminated or truncated else np.full(aec.action_space(agent).shape, 0.5, np.float32))
    assert sum(rewards) > 0


def test_gymnasium_single_agent_api(env):
    from gymnasium.utils.env_checker import check_env

    gym_env = CascadeGymEnv(env, stage=-1, seed=0)
    check_env(gym_env, skip_render_check=True)

    def episode(action, seed):
        gym_env.reset(seed=seed)
        rewards = []
        for _ in range(200):
            _, reward, done, _, _ = gym_env.step(action)
            rewards.append(reward)
            if done:
                return rewards
        raise AssertionError("a session did not end within 200 requests")

    hand_set, reversed_ = np.array([1.0, 0.5, 0.25], np.float32), np.array([-1.0, 0.5, 0.25], np.float32)
    runs = [episode(hand_set, seed) for seed in range(3)]
    assert runs == [episode(hand_set, seed) for seed in range(3)]  # a seed replays its user's session
    assert any(sum(r) > 0 for r in runs)  # users click and dwell
    assert runs != [episode(reversed_, seed) for seed in range(3)]  # the stage's action reaches the user


# ------------------------------------------------------------------ a sound environment

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cascade"


def _assert_sound(check: dict) -> None:
    assert all(r > 0.1 for r in check["relevance_appeal_spearman"]), check
    assert check["appeal_flipped"] < check["appeal_handset"] < check["appeal_best"], check
    assert check["dwell_flipped"] < check["dwell_handset"], check
    assert check["users_disjoint"] is True and passed(check)


def test_the_committed_synthetic_environment_is_sound():
    """configs/cascade/synthetic_100k.yaml: every stage's relevance agrees with the true appeal, distrusting
    relevance loses, and training and evaluation users are different people."""
    cfg = load_yaml(CascadeEnvConfig, CONFIGS / "synthetic_100k.yaml")
    assert cfg.seed is None and cfg.n_items == 100_000  # each run seed draws its world
    env, info = build_env(cfg, 1)
    assert info["world_seed"] == 1
    _assert_sound(check_cascade(env, 1, n_users=200))


def test_the_committed_mind_environment_is_sound(mind_data, tmp_path):
    """configs/cascade/mind.yaml on a simulator fitted to the MIND subset: the same checks, and item groups
    from k-means (MIND's catalogue has almost no categories)."""
    from relist.cli import main

    code = main(
        ["sim", "train", "--data", str(mind_data.root), "--out", str(tmp_path / "sim"), "--log-fraction", "0.0319"]
    )
    assert code == 0
    cfg = replace(load_yaml(CascadeEnvConfig, CONFIGS / "mind.yaml"), sim=str(tmp_path / "sim"))
    assert cfg.seed is None
    env, info = build_env(cfg, 0)
    assert info["item_groups"].startswith("k-means")
    assert int(env.cascade.catalogue.category.max()) + 1 == cfg.n_item_groups
    assert info["eval_people"] > 1000  # every person of the dataset, half held out
    _assert_sound(check_cascade(env, 0, n_users=300))
    # an item's stage error is the same in a history and as a candidate
    cascade, cat = env.cascade, env.cascade.catalogue
    both = cat.hist_known[cat.item_keys()].nonzero().squeeze(1)  # catalogue rows whose id histories hold
    assert len(both) > 100
    x = torch.cat([cat.vec, cat.bias[:, None]], dim=1)
    xh = torch.cat([cat.hist_vec, cat.hist_bias[:, None]], dim=1)
    ids = cat.item_keys()[both]
    for s in range(cascade.n_stages):
        as_candidate = cascade.item_views[s][both] - x[both]
        in_history = cascade.hist_views[s][ids] - xh[ids]
        torch.testing.assert_close(as_candidate, in_history, atol=1e-5, rtol=1e-4)


def test_evaluation_users_are_people_training_never_meets(env):
    catalogue = env.cascade.catalogue
    person = catalogue.user_sparse[:, 0]
    train = env.start(torch.arange(5000), 0, "train").users.pop
    evaluation = env.start(torch.arange(env.n_eval_people), 0, "eval").users.pop
    assert not set(person[train].tolist()) & set(person[evaluation].tolist())
    # evaluation over as many users as there are evaluation people meets each of them once
    assert sorted(evaluation.tolist()) == sorted(env.people["eval"].tolist())
    assert sorted(env.evaluate(None, env.n_eval_people, 3)["pop"].tolist()) == sorted(env.people["eval"].tolist())


def test_sessions_are_calibrated_on_training_users_only(env):
    from relist.sim.cascade_env import calibrate_sessions

    seen, start, params = [], env.start, env.sim.params
    env.start = lambda keys, seed, users="train": seen.append(users) or start(keys, seed, users)
    try:
        calibrate_sessions(env, 3.0, n_users=32, iterations=2)
    finally:
        env.start, env.sim.params = start, params
    assert seen and set(seen) == {"train"}
    # a split by person keeps every row of a person on one side
    rows = split_people(torch.tensor([7, 7, 3, 3, 3, 9, 1, 1]), 0.5, 0)
    sides = {p: {("eval" if r in rows["eval"] else "train") for r in range(8) if [7, 7, 3, 3, 3, 9, 1, 1][r] == p}
             for p in (7, 3, 9, 1)}  # fmt: skip
    assert all(len(s) == 1 for s in sides.values()) and {"train", "eval"} == set.union(*sides.values())


def test_each_run_seed_draws_its_world_unless_the_file_fixes_it():
    cfg = CascadeEnvConfig(source="synthetic", n_items=800, n_users=100, sizes=(100, 20, 5))
    a, b = build_env(cfg, 0)[0], build_env(cfg, 1)[0]
    assert not torch.equal(a.cascade.item_views[0], b.cascade.item_views[0])
    assert not torch.equal(a.cascade.catalogue.vec, b.cascade.catalogue.vec)  # the synthetic truth too
    fixed = replace(cfg, seed=4)
    c, d = build_env(fixed, 0)[0], build_env(fixed, 1)[0]
    assert torch.equal(c.cascade.item_views[0], d.cascade.item_views[0])


def test_item_groups_come_from_kmeans_where_asked():
    cfg = CascadeEnvConfig(source="synthetic", n_items=800, n_users=100, sizes=(100, 20, 5))
    own, own_info = build_env(cfg, 0)
    assert own_info["item_groups"].startswith("the data's categories")
    clustered, info = build_env(replace(cfg, item_groups="kmeans", n_item_groups=6), 0)
    groups = clustered.cascade.catalogue.category
    assert info["item_groups"].startswith("k-means") and set(groups.tolist()) == set(range(6))
    # clusters of the item vectors: items of a cluster are closer to its centre than to the others'
    vec = clustered.cascade.catalogue.vec
    centres = torch.stack([vec[groups == k].mean(0) for k in range(6)])
    assert (torch.cdist(vec, centres).argmin(1) == groups).float().mean() > 0.95


def test_stage_errors_are_fixed_per_item_and_shrink_downstream(env):
    """A stage's errors are fixed by the world seed (rebuilding gives the same views) and later stages see items
    more accurately. (That an item's error is the same in a history and as a candidate is checked on MIND,
    where histories have views of their own.)"""
    cascade = env.cascade
    x = torch.cat([cascade.catalogue.vec, cascade.catalogue.bias[:, None]], dim=1)
    errors = [float((view - x).pow(2).mean()) for view in cascade.item_views]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    again = Cascade(cascade.catalogue, cascade.config)
    assert all(torch.equal(a, b) for a, b in zip(again.item_views, cascade.item_views))
