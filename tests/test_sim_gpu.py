"""The simulator on CUDA: the same keyed draws as on the CPU, the same contract, the same outcomes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.data.synthetic import SyntheticClickModel
from relist.sim import rng
from relist.sim.abtest import simulate
from relist.sim.check import check_simulator
from relist.sim.pool import ListPool
from relist.sim.response import ClickModelConfig, FactorisedClickModel, TruthResponse
from relist.sim.session import SessionParams, Simulator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    return PreparedDataset(prepare(PrepareConfig(source="synthetic", out=out, n_lists=1200, n_users=200, n_items=500)))


def truth_sim(data: PreparedDataset, device: str) -> Simulator:
    truth = SyntheticClickModel.load(data.root / "truth.safetensors")
    return Simulator(
        TruthResponse(truth, device),
        ListPool.from_dataset(data, "test", device=device),
        SessionParams(ref_clicks=2.3, leave_bias=-1.0),
    )


def test_keyed_draws_are_the_same_integers_on_cuda():
    users, slots = torch.arange(1000)[:, None], torch.arange(64)[None, :]
    cpu = rng.hash_keys(5, rng.CLICK, users, 3, slots)
    cuda = rng.hash_keys(5, rng.CLICK, users.cuda(), 3, slots.cuda())
    assert torch.equal(cpu, cuda.cpu())


def test_truth_simulator_on_cuda_keeps_the_contract_and_matches_the_cpu(data):
    sim_cuda, sim_cpu = truth_sim(data, "cuda"), truth_sim(data, "cpu")
    check_simulator(sim_cuda, seed=0, n_users=64)
    a = simulate(sim_cpu, sim_cpu.response.appeal, 500, 3, 500)
    b = simulate(sim_cuda, sim_cuda.response.appeal, 500, 3, 500)
    # float rounding may flip a draw that lands within ~1e-7 of its probability; nearly every user is identical
    same = np.all([a[k] == b[k] for k in ("requests", "sessions", "clicks")], axis=0)
    assert same.mean() > 0.98
    np.testing.assert_allclose(a["dwell"][same], b["dwell"][same], rtol=1e-4)
    assert b["clicks"].sum() / b["requests"].sum() == pytest.approx(a["clicks"].sum() / a["requests"].sum(), rel=0.01)


def test_learned_response_on_cuda_matches_the_cpu(data):
    model = FactorisedClickModel(data.schema, ClickModelConfig()).eval()
    batch = data.batch(data.split("test")[:64])
    cpu = model.respond(batch)
    cuda = model.cuda().respond(batch.to("cuda"))
    torch.testing.assert_close(cuda.prob.cpu(), cpu.prob, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cuda.appeal.cpu(), cpu.appeal, atol=1e-5, rtol=1e-4)
