"""Strategy registry: names map to Flower's own Message-API strategies, plus FedBN.

A name in the config selects a class from this fixed table; nothing is imported by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)
from medfed.common.config import StudyConfig
from medfed.common.constants import ConfigKey, MetricKey


class FedBN(FedAvg):
    """FedBN (Li et al., ICLR 2021): normalisation layers stay at each site.

    Sites keep their own normalisation parameters on disk and send only the other
    parameters; this strategy averages what it receives and keeps its previous values
    for the rest, which therefore never leave a site. Only ``configure_*`` (to tell the
    sites) and ``aggregate_train`` (to merge) are overridden.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._current: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays
        config[ConfigKey.FEDBN.value] = True
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[ConfigKey.FEDBN.value] = True
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        shared, metrics = super().aggregate_train(server_round, replies)
        if shared is None or self._current is None:
            return shared, metrics
        merged = ArrayRecord(
            {k: (shared[k] if k in shared else Array(np.array(v.numpy()))) for k, v in self._current.items()}
        )
        return merged, metrics


def keep_dtypes(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the dtypes of the global model ``reference`` (integers rounded).

    The study loop applies it to every aggregate. Flower 1.41's q-FedAvg returns float64 for
    a float32 model (it divides by a Python float), and its median, trimmed-mean, Krum and
    Bulyan return float64 for integer arrays (BatchNorm's ``num_batches_tracked``); every
    site would refuse either.
    """
    out = {}
    for key, arr in arrays.items():
        value = arr.numpy()
        dtype = reference[key].numpy().dtype if key in reference else value.dtype
        if value.dtype != dtype:
            value = np.rint(value) if np.issubdtype(dtype, np.integer) else value
            arr = Array(np.asarray(value, dtype=dtype))
        out[key] = arr
    return ArrayRecord(out)


_Builder = Callable[[StudyConfig, dict], Strategy]

_REGISTRY: dict[str, _Builder] = {
    "fedavg": lambda c, kw: FedAvg(**kw),
    "fedprox": lambda c, kw: FedProx(proximal_mu=c.proximal_mu, **kw),
    "fedadam": lambda c, kw: FedAdam(eta=c.server_lr, eta_l=c.lr, tau=c.server_tau, **kw),
    "fedyogi": lambda c, kw: FedYogi(eta=c.server_lr, eta_l=c.lr, tau=c.server_tau, **kw),
    "fedadagrad": lambda c, kw: FedAdagrad(eta=c.server_lr, eta_l=c.lr, tau=c.server_tau, **kw),
    "fedavgm": lambda c, kw: FedAvgM(server_learning_rate=1.0, server_momentum=c.server_momentum, **kw),
    "fedmedian": lambda c, kw: FedMedian(**kw),
    "fedtrimmedavg": lambda c, kw: FedTrimmedAvg(beta=c.trimmed_beta, **kw),
    "krum": lambda c, kw: Krum(num_malicious_nodes=c.num_malicious, **kw),
    "multikrum": lambda c, kw: MultiKrum(num_malicious_nodes=c.num_malicious, **kw),
    "bulyan": lambda c, kw: Bulyan(num_malicious_nodes=c.num_malicious, **kw),
    # Sites' train-loss (the mean over the round's local steps) stands in for the loss at the round's start.
    "qfedavg": lambda c, kw: QFedAvg(
        client_learning_rate=c.lr, q=c.qfedavg_q, train_loss_key=MetricKey.TRAIN_LOSS.value, **kw
    ),
    "fedbn": lambda c, kw: FedBN(**kw),
}

# Attributes of Flower's strategies that carry state across rounds (server optimiser
# moments, momentum); saved in checkpoints so a resumed run continues exactly.
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def build_strategy(cfg: StudyConfig, num_sites: int) -> Strategy:
    """The configured strategy; sampling fractions and minimums come from the study."""
    min_nodes = min(cfg.min_sites, num_sites)
    kwargs = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,  # every site evaluates: per-site metrics are the point
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
        "weighted_by_key": MetricKey.NUM_EXAMPLES.value,
    }
    if cfg.central_dp != "off":
        from medfed.server.central_dp import wrap_central_dp

        return wrap_central_dp(cfg, num_sites, kwargs)
    return _REGISTRY[cfg.strategy](cfg, kwargs)


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's cross-round state as plain arrays (for checkpoints)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in STATEFUL_ATTRIBUTES:
        value = getattr(strategy, name, None)
        if value is None:
            continue
        if isinstance(value, dict):
            out[name] = {str(k): np.asarray(v) for k, v in value.items()}
        elif isinstance(value, list):
            out[name] = {str(i): np.asarray(v) for i, v in enumerate(value)}
    return out


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    for name, arrays in state.items():
        if name not in STATEFUL_ATTRIBUTES:
            raise ValueError(f"checkpoint carries unknown strategy state {name!r}")
        if name == "momentum_vector":
            setattr(strategy, name, [np.asarray(arrays[str(i)]) for i in range(len(arrays))])
        else:
            setattr(strategy, name, {k: np.asarray(v) for k, v in arrays.items()})
