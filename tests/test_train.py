"""The trainer: selection on valid, checkpoints, kill-and-resume, and a 2-process DDP run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset
from relist.io import CorruptFileError, atomic_write_text, seal
from relist.nn import LIST_LOSSES
from relist.rankers.train import TrainRankerConfig, train_ranker
from relist.rerankers import build_reranker
from relist.train import TrainConfig, WeightAverage, new_loop_state, parse_model_args, train, training_loop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rerank_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    prepare(PrepareConfig(source="synthetic", out=root / "data", n_lists=1500, n_users=200, n_items=400, seed=3))
    train_ranker(TrainRankerConfig(data=root / "data", out=root / "ranker", model="lambdamart", seed=3, progress=False))
    return root / "ranker" / "rerank"


def small(rerank_data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=rerank_data,
        out=out,
        model="prm",
        model_args="d_model=16,n_blocks=1,d_ffn=32",
        batch_size=64,
        epochs=3,
        eval_every=5,
        progress=False,
        seed=11,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("metric, pick", [("list_ce", min), ("ndcg@10", max)])
def test_training_selects_on_valid_and_reports_test(rerank_data, tmp_path, metric, pick):
    result = train(small(rerank_data, tmp_path / "run", p1_weight=1.0, p2_weight=1.0, select_metric=metric))
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["test"] == pytest.approx(result["test"])
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    best = pick(history, key=lambda r: r["valid"][metric])
    assert result["best_step"] == best["step"]
    assert result["valid"][metric] == pytest.approx(best["valid"][metric], abs=1e-6)
    assert result["valid"]["list_ce"] == pytest.approx(best["valid"]["list_ce"], abs=1e-6)
    assert history[0]["step"] == 0 and history[0]["train"] == {}  # the untrained model is a candidate too
    assert {"loss_cs_p1", "loss_cs_p2", "loss_base"} <= set(history[1]["train"])
    assert 0 <= result["obedience_test"]["obedience_p1@full"] <= 1
    # the consistency losses are what training lowers, along with the base loss
    assert history[-1]["train"]["loss"] < history[1]["train"]["loss"]


def test_the_weight_average_follows_the_weights_by_its_decay(rerank_data):
    torch.manual_seed(0)
    model = build_reranker("midnn", PreparedDataset(rerank_data).schema)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.features.dense_mean.add_(3.0)
    average.update()
    for (key, mine), theirs in zip(average.model.named_parameters(), model.parameters()):
        assert torch.allclose(mine, 0.9 * before[key] + 0.1 * theirs), key
    assert torch.equal(average.model.features.dense_mean, model.features.dense_mean)  # buffers are copied
    assert WeightAverage(model, 0.0).model is model  # no average: the model itself
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(model, 1.0)


def test_resume_from_a_checkpoint_without_a_weight_average(rerank_data, tmp_path, caplog):
    train(small(rerank_data, tmp_path / "run", max_steps=5, ema_decay=0.0))
    checkpoint = tmp_path / "run" / "checkpoint"
    assert not (checkpoint / (checkpoint / "latest").read_text() / "average").exists()
    (tmp_path / "run" / "metrics.json").unlink()
    with caplog.at_level("WARNING", logger="relist"):
        result = train(small(rerank_data, tmp_path / "run", max_steps=5, resume=True))  # ema_decay 0.95
    assert "no weight average" in caplog.text and result["steps"] == 5


def test_existing_output_is_kept_unless_asked(rerank_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(small(rerank_data, tmp_path / "run"))
    assert (tmp_path / "run" / "keep.txt").exists()


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_never_deletes_a_directory_it_did_not_write(rerank_data, tmp_path):
    """--resume on a directory without a checkpoint (a wrong path, a lost pointer) is refused and the
    directory left as it was: other files, a config.json without the trainer's run id, and a complete
    checkpoint whose 'latest' pointer is gone (which the trainer used to replace by its own step-N)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no checkpoint to resume and other files \\(important.txt\\)"):
        train(small(rerank_data, run, resume=True))
    assert tree(run) == {"important.txt": b"keep me"}
    # a config.json of the trainer's own form but no run id: not provably this trainer's, so refused
    mine = tmp_path / "mine"
    mine.mkdir()
    config = json.loads(json.dumps(dataclasses.asdict(small(rerank_data, mine, max_steps=5)), default=str))
    (mine / "config.json").write_text(json.dumps(config))
    for resume in (True, False):
        with pytest.raises(FileExistsError, match="no .relist-run naming the run that wrote them"):
            train(small(rerank_data, mine, max_steps=5, resume=resume))
    assert tree(mine) == {"config.json": json.dumps(config).encode()}
    # a finished run whose pointer was lost (and its metrics moved away): its checkpoint is kept, byte for byte
    lost = tmp_path / "lost"
    train(small(rerank_data, lost, max_steps=5))
    for name in ("metrics.json", "history.jsonl", "checkpoint/latest"):
        (lost / name).unlink()
    before = tree(lost)
    for resume in (True, False):
        with pytest.raises(FileExistsError, match="holds step-000000005 but no 'latest' pointer; nothing was changed"):
            train(small(rerank_data, lost, max_steps=5, resume=resume))
    assert tree(lost) == before
    # the message's remedy works: the pointer written back, the run resumes from it
    (lost / "checkpoint" / "latest").write_text("step-000000005")
    assert train(small(rerank_data, lost, max_steps=5, resume=True))["steps"] == 5


def test_resume_refuses_another_runs_checkpoint_and_an_edited_run_id(rerank_data, tmp_path):
    """--resume from a checkpoint another run wrote (copied in, the pointer edited to name it) would mix two
    runs; a run id file edited by hand no longer says whose the checkpoints are. Both are refused and the
    directory left as it was."""
    import shutil

    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    train(small(rerank_data, mine, max_steps=5))
    train(small(rerank_data, theirs, max_steps=5, seed=3))
    shutil.copytree(theirs / "checkpoint" / "step-000000005", mine / "checkpoint" / "step-000000004")
    (mine / "checkpoint" / "latest").write_text("step-000000004")
    before = tree(mine)
    with pytest.raises(FileExistsError, match="was written by another run"):
        train(small(rerank_data, mine, max_steps=6, resume=True))
    assert tree(mine) == before
    (mine / "checkpoint" / "latest").write_text("step-000000005")
    (mine / ".relist-run").write_text('{"run": "MY-RUN"}')
    before = tree(mine)
    with pytest.raises(FileExistsError, match="does not hold a run id this trainer wrote"):
        train(small(rerank_data, mine, max_steps=6, resume=True))
    assert tree(mine) == before


def test_a_run_that_failed_before_training_starts_again_when_corrected(rerank_data, tmp_path):
    """A run that failed before its first checkpoint (here: an unknown selection metric, found at the
    step-0 validation, after the run wrote its id, config and vocabularies) is started again by the
    corrected command, with or without --resume; a staging folder of its own (a checkpoint save a kill
    interrupted) is removed, one named by another run id is not, and the run is then refused."""
    for k, resume in enumerate((False, True)):
        run = tmp_path / f"run{k}"
        with pytest.raises(ValueError, match="is not a validation metric"):
            train(small(rerank_data, run, max_steps=5, select_metric="ndcg@7"))
        assert {".relist-run", "config.json", "vocab"} <= {p.name for p in run.iterdir()}
        run_id = json.loads((run / ".relist-run").read_text())["run"]
        (run / "checkpoint" / f".step-000000005.{run_id}").mkdir(parents=True)  # half of a save
        result = train(small(rerank_data, run, max_steps=5, resume=resume))
        assert result["steps"] == 5 and result["config"]["select_metric"] == "list_ce"
        assert json.loads((run / "config.json").read_text())["select_metric"] == "list_ce"
        assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["latest", "step-000000005"]
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="is not a validation metric"):
        train(small(rerank_data, other, max_steps=5, select_metric="ndcg@7"))
    (other / "checkpoint" / f".step-000000005.{'0' * 32}").mkdir(parents=True)
    before = tree(other)
    with pytest.raises(FileExistsError, match="but no 'latest' pointer"):
        train(small(rerank_data, other, max_steps=5))
    assert tree(other) == before and (other / "checkpoint" / f".step-000000005.{'0' * 32}").is_dir()


def test_a_checkpoint_folder_the_run_did_not_write_is_never_replaced(rerank_data, tmp_path):
    """A resumed run that reaches a step whose checkpoint folder exists but is not its own (it carries no
    run id of this run) stops with an error and leaves the folder as it was; its own checkpoints are
    replaced as it goes."""
    run = tmp_path / "run"
    train(small(rerank_data, run, max_steps=5))
    (run / "metrics.json").unlink()
    # as if killed right after its step-5 checkpoint: the state is not done (and sealed again)
    state_path = run / "checkpoint" / "step-000000005" / "state.json"
    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), "done": False}))
    seal(state_path.parent, ["state.json"])
    foreign = run / "checkpoint" / "step-000000010"
    foreign.mkdir()
    (foreign / "state.json").write_text('{"step": 10, "note": "someone else\'s"}')
    before = tree(foreign)
    with pytest.raises(FileExistsError, match="step-000000010 exists and was not written by this run"):
        train(small(rerank_data, run, max_steps=10, resume=True))
    assert tree(foreign) == before
    assert (run / "checkpoint" / "latest").read_text() == "step-000000005"  # the pointer still names a checkpoint
    assert not [p.name for p in (run / "checkpoint").iterdir() if p.name.startswith(".")]  # no staging left
    foreign.rename(tmp_path / "moved")
    assert train(small(rerank_data, run, max_steps=10, resume=True))["steps"] == 10
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["latest", "step-000000010"]


def test_max_steps_stops_training_between_validations(rerank_data, tmp_path):
    result = train(small(rerank_data, tmp_path / "run", max_steps=3, eval_every=0))
    assert result["steps"] == 3


def test_a_corrupt_or_escaping_checkpoint_is_refused_on_resume(rerank_data, tmp_path):
    run = tmp_path / "run"
    train(small(rerank_data, run, max_steps=5))
    (run / "metrics.json").unlink()
    folder = run / "checkpoint" / (run / "checkpoint" / "latest").read_text()
    for name in ("model.safetensors", "optimiser.safetensors", "average/model.safetensors"):
        path = folder / name
        pristine = path.read_bytes()
        flipped = bytearray(pristine)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptFileError, match=f"{name}: contents differ"):
            train(small(rerank_data, run, max_steps=5, resume=True))
        path.write_bytes(pristine)
    state, sums = folder / "state.json", folder / "checksums.json"
    pristine, sealed = state.read_bytes(), sums.read_bytes()
    state.write_bytes(pristine[: len(pristine) // 2])  # a truncated state.json: by its checksum, then by itself
    with pytest.raises(CorruptFileError, match="state.json: contents differ"):
        train(small(rerank_data, run, max_steps=5, resume=True))
    sums.unlink()
    with pytest.raises(CorruptFileError, match="state.json: not valid JSON"):
        train(small(rerank_data, run, max_steps=5, resume=True))
    state.write_bytes(pristine)
    sums.write_bytes(sealed)
    latest = run / "checkpoint" / "latest"
    for pointer in ("../../elsewhere", "/tmp", folder.name + "/.."):
        latest.write_text(pointer)
        with pytest.raises(CorruptFileError, match="not a step-N checkpoint folder of this run"):
            train(small(rerank_data, run, max_steps=5, resume=True))
    latest.write_text(folder.name)
    assert train(small(rerank_data, run, max_steps=5, resume=True))["steps"] == 5


def test_resume_refuses_other_settings_than_the_checkpoints(rerank_data, tmp_path):
    train(small(rerank_data, tmp_path / "run", max_steps=5))
    with pytest.raises(ValueError, match="selects its best checkpoint on list_ce; resume with --select-metric list_ce"):
        train(small(rerank_data, tmp_path / "run", max_steps=10, resume=True, select_metric="ndcg@10"))
    with pytest.raises(ValueError, match="other model settings \\(loss: .*'softmax'"):
        train(
            small(
                rerank_data,
                tmp_path / "run",
                max_steps=10,
                resume=True,
                model_args="d_model=16,n_blocks=1,d_ffn=32,loss=bce",
            )
        )


def test_an_unknown_selection_metric_is_named(rerank_data, tmp_path):
    with pytest.raises(ValueError, match="'ndcg@7' is not a validation metric.*list_ce"):
        train(small(rerank_data, tmp_path / "run", select_metric="ndcg@7", max_steps=1))


def test_model_args_are_typed_and_checked():
    assert parse_model_args("d_model=32,ordinal=false", "setrank") == {"d_model": 32, "ordinal": False}
    assert parse_model_args("hidden=32/16", "midnn") == {"hidden": (32, 16)}
    with pytest.raises(ValueError, match="has no setting 'depth'"):
        parse_model_args("depth=3", "prm")
    with pytest.raises(ValueError, match="d_model: expected int, got 'big'"):
        parse_model_args("d_model=big", "prm")
    with pytest.raises(ValueError, match="ordinal: expected bool, got 'maybe'"):
        parse_model_args("ordinal=maybe", "setrank")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "relist.cli", *args]


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "reranker",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "prm",
        "--model-args",
        "d_model=16,n_blocks=1,d_ffn=32",
        "--batch-size",
        "32",
        "--epochs",
        "4",
        "--eval-every",
        "3",
        "--seed",
        "5",
        "--no-progress",
        "--p2-weight",
        "1",
        "--patience",
        "100",
        *extra,
    ]


def test_a_killed_run_resumes_to_the_same_weights(rerank_data, tmp_path):
    """SIGKILL mid-run, then --resume in a hard-linked copy of the run directory at another path: the same
    final weights, weight average and test metrics as an uninterrupted run, the training time of both
    processes counted, and the original untouched."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(cli(*cli_args(rerank_data, tmp_path / "whole")), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(*cli_args(rerank_data, run)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    pointer = run / "checkpoint" / "latest"
    while time.time() < deadline:
        if pointer.is_file() and int(pointer.read_text().split("-")[1]) >= 9:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = int(pointer.read_text().split("-")[1])

    # resumed elsewhere, from a copy whose files are hard links to the killed run's: run directories are
    # movable, and resuming replaces files rather than writing into them, so the original is left as it was
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(run, moved, copy_function=os.link)
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert (run / "checkpoint" / "latest").stat().st_nlink == 2
    # the checkpoint carries the training time so far; set it to 1000 s (resealed, as if the killed process had
    # trained that long): the resumed run's train_seconds must count it, not restart from zero
    latest = moved / "checkpoint" / (moved / "checkpoint" / "latest").read_text()
    state = json.loads((latest / "state.json").read_text())
    assert state["train_seconds"] > 0
    atomic_write_text(latest / "state.json", json.dumps({**state, "train_seconds": 1000.0}))
    seal(latest, ["state.json"])
    began = time.perf_counter()
    resumed = subprocess.run(cli(*cli_args(rerank_data, moved, "--resume")), env=env, capture_output=True, text=True)
    resumed_wall = time.perf_counter() - began
    assert resumed.returncode == 0, resumed.stderr
    assert {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    run = moved
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    again = json.loads((run / "metrics.json").read_text())
    assert again["steps"] == whole["steps"] > killed_at
    assert 1000.0 < again["train_seconds"] < 1000.0 + resumed_wall

    def final(d):
        return load_file(str(d / "checkpoint" / (d / "checkpoint" / "latest").read_text() / "model.safetensors"))

    def average(d):
        latest = d / "checkpoint" / (d / "checkpoint" / "latest").read_text()
        return load_file(str(latest / "average" / "model.safetensors"))

    for a, b in ((final(tmp_path / "whole"), final(run)), (average(tmp_path / "whole"), average(run))):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert again["test"] == pytest.approx(whole["test"], abs=1e-6)


def test_two_process_ddp_matches_one_process(rerank_data, tmp_path):
    """torchrun with 2 CPU (gloo) processes, each on half of every batch, follows the 1-process run."""
    common = [
        "--model-args",
        "d_model=16,n_blocks=1,d_ffn=32,dropout=0",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--eval-every",
        "4",
        "--seed",
        "2",
        "--no-progress",
        "--max-steps",
        "8",
        "--patience",
        "100",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        cli("train", "reranker", "--data", str(rerank_data), "--out", str(tmp_path / "one"), *common),
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
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
            "train",
            "reranker",
            "--data",
            str(rerank_data),
            "--out",
            str(tmp_path / "two"),
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = [json.loads(x) for x in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in h1] == [r["step"] for r in h2] == [0, 4, 8]
    for r1, r2 in zip(h1[1:], h2[1:]):
        # the logged training loss is the mean over both processes' halves of every batch
        assert r2["train"]["loss"] == pytest.approx(r1["train"]["loss"], rel=1e-4)
        assert r2["valid"]["ndcg@10"] == pytest.approx(r1["valid"]["ndcg@10"], abs=1e-3)
    w1 = load_file(str(tmp_path / "one" / "best" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "best" / "model.safetensors"))
    # Adam divides by the gradient's running scale, so float noise in near-zero gradients shows up
    # as small weight differences; the weights must still agree closely
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=2e-3), key


@pytest.mark.parametrize("name, loss", [("prm", "softmax"), ("midnn", "bce"), ("raise", "bce"), ("raise", "softmax")])
def test_calibrated_skip_minimises_the_loss_of_the_initial_score_alone(rerank_data, name, loss):
    """With the network off the logits are a·z + b; calibration puts (a, b) at the loss's minimum on the
    train split, and the gate at gate_init·|a|. Listwise and pointwise losses, chosen by ``loss``."""
    data = PreparedDataset(rerank_data)
    model = build_reranker(name, data.schema, loss=loss)
    assert model.loss_kind == loss
    model.features.fit(data, "train")
    model.calibrate_skip(data, "train")
    batch = data.batch(data.split("train"))
    z = model.initial_logit(batch) * batch.mask
    loss_fn = LIST_LOSSES[model.loss_kind]
    params = torch.tensor([model.skip_weight.item(), model.skip_bias.item()], requires_grad=True)
    loss = loss_fn(params[0] * z + params[1] * batch.mask, batch.label, batch.mask)
    (grad,) = torch.autograd.grad(loss, params)
    assert grad.abs().max() < 1e-3
    for a, b in [
        (1.0, 0.0),
        (params[0].item() * 1.5, params[1].item()),
        (params[0].item() * 0.5, params[1].item() - 0.5),
    ]:
        assert loss_fn(a * z + b * batch.mask, batch.label, batch.mask) > loss.detach()
    assert model.skip_weight.item() > 0  # the initial ranker's score points the right way on this data
    assert model.gate.item() == pytest.approx(model.config.gate_init * model.skip_weight.item())


def test_the_training_loop_validates_stops_and_resumes_where_it_was():
    """The one loop (re-rankers, the DNN ranker and the click model): validation every ``eval_every`` steps and
    at each epoch's end, ``patience`` validations without improvement stop it, and a state saved after a
    validation continues to the same weights as a run that was never stopped."""
    improvements = (True, True, False, False, False, True, True, True)

    def run(state, weight_from=None, stop_after=0):
        weight = torch.nn.Parameter(torch.zeros(3) if weight_from is None else weight_from.clone())
        optimiser = torch.optim.SGD([weight], lr=0.1)

        def loss(rows):
            return {"loss": ((weight - torch.arange(3.0)) ** 2).sum() * float(len(rows))}

        def validate(state, train):
            state["history"].append(state["step"])
            return improvements[len(state["history"]) - 1]

        def stop(state):
            state["done"] = state["done"] or len(state["history"]) == stop_after

        training_loop(state, epochs=4, patience=3, epoch_batches=lambda epoch: [np.arange(2)] * 5, loss=loss,
                      optimiser=optimiser, validate=validate, eval_every=2, after_validation=stop)  # fmt: skip
        return weight.detach().clone()

    whole_state = new_loop_state()
    whole = run(whole_state)
    # validations at steps 2, 4, 5 (the epoch's end), 6, 8: two improvements, then three without: stop
    assert whole_state["history"] == [2, 4, 5, 6, 8] and whole_state["step"] == 8
    state = new_loop_state()
    first = run(state, stop_after=2)  # killed after its second validation's checkpoint
    assert state["step"] == 4 and state["batch_in_epoch"] == 4 and state["epoch"] == 0
    state["done"] = False
    again = run(state, weight_from=first)
    assert state["history"] == whole_state["history"] and torch.equal(again, whole)


def test_an_out_that_is_a_file_is_an_error_not_a_traceback(synthetic_world, tmp_path, capsys):
    from relist.cli import main

    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for extra in ([], ["--resume"]):
        argv = ["train", "reranker", "--data", str(synthetic_world / "ranker" / "rerank"), "--out", str(out)]
        assert main([*argv, "--max-steps", "1", "--no-progress", *extra]) == 2
        assert "relist: error:" in capsys.readouterr().err
        assert out.read_text() == "mine"
