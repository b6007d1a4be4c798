"""`relist data prepare`, `relist data stats` and `relist data headroom`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relist.config import option
from relist.data.prepare import PrepareConfig, prepare
from relist.data.store import PreparedDataset


@dataclass
class StatsConfig:
    data: Path = option(help="prepared dataset directory")
    verify: bool = option(False, help="also recompute the content hash and check it against the manifest")


def run_prepare(cfg: PrepareConfig) -> None:
    out = prepare(cfg)
    print(json.dumps({"out": str(out), **PreparedDataset(out).counts}, indent=2))


def run_stats(cfg: StatsConfig) -> None:
    data = PreparedDataset(cfg.data)
    report = {"source": data.manifest["source"], **data.counts, "content_hash": data.manifest["content_hash"]}
    if "n_dropped" in data.manifest.get("info", {}):  # lists a source dropped (trivago: click-outs off the list)
        report["n_dropped"] = data.manifest["info"]["n_dropped"]
    if cfg.verify:
        report["verified"] = data.verify()
    print(json.dumps(report, indent=2))
    if cfg.verify and not report["verified"]:
        raise ValueError(f"{cfg.data}: content hash does not match the manifest (files changed after preparation)")


def run_headroom(cfg) -> None:
    from relist.data.synthetic import format_headroom, run_headroom

    print(format_headroom(run_headroom(cfg)))
