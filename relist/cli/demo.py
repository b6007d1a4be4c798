"""`relist demo` and `relist report`."""

from __future__ import annotations

import sys


def run_demo(cfg) -> None:
    from relist.demo import run_demo as demo

    result = demo(cfg, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(result["summary"])
    print(f"report: {result['report']}")


def run_report(cfg) -> None:
    from relist.report import report

    print(f"wrote {report(cfg)}")
