"""Patient ages: parse DICOM-style age strings and bin them into bands.

:func:`parse_age_years` reads '045Y', '6M', '45' and the like; :class:`AgeBands` and
:func:`bin_ages` turn ages into named bands for subgroup metrics.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from dataclasses import dataclass, replace
from itertools import pairwise

from medfed.common.errors import ConfigError, DataError
from medfed.common.intake.manifest import Manifest

__all__ = ["AgeBands", "bin_ages", "parse_age_years"]

_AGE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([YMWD])?$")
_AGE_UNIT_YEARS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
_MAX_AGE_YEARS = 130.0


def parse_age_years(value: str) -> float | None:
    """Age in years from '045Y', '6M', '010W', '003D', '45' or '45.5'; None if unknown or implausible."""
    match = _AGE_RE.match(str(value).strip().upper())
    if match is None:
        return None
    years = float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2) or "Y"]
    if not math.isfinite(years) or years < 0 or years > _MAX_AGE_YEARS:
        return None
    return years


def _format_edge(edge: float) -> str:
    return str(int(edge)) if edge.is_integer() else str(edge)


@dataclass(frozen=True)
class AgeBands:
    """Age bands from strictly increasing inclusive upper bounds.

    ``AgeBands((40, 60))`` gives ``"<=40"``, ``"41-60"`` and ``">60"``. With a
    non-integer lower edge the band starts at the edge itself (``"40.5-60"``).
    """

    edges: tuple[float, ...]

    def __post_init__(self) -> None:
        try:
            edges = tuple(float(edge) for edge in self.edges)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"age band edges {self.edges!r} must be numbers (years), e.g. (40, 60)"
            ) from exc
        if not edges:
            raise ConfigError(
                "age band edges are empty; give at least one upper bound in years, e.g. (40, 60)"
            )
        if any(not math.isfinite(edge) or edge < 0 for edge in edges):
            raise ConfigError(f"age band edges {list(edges)} must be finite and non-negative years")
        if any(later <= earlier for earlier, later in pairwise(edges)):
            raise ConfigError(f"age band edges {list(edges)} must be strictly increasing, e.g. (40, 60)")
        object.__setattr__(self, "edges", edges)

    @property
    def names(self) -> tuple[str, ...]:
        """Band names, youngest first."""
        names = [f"<={_format_edge(self.edges[0])}"]
        for lower, upper in pairwise(self.edges):
            whole = lower.is_integer() and lower + 1 <= upper
            start = _format_edge(lower + 1 if whole else lower)
            names.append(f"{start}-{_format_edge(upper)}")
        names.append(f">{_format_edge(self.edges[-1])}")
        return tuple(names)

    def label(self, age_years: float) -> str:
        """Name of the band holding ``age_years`` (upper bounds are inclusive)."""
        if not math.isfinite(age_years):
            raise DataError(
                f"age {age_years!r} is not a finite number of years; parse it with parse_age_years first"
            )
        return self.names[bisect_left(self.edges, age_years)]


def bin_ages(
    manifest: Manifest, bands: AgeBands, column: str = "age", out_column: str = "age_band"
) -> Manifest:
    """A copy of ``manifest`` with attribute ``out_column`` = age band ('' when the age is unknown)."""
    if column not in manifest.attribute_names:
        raise ConfigError(
            f"{manifest.source} has no '{column}' attribute to bin "
            f"(attributes: {list(manifest.attribute_names)}); "
            "add an age column or name the right one"
        )
    rows = []
    for row in manifest.rows:
        years = parse_age_years(row.attributes.get(column, ""))
        band = "" if years is None else bands.label(years)
        rows.append(replace(row, attributes={**row.attributes, out_column: band}))
    names = manifest.attribute_names
    if out_column not in names:
        names = (*names, out_column)
    return replace(manifest, rows=tuple(rows), attribute_names=names)
