"""One trainer for every re-ranker: mini-batches, validation, early stopping, checkpoints, resume, DDP.

``train`` fits any registered re-ranker; ``train_evaluator`` and ``train_generator`` are the same trainer
with the settings LAST's evaluator and generator fix (their selection metric, the generator's reward).

- Model selection uses the ``valid`` split only; ``test`` is evaluated once, on the best checkpoint.
- Checkpoints are safetensors + JSON written atomically: ``OUT/checkpoint/step-N`` (the latest state:
  model, optimiser, random-number states, position in the data; ``OUT/checkpoint/latest`` names it) after
  every validation, ``OUT/best`` (the model with the best validation metric). ``resume=True`` continues
  an interrupted run from ``OUT/checkpoint``; because the data order is a function of (seed, epoch) and
  the random states are restored, a resumed run ends with the same weights as an uninterrupted one.
- Nothing is deleted or replaced that the trainer cannot show it wrote: OUT gets a run id (``.relist-run``)
  when the trainer creates it (or finds it empty), every checkpoint carries it, and a checkpoint is written
  in a staging folder named by it and renamed into place. Without a ``latest`` pointer, OUT is started
  again only when it holds nothing but this trainer's files of a run that never completed a checkpoint
  (so a run that failed before training, rerun with its mistake corrected, is not refused); a checkpoint
  without its pointer, a directory without the run id, or any other file is refused and left as it was.
- The run carries the raw-id vocabularies of its data (``OUT/vocab``), so it can be served without it.
- Under ``torchrun`` (WORLD_SIZE > 1) the objective is wrapped in DistributedDataParallel; every global
  batch is split evenly across the processes, so the gradient equals the single-process one.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from relist.batch import INITIAL_SCORE
from relist.config import convert, option
from relist.data.store import PreparedDataset, vocab_file
from relist.io import CorruptFileError, atomic_save_tensors, atomic_write_text, load_tensors, read_json, seal, verify
from relist.metrics import evaluate_lists, logged_order_scores
from relist.nn import softmax_list_loss
from relist.principled import (
    PERTURBATIONS,
    PrincipledConfig,
    PrincipledObjective,
    obedience,
)
from relist.rerankers import REGISTRY, build_reranker, load_reranker
from relist.rerankers.base import Reranker
from relist.rerankers.evaluator import load_evaluator
from relist.rerankers.generator import REWARDS
from relist.runtime import resolve_device, seed_everything

log = logging.getLogger("relist")
RUN_MARK = ".relist-run"  # the run's id: written first into the directory the trainer creates or finds empty
# what a run writes before its first complete checkpoint (the untrained model is validated, and saved as best/,
# at step 0; checkpoint/ may hold this run's staging folder of a save a kill interrupted): a directory holding
# only these and this trainer's RUN_MARK is an unstarted run of its own, which it starts again
UNSTARTED_RUN_FILES = {RUN_MARK, "config.json", "vocab", "tensorboard", "best", "checkpoint"}


@dataclass
class TrainConfig:
    data: Path = option(help="prepared re-ranking dataset (e.g. the rerank/ folder written by `relist train ranker`)")
    out: Path = option(help="run directory: checkpoints, best model, history, metrics")
    model: str = option("prm", help="re-ranker", choices=tuple(sorted(REGISTRY)))
    model_args: str = option("", help="model settings as key=value,key=value (e.g. d_model=32,n_blocks=1)")
    use_user: bool = option(True, help="personalised re-ranking (user id and clicked history as features)")
    seed: int = option(0, help="seed of initialisation, data order and perturbations")
    device: str = option("cpu", help="cpu, cuda, cuda:N or auto")
    epochs: int = option(30, help="maximum number of passes over the train split")
    batch_size: int = option(128, help="lists per optimiser step (split across processes under torchrun)")
    learning_rate: float = option(1e-3, help="Adam learning rate")
    weight_decay: float = option(0.0, help="Adam weight decay")
    ema_decay: float = option(
        0.95,
        help="validate, select and save an exponential moving average of the weights, "
        "with this decay per step (0: the weights themselves)",
    )
    eval_every: int = option(0, help="validate (and checkpoint) every N steps; 0 = once per epoch")
    patience: int = option(5, help="stop after this many validations without improvement")
    select_metric: str = option(
        "list_ce",
        help="validation metric that selects the best checkpoint: list_ce (the "
        "listwise cross-entropy of the scores, lower is better) or a ranking "
        "metric such as ndcg@10 (higher is better)",
    )
    p1_weight: float = option(0.0, help="λ1: weight of the convergence-consistency (P1) loss")
    p2_weight: float = option(0.0, help="λ2: weight of the adversarial-consistency (P2) loss")
    perturbation: str = option("adjacent", help="P2 perturbation", choices=PERTURBATIONS)
    cs_gradient: str = option(
        "both",
        help="CS-loss gradients through both presentations (the paper) or only the input one (cheaper)",
        choices=("both", "input"),
    )
    max_steps: int = option(0, help="stop after this many optimiser steps (0: no limit)")
    resume: bool = option(False, help="continue an interrupted run from OUT/checkpoint")
    overwrite: bool = option(False, help="replace OUT if it exists")
    tensorboard: bool = option(
        False, help="also write TensorBoard logs to OUT/tensorboard (needs the tensorboard package)"
    )
    progress: bool = option(True, help="show a progress bar")


def parse_model_args(text: str, model: str) -> dict:
    """``"d_model=32,hidden=64/32"`` -> typed overrides of the model's configuration, through the options
    system's conversion (a list's items are separated by "/"); unknown keys are errors."""
    if not text.strip():
        return {}
    cls = REGISTRY[model].config_class
    hints = typing.get_type_hints(cls)
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--model-args: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in hints:
            raise ValueError(f"--model-args: {model} has no setting {key!r}; valid: {sorted(hints)}")
        listed = value.split("/") if typing.get_origin(hints[key]) is tuple else value
        out[key] = convert(hints[key], listed, f"--model-args {key}", from_text=True)
    return out


class _Distributed:
    """Process group state under torchrun; a single process otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The average of each value over the processes (each saw an equal share of every batch)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        packed = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(packed)
        return {k: float(v) / self.world for k, v in zip(keys, packed)}

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _optimiser_tensors(optimiser: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Adam's state as flat tensors + JSON (safetensors holds tensors only)."""
    state = optimiser.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimiser(optimiser: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimiser.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def new_loop_state() -> dict:
    """Where ``training_loop`` is: saved with every checkpoint, so a resumed run continues exactly."""
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": 0, "stale": 0, "done": False,
            "history": []}  # fmt: skip


def training_loop(
    state: dict,
    *,
    epochs: int,
    patience: int,
    epoch_batches: Callable[[int], Sequence[np.ndarray]],
    loss: Callable[[np.ndarray], dict[str, Tensor]],
    optimiser: torch.optim.Optimizer,
    validate: Callable[[dict, dict[str, float]], bool],
    eval_every: int = 0,
    max_steps: int = 0,
    after_step: Callable[[], None] = lambda: None,
    after_validation: Callable[[dict], None] = lambda state: None,
    reduce: Callable[[dict[str, float]], dict[str, float]] = lambda parts: parts,
    progress: tqdm | None = None,
) -> dict:
    """The one supervised training loop of relist: re-rankers (``Trainer``), the DNN initial ranker and the
    simulator's click model all train through it.

    Each epoch takes its batches from ``epoch_batches(epoch)`` (row indices, one array per step); a step
    minimises ``loss(rows)["loss"]`` with ``optimiser`` and calls ``after_step``. Every ``eval_every`` steps
    and at the end of every epoch, ``validate(state, train_parts)`` (mean training losses since the last
    validation, through ``reduce``) says whether the model improved; ``patience`` validations without
    improvement, or ``max_steps`` steps, stop it; ``after_validation(state)`` runs after each (checkpoints).
    ``state`` (``new_loop_state()``, or one restored from a checkpoint) is updated in place and returned.
    """
    running: dict[str, float] = {}
    n = 0
    while not state["done"] and state["epoch"] < epochs:
        batches = epoch_batches(state["epoch"])
        if len(batches) == 0:
            raise ValueError("training_loop: an epoch without batches (is the training split empty?)")
        for b in range(state["batch_in_epoch"], len(batches)):
            parts = loss(batches[b])
            optimiser.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimiser.step()
            after_step()
            for key, value in parts.items():
                running[key] = running.get(key, 0.0) + float(value.detach())
            n += 1
            state["step"] += 1
            state["batch_in_epoch"] = b + 1
            if progress is not None:
                progress.update(1)
            end_of_epoch = b + 1 == len(batches)
            at_limit = bool(max_steps) and state["step"] >= max_steps
            if (eval_every and state["step"] % eval_every == 0) or end_of_epoch or at_limit:
                train_parts = reduce({k: v / n for k, v in running.items()})
                running, n = {}, 0
                state["stale"] = 0 if validate(state, train_parts) else state["stale"] + 1
                if end_of_epoch:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
                if state["stale"] >= patience or (max_steps and state["step"] >= max_steps):
                    state["done"] = True
                after_validation(state)
            if state["done"]:
                break
    state["done"] = True
    return state


def shuffled_batches(index: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """``index`` in the random order of (seed, epoch), cut into batches of ``batch_size``."""
    order = np.random.default_rng([seed, epoch]).permutation(index)
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def initial_order_metrics(
    data: PreparedDataset, split: str, ks=(1, 3, 5, 10), category_col: int | None = None
) -> dict[str, float]:
    """Metrics of the input order itself (the initial ranker's order in a re-ranking dataset); its AUC is
    that of the initial ranker's own score (``init_score``) where the data has it, not of the positions."""
    metrics = evaluate_lists(logged_order_scores, data.batches(split, 1024), ks=ks, category_col=category_col)
    if INITIAL_SCORE in data.schema.item_dense:
        column = data.schema.item_dense.index(INITIAL_SCORE)
        scored = evaluate_lists(lambda batch: batch.item_dense[..., column], data.batches(split, 1024), ks=(1,))
        metrics.update(auc=scored["auc"], auc_pooled=scored["auc_pooled"])
    return metrics


LOWER_IS_BETTER = frozenset({"list_ce"})


def _settings(model: Reranker) -> dict:
    """A model's settings with its loss resolved (an empty ``loss`` means the model's own)."""
    return {**dataclasses.asdict(model.config), "loss": model.loss_kind}


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of validation ``metric`` beats ``best`` (None: nothing yet)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def scored_metrics(model: Reranker, batches, ks=(1, 3, 5, 10)) -> dict[str, float]:
    """``evaluate_lists``'s metrics of ``model.score`` and ``list_ce``, from one scoring pass.

    ``list_ce``, the mean over lists of the listwise cross-entropy between softmax(scores) and the
    normalised clicks, is the checkpoint-selection criterion: it reads every item's score rather than
    the few lists whose top ten a checkpoint changes, so it is far steadier than NDCG@10 on a few hundred
    valid lists. It is the training loss of the listwise models; pointwise (BCE) models are judged on
    their scores' ranking, not their calibration, which BCE keeps improving long after the order stops
    improving. Lists without a click add 0 and still count in the mean, as in training."""
    total, lists = 0.0, 0

    def score(batch):
        nonlocal total, lists
        scores = model.score(batch)  # -inf on padding, which the loss masks anyway
        total += float(softmax_list_loss(scores, batch.label, batch.mask)) * batch.size
        lists += batch.size
        return scores

    metrics = evaluate_lists(score, batches, ks=ks)
    metrics["list_ce"] = total / max(lists, 1)
    return metrics


class Trainer:
    """Fits one re-ranker on ``data``'s train split; see the module docstring for the guarantees."""

    def __init__(self, config: TrainConfig, data: PreparedDataset | None = None):
        self.config = config
        self.data = data or PreparedDataset(config.data)
        self.device = resolve_device(config.device)
        self.out = Path(config.out)
        self.principled = PrincipledConfig(
            p1_weight=config.p1_weight,
            p2_weight=config.p2_weight,
            perturbation=config.perturbation,
            cs_gradient=config.cs_gradient,
        )
        self.max_len = int(self.data.counts.get("list_len", {}).get("max", 0)) or None
        self.run_id: str | None = None  # set by _prepare_out in the process that writes OUT
        self.resumed_from: Path | None = None

    # ---- set-up -------------------------------------------------------------------------------
    def _prepare_out(self, dist: _Distributed) -> bool:
        """Create OUT; returns True when resuming from a checkpoint.

        An existing OUT without a checkpoint pointer is started again only when it is this trainer's own
        unstarted run (``UNSTARTED_RUN_FILES`` and its run id, no complete checkpoint); anything else is
        refused, never deleted (only ``--overwrite`` replaces a directory)."""
        c = self.config
        if c.resume and self._latest_checkpoint() is not None:
            self.resumed_from = self._latest_checkpoint()
            if dist.main:
                self.run_id = self._resumed_run_id(self.resumed_from)
            return True
        if dist.main:
            if self.out.exists() and any(self.out.iterdir()):
                if c.overwrite:
                    shutil.rmtree(self.out)
                else:
                    self._check_unstarted_run()
                    log.info("%s: an earlier start of this run completed no checkpoint; starting it again", self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            self.run_id = self._write_run_id()
            self._write_vocabularies()
            atomic_write_text(self.out / "config.json", json.dumps(dataclasses.asdict(c), indent=2, default=str))
        dist.barrier()
        return False

    def _resumed_run_id(self, checkpoint: Path) -> str:
        """The run id a resumed run goes on under. A run written before run ids is adopted (--resume says it
        is this run); a run id file that is not one this trainer writes, or a checkpoint of another run
        (copied in, or named by an edited pointer), is refused and nothing is changed."""
        own = self._read_run_id()
        if own is None and (self.out / RUN_MARK).exists():
            raise FileExistsError(
                f"--resume: {self.out / RUN_MARK} does not hold a run id this trainer wrote (was it edited?); "
                "nothing was changed"
            )
        try:
            theirs = json.loads((checkpoint / "state.json").read_text(encoding="utf-8")).get("run")
        except (OSError, ValueError, AttributeError):
            theirs = None
        if own is not None and theirs is not None and theirs != own:
            raise FileExistsError(
                f"--resume: {checkpoint} was written by another run ({theirs}, this directory's is {own}); "
                "nothing was changed (point checkpoint/latest at one of this run's checkpoints)"
            )
        return own or self._write_run_id()

    def _read_run_id(self) -> str | None:
        try:
            value = json.loads((self.out / RUN_MARK).read_text(encoding="utf-8")).get("run")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value) else None

    def _write_run_id(self) -> str:
        run_id = uuid.uuid4().hex
        atomic_write_text(self.out / RUN_MARK, json.dumps({"run": run_id, "written_by": "relist train"}) + "\n")
        return run_id

    def _check_unstarted_run(self) -> None:
        """Raise FileExistsError (changing nothing) unless OUT holds only an unstarted run of this trainer;
        remove that run's staging folders (checkpoint saves a kill interrupted, named by its run id)."""
        c, out = self.config, self.out
        prefix = "--resume: " if c.resume else ""
        names = sorted(p.name for p in out.iterdir())
        foreign = [n for n in names if n not in UNSTARTED_RUN_FILES]
        if (out / "checkpoint" / "latest").exists() or (foreign and not c.resume):
            raise FileExistsError(f"{out} already exists (pass --overwrite to replace it or --resume to continue)")
        if foreign:
            raise FileExistsError(
                f"--resume: {out} holds no checkpoint to resume and other files ({', '.join(foreign[:5])}); "
                "nothing was changed (pass --overwrite to replace the directory)"
            )
        run_id = self._read_run_id()
        if run_id is None:
            raise FileExistsError(
                f"{prefix}{out} holds {', '.join(names[:5])} but no {RUN_MARK} naming the run that wrote them, so "
                "they may not be this trainer's; nothing was changed (pass --overwrite to replace the directory)"
            )
        folder = out / "checkpoint"
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
        staging = [p for p in entries if p.name.startswith(".step-") and p.name.endswith(f".{run_id}")]
        kept = [p.name for p in entries if p not in staging]
        if kept:
            raise FileExistsError(
                f"{prefix}{folder} holds {', '.join(kept[:3])} but no 'latest' pointer; nothing was changed (to "
                f"resume from a checkpoint, write its folder's name into {folder / 'latest'} and pass --resume; "
                "or pass --overwrite)"
            )
        for path in staging:  # this run's own half-written checkpoints
            shutil.rmtree(path)

    def _written_by_this_run(self, folder: Path) -> bool:
        try:
            return json.loads((folder / "state.json").read_text(encoding="utf-8")).get("run") == self.run_id
        except (OSError, ValueError, AttributeError):
            return False

    def _write_vocabularies(self) -> None:
        """Copy the raw-id vocabularies of the schema's sparse fields into OUT/vocab, so the run (and a
        service loading it) maps raw ids without the training data."""
        schema = self.data.schema
        (self.out / "vocab").mkdir(exist_ok=True)
        for f in (*schema.item_sparse, *schema.user_sparse, *schema.user_hist):
            source = vocab_file(self.data.root / "vocab", f.name)
            if source is not None:
                atomic_write_text(self.out / "vocab" / source.name, source.read_text(encoding="utf-8"))

    def build_model(self) -> Reranker:
        c = self.config
        model = build_reranker(
            c.model,
            self.data.schema,
            use_user=c.use_user,
            **{"max_len": max(64, self.max_len or 0), **parse_model_args(c.model_args, c.model)},
        )
        model.features.fit(self.data, "train")
        model.calibrate_skip(self.data, "train")
        return model

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        c = self.config
        dist = _Distributed(self.device)
        if c.batch_size % dist.world:
            raise ValueError(f"batch_size {c.batch_size} must be divisible by the number of processes {dist.world}")
        try:
            return self._fit(dist)
        finally:
            gc.collect()  # the DDP modules (whose reducers hold the process group) go before the group does
            dist.close()

    def _fit(self, dist: _Distributed) -> dict:
        c = self.config
        resuming = self._prepare_out(dist)
        seed_everything(c.seed)
        model = self.build_model().to(self.device)
        objective = PrincipledObjective(model, self.principled)
        trained = objective
        if dist.world > 1:
            trained = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
        optimiser = torch.optim.Adam(model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
        average = WeightAverage(model, c.ema_decay)
        perturb_rng = torch.Generator().manual_seed(c.seed + 7919)
        train_index = self.data.split("train")
        steps_per_epoch = len(train_index) // c.batch_size + (len(train_index) % c.batch_size > 0)
        eval_every = c.eval_every or steps_per_epoch
        state = {**new_loop_state(), "select_metric": c.select_metric}
        if resuming:
            state = self._load_checkpoint(model, optimiser, perturb_rng, average)
            log.info("resuming %s at step %d (epoch %d)", self.out, state["step"], state["epoch"])
        total_steps = c.epochs * steps_per_epoch if not c.max_steps else min(c.max_steps, c.epochs * steps_per_epoch)
        bar = tqdm(
            total=total_steps,
            initial=state["step"],
            desc=f"{c.model}",
            disable=not (c.progress and dist.main) or None,
            leave=False,
        )
        writer = self._tensorboard() if (c.tensorboard and dist.main) else None
        started = time.perf_counter()
        carried = state.get("train_seconds", 0.0)  # earlier processes' time, to the checkpoint resumed from
        if state["step"] == 0 and not state["history"]:
            # the untrained model is a candidate too: with the initial skip it serves the initial order
            self._validate(average.model, state, {}, writer, bar)

        def loss(rows: np.ndarray) -> dict[str, Tensor]:
            share = len(rows) // dist.world if len(rows) >= dist.world else len(rows)
            mine = rows[dist.rank * share : (dist.rank + 1) * share] if dist.world > 1 else rows
            model.train()
            return trained(self.data.batch(mine, max_len=self.max_len).to(self.device), perturb_rng)

        def validate(state: dict, train_parts: dict) -> bool:
            return self._validate(average.model, state, train_parts, writer, bar)

        def checkpoint(state: dict) -> None:
            state["train_seconds"] = carried + time.perf_counter() - started
            if dist.main:
                self._save_checkpoint(model, optimiser, perturb_rng, state, average)
            dist.barrier()

        training_loop(
            state,
            epochs=c.epochs,
            patience=c.patience,
            epoch_batches=lambda epoch: shuffled_batches(train_index, c.batch_size, c.seed, epoch),
            loss=loss,
            optimiser=optimiser,
            validate=validate,
            eval_every=eval_every,
            max_steps=c.max_steps,
            after_step=average.update,
            after_validation=checkpoint,
            reduce=dist.mean,
            progress=bar,
        )
        bar.close()
        if writer is not None:
            writer.close()
        result = self._finish(state, carried + time.perf_counter() - started) if dist.main else {}
        dist.barrier()
        return result

    def _validate(self, model: Reranker, state: dict, train_parts: dict, writer, bar) -> bool:
        """Validate ``model``, record it in ``state`` (and OUT/best when it is the best so far); whether it improved."""
        c = self.config
        batches = lambda: self.data.batches("valid", 512, max_len=self.max_len)  # noqa: E731
        valid = scored_metrics(model, batches(), ks=(5, 10))
        valid.update(obedience(model.score, batches(), ks=(5,), seed=c.seed))
        if c.select_metric not in valid:
            raise ValueError(
                f"select_metric {c.select_metric!r} is not a validation metric; valid: {', '.join(sorted(valid))}"
            )
        metric = valid[c.select_metric]
        record = {"step": state["step"], "epoch": state["epoch"], "train": train_parts, "valid": valid}
        state["history"].append(record)
        improved = better(c.select_metric, metric, state["best"])
        if improved:
            state["best"], state["best_step"] = metric, state["step"]
            if int(os.environ.get("RANK", "0")) == 0:
                model.save(self.out / "best")
        bar.set_postfix({c.select_metric: f"{metric:.4f}", "best": f"{state['best']:.4f}"})
        if writer is not None:
            for key, value in train_parts.items():
                writer.add_scalar(f"train/{key}", value, state["step"])
            for key, value in valid.items():
                writer.add_scalar(f"eval/{key}", value, state["step"])
        log.info(
            "step %d: valid %s %.4f (best %.4f at %d)",
            state["step"],
            c.select_metric,
            metric,
            state["best"],
            state["best_step"],
        )
        return improved

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter  # an optional package
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _save_checkpoint(
        self, model: Reranker, optimiser, perturb_rng: torch.Generator, state: dict, average: "WeightAverage"
    ) -> None:
        """A complete checkpoint in a staging folder named by the run id, renamed into place, then the
        ``latest`` pointer moved to it atomically, so a kill at any moment leaves a consistent checkpoint
        behind. The checkpoints replaced are this run's own (carrying its id, or the one it resumed from);
        a ``step-N`` folder of the same name that is not is an error, and left as it was."""
        root = self.out / "checkpoint"
        name = f"step-{state['step']:09d}"
        folder, staging = root / name, root / f".{name}.{self.run_id}"
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # this run's own: a save an error interrupted
        staging.mkdir()
        model.save(staging)
        if average.active:
            average.model.save(staging / "average")
        tensors, meta = _optimiser_tensors(optimiser)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.perturb"] = perturb_rng.get_state()
        atomic_save_tensors(tensors, staging / "optimiser.safetensors")
        saved = {**state, "optimiser": meta, "run": self.run_id}
        atomic_write_text(staging / "state.json", json.dumps(saved, indent=1))
        seal(staging, ["optimiser.safetensors", "state.json"])
        if folder.exists():
            if not self._written_by_this_run(folder):
                shutil.rmtree(staging)
                raise FileExistsError(f"{folder} exists and was not written by this run; nothing was replaced")
            shutil.rmtree(folder)  # this run's own, from an attempt killed before the pointer moved to it
        os.replace(staging, folder)
        atomic_write_text(root / "latest", name)
        for old in root.glob("step-*"):
            if old != folder and (old == self.resumed_from or self._written_by_this_run(old)):
                shutil.rmtree(old, ignore_errors=True)

    def _latest_checkpoint(self) -> Path | None:
        """The checkpoint ``checkpoint/latest`` names: a ``step-N`` folder of this run, never a path elsewhere."""
        pointer = self.out / "checkpoint" / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not re.fullmatch(r"step-[0-9]{9}", name) or not (self.out / "checkpoint" / name).is_dir():
            raise CorruptFileError(f"{pointer}: names {name!r}, not a step-N checkpoint folder of this run")
        return self.out / "checkpoint" / name

    def _load_checkpoint(
        self, model: Reranker, optimiser, perturb_rng: torch.Generator, average: "WeightAverage"
    ) -> dict:
        folder = self._latest_checkpoint()
        verify(folder)  # the model, the optimiser and the state; the weight average is checked when loaded
        saved = load_reranker(folder)
        then, now = _settings(saved), _settings(model)
        changed = {k: v for k, v in then.items() if now.get(k) != v}
        if changed:
            raise ValueError(
                f"{folder} was trained with other model settings ({', '.join(sorted(changed))}: "
                f"{changed}); pass them in --model-args to resume"
            )
        model.load_state_dict(saved.state_dict())
        if average.active:
            if (folder / "average").is_dir():
                average.model.load_state_dict(load_reranker(folder / "average").state_dict())
            else:  # a checkpoint written without a weight average: start it from the weights
                log.warning("%s has no weight average; starting it from the checkpoint's weights", folder)
                average.model.load_state_dict(model.state_dict())
        meta = read_json(folder / "state.json")
        selected_on = meta.setdefault("select_metric", "ndcg@10")  # checkpoints from before list_ce selected on NDCG@10
        if selected_on != self.config.select_metric:
            raise ValueError(
                f"{folder} selects its best checkpoint on {selected_on}; resume with --select-metric {selected_on}"
            )
        tensors = load_tensors(folder / "optimiser.safetensors")
        torch.set_rng_state(tensors.pop("rng.torch"))
        perturb_rng.set_state(tensors.pop("rng.perturb"))
        _load_optimiser(optimiser, {k: v.to(self.device) for k, v in tensors.items()}, meta.pop("optimiser"))
        meta.pop("run", None)
        return meta

    def _finish(self, state: dict, seconds: float) -> dict:
        best = load_reranker(self.out / "best").to(self.device)
        batches = lambda split: self.data.batches(split, 512, max_len=self.max_len)  # noqa: E731
        result = {
            "model": self.config.model,
            "config": dataclasses.asdict(self.config),
            "best_step": state["best_step"],
            "steps": state["step"],
            "train_seconds": seconds,
            "valid": scored_metrics(best, batches("valid")),
            "test": scored_metrics(best, batches("test")),
            "obedience_test": obedience(best.score, batches("test"), seed=self.config.seed),
            "initial_test": initial_order_metrics(self.data, "test"),
        }
        # atomic, like every output: a copy of the run sharing this file by a hard link keeps its own
        atomic_write_text(self.out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
        atomic_write_text(self.out / "metrics.json", json.dumps(result, indent=2, default=str))
        return result


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging): after every optimiser step,
    w̄ ← decay·w̄ + (1 − decay)·w, buffers copied. With ``decay`` 0 it is the model itself.

    On small re-ranking sets the weights wander from step to step, and selecting the best checkpoint on a
    few hundred valid lists picks that noise; the average moves smoothly, so validation compares
    models that differ by what training learned rather than by the last mini-batch. (On MIND it made no
    measurable difference to test metrics; docs/principled_mind.md.)"""

    def __init__(self, model: Reranker, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay, self.source = decay, model
        self.model = copy.deepcopy(model) if decay else model

    @property
    def active(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self) -> None:
        if not self.active:
            return
        for mine, theirs in zip(self.model.parameters(), self.source.parameters()):
            mine.lerp_(theirs, 1.0 - self.decay)
        for mine, theirs in zip(self.model.buffers(), self.source.buffers()):
            mine.copy_(theirs)


def train(config: TrainConfig, data: PreparedDataset | None = None) -> dict:
    """Train one re-ranker as ``config`` says; returns (and writes to OUT/metrics.json) its metrics."""
    if config.model not in REGISTRY:
        raise ValueError(f"unknown re-ranker {config.model!r}; valid: {', '.join(sorted(REGISTRY))}")
    return Trainer(config, data).fit()


# ---- LAST's evaluator and generator: the same trainer, with the settings they fix ------------------------
@dataclass
class _LastModelConfig:
    """What `relist train evaluator` and `relist train generator` share."""

    data: Path = option(help="prepared re-ranking dataset (the rerank/ folder written by `relist train ranker`)")
    out: Path = option(help="run directory: checkpoints, best/, history, metrics")
    seed: int = option(0, help="seed of initialisation, data order and sampling (and the train subset)")
    device: str = option("cpu", help="cpu, cuda, cuda:N or auto")
    epochs: int = option(30, help="maximum passes over the train split")
    batch_size: int = option(128, help="lists per step")
    learning_rate: float = option(1e-3, help="Adam learning rate")
    patience: int = option(5, help="stop after this many validations without improvement on valid")
    max_steps: int = option(0, help="stop after this many steps (0: no limit)")
    overwrite: bool = option(False, help="replace OUT if it exists")
    resume: bool = option(False, help="continue an interrupted run from OUT/checkpoint")
    progress: bool = option(True, help="show a progress bar")


@dataclass
class TrainEvaluatorConfig(_LastModelConfig):
    model_args: str = option("", help="evaluator settings as key=value,... (d_model, heads, gru, hidden=512/256/128)")
    train_fraction: float = option(
        1.0, help="share of the train lists used (a random subset by seed): weaker evaluators"
    )


@dataclass
class TrainGeneratorConfig(_LastModelConfig):
    reward: str = option(
        "ndcg",
        help="per-position reward: NDCG gain on the labels, or the evaluator's click probability",
        choices=REWARDS,
    )
    evaluator: Path | None = option(None, help="evaluator run directory (its best/), needed for --reward evaluator")
    model_args: str = option("", help="generator settings as key=value,... (encoder, hidden, heads, gamma, samples)")


def _trainer_config(cfg, model: str, select_metric: str, model_args: str) -> TrainConfig:
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in shared}
    return TrainConfig(**{**values, "model": model, "select_metric": select_metric, "model_args": model_args})


def subset_train(data: PreparedDataset, fraction: float, seed: int) -> PreparedDataset:
    """``data`` with its train split cut to a random ``fraction`` of the lists (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction < 1:
        train_lists = data.split("train")
        keep = max(1, int(round(fraction * len(train_lists))))
        chosen = np.random.default_rng([seed, 1]).choice(train_lists, keep, replace=False)
        data.splits = {**data.splits, "train": np.sort(chosen)}
    return data


def train_evaluator(cfg: TrainEvaluatorConfig) -> dict:
    """LAST's evaluator: BCE on the clicks, selected on valid AUC."""
    data = subset_train(PreparedDataset(cfg.data), cfg.train_fraction, cfg.seed)
    return Trainer(_trainer_config(cfg, "evaluator", "auc", cfg.model_args), data).fit()


class GeneratorTrainer(Trainer):
    """The trainer with the reward evaluator attached to every generator it builds."""

    def __init__(self, config: TrainConfig, evaluator: Reranker | None):
        super().__init__(config)
        self.evaluator = evaluator

    def build_model(self) -> Reranker:
        model = super().build_model()
        if self.evaluator is not None:
            model.use_evaluator(self.evaluator.to(self.device))
        return model


def train_generator(cfg: TrainGeneratorConfig) -> dict:
    """LAST's generator: reward-weighted cross-entropy, selected on valid NDCG@10 of greedy decoding."""
    evaluator = None
    if cfg.reward == "evaluator":
        if cfg.evaluator is None:
            raise ValueError("--reward evaluator needs --evaluator DIR (a `relist train evaluator` run)")
        evaluator = load_evaluator(cfg.evaluator)
    args = ",".join(a for a in (cfg.model_args, f"reward={cfg.reward}") if a)
    return GeneratorTrainer(_trainer_config(cfg, "generator", "ndcg@10", args), evaluator).fit()
