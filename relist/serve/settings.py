"""Settings of `relist serve` (kept apart from the app so that the command line does not import FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relist.config import option
from relist.last import LastConfig

LIMITS = "relist.limits"  # lifespan-state key of the limits the server's protocol reads (relist.serve.protocol)
# request-state key: {"admission": ...} of a /rerank request the protocol admitted from its headers (and
# releases); None in it once the protocol let the admission go (the body stalled: the app admits it again)
ADMITTED = "relist.admitted"
MIN_GRACE_WITH_WORKERS = 2.0  # seconds (relist.serve.app.uvicorn_stop_seconds)


@dataclass
class ServeSettings:
    run: Path = option(help="directory holding generator/ and evaluator/ (runs of `relist train generator|evaluator`)")
    host: str = option("127.0.0.1", help="address to listen on")
    port: int = option(8000, help="port to listen on")
    workers: int = option(1, help="uvicorn worker processes, each with its own copy of the models")
    last: LastConfig = option(LastConfig(), help="LAST's settings (their options are serve's own)", flatten=True)
    window_ms: float = option(2.0, help="micro-batching window: how long a request waits for others")
    max_batch: int = option(64, help="most requests per micro-batch")
    max_body_bytes: int = option(1 << 20, help="largest accepted request body")
    max_items: int = option(0, help="most candidates per request (0: the evaluator's max_len)")
    max_history: int = option(1000, help="most history items per request (MIND's longest history: 425)")
    max_queue: int = option(256, help="requests waiting for a batch before new ones are shed (503, Retry-After)")
    deadline_ms: float = option(
        500.0,
        help="shed a request (503, Retry-After) once admitting it would have a request wait longer than this (the "
        "longest-waiting one of the batch it would join, as the recent batch times say); 0: off",
    )
    shed_pause_ms: float = option(
        100.0,
        help="after a request is shed from its headers, its connection is not read for this long (a client that "
        "retries a 503 at once is heard at most this often); 0: read at once",
    )
    request_timeout_ms: float = option(
        2000.0,
        help="an admitted request not answered this long after its body was read gets 504 (and leaves the queue)",
    )
    max_connections: int = option(
        512,
        help="open connections past which a request gets 503 with Retry-After (GET /healthz and /readyz are "
        "still answered, on a connection then closed)",
    )
    keep_alive_seconds: float = option(5.0, help="how long an idle keep-alive connection is held")
    grace_seconds: float = option(
        10.0,
        help="on SIGTERM, the process exits within this long; in-flight requests may finish in all of it but "
        "0.2 s (uvicorn's own stop) and its last quarter (at most its last second), which closing the model "
        "process takes",
    )
    header_timeout_seconds: float = option(
        10.0,
        help="a request line and headers not complete this long after the connection opened (or, kept alive, "
        "after their first byte) get 408 and the connection is closed",
    )
    body_timeout_seconds: float = option(10.0, help="a body not complete this long after its headers gets 408")
    write_timeout_seconds: float = option(
        10.0,
        help="a connection whose client has not taken the bytes sent to it for this long (a client that never "
        "reads its answers) is closed",
    )
    model_timeout_seconds: float = option(
        10.0,
        help="a model process that has not answered a batch, or a ping while idle, within this long is taken as "
        "hung: it is killed (its batch's requests get 500) and a new one started (a new one not loaded within "
        "the larger of this and 4x the first start's time is killed too)",
    )
    max_id_chars: int = option(256, help="longest id accepted, in characters")
    threads: int = option(1, help="torch threads per worker process")
    seed: int = option(0, help="seed of the sampling noise")

    def last_config(self) -> LastConfig:
        return self.last

    def __post_init__(self):
        timeouts = ("header_timeout_seconds", "body_timeout_seconds", "write_timeout_seconds", "request_timeout_ms")
        for name in (*timeouts, "model_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"serve: --{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.workers > 1 and self.grace_seconds < MIN_GRACE_WITH_WORKERS:
            raise ValueError(
                f"serve: with --workers {self.workers}, --grace-seconds must be at least {MIN_GRACE_WITH_WORKERS:g} "
                f"(uvicorn's supervisor and the worker processes' exit take about 1.5 s), got {self.grace_seconds:g}"
            )
        if self.shed_pause_ms < 0:
            raise ValueError(f"serve: --shed-pause-ms must be 0 (off) or positive, got {self.shed_pause_ms}")
        if self.deadline_ms < 0:
            raise ValueError(f"serve: --deadline-ms must be 0 (off) or positive, got {self.deadline_ms}")
        if self.last.select != "evaluator":
            raise ValueError("serve: --select must be 'evaluator' (oracle selection reads labels, which requests lack)")
