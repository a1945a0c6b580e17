"""Typed, frozen configuration parsed once from YAML, Flower run config or node config.

Every study is described by one flat mapping of kebab-case keys (the same keys in
``[tool.flwr.app.config]``, ``flwr run --run-config``, a study YAML and the
``medfed simulate`` flags). :func:`parse_study_config` turns such a mapping into a
:class:`StudyConfig`, checking every key and range once; nothing downstream re-parses.

Config is plain data: names (strategy, model, dataset, optimizer) are looked up in fixed
registries, never imported or evaluated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medfed.common.errors import ConfigError

STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
    "fedbn",
)
MODELS = ("cnn", "densenet121", "resnet18")
DATASETS = ("synthetic", "medmnist")
PARTITIONS = ("iid", "dirichlet")
OPTIMIZERS = ("sgd", "adam")
MODES = ("federated", "centralized", "local")
SELECTIONS = ("val-auc", "last")
DEVICES = ("auto", "cpu", "cuda")


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class StudyConfig:
    """One federated study: data, model, local training, strategy and run outputs."""

    # data
    dataset: str = "synthetic"
    data_path: str = ""
    num_sites: int = 4
    partition: str = "dirichlet"
    alpha: float = 1.0
    seed: int = 0
    # model and local training
    model: str = "cnn"
    num_classes: int = 0  # 0: taken from the data (needed when the server holds no data)
    in_channels: int = 0
    image_size: int = 0
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 64
    lr: float = 0.001
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"
    # federation
    mode: str = "federated"
    strategy: str = "fedavg"
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    min_sites: int = 2
    round_timeout: float = 600.0
    evaluate_every: int = 1  # federated evaluation every N rounds (and at the last one)
    proximal_mu: float = 0.01
    server_lr: float = 0.1
    server_momentum: float = 0.9
    trimmed_beta: float = 0.2
    num_malicious: int = 0
    qfedavg_q: float = 0.1
    # outputs
    selection: str = "val-auc"
    out_dir: str = "runs/latest"
    resume: str = ""

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("model", self.model, MODELS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("device", self.device, DEVICES)
        _check_range("num-sites", self.num_sites, 1, 1000)
        _check_range("num-classes", self.num_classes, 0, 100000)
        _check_range("in-channels", self.in_channels, 0, 64)
        _check_range("image-size", self.image_size, 0, 4096)
        _check_range("alpha", self.alpha, 1e-3, 1e6)
        _check_range("local-epochs", self.local_epochs, 0, 1000)
        _check_range("local-steps", self.local_steps, 0, 10**7)
        _check_range("batch-size", self.batch_size, 1, 65536)
        _check_range("lr", self.lr, 1e-8, 10.0)
        _check_range("momentum", self.momentum, 0.0, 1.0)
        _check_range("weight-decay", self.weight_decay, 0.0, 1.0)
        _check_range("num-server-rounds", self.num_server_rounds, 1, 100000)
        _check_range("fraction-train", self.fraction_train, 0.0, 1.0)
        _check_range("min-sites", self.min_sites, 1, 1000)
        _check_range("round-timeout", self.round_timeout, 1.0, 7 * 86400.0)
        _check_range("evaluate-every", self.evaluate_every, 1, 100000)
        _check_range("proximal-mu", self.proximal_mu, 0.0, 100.0)
        _check_range("server-lr", self.server_lr, 1e-8, 100.0)
        _check_range("server-momentum", self.server_momentum, 0.0, 1.0)
        _check_range("trimmed-beta", self.trimmed_beta, 0.0, 0.49)
        _check_range("num-malicious", self.num_malicious, 0, 1000)
        _check_range("qfedavg-q", self.qfedavg_q, 0.0, 100.0)
        if self.local_epochs == 0 and self.local_steps == 0:
            raise ConfigError(
                "local-epochs and local-steps are both 0: set local-epochs >= 1 "
                "or local-steps >= 1 so that sites train"
            )
        if self.dataset == "medmnist" and not self.data_path:
            raise ConfigError(
                "dataset 'medmnist' needs data-path: the path of a MedMNIST .npz file "
                "(e.g. --data ../shared/data/pneumoniamnist/pneumoniamnist.npz)"
            )
        if self.mode == "federated" and self.min_sites > self.num_sites:
            raise ConfigError(
                f"min-sites={self.min_sites} is larger than num-sites={self.num_sites}: "
                "lower min-sites or add sites"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as the flat kebab-case mapping it was parsed from."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> StudyConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} is out of range: allowed {low}..{high}")


def _coerce(key: str, value: Any, target: type) -> Any:
    """Convert a YAML / run-config scalar to the field's type, or raise ConfigError."""
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if target is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if target is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if target is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {target}")  # pragma: no cover


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _parse_dataclass(cls: type, mapping: Mapping[str, Any], what: str) -> Any:
    known = {_key(f.name): f for f in fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown {what} key(s): {', '.join(unknown)}; allowed keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for key, value in mapping.items():
        f = known[key]
        kwargs[f.name] = _coerce(key, value, _TYPES[str(f.type)])
    return cls(**kwargs)


def parse_study_config(mapping: Mapping[str, Any]) -> StudyConfig:
    """Parse a flat kebab-case mapping (run config, YAML, CLI) into a StudyConfig."""
    return _parse_dataclass(StudyConfig, mapping, "study config")


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file holding one flat mapping; errors name the file and the problem."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys to values, got {type(data).__name__}")
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{p}: key {key!r} must be a plain value, not a {type(value).__name__}")
    return {str(k): v for k, v in data.items()}


def load_study_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudyConfig:
    """Load a study YAML, apply overrides (e.g. CLI flags) and validate once."""
    mapping = load_yaml_mapping(path)
    mapping.update(overrides or {})
    try:
        return parse_study_config(mapping)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class SiteConfig:
    """One hospital site, from its ``site.yaml`` or the SuperNode's node config."""

    site_id: str
    data_root: str
    state_dir: str
    dataset: str = "medmnist"  # required in site.yaml: a site never trains on a default
    data_file: str = ""
    task: str = "classification"
    shard_index: int = 0
    shard_count: int = 1
    server: str = "127.0.0.1:9092"
    root_cert: str = ""
    auth_key: str = ""
    clientappio_port: int = 0

    def __post_init__(self) -> None:
        if not self.site_id or not all(c.isalnum() or c in "-_." for c in self.site_id):
            raise ConfigError(
                f"site-id={self.site_id!r} is not allowed: use letters, digits, '-', '_' or '.'"
            )
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("task", self.task, ("classification",))
        _check_range("shard-count", self.shard_count, 1, 10000)
        _check_range("shard-index", self.shard_index, 0, self.shard_count - 1)
        _check_range("clientappio-port", self.clientappio_port, 0, 65535)
        if self.dataset == "medmnist" and not self.data_file:
            raise ConfigError(
                "site dataset 'medmnist' needs data-file: the .npz file relative to data-root"
            )

    def resolve(self, base: Path) -> SiteConfig:
        """Return a copy whose relative paths are resolved against ``base``."""

        def _abs(p: str) -> str:
            return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

        return dataclasses.replace(
            self,
            data_root=_abs(self.data_root),
            state_dir=_abs(self.state_dir),
            root_cert=_abs(self.root_cert),
            auth_key=_abs(self.auth_key),
        )

    @property
    def data_file_path(self) -> Path:
        return Path(self.data_root) / self.data_file

    def to_dict(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self) if f.init}


def parse_site_config(mapping: Mapping[str, Any]) -> SiteConfig:
    """Parse a site mapping (site.yaml or node config)."""
    for required in ("site-id", "data-root", "state-dir", "dataset"):
        if required not in mapping:
            raise ConfigError(f"site config is missing required key {required!r}")
    return _parse_dataclass(SiteConfig, mapping, "site config")


def load_site_config(path: str | Path) -> SiteConfig:
    """Load ``site.yaml``; relative paths are resolved against the file's folder."""
    try:
        cfg = parse_site_config(load_yaml_mapping(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return cfg.resolve(Path(path).resolve().parent)
