"""`relist serve`."""

from __future__ import annotations

from relist.serve.settings import ServeSettings


def run_serve(cfg: ServeSettings) -> None:
    from relist.serve.app import serve  # FastAPI and uvicorn only for this command

    print(f"relist serve: {cfg.run} on http://{cfg.host}:{cfg.port} (POST /rerank, GET /healthz, GET /metrics)")
    serve(cfg)
