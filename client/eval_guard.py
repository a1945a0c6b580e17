"""How often a site lets the server evaluate: each model version a bounded number of times, one threshold per run.

An evaluation reply aggregates the site's validation and test patients. Asked often enough,
with models or decision thresholds of the server's choosing, aggregates add up to answers
about single patients, and evaluation is not covered by DP. So the site keeps, in
``<state-dir>/evaluations.json`` (under an exclusive lock: the launcher may run several
ClientApp processes at once), what it has answered in each run:

- a model version (the hash of the arrays received) is evaluated at most
  :data:`MAX_EVALS_PER_MODEL` times per run: once in the round that produced it and once
  more as the selected model at the end;
- a run evaluates at most ``num-server-rounds + 1`` times in all (each round, then the final);
- the decision threshold is the server's choice applied only at the end: a run may carry one
  threshold, and a message with a different one is refused.

Refusals are :class:`PublicSiteError`: the server learns which rule it broke, nothing else.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from medfed.client.boundary import PublicSiteError
from medfed.common.atomic import atomic_write_text
from medfed.common.locks import hold_lock

log = logging.getLogger(__name__)

EVALUATIONS_FILE = "evaluations.json"
MAX_EVALS_PER_MODEL = 2
KEEP_RUNS = 50  # older runs' counts are dropped (a run is one study)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"runs": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data.get("runs"), dict):
            raise ValueError("no 'runs' mapping")
        return data
    except (ValueError, AttributeError) as exc:
        # A damaged count must not reset to zero: the site refuses until its operator looks.
        log.error("%s is unreadable (%s): evaluations are refused until it is repaired or removed", path, exc)
        raise PublicSiteError("this site's evaluation log is damaged: its operator must repair it") from exc


def admit_evaluation(state_dir: Path, run_id: int, model_hash: str, threshold: float | None,
                     max_total: int) -> None:
    """Count this evaluation, or raise :class:`PublicSiteError` when a rule above refuses it."""
    path = Path(state_dir) / EVALUATIONS_FILE
    with hold_lock(path.with_name(f"{EVALUATIONS_FILE}.lock")):
        data = _read(path)
        run = data["runs"].setdefault(str(run_id), {"models": {}, "total": 0, "threshold": None})
        seen = int(run["models"].get(model_hash, 0))
        if seen >= MAX_EVALS_PER_MODEL:
            raise PublicSiteError(f"this model version was already evaluated {seen} times in this run "
                                  f"(a site evaluates each at most {MAX_EVALS_PER_MODEL} times)")
        if run["total"] >= max_total:
            raise PublicSiteError(f"this run already had {run['total']} evaluations, the most its "
                                  "num-server-rounds allows (one per round and the final one)")
        if threshold is not None:
            if not math.isfinite(threshold):
                raise PublicSiteError("the evaluation threshold must be a finite number")
            if run["threshold"] is not None and run["threshold"] != threshold:
                raise PublicSiteError("this run already evaluated at another threshold: a site applies "
                                      "one threshold per run, the server's final choice")
            run["threshold"] = threshold
        run["models"][model_hash] = seen + 1
        run["total"] += 1
        runs = data["runs"]
        for old in list(runs)[:-KEEP_RUNS]:
            del runs[old]
        atomic_write_text(path, json.dumps(data, indent=1))
