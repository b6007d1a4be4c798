"""`relist sim train` and `relist sim truth`: build a simulator directory and report how well it predicts.

Data protocol of the learned response model:
- fitted on the ``ranker`` split, optionally with a share of the ``train`` split (``--extra-train-share``),
  at full logged length and in the logged display order. The re-rankers and LAST's evaluator learn from
  the ``train`` split in the initial ranker's order, cut to 10 items, so by default the simulator and
  the evaluator it judges share no lists;
- early stopping on the ``valid`` split's log-loss;
- reported on the ``test`` split (held-out impressions): log-loss, AUC over (item, click) pairs,
  expected calibration error (15 equal-mass bins, and 15 equal-width bins) and a reliability plot, next
  to two references: a constant click rate and a click rate per position, both from the training lists.
- the simulated users and candidate lists come from ``--pool-split`` (default ``test``), which the
  response model never trained on.

Defaults were chosen on MIND's ``valid`` split (5k subset): without a prior on the embedding tables the
model memorised item ids after two epochs (valid log-loss rising from 0.1515); ``l2`` 300 with Adam at
0.003 trains for about 20 epochs to a test log-loss of 0.1505 (l2 10: 0.1546, l2 1000: 0.1512); adding
half of the ``train`` split (``--extra-train-share 0.5``) gave no gain (0.1507), so by default the
simulator keeps clear of the lists the re-rankers and the evaluator learn from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from relist.config import option
from relist.data.store import PreparedDataset
from relist.io import atomic_directory
from relist.metrics import auc, calibration_bins, expected_calibration_error, grouped_auc, log_loss
from relist.runtime import resolve_device, seed_everything
from relist.sim.fit import fit_session
from relist.sim.pool import ListPool, unknown_ids
from relist.sim.response import ClickModelConfig, FactorisedClickModel, position_bucket
from relist.sim.session import SessionParams, Simulator
from relist.sim.store import build_response, simulator_config, write_simulator
from relist.train import new_loop_state, training_loop

log = logging.getLogger("relist")


@dataclass
class SimBuildConfig:
    data: Path = option(help="prepared dataset (from `relist data prepare`); users and candidates come from it too")
    out: Path = option(help="simulator directory to write")
    seed: int = option(0, help="random seed (training order, initialisation, session calibration)")
    device: str = option("cpu", help="cpu, cuda, cuda:N or auto")
    pool_split: str = option("test", help="split whose users and candidate lists the simulated users get")
    max_candidates: int = option(100, help="candidate lists are cut to this many items (in their logged order)")
    slate_size: int = option(10, help="items shown per request (the policy's first ones)")
    log_fraction: float = option(
        1.0,
        help="share of the full log's impressions the data holds, to undo thinning of per-user list counts "
        "(MIND 5k subset: 0.0319)",
    )
    session_requests: float | None = option(
        None, help="target requests per session under the logged order (default: fitted lists per user)"
    )
    memory: float | None = option(None, help="session: share of satisfaction carried to the next list (default 0.7)")
    leave_sensitivity: float | None = option(
        None, help="session: change in log-odds of leaving per unit of satisfaction (default 1.0)"
    )
    fatigue: float | None = option(
        None, help="session: log-odds of leaving added per list already seen in the session (default 0.1)"
    )
    return_bias: float | None = option(
        None, help="session: log-odds of returning at neutral satisfaction (default 1.0)"
    )
    return_sensitivity: float | None = option(
        None, help="session: change in log-odds of returning per unit of satisfaction (default 0.5)"
    )
    max_sessions: int | None = option(None, help="session: horizon in sessions (default 3)")
    overwrite: bool = option(False, help="replace OUT if it exists")
    threads: int = option(
        1, help="torch intra-op threads (0: torch's default); small per-request tensors gain nothing from more"
    )


@dataclass
class TrainSimConfig(SimBuildConfig):
    dim: int = option(16, help="factor dimension of the response model")
    epochs: int = option(40, help="most training epochs (early-stopped on valid)")
    patience: int = option(3, help="epochs without improvement on valid before stopping")
    batch_size: int = option(64, help="lists per training batch")
    lr: float = option(0.003, help="Adam learning rate")
    l2: float = option(
        300.0, help="Gaussian prior on the embedding tables: penalty l2 * sum of squares / training rows"
    )
    extra_train_share: float = option(
        0.0, help="share of the train split's lists added to the ranker split for fitting"
    )
    progress: bool = option(True, help="show a progress bar")


def _session_params(cfg: SimBuildConfig) -> SessionParams:
    return SessionParams().replace(
        memory=cfg.memory,
        leave_sensitivity=cfg.leave_sensitivity,
        fatigue=cfg.fatigue,
        return_bias=cfg.return_bias,
        return_sensitivity=cfg.return_sensitivity,
        max_sessions=cfg.max_sessions,
    )


def _check_out(cfg: SimBuildConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    return out


def _require(data: PreparedDataset, *splits: str) -> None:
    for split in splits:
        if split not in data.splits or len(data.split(split)) == 0:
            raise ValueError(f"{data.root} has no {split!r} lists; prepare it with a non-zero share for {split}")


def length_batches(
    data: PreparedDataset, index: np.ndarray, batch_size: int, seed: int | None = None
) -> list[np.ndarray]:
    """Batches of lists of similar length (the context terms cost L**2 per list, so padding is expensive);
    with ``seed``, lengths are jittered and the batch order shuffled, so every epoch batches differently."""
    lengths = data.lengths(index).astype(np.float64)
    if seed is not None:
        rng = np.random.default_rng(seed)
        lengths = lengths * rng.uniform(0.8, 1.25, size=len(lengths))
    ordered = index[np.argsort(lengths, kind="stable")]
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    if seed is not None:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


@torch.no_grad()
def predict(
    response, data: PreparedDataset, index: np.ndarray, device, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Click probabilities of every real (list, position) of ``index`` shown in the logged order."""
    out = {"prob": [], "label": [], "position": [], "list": []}
    for part in length_batches(data, np.asarray(index), batch_size):
        batch = data.batch(part).to(device)
        prob = response.respond(batch).prob
        pos = torch.arange(batch.list_len, device=device).expand(batch.mask.shape)
        lists = torch.as_tensor(part, device=device)[:, None].expand(batch.mask.shape)
        for name, value in (("prob", prob), ("label", batch.label), ("position", pos), ("list", lists)):
            out[name].append(value[batch.mask].cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def calibration_report(prob, label, lists) -> dict[str, float]:
    """Log loss, group AUC (within lists, ``lists`` naming each pair's list) and pooled AUC, calibration."""
    return {
        "log_loss": log_loss(prob, label),
        "auc": grouped_auc(prob, label, lists),
        "auc_pooled": auc(prob, label),
        "ece": expected_calibration_error(prob, label, strategy="quantile"),
        "ece_uniform": expected_calibration_error(prob, label, strategy="uniform"),
        "mean_predicted": float(prob.double().mean()),
        "click_rate": float(label.double().mean()),
        "n": int(label.numel()),
    }


def reference_reports(train: dict, test: dict, exact: int) -> dict[str, dict]:
    """A constant click rate and a click rate per position bucket, both fitted on the training rows."""
    rate = float(train["label"].double().mean())
    buckets = position_bucket(train["position"], exact)
    n_buckets = exact + 16
    hits = torch.bincount(buckets, weights=train["label"].double(), minlength=n_buckets)
    seen = torch.bincount(buckets, minlength=n_buckets).double()
    per_position = (hits + 20 * rate) / (seen + 20)  # smoothed towards the overall rate
    return {
        "constant rate": calibration_report(torch.full_like(test["prob"], rate), test["label"], test["list"]),
        "rate per position": calibration_report(
            per_position[position_bucket(test["position"], exact)].float(), test["label"], test["list"]
        ),
    }


def reliability_plot(prob, label, path: Path, title: str) -> None:
    import matplotlib  # imported only when plotting: it costs a second of start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration_bins(prob, label, n_bins=15, strategy="quantile")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    top = float(max(bins["predicted"].max(), bins["observed"].max())) * 1.1
    left.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    left.plot(bins["predicted"].numpy(), bins["observed"].numpy(), marker="o", label="15 equal-mass bins")
    left.set_xlabel("mean predicted click probability")
    left.set_ylabel("observed click rate")
    left.set_title(title)
    left.legend(loc="upper left")
    right.hist(prob.numpy(), bins=50, color="tab:blue")
    right.set_yscale("log")
    right.set_xlabel("predicted click probability")
    right.set_ylabel("held-out (item, position) pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fit_response(
    cfg: TrainSimConfig, data: PreparedDataset, train_index: np.ndarray, device
) -> tuple[FactorisedClickModel, dict]:
    model = FactorisedClickModel(data.schema, ClickModelConfig(dim=cfg.dim), unknown_ids(data))
    rows = np.concatenate([np.arange(data.offsets[i], data.offsets[i + 1]) for i in train_index])
    model.fit_dense(torch.from_numpy(np.asarray(data.item_dense[rows])))
    rate = float(np.clip(np.asarray(data.label[rows]).mean(), 1e-4, 1 - 1e-4))
    with torch.no_grad():
        model.dense_weight.bias.fill_(float(np.log(rate / (1 - rate))))  # start at the base rate, not at 1/2
    model.to(device)
    tables = [p for name, p in model.named_parameters() if "emb" in name]
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    prior = cfg.l2 / len(rows)
    valid_index = data.split("valid")
    state, best_state = new_loop_state(), None
    steps_per_epoch = -(-len(train_index) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="sim train", disable=not cfg.progress or None, leave=False)

    def loss(part: np.ndarray) -> dict[str, torch.Tensor]:
        model.train()
        batch = data.batch(part).to(device)
        logit, _ = model.logits(batch)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit[batch.mask], batch.label[batch.mask])
        penalty = prior * sum((t**2).sum() for t in tables)
        return {"loss": bce + penalty, "log_loss": bce.detach()}  # the mean over batches is reported

    def validate(state: dict, train: dict) -> bool:
        nonlocal best_state
        model.eval()
        held = predict(model, data, valid_index, device)
        valid_loss = log_loss(held["prob"], held["label"])
        epoch = len(state["history"]) + 1
        state["history"].append({"epoch": epoch, "train_log_loss": train["log_loss"], "valid_log_loss": valid_loss})
        log.info("sim train: epoch %d train %.5f valid %.5f", epoch, train["log_loss"], valid_loss)
        bar.set_postfix(epoch=epoch, valid_log_loss=f"{valid_loss:.5f}", refresh=False)
        if state["best"] is not None and valid_loss >= state["best"] - 1e-5:
            return False
        state["best"] = valid_loss
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    training_loop(
        state,
        epochs=cfg.epochs,
        patience=cfg.patience,
        epoch_batches=lambda epoch: length_batches(data, train_index, cfg.batch_size, seed=cfg.seed * 1000 + epoch),
        loss=loss,
        optimiser=optimiser,
        validate=validate,
        progress=bar,
    )
    bar.close()
    model.load_state_dict(best_state)
    history = state["history"]
    return model.eval(), {"epochs": history, "best_epoch": int(np.argmin([h["valid_log_loss"] for h in history]) + 1)}


def _finish(
    cfg: SimBuildConfig,
    data: PreparedDataset,
    response,
    kind: str,
    result: dict,
    device,
    model: FactorisedClickModel | None = None,
    test: dict | None = None,
) -> dict:
    """Fit the session parameters, write the simulator directory atomically, return the report."""
    out = _check_out(cfg)
    pool = ListPool.from_dataset(data, cfg.pool_split, cfg.max_candidates, device)
    sim = Simulator(response, pool, _session_params(cfg), cfg.slate_size)
    result["session_fit"] = fit_session(sim, data, cfg.log_fraction, cfg.session_requests, seed=cfg.seed)
    result["session"] = asdict(sim.params)
    with atomic_directory(out) as tmp:
        if test is not None:
            reliability_plot(
                test["prob"],
                test["label"],
                tmp / "reliability.png",
                f"{kind} simulator, held-out test (ECE {result['test']['ece']:.4f})",
            )
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
        config = simulator_config(
            kind,
            data,
            cfg.pool_split,
            cfg.max_candidates,
            cfg.slate_size,
            sim.params,
            model.config if model is not None else None,
            build={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        )
        write_simulator(tmp, config, model)
    return result


def train_simulator(cfg: TrainSimConfig) -> dict:
    """Fit the response model, evaluate it on held-out lists, fit sessions, write ``cfg.out``."""
    _check_out(cfg)
    if not 0.0 <= cfg.extra_train_share <= 1.0:
        raise ValueError(f"--extra-train-share must be in [0, 1], got {cfg.extra_train_share}")
    data = PreparedDataset(cfg.data)
    _require(data, "ranker", "valid", "test", cfg.pool_split)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    train_index = data.split("ranker")
    if cfg.extra_train_share > 0:
        extra = data.split("train")
        pick = np.random.default_rng([cfg.seed, 7]).permutation(len(extra))[
            : int(round(cfg.extra_train_share * len(extra)))
        ]
        train_index = np.sort(np.concatenate([train_index, extra[pick]]))
    model, fit_info = fit_response(cfg, data, train_index, device)
    test = predict(model, data, data.split("test"), device)
    train_rows = predict(model, data, train_index, device)
    top = test["position"] < cfg.slate_size
    result = {
        "kind": "learned",
        "data": str(cfg.data),
        "seed": cfg.seed,
        "n_train_lists": int(len(train_index)),
        "fit": fit_info,
        "test": calibration_report(test["prob"], test["label"], test["list"]),
        f"test_first_{cfg.slate_size}_positions": calibration_report(
            test["prob"][top], test["label"][top], test["list"][top]
        ),
        "references": reference_reports(train_rows, test, model.config.exact_positions),
        "coefficients": model.describe(),
    }
    return _finish(cfg, data, model, "learned", result, device, model, test)


def truth_simulator(cfg: SimBuildConfig) -> dict:
    """A simulator backed by a synthetic dataset's known click model; reports the truth's own held-out fit."""
    _check_out(cfg)
    data = PreparedDataset(cfg.data)
    _require(data, "test", cfg.pool_split)
    device = resolve_device(cfg.device)
    response = build_response({"kind": "truth"}, data, device)
    test = predict(response, data, data.split("test"), device)
    result = {
        "kind": "truth",
        "data": str(cfg.data),
        "seed": cfg.seed,
        "test": calibration_report(test["prob"], test["label"], test["list"]),
    }
    return _finish(cfg, data, response, "truth", result, device, None, test)
