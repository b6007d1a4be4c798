"""Fixed-width text tables of metrics, as the commands print them."""

from __future__ import annotations

from typing import Sequence

TABLE_METRICS = ("ndcg@5", "ndcg@10", "map@5", "map@10", "p@5", "clicks@10", "auc", "alpha_ndcg@10")


def metrics_table(rows: dict[str, dict[str, float]], metrics: Sequence[str] = TABLE_METRICS, digits: int = 4) -> str:
    """One row per named result, one column per metric that any row has ("-" where a row lacks it)."""
    metrics = [m for m in metrics if any(m in r for r in rows.values())]
    name_width = max(len(n) for n in rows) + 2
    column = max(14, digits + 10)
    lines = ["".ljust(name_width) + "".join(m.rjust(column) for m in metrics)]
    for name, values in rows.items():
        cells = ((f"{values[m]:.{digits}f}" if m in values else "-").rjust(column) for m in metrics)
        lines.append(name.ljust(name_width) + "".join(cells))
    return "\n".join(lines)
