"""The medfed ServerApp: parse the run config once and run the federated study loop."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from medfed.common.config import parse_study_config
from medfed.common.logs import setup_logging

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point on the SuperLink (deployment) or the simulation engine."""
    from medfed.server.federation import run_federated

    setup_logging()
    cfg = parse_study_config(context.run_config)
    summary = run_federated(grid, cfg)
    log.info("study finished: selected round %s, test %s", summary["selected-round"], summary["test"])
