"""Settings of `relist serve` (kept apart from the app so that the command line does not import FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relist.config import option
from relist.last import OFFSETS, LastConfig


@dataclass
class ServeSettings:
    run: Path = option(help="directory holding generator/ and evaluator/ (runs of `relist train generator|evaluator`)")
    host: str = option("127.0.0.1", help="address to listen on")
    port: int = option(8000, help="port to listen on")
    workers: int = option(1, help="uvicorn worker processes, each with its own copy of the models")
    mode: str = option(
        "parallel", help="LAST mode, or 'greedy' for generator-only decoding", choices=("parallel", "serial", "greedy")
    )
    offsets: str = option("activations", help="where LAST's offsets go", choices=OFFSETS)
    steps: str = option("0,0,0,0,6,7,8,9", help="parallel step sizes, one candidate each (comma-separated)")
    serial_steps: int = option(8, help="serial: generate-evaluate-update rounds")
    grad_steps: int = option(
        0, help="decoding steps LAST's gradient flows through (0: all, the paper's objective; T > 0 is a deviation)"
    )
    window_ms: float = option(2.0, help="micro-batching window: how long a request waits for others")
    max_batch: int = option(64, help="most requests per micro-batch")
    max_body_bytes: int = option(1 << 20, help="largest accepted request body")
    max_items: int = option(0, help="most candidates per request (0: the evaluator's max_len)")
    threads: int = option(1, help="torch threads per worker process")
    seed: int = option(0, help="seed of the sampling noise")

    def last_config(self) -> LastConfig:
        if self.mode == "greedy":
            return LastConfig(steps=())
        try:
            steps = tuple(float(s) for s in self.steps.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--steps must be comma-separated numbers, got {self.steps!r}") from None
        return LastConfig(
            mode=self.mode,
            offsets=self.offsets,
            steps=steps,
            serial_steps=self.serial_steps,
            grad_steps=self.grad_steps,
        )
