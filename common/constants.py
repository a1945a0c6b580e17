"""Record, config and metric keys exchanged between the ServerApp and the ClientApp.

One place for every key: handlers and the server loop import these, never literals.
"""

from __future__ import annotations

from enum import Enum


class RecordKey(str, Enum):
    """Top-level keys of a Message's RecordDict."""

    ARRAYS = "arrays"
    CONFIG = "config"
    METRICS = "metrics"
    SITE = "site"
    FACTS = "facts"  # a site's answer to the describe query: non-identifying facts of its data
    EVALUATION = "evaluation"  # in a train reply: the site's evaluation of the model it received (fused round)


class QueryKind(str, Enum):
    """What a ``query`` message asks a site (``ConfigKey.QUERY``)."""

    DESCRIBE = "describe"  # the shape of the site's data: classes, channels, image size, label names


class ConfigKey(str, Enum):
    """Keys of the ConfigRecord the server sends with each message."""

    SERVER_ROUND = "server-round"  # set by Flower's strategies
    PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
    LOCAL_EPOCHS = "local-epochs"
    LOCAL_STEPS = "local-steps"
    LR = "lr"
    FEDBN = "fedbn"
    RUN_SEED = "seed"
    CENTRAL_DP = "central-dp"  # sites send a unit weight (Flower's DP accounting needs equal weights)
    THRESHOLD = "threshold"  # binary decision threshold the sites apply (0.5 when absent)
    QUERY = "query"  # a query message's kind (QueryKind)
    # on a train message: evaluate the received model (val and test) before training and send both
    # results in one reply, so an evaluated round costs one message (server/federation.py)
    EVALUATE_RECEIVED = "evaluate-received"
    # on the final evaluation of the reported model: sites add what the study asks of it only
    # (explain-metrics' saliency aggregates, robustness-eval's attacks)
    FINAL_EVALUATION = "final-evaluation"


class FactKey(str, Enum):
    """Keys of the ConfigRecord a site sends in answer to the describe query (RecordKey.FACTS)."""

    TASK = "task"
    SOURCE = "source"  # the kind of data the site serves: synthetic, medmnist, manifest, dicom, partition
    NUM_CLASSES = "num-classes"
    IN_CHANNELS = "in-channels"
    IMAGE_SIZE = "image-size"
    SPATIAL_DIMS = "spatial-dims"
    LABEL_NAMES = "label-names"
    GROUP_ATTRIBUTE = "group-attribute"  # "" when the site's data has no group codes
    GROUP_NAMES = "group-names"


class SiteKey(str, Enum):
    """Keys of the ConfigRecord a site attaches to its reply."""

    SITE_ID = "site-id"
    STATUS = "status"
    AUDIT_HEAD = "audit-head"  # the site audit trail's last hash: the server logs it as an anchor


class NodeConfigKey(str, Enum):
    """Keys of a deployed SuperNode's node config (set by ``medfed site start``)."""

    SITE_ID = "site-id"
    DATA_ROOT = "data-root"
    SITE_CONFIG = "site-config"
    STATE_DIR = "state-dir"
    # Set by Flower's simulation engine instead:
    PARTITION_ID = "partition-id"
    NUM_PARTITIONS = "num-partitions"
    # Set by medfed's simulation engine in the ServerApp's node config: the server may hold the
    # study's data (it partitioned it). Without it the ServerApp is deployed and holds none.
    SIMULATION = "medfed-simulation"


class MetricKey(str, Enum):
    """Metric names in replies and run outputs."""

    NUM_EXAMPLES = "num-examples"  # FedAvg weight: training samples, never batches
    UNIT_WEIGHT = "unit-weight"  # the weight under central DP: 1 for every site
    TRAIN_LOSS = "train-loss"
    TRAIN_STEPS = "train-steps"
    TRAIN_SECONDS = "train-s"
    LOSS = "loss"
    AUC = "auc"
    ACCURACY = "accuracy"
    BALANCED_ACCURACY = "balanced-accuracy"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    DICE = "dice"  # segmentation: mean per-image Dice over foreground classes
    HD95 = "hd95"  # segmentation: mean per-image 95th-percentile Hausdorff distance (pixels)
    HD95_COUNT = "hd95-count"  # images with a finite HD95 (both masks non-empty)
    D_LOSS = "d-loss"  # generation: the discriminator's loss on real images and as many fakes
    D_ACCURACY = "d-accuracy"  # generation: mean of its real-as-real and fake-as-fake rates
    VAL_HIST_POS = "val-hist-pos"
    VAL_HIST_NEG = "val-hist-neg"
    TEST_HIST_POS = "test-hist-pos"  # test score histograms: the server pools a deployed study's test metrics
    TEST_HIST_NEG = "test-hist-neg"
    TEST_EXAMPLES = "test-num-examples"  # test samples a site evaluated (the weight of its test metrics)
    # record-level DP at the site (see medfed.common.dp)
    EPSILON = "epsilon"  # ε spent so far by the site, over every study its ledger has seen
    DELTA = "delta"
    EPSILON_BUDGET = "epsilon-budget"
    NOISE_MULTIPLIER = "noise-multiplier"
    DP_ACCOUNTANT = "dp-accountant"  # index into medfed.common.dp.accounting.ACCOUNTANTS (0 rdp, 1 prv)


NUM_HIST_BINS = 100
"""Score-histogram bins a site sends for pooled validation AUC and threshold choice."""

SPLITS = ("val", "test")
"""Splits a site evaluates the global model on; never the training split."""

BUDGET_EXHAUSTED = "privacy budget exhausted"
"""Phrase in a site's error reply when a round would exceed its privacy budget (the server stops on it)."""

DP_METRICS = (
    MetricKey.EPSILON, MetricKey.DELTA, MetricKey.EPSILON_BUDGET, MetricKey.NOISE_MULTIPLIER,
    MetricKey.DP_ACCOUNTANT,
)
"""Privacy metrics a DP site reports with every training reply."""

MAX_GROUPS = 8
"""Group codes 0..MAX_GROUPS-1 a site reports per-group aggregates for (see medfed.common.fairness)."""

MIN_GROUP_SAMPLES = 5
"""k-anonymity: a site sends no per-group aggregates for a group with fewer samples in a split."""

GROUP_COUNT_NAMES = ("tp", "fp", "tn", "fn")
"""Per-group confusion counts at the decision threshold (binary classification)."""
GROUP_SUPPRESSED = "suppressed"  # 1.0: the group is present at the site but too small to report
GROUP_HIST_POS = "hist-pos"  # per-group score histograms, NUM_HIST_BINS bins
GROUP_HIST_NEG = "hist-neg"


def group_metric_key(split: str, group: int, name: str) -> str:
    """Reply key of one per-group aggregate, e.g. ``test-g1-tp`` or ``val-g0-hist-pos``."""
    return f"{split}-g{group}-{name}"


GROUP_SCALAR_KEYS = frozenset(
    group_metric_key(s, k, n) for s in SPLITS for k in range(MAX_GROUPS) for n in (*GROUP_COUNT_NAMES, GROUP_SUPPRESSED)
)
GROUP_HISTOGRAM_KEYS = frozenset(
    group_metric_key(s, k, n) for s in SPLITS for k in range(MAX_GROUPS) for n in (GROUP_HIST_POS, GROUP_HIST_NEG)
)
"""Every per-group key a site may send; only the histogram keys are lists (of NUM_HIST_BINS counts)."""

# --- interpretability aggregates (medfed.common.explain.metrics): saliency mass shares, never a per-image map
EXPLAIN_GRID = 8
"""Side of the coarse mean saliency map a site sends per class (8x8 in 2D; 4x4x4 in 3D: 64 cells either way)."""
EXPLAIN_CELLS = 64
MAX_EXPLAIN_CLASSES = 8
"""Classes 0..MAX_EXPLAIN_CLASSES-1 a site sends a coarse map for."""
EXPLAIN_N = "explain-n"  # images whose saliency entered the aggregates
EXPLAIN_BORDER = "explain-border"  # mean share of saliency mass in the outer band of the image
EXPLAIN_BORDER_SD = "explain-border-sd"  # its standard deviation over the images (for the server's outlier rule)
EXPLAIN_MASK = "explain-mask"  # mean share of saliency mass inside the image's mask (energy pointing game)
EXPLAIN_MASK_N = "explain-mask-n"  # images with a non-empty mask
EXPLAIN_MAP = "explain-map"  # a class's coarse mean saliency map: EXPLAIN_CELLS shares adding up to 1


def explain_class_key(split: str, cls: int, name: str) -> str:
    """Reply key of one class's explain aggregate, e.g. ``test-c1-explain-border`` or ``test-c1-explain-map``."""
    return f"{split}-c{cls}-{name}"


_SPLIT_NAMES = (EXPLAIN_N, EXPLAIN_BORDER, EXPLAIN_BORDER_SD, EXPLAIN_MASK, EXPLAIN_MASK_N)
EXPLAIN_SPLIT_KEYS = frozenset(f"{s}-{n}" for s in SPLITS for n in _SPLIT_NAMES)
EXPLAIN_CLASS_KEYS = frozenset(explain_class_key(s, c, n) for s in SPLITS for c in range(MAX_EXPLAIN_CLASSES)
                               for n in (EXPLAIN_N, EXPLAIN_BORDER, EXPLAIN_BORDER_SD))
EXPLAIN_MAP_KEYS = frozenset(explain_class_key(s, c, EXPLAIN_MAP) for s in SPLITS for c in range(MAX_EXPLAIN_CLASSES))
EXPLAIN_GROUP_KEYS = frozenset(group_metric_key(s, g, n) for s in SPLITS for g in range(MAX_GROUPS)
                               for n in (EXPLAIN_N, EXPLAIN_BORDER))
EXPLAIN_SCALAR_KEYS = EXPLAIN_SPLIT_KEYS | EXPLAIN_CLASS_KEYS | EXPLAIN_GROUP_KEYS
EXPLAIN_COUNT_KEYS = frozenset(k for k in EXPLAIN_SCALAR_KEYS if k.endswith(f"-{EXPLAIN_N}") or k.endswith(EXPLAIN_MASK_N))
"""Explain counts: whole numbers of images, each at least MIN_GROUP_SAMPLES (k-anonymity)."""
EXPLAIN_SHARE_KEYS = EXPLAIN_SCALAR_KEYS - EXPLAIN_COUNT_KEYS
"""Explain values that are shares (or a share's spread): numbers in 0..1."""
