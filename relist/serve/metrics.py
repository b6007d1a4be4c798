"""Prometheus text exposition of the service's counters and latency histogram (no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PATHS = ("/rerank", "/healthz", "/readyz", "/metrics")
OTHER = "(other)"  # any other path, and answers given before a path was read: one label, however many paths


def path_label(path: str) -> str:
    """The label of a request path: the service's own paths, or one label for all others."""
    return path if path in PATHS else OTHER


class ServiceMetrics:
    """Answers by path and status, non-2xx answers by path, status and reason, connections closed by the
    server without an answer by reason, model processes replaced by reason, latency and batch sizes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status) -> count
        self.errors: Counter = Counter()  # (path, status, reason) -> count
        self.closed: Counter = Counter()  # reason -> connections closed without an answer
        self.models_lost: Counter = Counter()  # reason (exited, hung) -> model processes replaced
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches = 0
        self.batched_requests = 0

    def observe(self, path: str, status: int, seconds: float, reason: str | None = None) -> None:
        """Count one answer; a non-2xx one also under its reason (``unspecified`` when none was given)."""
        path = path_label(path)
        with self.lock:
            self.requests[path, status] += 1
            if not 200 <= status < 300:
                self.errors[path, status, reason or "unspecified"] += 1
            if path == "/rerank":
                k = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.latency[k] += 1
                self.latency_sum += seconds

    def observe_closed(self, reason: str) -> None:
        with self.lock:
            self.closed[reason] += 1

    def observe_model_lost(self, reason: str) -> None:
        with self.lock:
            self.models_lost[reason] += 1

    def observe_batch(self, size: int) -> None:
        with self.lock:
            self.batches += 1
            self.batched_requests += size

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP relist_requests_total HTTP answers by path and status.",
                "# TYPE relist_requests_total counter",
            ]
            lines += [
                f'relist_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP relist_request_errors_total Non-2xx answers by path, status and reason.",
                "# TYPE relist_request_errors_total counter",
            ]
            lines += [
                f'relist_request_errors_total{{path="{p}",status="{s}",reason="{r}"}} {n}'
                for (p, s, r), n in sorted(self.errors.items())
            ]
            lines += [
                "# HELP relist_connections_closed_total Connections the server closed without an answer, by reason.",
                "# TYPE relist_connections_closed_total counter",
            ]
            lines += [f'relist_connections_closed_total{{reason="{r}"}} {n}' for r, n in sorted(self.closed.items())]
            lines += [
                "# HELP relist_model_processes_lost_total Model processes that exited or hung and were replaced.",
                "# TYPE relist_model_processes_lost_total counter",
            ]
            lines += [
                f'relist_model_processes_lost_total{{reason="{r}"}} {n}' for r, n in sorted(self.models_lost.items())
            ]
            lines += [
                "# HELP relist_rerank_latency_seconds /rerank latency, request headers read to response ready.",
                "# TYPE relist_rerank_latency_seconds histogram",
            ]
            running = 0
            for bound, count in zip(LATENCY_BUCKETS, self.latency):
                running += count
                lines.append(f'relist_rerank_latency_seconds_bucket{{le="{bound}"}} {running}')
            total = running + self.latency[-1]
            lines += [
                f'relist_rerank_latency_seconds_bucket{{le="+Inf"}} {total}',
                f"relist_rerank_latency_seconds_sum {self.latency_sum:.6f}",
                f"relist_rerank_latency_seconds_count {total}",
                "# HELP relist_batches_total Micro-batches run.",
                "# TYPE relist_batches_total counter",
                f"relist_batches_total {self.batches}",
                "# HELP relist_batched_requests_total Requests served through micro-batches.",
                "# TYPE relist_batched_requests_total counter",
                f"relist_batched_requests_total {self.batched_requests}",
            ]
        return "\n".join(lines) + "\n"
