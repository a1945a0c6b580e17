"""Run the medfed ServerApp and ClientApp on Flower's simulation engine (Ray backend).

This is the only module that touches Flower's simulation entry point. In flwr 1.41 the
public ``run_simulation`` is deprecated and gives the apps an empty run config, and
``flwr run . local`` leaves a detached SuperLink running. We therefore call the runtime
that both of them wrap, ``flwr.simulation.run_simulation._run_simulation``, the way
Flower's own ``flwr-simulation`` process does: with a ``Run`` and an app directory whose
``pyproject.toml`` carries the study's run config, so the ServerApp and every ClientApp
receive exactly the config they get in deployment. It runs in-process, starts and stops
its own Ray instance (or connects to a running cluster: ``ray-address``), and leaves nothing
running when it returns.

Before the engine starts, this driver builds the study's data once and writes one shard per
site into ``RUN_DIR/.sites`` (:mod:`medfed.common.data.shards`); the ClientApps' run config
names that folder (``site-shards``), so each Ray actor maps only the site it is running,
never the whole dataset. The ServerApp runs in this process and keeps the central val/test
splits. The shards are removed when the run ends.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from medfed.common.config import StudyConfig
from medfed.common.errors import ConfigError, MedfedError
from medfed.simulations.attacks import AttackSpec

log = logging.getLogger(__name__)

APP_DIR_NAME = ".flwr-app"
SHARD_DIR_NAME = ".sites"


def write_app_dir(cfg: StudyConfig, run_dir: Path) -> Path:
    """A minimal Flower app directory whose run config is this study's config."""
    from medfed.common.flwr_app import write_flower_app

    return write_flower_app(run_dir / APP_DIR_NAME, cfg.to_dict())


def backend_config(cfg: StudyConfig) -> dict[str, Any]:
    """Ray resources: one ClientApp actor per ``site-cpus`` CPUs (and ``site-gpus`` GPU share).

    Flower creates as many actors as the cluster's resources fit, whatever the number of sites;
    each actor runs the sites one message at a time. Defaults: 2 CPUs per actor (1 on a
    single core) and, when CUDA is present, a GPU share of 1/min(sites, 4).
    """
    import torch

    cpus = os.cpu_count() or 1
    per_site_cpus: float = cfg.site_cpus or max(1, min(2, cpus))
    if cfg.site_gpus >= 0:
        gpus = cfg.site_gpus
    else:
        gpus = 1.0 / max(1, min(cfg.num_sites, 4)) if torch.cuda.is_available() else 0.0
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": True}
    if cfg.ray_address:  # a running cluster brings its own resources: Ray refuses num_cpus then
        init_args["address"] = cfg.ray_address
    else:  # always a new local instance, never one that RAY_ADDRESS or an earlier 'ray start' names
        init_args.update(address="local", num_cpus=cpus)
    return {"client_resources": {"num_cpus": per_site_cpus, "num_gpus": gpus}, "init_args": init_args}


def check_cluster_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the fix, when no Ray cluster answers at ``address`` (HOST:PORT)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise MedfedError(
            f"no Ray cluster answers at ray-address={address} ({exc}): start one there with "
            f"'ray start --head --port={port}' (using this environment's Python and medfed), or leave "
            "ray-address empty to start a local Ray instance"
        ) from exc


def write_site_shards_for(cfg: StudyConfig, run_dir: Path, attack: AttackSpec | None = None) -> Path | None:
    """Write the study's sites as per-site shards under ``run_dir``; None when sites load their own data.

    Sites described by site.yaml files (dataset ``sites``) already read only their own files.
    ``attack`` (label-flip) poisons the shards of its malicious sites (:mod:`.attacks`).
    """
    from medfed.common.data.federated import load_study_data
    from medfed.common.data.shards import shard_kind, write_site_shards

    flip = attack is not None and attack.kind == "label-flip"
    if cfg.dataset == "sites" or (flip and shard_kind(load_study_data(cfg)) is None):
        if flip:
            raise ConfigError("attack=label-flip is simulated through site shards, which these sites do not use")
        return None
    fed = load_study_data(cfg)  # memoised: the CLI has built it already, and the ServerApp reuses it
    if flip:
        from medfed.simulations.attacks import poison_study_data

        fed = poison_study_data(fed, attack)  # a copy: the server's own data stays true
    if shard_kind(fed) is None:
        log.warning("the sites of %s cannot be written as shards: every ClientApp actor builds the whole dataset",
                    fed.info.name)
        return None
    return write_site_shards(fed, run_dir / SHARD_DIR_NAME)


def run_on_simulation_engine(cfg: StudyConfig, attack: AttackSpec | None = None) -> None:
    """Run the federated study ``cfg`` with one virtual SuperNode per site.

    ``attack``: simulated poisoned sites (:mod:`medfed.simulations.attacks`); never part of ``cfg``,
    which is what every ClientApp receives. Recorded in ``RUN_DIR/attack.json``.
    """
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
    from medfed.common.constants import NodeConfigKey
    from medfed.common.data.partition_summary import write_study_partition
    from medfed.server.app import app as server_app

    if cfg.ray_address not in ("", "auto"):
        check_cluster_reachable(cfg.ray_address)
    run_dir = Path(cfg.out_dir).resolve()
    if cfg.site_shards:
        log.warning("site-shards=%r is ignored: the engine writes the shards of this run itself", cfg.site_shards)
    cfg = cfg.replace(out_dir=str(run_dir), site_shards="")
    if attack is not None and attack.active:
        import json

        from medfed.simulations.attacks import ATTACK_FILE, attack_client_app

        attack.check(cfg.num_sites)
        client_app = attack_client_app(attack)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ATTACK_FILE).write_text(json.dumps(attack.to_dict()) + "\n", encoding="utf-8")
    shard_dir = write_site_shards_for(cfg, run_dir, attack)
    # The ClientApps read the shards; the ServerApp's config (kept in checkpoints and
    # summary.json) names no run-local folder, so a finished run compares equal to its study.
    client_cfg = cfg.replace(site_shards=str(shard_dir)) if shard_dir else cfg
    app_dir = write_app_dir(client_cfg, run_dir)
    write_study_partition(cfg)  # partition.json/.md/.png: what each simulated site holds
    run_config = cfg.to_dict()

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run.run_id, node_id=0, node_config={NodeConfigKey.SIMULATION.value: True}, state=RecordDict(),
        run_config=run_config,
    )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no data about the study leaves the machine
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        _run_simulation(
            num_supernodes=cfg.num_sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(cfg),
            server_app_context=server_context,
            app_dir=str(app_dir),
            run=run,
            is_app=True,
        )
    finally:
        if shard_dir is not None:
            shutil.rmtree(shard_dir, ignore_errors=True)
