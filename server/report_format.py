"""Formatting shared by the report's sections (``report.md`` and its plots): numbers, Markdown tables, plot style.

:mod:`medfed.server.report` and its section writers (:mod:`~medfed.server.report_fairness`,
:mod:`~medfed.server.report_trust`) all import from here, so no section imports the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PLOT_DPI = 110
PLOT_SIZE_IN = (7.0, 4.5)


def natural_key(text: str) -> list[Any]:
    """Sort key that puts site-2 before site-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None when missing, non-numeric or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, digits: int = 4) -> str:
    """A metric value for a table: integers as is, floats with ``digits`` decimals, else n/a."""
    if isinstance(value, str):
        return value
    found = number(value)
    if found is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:d}"
    return f"{found:.{digits}f}"


def fmt_count(value: Any) -> str:
    """An example count (may arrive as a float, e.g. 120.0) as an integer, else n/a."""
    found = number(value)
    return "n/a" if found is None else f"{round(found):d}"


def fmt_bytes(count: float) -> str:
    """Byte count in binary units."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def md_cell(value: Any) -> str:
    """Text safe to put in a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a Markdown table."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines


def finish_round_plot(fig: Any, ax: Any, out_png: Path, ylabel: str, title: str) -> None:
    """The report's style for a plot over rounds: integer round axis, grid, legend, 110 dpi PNG."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=PLOT_DPI)
