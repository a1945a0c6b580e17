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
from medfed.common.tasks import CLASSIFIERS, GENERATORS, SEGMENTERS, TABULAR, TASKS, get_task

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
DATASETS = ("synthetic", "medmnist", "sites", "npz", "uci-heart", "site-data")
SITE_DATA = "site-data"
"""Deployment: each site trains on its own data (its site.yaml); the sites describe its shape to the server."""
FEATURE_SCALINGS = ("federated", "site")  # tabular z-scores: pooled training statistics, or each site's own
TABULAR_DATASETS = ("uci-heart",)  # feature vectors: tabular models only (medfed.common.tabular)
UCI_HEART_SITES = 4  # its real hospitals: Cleveland, Hungary, Switzerland, VA Long Beach
SEGMENTATION_DATASETS = ("synthetic", "npz", SITE_DATA)
PARTITIONS = ("iid", "dirichlet", "quantity", "demographic", "natural")  # medfed.common.data.partition
SHIFTS = ("none", "scanner")  # medfed.common.data.shift
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
    quantity_exponent: float = 1.0  # partition quantity: site k holds (k+1)**-exponent of the data
    min_site_size: int = 2  # fewest training samples per simulated site (val and test: 2)
    group_proportions: str = ""  # partition demographic: fraction of group code 1 per site, e.g. "0.8,0.2"
    feature_scaling: str = "federated"  # uci-heart: z-scores from all sites' pooled statistics, or "site"
    group_contrast: str = ""  # synthetic: lesion contrast per group code, e.g. "0.4,1" (an injected bias)
    group_attribute: str = ""  # deployment: the group attribute's name (e.g. sex), for reports
    group_names: str = ""  # deployment: the names of group codes 0, 1, ... (e.g. "female,male")
    shift: str = "none"  # scanner: per-site MONAI intensity/noise/blur/resolution transforms
    shift_strength: float = 1.0  # 0: identical scanners, 1: default, 2: strong
    seed: int = 0
    # model and local training
    model: str = ""  # "": the task's default (cnn, unet or cgan)
    num_classes: int = 0  # 0: taken from the data (needed when the server holds no data)
    in_channels: int = 0
    image_size: int = 0
    spatial_dims: int = 0  # 0: from the data (2); 3: volumes (segmentation only)
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
    max_reply_mb: float = 512.0  # larger site replies are refused (server/limits.py)
    node_wait_timeout: float = 300.0  # before each round: wait at most this long for min-sites sites
    max_failed_rounds: int = 3  # stop after this many rounds in a row with fewer than min-sites trained
    # deployment: once half of the sites answered a phase, wait at most straggler-factor x their median
    # time (at least straggler-floor s): a dead site costs seconds, not Flower's minute (0: off)
    straggler_factor: float = 3.0
    straggler_floor: float = 10.0
    evaluate_every: int = 1  # federated evaluation every N rounds (and at the last one)
    # the sites evaluate round r's model inside round r+1's train message: one message per round
    # (the last round and the final model are evaluated by their own message; needs fraction-train 1)
    fused_evaluation: bool = True
    proximal_mu: float = 0.01
    server_lr: float = 0.1
    server_momentum: float = 0.9
    server_tau: float = 1e-3  # FedAdam/FedYogi/FedAdagrad: adaptivity (Reddi et al. 2021's tau)
    trimmed_beta: float = 0.2
    num_malicious: int = 0
    # reject a site's update whose L2 distance to the global model exceeds this multiple of the round's
    # median (server.replies; 0: off; needs >= 3 valid replies)
    max_update_norm_ratio: float = 10.0
    # a site's FedAvg weight (num-examples) above this multiple of the round's median is capped to it
    # (server.replies.cap_weights; 0: off), so one site cannot outweigh the others by claiming a huge dataset
    max_site_weight_ratio: float = 10.0
    # splits with fewer samples send no metrics or histograms (per-patient values would show);
    # a deployed site's own min-eval-n (site.yaml) wins over this one
    min_eval_n: int = 20
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
    # group-aware training (classification): weight each training image by 1 / frequency of its
    # (group, label) cell at the site, normalised to mean 1 (medfed.common.training.group_weights)
    group_reweight: bool = False
    # trust toolkit (classification): saliency aggregates, a planted shortcut, attacks, adversarial training
    explain_metrics: bool = False  # sites send saliency aggregates (medfed.common.explain.metrics) in the final evaluation
    explain_every: bool = False  # ... and in every federated evaluation (evaluate-every)
    explain_band: float = 0.1  # border band: this share of the side on each side
    explain_method: str = "gradxinput"  # gradxinput, gradcampp or gradcam (medfed.common.explain.saliency)
    shortcut_site: int = -1  # simulation: a bright bar near the border of site K's positive images (-1: none)
    shortcut_strength: float = 1.0  # the bar's blend into the image, 0..1 (1: white)
    robustness_eval: str = ""  # comma-separated attacks (fgsm,pgd) each site runs on the final model, test split
    robustness_eps: str = "0.5,1,2,4,8"  # attack radii in units of 1/255 (L-infinity, [0, 1] intensities)
    robustness_steps: int = 10  # PGD steps of the evaluation
    adv_train: str = "none"  # pgd: Madry PGD adversarial training at the sites, in the shared loop
    adv_eps: float = 2.0  # its radius in units of 1/255
    adv_steps: int = 3  # its PGD steps
    adv_ratio: float = 0.5  # share of each batch replaced by adversarial examples
    # simulation engine (medfed.simulations.engine): where the sites run and what each gets
    ray_address: str = ""  # "": start a local Ray instance; "auto" or HOST:PORT: connect to a running cluster
    site_cpus: float = 0.0  # CPUs per ClientApp actor (0: min(2, cores)); actors = cluster CPUs / site-cpus
    site_gpus: float = -1.0  # GPU share per actor (-1: 1/min(sites, 4) when CUDA is present, else 0)
    site_shards: str = ""  # set by the engine for its ClientApps: per-site array files (medfed.common.data.shards)
    # outputs
    selection: str = "val-auc"
    out_dir: str = "runs/latest"
    resume: str = ""

    def __post_init__(self) -> None:
        check_choice("task", self.task, tuple(TASKS))
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("partition", self.partition, PARTITIONS)
        _check_partition(self)
        task = get_task(self.task)
        if not self.model:
            tabular = self.dataset in TABULAR_DATASETS and self.task == "classification"
            object.__setattr__(self, "model", TABULAR[0] if tabular else task.default_model)
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
        _check_tabular(self)
        _check_engine(self)
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
        if self.spatial_dims not in (0, 2, 3):
            raise ConfigError(f"spatial-dims={self.spatial_dims} is not allowed: choose 0 (from the data), "
                              "2 (images) or 3 (volumes)")
        if self.spatial_dims == 3 and self.task != "segmentation":
            raise ConfigError(f"spatial-dims 3 (volumes) is for segmentation only, not task {self.task!r}: "
                              "set task segmentation, or leave spatial-dims at 0")
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
        check_range("max-reply-mb", self.max_reply_mb, 1.0, 65536.0)
        check_range("node-wait-timeout", self.node_wait_timeout, 0.0, 7 * 86400.0)
        check_range("max-failed-rounds", self.max_failed_rounds, 1, 100000)
        check_range("straggler-factor", self.straggler_factor, 0.0, 1000.0)
        check_range("straggler-floor", self.straggler_floor, 0.0, 7 * 86400.0)
        check_range("evaluate-every", self.evaluate_every, 1, 100000)
        check_range("proximal-mu", self.proximal_mu, 0.0, 100.0)
        check_range("server-lr", self.server_lr, 1e-8, 100.0)
        check_range("server-momentum", self.server_momentum, 0.0, 1.0)
        check_range("server-tau", self.server_tau, 1e-12, 1.0)
        check_range("trimmed-beta", self.trimmed_beta, 0.0, 0.49)
        check_range("num-malicious", self.num_malicious, 0, 1000)
        check_range("max-update-norm-ratio", self.max_update_norm_ratio, 0.0, 1e6)
        if 0.0 < self.max_update_norm_ratio < 1.0:
            raise ConfigError(f"max-update-norm-ratio={self.max_update_norm_ratio} would exclude sites at or below "
                              "the median update norm: use 0 (off) or a ratio >= 1 (default 10)")
        check_range("max-site-weight-ratio", self.max_site_weight_ratio, 0.0, 1e6)
        if 0.0 < self.max_site_weight_ratio < 1.0:
            raise ConfigError(f"max-site-weight-ratio={self.max_site_weight_ratio} would cap sites at or below the "
                              "median weight: use 0 (off) or a ratio >= 1 (default 10)")
        check_range("min-eval-n", self.min_eval_n, 1, 10**7)
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
        if self.strategy == "qfedavg" and self.epsilon > 0:
            raise ConfigError("strategy qfedavg weights sites by their training loss, which DP sites do not send "
                              "(the accountant does not cover it): use another strategy with epsilon, or epsilon 0")
        if self.group_reweight and self.epsilon > 0:
            raise ConfigError("group-reweight weights each image by its (group, label) frequency over the whole site, "
                              "a data-dependent weight DP-SGD's accounting does not cover: use group-reweight false "
                              "with epsilon, or epsilon 0")
        if self.group_reweight and self.task != "classification":
            raise ConfigError(f"group-reweight weights a classification loss by group, not a {self.task} loss: "
                              "set task classification or group-reweight false")
        _check_trust(self)
        if self.mode == "federated" and self.min_sites > self.num_sites:
            raise ConfigError(
                f"min-sites={self.min_sites} is larger than num-sites={self.num_sites}: "
                "lower min-sites or add sites"
            )

    @property
    def group_fractions(self) -> tuple[float, ...]:
        """``group-proportions`` as numbers (the run config carries one comma-separated string)."""
        return _fractions(self.group_proportions)

    @property
    def group_contrasts(self) -> tuple[float, ...]:
        """``group-contrast`` as numbers: () means every group's lesions at full contrast."""
        try:
            values = tuple(float(v) for v in self.group_contrast.split(",") if v.strip())
        except ValueError:
            values = (float("nan"),)
        return values

    @property
    def robustness_attacks(self) -> tuple[str, ...]:
        """``robustness-eval`` as a tuple of attack names (() when off)."""
        return tuple(a.strip() for a in self.robustness_eval.split(",") if a.strip())

    @property
    def robustness_radii(self) -> tuple[tuple[str, float], ...]:
        """``robustness-eps`` as (the text given, the radius on the [0, 1] scale) pairs."""
        return _radii(self.robustness_eps)

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


ADV_TRAIN = ("none", "pgd")
EXPLAIN_METHODS = ("gradxinput", "gradcampp", "gradcam")  # occlusion costs a forward pass per occluded patch: CLI only
EPS_UNIT = 255.0  # radii in config and on the command line are in 1/255 units of the [0, 1] intensity scale


def _radii(text: str) -> tuple[tuple[str, float], ...]:
    from medfed.common.robustness.keys import MAX_EPS, parse_radii

    radii = tuple(parse_radii(text, EPS_UNIT, "robustness-eps"))
    if len(radii) > MAX_EPS:
        raise ConfigError(f"robustness-eps={text!r} lists {len(radii)} radii: give at most {MAX_EPS}, e.g. 0.5,1,2,4,8")
    return radii


def _check_trust(cfg: StudyConfig) -> None:
    """Keys of the trust toolkit: saliency aggregates, planted shortcut, robustness evaluation, adversarial training."""
    from medfed.common.robustness.keys import ROBUST_ATTACKS

    check_range("explain-band", cfg.explain_band, 1e-3, 0.49)
    check_choice("explain-method", cfg.explain_method, EXPLAIN_METHODS)
    check_range("shortcut-strength", cfg.shortcut_strength, 0.0, 1.0)
    check_range("robustness-steps", cfg.robustness_steps, 1, 1000)
    check_choice("adv-train", cfg.adv_train, ADV_TRAIN)
    check_range("adv-eps", cfg.adv_eps, 1e-6, EPS_UNIT)
    check_range("adv-steps", cfg.adv_steps, 1, 100)
    check_range("adv-ratio", cfg.adv_ratio, 1e-6, 1.0)
    for attack in cfg.robustness_attacks:
        check_choice("robustness-eval", attack, ROBUST_ATTACKS)
    _radii(cfg.robustness_eps)
    image_classifier = cfg.task == "classification" and cfg.model not in TABULAR
    for key, on in (("explain-metrics", cfg.explain_metrics or cfg.explain_every),
                    ("robustness-eval", bool(cfg.robustness_attacks)), ("adv-train", cfg.adv_train != "none"),
                    ("shortcut-site", cfg.shortcut_site >= 0)):
        if on and not image_classifier:
            raise ConfigError(f"{key} needs an image classifier (task classification, model cnn, cnn-dp, "
                              f"densenet121 or resnet18), not task {cfg.task!r} / model {cfg.model!r}: leave it off")
    if cfg.shortcut_site >= 0 and (cfg.dataset not in ("synthetic", "medmnist") or cfg.shortcut_site >= cfg.num_sites):
        raise ConfigError(f"shortcut-site={cfg.shortcut_site} plants a marker in one simulated site of a dataset "
                          f"split into sites (synthetic or medmnist): give a site index 0..{cfg.num_sites - 1} "
                          f"of such a study (dataset {cfg.dataset!r}), or -1 for none")
    if cfg.shortcut_site < -1:
        raise ConfigError(f"shortcut-site={cfg.shortcut_site}: give a site index >= 0, or -1 for none")


def _check_engine(cfg: StudyConfig) -> None:
    """Keys of the simulation engine: the Ray cluster to use and the resources of one site."""
    check_range("site-cpus", cfg.site_cpus, 0.0, 1024.0)
    if cfg.site_gpus != -1.0 and not 0.0 <= cfg.site_gpus <= 64.0:
        raise ConfigError(f"site-gpus={cfg.site_gpus} is out of range: give a GPU share per site in 0..64 "
                          "(e.g. 0.25: four sites per GPU), or -1 for the default")
    address = cfg.ray_address
    if address in ("", "auto"):
        return
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"ray-address={address!r} is not allowed: give \"\" (start a local Ray instance), \"auto\" (the "
            "cluster this machine joined with 'ray start') or the cluster's GCS address HOST:PORT, as "
            "'ray start --head' prints it (Ray Client addresses ray://... are not supported)"
        )


def _check_tabular(cfg: StudyConfig) -> None:
    """Tabular datasets take tabular models and vice versa; UCI Heart is its four hospitals."""
    if cfg.dataset in TABULAR_DATASETS and cfg.model not in TABULAR:
        raise ConfigError(f"dataset {cfg.dataset!r} holds feature vectors, not images: use a tabular model "
                          f"({', '.join(TABULAR)}), not {cfg.model!r}")
    if cfg.model in TABULAR and cfg.dataset not in TABULAR_DATASETS:
        raise ConfigError(f"model {cfg.model!r} reads feature vectors: use it with a tabular dataset "
                          f"({', '.join(TABULAR_DATASETS)}), or an image model (cnn) with {cfg.dataset!r}")
    if cfg.dataset == "uci-heart":
        if not cfg.data_path:
            raise ConfigError("dataset 'uci-heart' needs data-path: the folder of the UCI processed.*.data files "
                              "(e.g. --data ../shared/data/uci_heart_disease)")
        if cfg.partition != "natural":
            raise ConfigError(f"dataset 'uci-heart' is split by its real hospitals, not {cfg.partition!r}: "
                              "set partition natural (--partition natural)")
        if cfg.num_sites != UCI_HEART_SITES:
            raise ConfigError(f"dataset 'uci-heart' has {UCI_HEART_SITES} hospitals but num-sites={cfg.num_sites}: "
                              f"set num-sites {UCI_HEART_SITES} (the default)")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = (float("nan"),)
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"group-proportions={text!r} must be comma-separated fractions in 0..1, "
                          "one per site (e.g. 0.8,0.2: site-0 80% group 1, site-1 20%)")
    return values


def _check_partition(cfg: StudyConfig) -> None:
    """Keys of the partition schemes (medfed.common.data.partition) and of acquisition shift."""
    check_choice("shift", cfg.shift, SHIFTS)
    check_range("quantity-exponent", cfg.quantity_exponent, 0.0, 10.0)
    check_range("min-site-size", cfg.min_site_size, 1, 10**6)
    check_range("shift-strength", cfg.shift_strength, 0.0, 3.0)
    fractions = cfg.group_fractions
    if fractions and cfg.partition != "demographic":
        raise ConfigError(f"group-proportions={cfg.group_proportions!r} is used by partition demographic only: "
                          f"set partition demographic, or leave group-proportions empty")
    if fractions and len(fractions) != cfg.num_sites:
        raise ConfigError(f"group-proportions gives {len(fractions)} fraction(s) for num-sites={cfg.num_sites}: "
                          "give one fraction of group 1 per site, or leave it empty for a default spread")
    names = [n.strip() for n in cfg.group_names.split(",")] if cfg.group_names else []
    if bool(cfg.group_attribute) != bool(names) or any(not n for n in names) or len(names) > 8 \
            or len(set(names)) != len(names):
        raise ConfigError(f"group-attribute={cfg.group_attribute!r} and group-names={cfg.group_names!r}: give both "
                          "or neither, as the attribute's name and 1-8 distinct names of codes 0, 1, ... "
                          "(e.g. sex and female,male)")
    check_choice("feature-scaling", cfg.feature_scaling, FEATURE_SCALINGS)
    contrasts = cfg.group_contrasts
    if contrasts and (len(contrasts) != 2 or not all(0.0 <= c <= 2.0 for c in contrasts)):
        raise ConfigError(f"group-contrast={cfg.group_contrast!r} must be two numbers in 0..2, the lesion contrast "
                          "of group 0 and group 1 (synthetic sex: female, male), e.g. 0.4,1")
    if contrasts and (cfg.dataset != "synthetic" or cfg.task != "classification"):
        raise ConfigError(f"group-contrast injects a bias into generated images: it needs dataset synthetic and "
                          f"task classification, not {cfg.dataset!r} / {cfg.task!r}; leave it empty")
    if cfg.shift != "none" and (cfg.dataset not in ("synthetic", "medmnist") or cfg.task == "segmentation"):
        raise ConfigError(f"shift={cfg.shift!r} simulates scanners on sites split from one image dataset "
                          f"(synthetic or medmnist, classification), not dataset {cfg.dataset!r} / task "
                          f"{cfg.task!r}: set shift none")


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


