"""Fixed-width text tables of metrics, as the commands print them, and the cells of the summaries' tables."""

from __future__ import annotations

import math
from typing import Sequence

TABLE_METRICS = ("ndcg@5", "ndcg@10", "map@5", "map@10", "p@5", "clicks@10", "auc", "alpha_ndcg@10")
ONE_SEED = "1 seed, no interval"


def _number(value: float, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metrics_table(rows: dict[str, dict[str, float]], metrics: Sequence[str] = TABLE_METRICS, digits: int = 4) -> str:
    """One row per named result, one column per metric that any row has ("-" where a row lacks it or its
    value is not a number)."""
    metrics = [m for m in metrics if any(m in r for r in rows.values())]
    name_width = max(len(n) for n in rows) + 2
    column = max(14, digits + 10)
    lines = ["".ljust(name_width) + "".join(m.rjust(column) for m in metrics)]
    for name, values in rows.items():
        cells = ((_number(values[m], digits) if m in values else "-").rjust(column) for m in metrics)
        lines.append(name.ljust(name_width) + "".join(cells))
    return "\n".join(lines)


def seeds_interval(n_seeds: int, kind: str = "over seeds") -> str:
    """What a table's "±" means for ``n_seeds`` seeds: the 95% t interval, or that one seed has none."""
    return ONE_SEED if n_seeds == 1 else f"mean ± 95% t interval {kind}, {n_seeds} seeds"


def mean_cell(values: Sequence[float], digits: int = 4, signed: bool = False) -> str:
    """The mean of per-seed ``values`` ± the half-width of its 95% t interval over them; one value alone
    (never "± nan": the table's heading says "1 seed, no interval", see ``seeds_interval``)."""
    from relist.stats import t_ci95  # scipy, only when a summary is written

    if not len(values):
        return "-"
    mean = sum(values) / len(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {t_ci95(list(values)):.{digits}f}"
