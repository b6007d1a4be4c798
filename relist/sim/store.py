"""A simulator directory (SIM): what ``relist sim train`` / ``relist sim truth`` write and ``relist abtest`` reads.

    config.json          kind ("learned" or "truth"), the prepared dataset and split the users and
                         candidate lists come from, slate size, session parameters, model settings
    model.safetensors    the learned response model (kind "learned" only)
    metrics.json         held-out log-loss, AUC, calibration error, fitted session statistics
    reliability.png      reliability plot of the held-out predictions

The simulator reads its users and candidates from the prepared dataset by path, so that dataset must
stay where it was. Weights are safetensors; loading never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from relist.data.store import PreparedDataset, Schema
from relist.data.synthetic import SyntheticClickModel
from relist.io import atomic_save_tensors, atomic_write_text, load_tensors, read_json, seal, verify
from relist.sim.pool import ListPool, unknown_ids
from relist.sim.response import ClickModelConfig, FactorisedClickModel, TruthResponse
from relist.sim.session import SessionParams, Simulator

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def write_simulator(out: Path, config: dict, model: FactorisedClickModel | None = None) -> None:
    """Write config (and weights) into ``out`` (created by the caller); the config file last, atomically."""
    out = Path(out)
    if model is not None:
        atomic_save_tensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS)
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2, default=str))
    seal(out, [CONFIG] + ([WEIGHTS] if model is not None else []))


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} is not a simulator directory (no {CONFIG}); write one with `relist sim train` or `relist "
            "sim truth`"
        )
    verify(path)
    return read_json(path / CONFIG)


def build_response(
    config: dict, data: PreparedDataset, device: torch.device | str = "cpu", weights: Path | None = None
):
    if config["kind"] == "truth":
        truth_path = data.root / "truth.safetensors"
        if not truth_path.is_file():
            raise FileNotFoundError(
                f"{data.root} has no truth.safetensors: a truth simulator needs a prepared synthetic dataset"
            )
        return TruthResponse(SyntheticClickModel.load(truth_path), device)
    if config["kind"] != "learned":
        raise ValueError(f"unknown simulator kind {config['kind']!r}; expected 'learned' or 'truth'")
    model = FactorisedClickModel(
        Schema.from_json(config["schema"]), ClickModelConfig(**config["model"]), config.get("unknown", {})
    )
    if weights is not None:
        model.load_state_dict(load_tensors(weights))
    return model.to(device).eval()


def load_simulator(
    path: str | Path, device: torch.device | str = "cpu", session: SessionParams | None = None
) -> Simulator:
    """The simulator stored in ``path``; ``session`` overrides its stored session parameters."""
    path = Path(path)
    config = read_config(path)
    data = PreparedDataset(config["data"])
    if Schema.from_json(config["schema"]) != data.schema:
        raise ValueError(f"{path}: the dataset {config['data']} no longer has the schema the simulator was built on")
    response = build_response(config, data, device, path / WEIGHTS if config["kind"] == "learned" else None)
    pool = ListPool.from_dataset(data, config["pool_split"], config["max_candidates"], device)
    return Simulator(response, pool, session or SessionParams(**config["session"]), config["slate_size"])


def simulator_config(
    kind: str,
    data: PreparedDataset,
    pool_split: str,
    max_candidates: int,
    slate_size: int,
    session: SessionParams,
    model: ClickModelConfig | None = None,
    **extra,
) -> dict:
    return {
        "kind": kind,
        "data": str(Path(data.root).resolve()),
        "data_content_hash": data.manifest["content_hash"],
        "pool_split": pool_split,
        "max_candidates": max_candidates,
        "slate_size": slate_size,
        "session": asdict(session),
        "model": asdict(model) if model else None,
        "unknown": unknown_ids(data),
        "schema": data.schema.to_json(),
        **extra,
    }
