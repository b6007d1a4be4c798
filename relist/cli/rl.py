"""`relist rl train`."""

from __future__ import annotations

from relist.rl.train import RLTrainConfig, train_rl


def run_rl_train(cfg: RLTrainConfig) -> None:
    result = train_rl(cfg)
    if result is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    last, handset = result["final"], result["handset"]
    files = "fusion.safetensors" if cfg.method == "cem" else "actors.safetensors"
    print(
        f"{cfg.method}: session dwell {last['session_dwell']:.1f} s against the hand-set weights' "
        f"{handset['session_dwell']:.1f} s ({last['session_dwell'] - handset['session_dwell']:+.1f} s), "
        f"session length {last['session_length']:.2f} against {handset['session_length']:.2f}, on the same "
        f"evaluation users; after {last['requests']} training requests on {result['world_size']} process(es)"
    )
    print(f"wrote {cfg.out}/metrics.json, {files}")
