"""Bias studies: one YAML file runs a grid of simulations and compares them in one table.

A study file names a ``base`` config (any StudyConfig keys, kebab-case, shared by every
cell), a ``grid`` (keys with lists of values; their cartesian product is run, federated),
``baselines`` (``centralized`` and/or ``local``, run once per combination of the grid
values that a baseline uses) and ``out``::

    name: pneumonia-skew
    base: {data-path: ../shared/data/pneumoniamnist/pneumoniamnist.npz, num-sites: 5}
    grid: {strategy: [fedavg, fedprox], partition: [iid, dirichlet], epsilon: [0, 8], seed: [0, 1]}
    baselines: [centralized, local]
    out: runs/studies/pneumonia-skew

Every cell runs in this process through the same functions as ``medfed simulate`` (the
simulation engine starts and stops its own Ray instance per cell) into
``OUT/cells/<cell-id>``, a readable id made of its mode and grid values. The plan is checked
whole (every cell's config parsed) before anything runs. A cell whose ``summary.json``
holds the cell's config is not rerun; a partly written one is rerun from scratch. A failed
cell is recorded (``failed.json``) and the study goes on. Baselines have no DP-SGD
(:func:`medfed.simulations.baselines.run_baseline`), so their cells leave out the privacy
and strategy keys: they are the non-private reference for every privacy setting.

Relative paths (``data-path``, ``initial-weights``, ``augment-model``, ``out``) are relative
to the working directory, as with ``medfed simulate --config``.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medfed.common.atomic import atomic_write_text
from medfed.common.config import StudyConfig, kebab, parse_study_config
from medfed.common.errors import ConfigError, MedfedError
from medfed.simulations.attacks import ATTACK_FILE, AttackSpec, parse_attack

log = logging.getLogger(__name__)

SPEC_KEYS = ("name", "base", "grid", "baselines", "out", "attack")  # attack: simulation only (.attacks)
BASELINE_MODES = ("centralized", "local")
RUNNER_KEYS = ("mode", "out-dir", "resume")  # the runner sets these per cell
FEDERATED_ONLY = (  # keys a centralized or local baseline does not use (it has no strategy and no DP)
    "strategy", "fraction-train", "min-sites", "round-timeout", "node-wait-timeout", "max-failed-rounds",
    "straggler-factor", "straggler-floor", "max-reply-mb", "evaluate-every", "fused-evaluation", "proximal-mu", "server-lr", "server-momentum", "server-tau", "trimmed-beta",
    "num-malicious", "max-update-norm-ratio", "qfedavg-q", "epsilon", "delta", "max-grad-norm", "dp-accountant",
    "max-physical-batch", "central-dp", "central-noise", "central-clip", "central-epsilon", "central-delta",
)
PATH_KEYS = ("data-path", "initial-weights", "augment-model")
NO_DP_KEYS = ("epsilon",)  # null means 0: no DP
PLAN_FILE = "study.json"
CELLS_DIR = "cells"
CELL_CONFIG = "cell.yaml"  # the cell's full config: medfed simulate --config cell.yaml reruns it
FAILED_FILE = "failed.json"
_PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class StudySpec:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    baselines: tuple[str, ...]
    out: Path
    attack: AttackSpec = AttackSpec()  # poisoned sites in every federated cell; never in a cell's config


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its id, mode, grid values and full config."""

    cell_id: str
    mode: str
    values: dict[str, Any]
    config: StudyConfig
    attack: AttackSpec = AttackSpec()

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)


@dataclass(frozen=True)
class CellOutcome:
    cell_id: str
    status: str  # "ran", "skipped" (finished before, same config) or "failed"
    reason: str = ""


# --------------------------------------------------------------------------- the study file
def load_study_spec(path: str | Path) -> StudySpec:
    """Read and check a study file (plain data only); errors name the file and the fix."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    try:
        return parse_study_spec(data, default_name=p.stem)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def parse_study_spec(data: Any, default_name: str = "study") -> StudySpec:
    if not isinstance(data, dict):
        raise ConfigError(f"a study file holds a mapping with keys {', '.join(SPEC_KEYS)}, "
                          f"got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"unknown study key(s): {', '.join(unknown)}; allowed keys: {', '.join(SPEC_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name={name!r} must be a non-empty string")
    base = _mapping(data.get("base"), "base")
    for key, value in base.items():
        plain_list = isinstance(value, list) and all(isinstance(v, _PLAIN) for v in value)
        if not isinstance(value, _PLAIN) and not plain_list:
            raise ConfigError(f"base key {key!r} must be a plain value, not {type(value).__name__}")
    grid = _mapping(data.get("grid"), "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, _PLAIN) for v in values):
            raise ConfigError(f"grid key {key!r} must be a non-empty list of plain values, "
                              f"e.g. {key}: [a, b]; got {values!r}")
    for key in RUNNER_KEYS:
        if key in base or key in grid:
            raise ConfigError(f"{key!r} is set by the study runner for each cell: remove it "
                              "(centralized and local runs go in baselines: [centralized, local]; the "
                              "output folder is out)")
    both = sorted(set(base) & set(grid))
    if both:
        raise ConfigError(f"key(s) {', '.join(both)} are in both base and grid: keep each in one place")
    baselines = data.get("baselines") or []
    if not isinstance(baselines, list) or any(b not in BASELINE_MODES for b in baselines) \
            or len(set(baselines)) != len(baselines):
        raise ConfigError(f"baselines={baselines!r} must be a list of distinct modes from "
                          f"{', '.join(BASELINE_MODES)}")
    out = data.get("out", str(Path("runs", "studies", _slug(name))))
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"out={out!r} must be a folder path")
    attack = parse_attack(_mapping(data.get("attack"), "attack"))
    return StudySpec(name.strip(), base, grid, tuple(baselines), Path(out).resolve(), attack)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping of config keys, got {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


# --------------------------------------------------------------------------- the plan
def plan_cells(spec: StudySpec) -> list[Cell]:
    """Every cell of the study, each config parsed and checked, before anything runs."""
    cells = [_cell(spec, "federated", dict(combo)) for combo in _product(spec.grid)]
    baseline_grid = {k: v for k, v in spec.grid.items() if k not in FEDERATED_ONLY}
    for mode in spec.baselines:
        cells += [_cell(spec, mode, dict(combo)) for combo in _product(baseline_grid)]
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.cell_id in seen:
            raise ConfigError(f"cells {seen[cell.cell_id].values} and {cell.values} get the same id "
                              f"{cell.cell_id!r}: make the grid values distinct")
        seen[cell.cell_id] = cell
    return cells


def _product(grid: Mapping[str, list[Any]]) -> list[tuple[tuple[str, Any], ...]]:
    keys = list(grid)
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _cell(spec: StudySpec, mode: str, values: dict[str, Any]) -> Cell:
    cell_id = "__".join([mode, *(f"{k}-{_id_part(v)}" for k, v in values.items())])
    base = spec.base if mode == "federated" else {k: v for k, v in spec.base.items() if k not in FEDERATED_ONLY}
    mapping = {**base, **values}
    for key in NO_DP_KEYS:
        if key in mapping and mapping[key] is None:
            mapping[key] = 0.0
    for key in PATH_KEYS:
        if isinstance(mapping.get(key), str) and mapping[key]:
            mapping[key] = ",".join(str(Path(p.strip()).resolve()) for p in mapping[key].split(",") if p.strip())
    if mapping.get("data-path") and "dataset" not in mapping:
        mapping["dataset"] = _dataset_of(mapping["data-path"], str(mapping.get("task", "classification")))
    mapping.update({"mode": mode, "out-dir": str(spec.out / CELLS_DIR / cell_id)})
    try:
        cfg = parse_study_config(mapping)
    except ConfigError as exc:
        raise ConfigError(f"cell {cell_id}: {exc}") from exc
    if mode != "federated" or not spec.attack.active:
        return Cell(cell_id, mode, values, cfg)
    try:
        spec.attack.check(cfg.num_sites)
    except ConfigError as exc:
        raise ConfigError(f"cell {cell_id}: {exc}") from exc
    return Cell(cell_id, mode, values, cfg, spec.attack)


def _dataset_of(data_path: str, task: str) -> str:
    """The dataset a data-path means when the study does not say, as ``medfed simulate --data`` reads it."""
    from medfed.common.data.uci_heart import is_uci_heart_dir

    if is_uci_heart_dir(data_path):
        return "uci-heart"
    return "npz" if task == "segmentation" else "medmnist"


def _id_part(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if "/" in text:  # a path: its file name without extension
        text = Path(text.rstrip("/")).name.split(".")[0]
    return _slug(text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


# --------------------------------------------------------------------------- running
def cell_state(cell: Cell) -> str:
    """``done`` (summary with this config), ``failed``, ``partial`` (to rerun), or ``new``."""
    from medfed.server.recorder import SUMMARY_FILE

    run_dir = cell.run_dir
    if (run_dir / FAILED_FILE).is_file():
        return "failed"
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        if cell.mode == "federated":
            from medfed.simulations.study_table import round_failures

            if not round_failures(run_dir)[0]:  # finished, but no site trained: rerun it
                return "failed"
        attacked = (run_dir / ATTACK_FILE).is_file()  # a cell run under another attack setting is rerun
        same_attack = attacked == cell.attack.active and (
            not attacked or json.loads((run_dir / ATTACK_FILE).read_text()) == cell.attack.to_dict())
        return "done" if _same_config(summary, cell.config) and same_attack else "partial"
    return "partial" if run_dir.exists() else "new"


def _same_config(summary_path: Path, cfg: StudyConfig) -> bool:
    """Whether the finished run's stored config is ``cfg`` (keys added since take their defaults)."""
    try:
        stored = json.loads(summary_path.read_text(encoding="utf-8")).get("config")
        known = {kebab(f.name) for f in fields(StudyConfig)}
        if not isinstance(stored, dict) or set(stored) - known:
            return False
        previous = parse_study_config({k: v for k, v in stored.items() if v is not None})
    except (OSError, ValueError, AttributeError, ConfigError):
        return False
    return previous.replace(out_dir=cfg.out_dir, resume=cfg.resume) == cfg


def run_cell(cfg: StudyConfig, attack: AttackSpec | None = None) -> None:
    """Run one cell exactly as ``medfed simulate`` does: data checked first, then the run."""
    from medfed.common.data.federated import load_study_data
    from medfed.common.training import check_group_reweight
    from medfed.server.recorder import SUMMARY_FILE

    fed = load_study_data(cfg)
    check_group_reweight(cfg, [s.train for s in fed.sites])
    if cfg.mode == "federated":
        from medfed.simulations.engine import run_on_simulation_engine

        try:
            run_on_simulation_engine(cfg, attack)
        finally:
            _stop_ray()
        if not (Path(cfg.out_dir) / SUMMARY_FILE).is_file():
            raise MedfedError("the simulation ended without writing summary.json: see the log above")
        from medfed.simulations.study_table import round_failures

        trained, _, first = round_failures(Path(cfg.out_dir))
        if not trained:  # the server finishes a study whose sites all refuse: its model is the initial one
            raise MedfedError(f"no site trained in any round: {first or 'see the log above'}")
    else:
        from medfed.simulations.baselines import run_baseline

        run_baseline(cfg)


def _stop_ray() -> None:
    """Shut down this process's own Ray instance if a failed simulation left it up."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def write_plan(spec: StudySpec, cells: list[Cell]) -> Path:
    plan = {
        "name": spec.name,
        "grid-keys": list(spec.grid),
        "baselines": list(spec.baselines),
        "attack": spec.attack.to_dict(),
        "cells": [{"id": c.cell_id, "mode": c.mode, "values": c.values} for c in cells],
    }
    path = spec.out / PLAN_FILE
    atomic_write_text(path, json.dumps(plan, indent=2) + "\n")
    return path


def run_study(spec: StudySpec, cells: list[Cell],
              runner: Callable[[StudyConfig], None] = run_cell) -> list[CellOutcome]:
    """Run every cell not finished before, record failures, and rewrite the tables after each."""
    import yaml
    from medfed.simulations.study_table import write_tables

    spec.out.mkdir(parents=True, exist_ok=True)
    write_plan(spec, cells)
    outcomes = []
    for i, cell in enumerate(cells, 1):
        state = cell_state(cell)
        if state == "done":
            log.info("study %s: cell %d/%d %s skipped: finished before with the same config",
                     spec.name, i, len(cells), cell.cell_id)
            outcomes.append(CellOutcome(cell.cell_id, "skipped"))
            continue
        if state != "new":
            log.info("study %s: cell %s was %s: rerunning it from scratch", spec.name, cell.cell_id, state)
            shutil.rmtree(cell.run_dir)
        cell.run_dir.mkdir(parents=True)
        atomic_write_text(cell.run_dir / CELL_CONFIG, yaml.safe_dump(cell.config.to_dict(), sort_keys=False))
        log.info("study %s: cell %d/%d %s running", spec.name, i, len(cells), cell.cell_id)
        try:
            runner(cell.config, cell.attack) if cell.attack.active else runner(cell.config)
            outcomes.append(CellOutcome(cell.cell_id, "ran"))
        except Exception as exc:  # one failed cell is data: record it, run the rest
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.error("study %s: cell %s failed: %s", spec.name, cell.cell_id, reason)
            log.debug("cell failure", exc_info=True)
            atomic_write_text(cell.run_dir / FAILED_FILE, json.dumps({"reason": reason}) + "\n")
            outcomes.append(CellOutcome(cell.cell_id, "failed", reason))
        write_tables(spec.out)
    write_tables(spec.out)
    return outcomes
