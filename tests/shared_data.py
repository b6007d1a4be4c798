"""Where the real data beside the repository are (``../shared/data``): tests read them by path and never
copy them into the repository. A test that needs one skips where it is absent, unless it says otherwise."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
MIND_SUBSET = SHARED / "data" / "mind_small_5k"
TRIVAGO_RIO = SHARED / "data" / "trivago_rio"
