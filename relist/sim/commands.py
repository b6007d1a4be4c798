"""The simulator's `relist` commands (merged into the command table of `relist.cli`)."""

from __future__ import annotations

COMMANDS: dict = {}
