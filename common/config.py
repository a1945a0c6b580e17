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
from medfed.common.tasks import CLASSIFIERS, GENERATORS, SEGMENTERS, TASKS, get_task

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
MODELS = CLASSIFIERS + SEGMENTERS + GENERATORS
DATASETS = ("synthetic", "medmnist", "sites", "npz")
SEGMENTATION_DATASETS = ("synthetic", "npz")
PARTITIONS = ("iid", "dirichlet")
OPTIMIZERS = ("sgd", "adam")
MODES = ("federated", "centralized", "local")
SELECTIONS = ("val-auc", "last")
DEVICES = ("auto", "cpu", "cuda")


def kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class StudyConfig:
    """One federated study: data, model, local training, strategy and run outputs."""

    # data
    task: str = "classification"  # classification | segmentation | generation (medfed.common.tasks)
    dataset: str = "synthetic"
    data_path: str = ""
    num_sites: int = 4
    partition: str = "dirichlet"
    alpha: float = 1.0
    seed: int = 0
    # model and local training
    model: str = ""  # "": the task's default (cnn, unet or cgan)
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
    # record-level DP-SGD at every site (epsilon 0: off). A deployed site's own budget wins if lower.
    epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    dp_accountant: str = "rdp"
    max_physical_batch: int = 128
    # central (client-level) DP with Flower's wrapper and accountant (see medfed.server.central_dp)
    central_dp: str = "off"
    central_noise: float = 1.0
    central_clip: float = 1.0
    central_epsilon: float = 0.0  # 0: no cap
    central_delta: float = 1e-5
    # transfer learning (medfed.common.transfer): start from a checkpoint, new head, frozen layers
    initial_weights: str = ""  # a medfed checkpoint or a plain state_dict file ("": from scratch)
    new_head: bool = False  # re-initialise the classifier head even when its shape fits
    freeze: str = ""  # comma-separated parameter-name patterns (fnmatch, e.g. "features.*"); not trained, not sent
    # augmentation (classification): sites add images from a trained conditional GAN to their training data
    augment_model: str = ""  # a medfed generation checkpoint (model.pt of a --task generation study)
    augment_classes: str = ""  # comma-separated class indices to add (e.g. "1")
    augment_count: int = 0  # generated images per class and site
    augment_group: int = -1  # group code of generated images at sites with group codes (-1: none)
    # outputs
    selection: str = "val-auc"
    out_dir: str = "runs/latest"
    resume: str = ""

    def __post_init__(self) -> None:
        check_choice("task", self.task, tuple(TASKS))
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("partition", self.partition, PARTITIONS)
        task = get_task(self.task)
        if not self.model:
            object.__setattr__(self, "model", task.default_model)
        check_choice("model", self.model, MODELS)
        if self.model not in task.models:
            raise ConfigError(
                f"model={self.model!r} is not a {self.task} model: choose one of {', '.join(task.models)}"
            )
        if self.task == "segmentation" and self.dataset not in SEGMENTATION_DATASETS:
            raise ConfigError(
                f"dataset={self.dataset!r} has no masks: segmentation takes dataset synthetic (the "
                "default, generated with masks) or npz (train_images/train_masks/... arrays in data-path)"
            )
        if self.dataset == "npz" and self.task != "segmentation":
            raise ConfigError("dataset 'npz' holds segmentation masks: use it with task segmentation, "
                              "or dataset medmnist for a MedMNIST classification file")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mode", self.mode, MODES)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("device", self.device, DEVICES)
        check_range("num-sites", self.num_sites, 1, 1000)
        check_range("num-classes", self.num_classes, 0, 100000)
        check_range("in-channels", self.in_channels, 0, 64)
        check_range("image-size", self.image_size, 0, 4096)
        check_range("alpha", self.alpha, 1e-3, 1e6)
        check_range("local-epochs", self.local_epochs, 0, 1000)
        check_range("local-steps", self.local_steps, 0, 10**7)
        check_range("batch-size", self.batch_size, 1, 65536)
        check_range("lr", self.lr, 1e-8, 10.0)
        check_range("momentum", self.momentum, 0.0, 1.0)
        check_range("weight-decay", self.weight_decay, 0.0, 1.0)
        check_range("num-server-rounds", self.num_server_rounds, 1, 100000)
        check_range("fraction-train", self.fraction_train, 0.0, 1.0)
        check_range("min-sites", self.min_sites, 1, 1000)
        check_range("round-timeout", self.round_timeout, 1.0, 7 * 86400.0)
        check_range("evaluate-every", self.evaluate_every, 1, 100000)
        check_range("proximal-mu", self.proximal_mu, 0.0, 100.0)
        check_range("server-lr", self.server_lr, 1e-8, 100.0)
        check_range("server-momentum", self.server_momentum, 0.0, 1.0)
        check_range("trimmed-beta", self.trimmed_beta, 0.0, 0.49)
        check_range("num-malicious", self.num_malicious, 0, 1000)
        check_range("qfedavg-q", self.qfedavg_q, 0.0, 100.0)
        check_range("epsilon", self.epsilon, 0.0, 1000.0)
        check_range("delta", self.delta, 1e-12, 0.1)
        check_range("max-grad-norm", self.max_grad_norm, 1e-6, 1e6)
        check_choice("dp-accountant", self.dp_accountant, ("rdp", "prv"))
        check_range("max-physical-batch", self.max_physical_batch, 1, 65536)
        check_choice("central-dp", self.central_dp, ("off", "server-fixed"))
        check_range("central-noise", self.central_noise, 1e-6, 1e4)
        check_range("central-clip", self.central_clip, 1e-9, 1e9)
        check_range("central-epsilon", self.central_epsilon, 0.0, 1e6)
        check_range("central-delta", self.central_delta, 1e-12, 0.1)
        if self.local_epochs == 0 and self.local_steps == 0:
            raise ConfigError(
                "local-epochs and local-steps are both 0: set local-epochs >= 1 "
                "or local-steps >= 1 so that sites train"
            )
        if self.dataset in ("medmnist", "npz") and not self.data_path:
            raise ConfigError(
                "dataset 'medmnist' needs data-path: the path of a MedMNIST .npz file "
                "(e.g. --data ../shared/data/pneumoniamnist/pneumoniamnist.npz)"
            )
        if self.dataset == "sites":
            paths = [p for p in self.data_path.split(",") if p.strip()]
            if len(paths) != self.num_sites:
                raise ConfigError(
                    f"dataset 'sites' needs data-path to list one site.yaml per site, comma-separated: "
                    f"got {len(paths)} path(s) for num-sites={self.num_sites} "
                    "(medfed simulate --site-configs a.yaml,b.yaml sets both)"
                )
        if self.freeze and not self.initial_weights:
            raise ConfigError(f"freeze={self.freeze!r} without initial-weights would freeze random weights: "
                              "give initial-weights (a checkpoint) or leave freeze empty")
        if self.new_head and not self.initial_weights:
            raise ConfigError("new-head needs initial-weights: a fresh model's head is new anyway")
        if self.augment_model and (self.task != "classification" or not self.augment_classes or self.augment_count < 1):
            raise ConfigError("augment-model adds generated images to classification training data: set task "
                              "classification, augment-classes (e.g. 1) and augment-count >= 1")
        if self.augment_classes and not all(c.strip().isdigit() for c in self.augment_classes.split(",")):
            raise ConfigError(f"augment-classes={self.augment_classes!r} must be comma-separated class indices")
        check_range("augment-count", self.augment_count, 0, 10**6)
        if self.mode == "federated" and self.min_sites > self.num_sites:
            raise ConfigError(
                f"min-sites={self.min_sites} is larger than num-sites={self.num_sites}: "
                "lower min-sites or add sites"
            )

    @property
    def freeze_patterns(self) -> tuple[str, ...]:
        """The ``freeze`` patterns as a tuple (the run config carries one comma-separated string)."""
        return tuple(p.strip() for p in self.freeze.split(",") if p.strip())

    def to_dict(self) -> dict[str, Any]:
        """Return the config as the flat kebab-case mapping it was parsed from."""
        return {kebab(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> StudyConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")


def check_range(key: str, value: float, low: float, high: float) -> None:
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
    if target is tuple:  # a YAML list or a comma-separated string (node config values are scalars)
        return _coerce_items(key, value)
    raise ConfigError(f"{key}: unsupported type {target}")  # pragma: no cover


def _coerce_items(key: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise ConfigError(f"{key}={value!r} must be a list of plain values (or a comma-separated string)")


def _coerce_typed(key: str, value: Any, type_name: str) -> Any:
    """Coerce ``value`` to a field annotated ``type_name`` (a string under postponed annotations)."""
    if type_name in _TYPES:
        return _coerce(key, value, _TYPES[type_name])
    if type_name == "float | None":
        return None if value is None else _coerce(key, value, float)
    if type_name in ("tuple[str, ...]", "tuple[float, ...]"):
        items = _coerce(key, value, tuple)
        item_type = str if type_name == "tuple[str, ...]" else float
        try:
            return tuple(item_type(v) for v in items)
        except ValueError as exc:
            raise ConfigError(f"{key}={value!r}: every item must be a number") from exc
    raise ConfigError(f"{key}: unsupported type {type_name}")  # pragma: no cover


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def parse_dataclass(cls: type, mapping: Mapping[str, Any], what: str) -> Any:
    known = {kebab(f.name): f for f in fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown {what} key(s): {', '.join(unknown)}; allowed keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for key, value in mapping.items():
        f = known[key]
        kwargs[f.name] = _coerce_typed(key, value, str(f.type))
    return cls(**kwargs)


def parse_study_config(mapping: Mapping[str, Any]) -> StudyConfig:
    """Parse a flat kebab-case mapping (run config, YAML, CLI) into a StudyConfig."""
    return parse_dataclass(StudyConfig, mapping, "study config")


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
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
        ):
            raise ConfigError(
                f"{p}: key {key!r} must be a plain value or a list of plain values, "
                f"not a nested {type(value).__name__}"
            )
    return {str(k): v for k, v in data.items()}


def load_study_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudyConfig:
    """Load a study YAML, apply overrides (e.g. CLI flags) and validate once."""
    mapping = load_yaml_mapping(path)
    mapping.update(overrides or {})
    try:
        return parse_study_config(mapping)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


