"""`relist rl train`."""

from __future__ import annotations

from relist.rl.loop import RLTrainConfig, train_rl


def run_rl_train(cfg: RLTrainConfig) -> None:
    result = train_rl(cfg)
    if result is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    last = result["final"]
    print(
        f"{cfg.method}: session dwell {last['session_dwell']:.1f} s, session length {last['session_length']:.2f} "
        f"after {last['requests']} requests on {result['world_size']} process(es); "
        f"wrote {cfg.out}/metrics.json, actors.safetensors"
    )
