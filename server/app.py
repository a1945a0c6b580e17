"""The medfed ServerApp: parse the run config once and run the federated study loop.

In medfed's simulation engine the ServerApp's node config carries ``medfed-simulation``
(the server built and partitioned the data); anywhere else it is a deployed coordinator
that holds no patient data. A deployed study that stopped early or failed raises
:class:`~medfed.server.outcome.StudyEnded` once its summary is written, so Flower marks the
run failed with the reason and ``medfed run --wait`` exits with the outcome's code.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from medfed.common.config import parse_study_config
from medfed.common.constants import NodeConfigKey
from medfed.common.logs import setup_logging

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point on the SuperLink (deployment) or the simulation engine."""
    from medfed.server.federation import run_federated
    from medfed.server.outcome import COMPLETED, Outcome, StudyEnded

    setup_logging()
    simulation = bool(context.node_config.get(NodeConfigKey.SIMULATION.value, False))
    if not simulation:  # this run's own process: its grid pulls the sites' replies without Flower's 1 s wait
        from medfed.common.flwr_pull import HTTP_GRID_MODULE, patch_pull

        patch_pull(HTTP_GRID_MODULE)
    cfg = parse_study_config(context.run_config)
    summary = run_federated(grid, cfg, simulation=simulation)
    outcome = Outcome(**summary["outcome"])
    if outcome.status == COMPLETED:
        log.info("study finished: selected round %s, test %s (%s)", summary["selected-round"],
                 _short(summary["test"]), summary["test-source"]["note"])
        return
    log.error("study %s: %s", outcome.status, outcome.reason)
    if not simulation:
        raise StudyEnded(outcome)


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float)) or "none"
