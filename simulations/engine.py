"""Run the medfed ServerApp and ClientApp on Flower's simulation engine (Ray backend).

This is the only module that touches Flower's simulation entry point. In flwr 1.41 the
public ``run_simulation`` is deprecated and gives the apps an empty run config, and
``flwr run . local`` leaves a detached SuperLink running. We therefore call the runtime
that both of them wrap, ``flwr.simulation.run_simulation._run_simulation``, the way
Flower's own ``flwr-simulation`` process does: with a ``Run`` and an app directory whose
``pyproject.toml`` carries the study's run config, so the ServerApp and every ClientApp
receive exactly the config they get in deployment. It runs in-process, starts and stops
its own Ray instance, and leaves nothing running when it returns.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medfed.common.config import StudyConfig

log = logging.getLogger(__name__)

APP_DIR_NAME = ".flwr-app"


def write_app_dir(cfg: StudyConfig, run_dir: Path) -> Path:
    """A minimal Flower app directory whose run config is this study's config."""
    from medfed.common.flwr_app import write_flower_app

    return write_flower_app(run_dir / APP_DIR_NAME, cfg.to_dict())


def backend_config(num_sites: int) -> dict[str, Any]:
    """Ray resources: one ClientApp actor per available core pair, GPU share when present."""
    import torch

    cpus = os.cpu_count() or 1
    per_client = max(1, min(2, cpus))
    gpus = 0.0
    if torch.cuda.is_available():
        gpus = 1.0 / max(1, min(num_sites, 4))
    return {
        "client_resources": {"num_cpus": per_client, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR",
                      "log_to_driver": True},
    }


def run_on_simulation_engine(cfg: StudyConfig) -> None:
    """Run the federated study ``cfg`` with one virtual SuperNode per site."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import (
        RUN_ID_NUM_BYTES,
        SUPERLINK_NODE_ID,
        TASK_ID_NUM_BYTES,
    )
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType
    from medfed.client.app import app as client_app
    from medfed.server.app import app as server_app

    run_dir = Path(cfg.out_dir).resolve()
    cfg = cfg.replace(out_dir=str(run_dir))
    app_dir = write_app_dir(cfg, run_dir)
    run_config = cfg.to_dict()

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no data about the study leaves the machine
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    _run_simulation(
        num_supernodes=cfg.num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config(cfg.num_sites),
        server_app_context=server_context,
        app_dir=str(app_dir),
        run=run,
        is_app=True,
    )
