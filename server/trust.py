"""The trust sections of a run's summary: interpretability (``explain``) and robustness under attack.

Both come only from what the sites measured on their own test splits in the final
evaluation; a study that asked for neither gets neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medfed.server.explain import EXPLAIN, summary_explain
from medfed.server.fairness import config_group_names, group_names
from medfed.server.robustness import ROBUSTNESS, summary_robustness

if TYPE_CHECKING:
    from medfed.common.config import StudyConfig
    from medfed.common.data.splits import DatasetInfo


def trust_sections(cfg: StudyConfig, per_site: Mapping[str, Mapping[str, Any]],
                   info: DatasetInfo | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.explain_metrics or cfg.explain_every:
        _, names = group_names(info, config_group_names(cfg.group_attribute, cfg.group_names))
        explain = summary_explain(per_site, cfg.explain_band, cfg.explain_method, tuple(names))
        if explain is not None:
            out[EXPLAIN] = explain
    if cfg.robustness_attacks:
        robust = summary_robustness(per_site, cfg.robustness_attacks, cfg.robustness_radii, cfg.robustness_steps)
        if robust is not None:
            out[ROBUSTNESS] = robust
    return out
