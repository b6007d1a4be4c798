"""UNEX-RL and its baselines: CIC rebuilds what the cascade produces, learners beat random weights, the
experiment command end to end, and a 2-process DDP job."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from relist.cli import main
from relist.rl.agents import METHODS, MultiStageAgent, method_config
from relist.rl.loop import LoopConfig, evaluate, fixed_policy, greedy_policy, train_agent
from relist.sim.cascade_env import CascadeEnvConfig, build_env, default_actions

ENV = dict(source="synthetic", n_items=1500, n_users=300, sizes=[150, 40, 8], session_requests=3.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env():
    return build_env(CascadeEnvConfig(**{**ENV, "sizes": tuple(ENV["sizes"])}))[0]


@pytest.fixture(scope="module")
def env_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("env") / "env.yaml"
    path.write_text(yaml.safe_dump(ENV))
    return path


def test_cic_rebuilds_what_the_cascade_produces_and_replaces_stale_copies(env):
    loop = LoopConfig(steps=12, n_envs=48, warmup=4, eval_every=1000, eval_users=8)
    agent, _ = train_agent(env, method_config("unexrl", batch_size=64, critic_warmup=0), loop, seed=0)
    assert agent.updates > 0
    replay = agent.replay
    batch = replay.sample(64, torch.Generator().manual_seed(0))
    dims, cascade = cascade_dims(env), env.cascade
    stored = list(batch.obs.split(dims, 1))
    # the stored actions rebuild exactly the observations the stages saw when the transition was collected
    rebuilt = cascade.observations(batch.pop, batch.ctx, list(batch.act.split(cascade.action_dims, 1)))
    for s in range(cascade.n_stages):
        assert torch.equal(rebuilt[s], stored[s]), f"stage {s}"
    # CIC's chain of the current (updated) actors equals a fresh forward pass with the same actions ...
    with torch.no_grad():
        chain = cascade(batch.pop, batch.ctx, agent.policy())
        fresh = cascade(batch.pop, batch.ctx, [a.clone() for a in chain.actions])
    for s in range(cascade.n_stages):
        assert torch.equal(chain.obs[s], fresh.obs[s])
    # ... and differs from the stale buffer copies downstream (the first observation is the same)
    assert torch.equal(chain.obs[0], stored[0])
    for s in range(1, cascade.n_stages):
        changed = (chain.obs[s] != stored[s]).any(1).float().mean()
        assert changed > 0.5, f"stage {s}: only {changed:.2f} of the rebuilt observations differ"


def cascade_dims(env):
    return env.cascade.obs_dims


def test_a_learned_agent_beats_random_fusion_weights(env):
    """DDPG on the ranking stage, from a cold start, ends better than random fusion weights: over 3 seeds its
    session dwell is on average more than 1.15 times that of 3 random weight vectors per seed.

    The margin was set from 20 seeds (0-19) of this exact set-up: the per-seed ratio ranged 1.01-2.73
    (median 1.82; one seed of 20 barely beat random), and the mean ratio over any 3 of those 20 seeds was
    at least 1.21. Warm-started UNEX-RL is not asserted here: at this budget (80 steps of 64 users) it ended
    below the hand-set weights it started from in 20 of 20 seeds, and below random weights in 3."""
    loop = LoopConfig(steps=80, n_envs=64, warmup=10, eval_every=80, eval_users=300)
    ratios = []
    for seed in (0, 1, 2):
        agent, _ = train_agent(env, method_config("ddpg", batch_size=128, critic_warmup=10), loop, seed=seed)
        assert agent.updates > 10
        learned = evaluate(env, greedy_policy(agent), loop, seed)["session_dwell"]
        randoms = []
        for k in range(3):
            g = torch.Generator().manual_seed(100 * seed + k)
            weights = [torch.rand(1, m, generator=g) * 2 - 1 for m in env.cascade.action_dims]
            randoms.append(evaluate(env, fixed_policy(weights), loop, seed)["session_dwell"])
        ratios.append(learned / np.mean(randoms))
    assert np.mean(ratios) > 1.15, ratios


@pytest.mark.parametrize("method", ["unexrl", "unexrl_q1"])
def test_global_critic_reads_downstream_observations_only_when_asked(env, method):
    """The paper's global critic reads every stage's stored observation; ``critic_obs="first"`` (unexrl_q1)
    reads the first only, so scrambling the stored downstream observations changes the first critic's loss
    and not the second's."""
    loop = LoopConfig(steps=8, n_envs=32, warmup=2, eval_every=1000, eval_users=4)
    agent, _ = train_agent(env, method_config(method, batch_size=32, critic_warmup=1000), loop, seed=0)
    batch = agent.replay.sample(32, torch.Generator().manual_seed(0))
    first = env.cascade.obs_dims[0]
    scrambled = dataclasses.replace(
        batch,
        obs=torch.cat([batch.obs[:, :first], torch.randn_like(batch.obs[:, first:])], 1),
        next_obs=torch.randn_like(batch.next_obs),
    )
    state = copy.deepcopy(agent.critics.state_dict())
    losses = []
    for b in (batch, scrambled):
        agent.critics.load_state_dict(state)
        losses.append(agent.update(b, agent.replay)["critic_loss"])
    if method == "unexrl":
        assert losses[0] != pytest.approx(losses[1], rel=1e-4)
    else:
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_the_actors_it_says(env, method):
    """Each registered method collects, updates, and has an actor at exactly the stages it acts at, each of
    which its updates move."""
    config = method_config(method, batch_size=32, critic_warmup=0)
    loop = LoopConfig(steps=10, n_envs=32, warmup=2, eval_every=1000, eval_users=4)
    untrained = MultiStageAgent(
        env.cascade, config, default_actions(env.cascade, 1), torch.Generator().manual_seed(0)
    )  # the initial weights train_agent starts from
    agent, curve = train_agent(env, config, loop, seed=0)
    assert agent.updates > 0 and np.isfinite(curve[-1]["session_dwell"])
    n = env.cascade.n_stages
    assert agent.acting == (list(range(n)) if config.acting == "all" else [n - 1])
    assert sorted(agent.actors) == [str(s) for s in agent.acting]  # the other stages keep the hand-set weights
    for s in agent.acting:
        before = torch.cat([p.reshape(-1) for p in untrained.actors[str(s)].parameters()])
        after = torch.cat([p.reshape(-1) for p in agent.actors[str(s)].parameters()])
        assert not torch.equal(before, after), (method, env.cascade.names[s])


def test_td3_has_twin_critics_and_delays_its_actor(env):
    loop = LoopConfig(steps=8, n_envs=32, warmup=2, eval_every=1000, eval_users=4)
    agent, _ = train_agent(env, method_config("td3", batch_size=32, critic_warmup=0), loop, seed=0)
    assert len(agent.critics) == 2 and agent.acting == [env.cascade.n_stages - 1]
    before = [p.clone() for p in agent.actors.parameters()]
    batch = agent.replay.sample(32, torch.Generator().manual_seed(0))
    agent.updates = 0
    out = agent.update(batch, agent.replay)  # the first of every two updates leaves the actor alone
    assert "actor_loss" not in out and all(torch.equal(a, b) for a, b in zip(before, agent.actors.parameters()))
    out = agent.update(batch, agent.replay)
    assert "actor_loss" in out and not all(torch.equal(a, b) for a, b in zip(before, agent.actors.parameters()))


def _experiment(env_yaml, out, *extra):
    printed = io.StringIO()
    args = ["experiment", "unexrl", "--env", str(env_yaml), "--out", str(out), "--seeds", "2"]
    args += ["--methods", "cem,ddpg,unexrl", "--stages", "3,4", "--stage-methods", "unexrl", "--stage-seeds", "1"]
    args += ["--steps", "12", "--n-envs", "32", "--eval-every", "6", "--cem-users", "8", "--reference-budget", "2"]
    args += ["--resamples", "200", *extra]
    with contextlib.redirect_stdout(printed):
        return main(args)


def test_experiment_command_end_to_end(env_yaml, tmp_path, capsys):
    import csv

    out = tmp_path / "exp"
    assert _experiment(env_yaml, out) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    # 3 stages: default, random, cem, ddpg, unexrl, reference over two seeds; 4 stages: default, unexrl over one
    assert len(rows) == 2 * 6 + 2
    assert {r["stages"] for r in rows} == {"3", "4"}
    budget = 12 * 32
    for r in rows:  # equal budgets: RL exactly, CEM until the budget is spent (at most one candidate more)
        used = int(r["requests_used"])
        if r["method"] in ("ddpg", "unexrl"):
            assert used == budget
        elif r["method"] == "cem":
            assert budget <= used <= budget + 8 * 3 * 100
        elif r["method"] == "reference":
            assert used >= 2 * budget
    checks = [c for c in csv.DictReader(open(out / "checks.csv")) if c["n_stages"] == "3"]
    assert [c["users_disjoint"] for c in checks] == ["True", "True"]
    assert {c["world_seed"] for c in checks} == {"0", "1"}  # each seed its own world
    summary = (out / "summary.md").read_text()
    assert "Is the environment sound?" in summary and "More stages" in summary
    assert "No verdicts: 2 seed(s)" in summary and "vs CEM" not in summary  # too few seeds for a verdict
    assert "best fixed fusion (reference)" in summary and "Holm p" in summary and "Wilcoxon p" in summary
    assert (out / "curves.png").is_file() and (out / "stages.png").is_file()
    curves = list(csv.DictReader(open(out / "curves.csv")))
    assert {c["step"] for c in curves if c["method"] == "unexrl"} == {"0", "6", "12"}
    assert {c["step"] for c in curves if c["method"] == "cem"} == {"0", "6", "12"}
    # the curve's last point is the table's evaluation: the same users
    for method in ("ddpg", "unexrl"):
        last = [c for c in curves if c["method"] == method and c["step"] == "12" and c["stages"] == "3"]
        table = [r for r in rows if r["method"] == method and r["stages"] == "3"]
        assert sorted(float(c["session_dwell"]) for c in last) == pytest.approx(
            sorted(float(r["session_dwell"]) for r in table)
        )

    # --resume keeps every finished run (an interrupted run: run files of two worlds lost) and redoes only what
    # is missing, here in two worker processes (one world each): the redone runs reproduce the lost ones
    lost = out / "runs" / "3-stages" / "ddpg" / "seed-1.json"
    also_lost = out / "runs" / "3-stages" / "cem" / "seed-0.json"
    kept = (out / "runs" / "3-stages" / "unexrl" / "seed-0.json").stat().st_mtime_ns
    lost.unlink()
    also_lost.unlink()
    assert _experiment(env_yaml, out, "--resume", "--jobs", "2") == 0
    assert lost.is_file() and also_lost.is_file()
    assert (out / "runs" / "3-stages" / "unexrl" / "seed-0.json").stat().st_mtime_ns == kept
    again = list(csv.DictReader(open(out / "results.csv")))
    key = lambda r: (r["stages"], r["method"], r["seed"])  # noqa: E731
    before = {key(r): r["session_dwell"] for r in rows}
    assert {key(r): r["session_dwell"] for r in again} == before  # the redone run reproduces the lost one
    # other settings are refused, and a plain rerun does not overwrite
    assert _experiment(env_yaml, out, "--resume", "--cem-users", "9") == 2
    assert "cem_users" in capsys.readouterr().err
    assert _experiment(env_yaml, out) == 2
    # --overwrite starts over, removing only the records it wrote
    (out / "notes.txt").write_text("mine")
    assert _experiment(env_yaml, out, "--overwrite", "--stages", "3", "--seeds", "1") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not lost.is_file() and (out / "runs" / "3-stages" / "ddpg" / "seed-0.json").is_file()


def test_two_process_ddp_training(env_yaml, tmp_path):
    """torchrun with 2 CPU (gloo) processes: each simulates its own users, DDP keeps the learners identical."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "rl",
        "train",
        "--env",
        str(env_yaml),
        "--method",
        "unexrl",
        "--steps",
        "10",
        "--n-envs",
        "32",
        "--eval-every",
        "10",
    ]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "relist.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    result = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert result["world_size"] == 2 and result["ranks_in_sync"] is True
    assert result["final"]["requests"] == 10 * 32 * 2
    assert (tmp_path / "two" / "actors.safetensors").is_file()


@pytest.mark.parametrize("method", ["unexrl", "unexrl_no_sg"])
def test_without_sg_the_matching_actor_learns_through_the_later_stages(env, method):
    """The cascading path a_1 -> o_2 -> a_2 -> o_3 -> a_3: with the stop-gradient (UNEX-RL) the matching actor gets
    no gradient from what the later stages do with its candidates; without it (``unexrl_no_sg``) it does, and
    the values of the chain are the same either way."""
    agent = MultiStageAgent(env.cascade, method_config(method), default_actions(env.cascade, 1), torch.Generator())
    agent.start_training()
    state = env.start(torch.arange(64), 3)
    pop, ctx = env.first(state)
    chain = agent.chain(pop, ctx)
    matching = list(agent.actors["0"].parameters())

    def reached(value) -> float:
        grads = torch.autograd.grad(value, matching, allow_unused=True, retain_graph=True)
        return sum(float(g.abs().sum()) for g in grads if g is not None)

    downstream = sum(a.pow(2).sum() for a in chain.actions[1:])  # the later stages' actions only
    # the global critic through the downstream observations alone (every action held fixed)
    held = torch.cat([a.detach() for a in chain.actions], 1)
    through_obs = agent.critics[0]["g"](agent._global_obs(chain.obs), held).sum()
    if method == "unexrl":
        assert reached(downstream) == 0.0 and reached(through_obs) == 0.0
    else:
        assert reached(downstream) > 0.0 and reached(through_obs) > 0.0
    plain = env.cascade(pop, ctx, [a.detach() for a in chain.actions])
    assert all(torch.equal(x.stages[s].rows, plain.stages[s].rows) for x in (chain,) for s in range(3))


def test_cem_counts_every_request_it_plays_out_and_stops_at_its_budget(env):
    from relist.rl.cem import CEMConfig, train_cem

    played = []
    evaluate_users = env.evaluate

    def counting(*args, **kwargs):
        out = evaluate_users(*args, **kwargs)
        assert kwargs.get("users") == "train"  # CEM scores its candidates on training users only
        played.append(int(out["requests"].sum()))
        return out

    env.evaluate = counting
    try:
        _, history = train_cem(env, CEMConfig(iterations=100, population=6, elite=2, users=16, budget=900), 0)
    finally:
        env.evaluate = evaluate_users
    assert history[-1]["requests"] == sum(played)
    assert sum(played[:-1]) < 900 <= sum(played)  # the last candidate scored is the one that spent the budget
    assert len(history) >= 2


def test_verdicts_need_five_seeds_and_follow_the_paired_difference():
    """The table's statistics on made-up runs: a method 50 s behind UNEX-RL on every seed (over 400 users each)
    is resolved at 6 seeds and not claimed at 3; the hand-set counts and signs are what the numbers say."""
    from relist.experiments.unexrl import _verdicts, method_stats

    rng = np.random.default_rng(0)

    def run(method, seed, shift):
        sessions = np.full(400, 2.0)
        dwell = sessions * (1000 + 30 * seed + shift) + rng.normal(0, 200, 400)
        users = {"dwell": dwell.tolist(), "sessions": sessions.tolist(), "requests": [3.0] * 400, "clicks": [1.0] * 400}
        value = float(dwell.sum() / sessions.sum())
        return {"stages": 3, "method": method, "seed": seed, "session_dwell": value, "session_length": 1.5,
                "clicks_per_request": 1.0, "requests_used": 100, "users": users, "curve": []}  # fmt: skip

    for n_seeds, claimed in ((6, True), (3, False)):
        records = [
            run(m, s, shift) for s in range(n_seeds) for m, shift in (("default", -80), ("unexrl", 0), ("ddpg", -50))
        ]
        stats = method_stats(records, 3, ["default", "unexrl", "ddpg"], resamples=400)
        assert stats["ddpg"]["vs_ref"]["mean"] == pytest.approx(50, abs=15)  # UNEX-RL minus DDPG
        assert stats["ddpg"]["above_default"] == (n_seeds, n_seeds) and stats["unexrl"]["seeds"] == n_seeds
        text = "\n".join(_verdicts(stats, ["ddpg"], 400))
        assert ("vs DDPG (ranking stage)" in text and ": yes" in text) == claimed
        assert ("No verdicts" in text) == (not claimed)
