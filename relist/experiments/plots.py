"""Plot helpers the experiments share, so that no figure misleads.

- Bar charts of metric values start at zero unless that would hide the differences between the bars;
  then the axis starts just below them and the cut is marked: break marks on the y axis (``gid
  "broken-axis"``) and the start named in the y label.
- Tick labels are never cut; long ones are wrapped onto several lines.
- A study writes its figures through ``write_figures``, which leaves no plot in OUT that is not of this run.
- matplotlib is imported only inside the functions that plot, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

BROKEN_AXIS = "broken-axis"


def _nice_floor(value: float, span: float) -> float:
    """``value`` rounded down to a round number at the scale of ``span``."""
    step = 10 ** math.floor(math.log10(span)) if span > 0 else 1.0
    return math.floor(value / step) * step


def metric_axis(ax, tops: Sequence[float], bottoms: Sequence[float] | None = None, label: str = "") -> float | None:
    """Set the y range of a bar chart of non-negative metric values; returns where a broken axis starts.

    ``tops`` are the bars' heights plus their error bars and any reference line, ``bottoms`` their lowest
    drawn values (bars minus error bars; default ``tops``). From zero when the smallest bottom is below
    half the largest top (the bars differ visibly from zero); otherwise the axis starts below the smallest
    bottom by a tenth of the range shown, break marks are drawn on the y axis and the label says where it
    starts."""
    tops = np.asarray([t for t in tops if np.isfinite(t)], dtype=float)
    bottoms = np.asarray([b for b in (tops if bottoms is None else bottoms) if np.isfinite(b)], dtype=float)
    if not len(tops) or tops.max() <= 0 or bottoms.min() <= 0.5 * tops.max():
        ax.set_ylim(0, None)
        ax.set_ylabel(label)
        return None
    low, high = float(bottoms.min()), float(tops.max())
    span = max(high - low, 1e-3 * high)
    start = _nice_floor(low - 0.1 * span, span)
    ax.set_ylim(start, high + 0.1 * span)
    for dy in (-0.012, 0.012):  # two short slanted strokes across the y axis near its foot
        ax.plot([-0.015, 0.015], [0.02 + dy - 0.01, 0.02 + dy + 0.01], transform=ax.transAxes, color="black",
                lw=1, clip_on=False, gid=BROKEN_AXIS)  # fmt: skip
    ax.set_ylabel(f"{label} (axis starts at {start:g})".strip())
    return start


def wrap_label(text: str, width: int = 24) -> str:
    """``text`` on lines of at most ``width`` characters where it has spaces; nothing is dropped."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


def write_figures(out: Path, figures: dict[str, Callable[[], object]], dpi: int) -> list[str]:
    """Draw each figure and save it as ``out/<name>``; returns the names written.

    A builder returns a matplotlib figure, or None when its study did not run: then no empty plot is
    written, and a file of that name left by an earlier run in ``out`` is removed, since it would not be of
    these results. The builders run after the non-interactive backend is selected."""
    import matplotlib  # imported only when plotting: it costs a second of start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, build in figures.items():
        fig = build()
        if fig is None:
            (out / name).unlink(missing_ok=True)
            continue
        fig.savefig(out / name, dpi=dpi)
        plt.close(fig)
        written.append(name)
    return written
