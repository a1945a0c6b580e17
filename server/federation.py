"""The federated study loop, run by the ServerApp in simulation and in deployment alike.

Each round calls the Flower strategy's own ``configure_train``/``aggregate_train`` and
``configure_evaluate`` hooks; around them this loop screens replies, keeps per-site
metrics, pools validation histograms to choose the reported round and threshold,
evaluates the global model centrally when the server has test data (simulation, or a file
a deployed server really holds) and otherwise pools the sites' test metrics, and writes a
checkpoint and a metrics line after every round so ``--resume`` continues exactly.

A deployed study first asks the sites to describe their data (:mod:`.describe`): the model's
shape comes from them. Only rounds whose aggregate changed the global model are evaluated and
may be selected; a study in which none was applied fails with nothing to report, one cut short
stops with what it has (:mod:`.outcome`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy
from medfed.common.arrays import arrays_to_state_dict
from medfed.common.checkpoint import Checkpoint, load_checkpoint
from medfed.common.config import StudyConfig
from medfed.common.constants import (
    BUDGET_EXHAUSTED,
    DP_METRICS,
    GROUP_SCALAR_KEYS,
    ConfigKey,
    MetricKey,
    RecordKey,
)
from medfed.common.data.splits import DatasetInfo
from medfed.common.errors import ConfigError
from medfed.common.models import ModelSpec, model_spec
from medfed.common.tasks import get_task
from medfed.common.training import derive_seed
from medfed.server.audit import AUDIT_HEAD, ServerAudit
from medfed.server.availability import Availability, StudyStop
from medfed.server.central import (
    CentralData,
    evaluate_arrays,
    final_task_metrics,
    load_central,
)
from medfed.server.central_dp import central_privacy, restore_central_privacy
from medfed.server.describe import (
    SITE_DATA_NAME,
    Described,
    agreed_info,
    describe_sites,
)
from medfed.server.exchange import Deadline, Exchanged, exchange
from medfed.server.fairness import (
    FAIRNESS,
    central_scores,
    config_group_names,
    round_fairness,
    summary_fairness,
)
from medfed.server.frozen import FrozenPart, initial_arrays
from medfed.server.frozen import split as split_frozen
from medfed.server.limits import bound_replies, reply_bytes
from medfed.server.outcome import COMPLETED, FAILED, STOPPED, Outcome, StudyFailed
from medfed.server.recorder import RunRecorder
from medfed.server.trust import trust_sections
from medfed.server.replies import (
    Capped,
    Failure,
    cap_eval_weights,
    cap_weights,
    log_failures,
    screen_evaluate_replies,
    screen_train_replies,
    split_evaluation,
)
from medfed.server.resume import resolve_resume
from medfed.server.selection import Selection, pool_test, pool_validation
from medfed.server.strategies import (
    FedBN,
    build_strategy,
    keep_dtypes,
    restore_strategy_state,
    strategy_state,
)

log = logging.getLogger(__name__)

# Keys of the study config that a resumed run must share with the checkpoint.
RESUME_INVARIANTS = ("task", "dataset", "data-path", "num-sites", "partition", "alpha", "seed", "model", "strategy",
                     "initial-weights", "new-head", "freeze")


APPLIED = "applied-rounds"  # checkpoint metrics: the rounds whose aggregate was applied


@dataclass
class _State:
    arrays: ArrayRecord
    best_arrays: ArrayRecord
    selection: Selection
    start_round: int
    last_sites: dict[str, dict[str, Any]]
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> latest DP metrics
    frozen: FrozenPart = field(default_factory=FrozenPart)  # transfer learning: layers not trained
    avail: Availability | None = None  # sites that drop and return: bounded waits, k-of-n rounds
    applied: list[int] = field(default_factory=list)  # rounds whose aggregate changed the global model
    simulation: bool = False
    pending: _Pending | None = None  # the round whose evaluation rides on the next train message


PENDING = "pending-round"  # checkpoint metrics: a trained round whose evaluation has not come back yet


@dataclass
class _Pending:
    """A trained round not yet recorded: its model is evaluated inside the next round's train message."""

    rnd: int
    arrays: ArrayRecord  # the global model after the round: what the sites evaluate
    record: dict[str, Any]  # the round's metrics line so far: training, time, bytes, failures
    train_rows: dict[str, dict[str, Any]]  # per-site training metrics
    asked: int = 0  # sites sent the train message

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.rnd, "record": self.record, "train-rows": self.train_rows, "asked": self.asked}


@dataclass
class _Evaluation:
    """One round's evaluation: from its own evaluate message, or from the next round's train replies."""

    per_site: dict[str, dict] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    capped: list[Capped] = field(default_factory=list)
    seconds: float = 0.0
    sent: int = 0
    received: int = 0
    with_round: int | None = None  # fused: the round whose train message carried it

    def merge(self, other: _Evaluation) -> _Evaluation:
        return _Evaluation({**self.per_site, **other.per_site}, self.failures + other.failures,
                           self.capped + other.capped, self.seconds + other.seconds, self.sent + other.sent,
                           self.received + other.received, self.with_round)


def _bytes(messages: list[Message]) -> int:
    return sum(reply_bytes(msg) for msg in messages)


def model_spec_for(cfg: StudyConfig, info: DatasetInfo | None) -> ModelSpec:
    """The study's model: explicit run-config sizes, else the data's (the server's own, or what the sites described)."""
    if info is not None:
        return model_spec(cfg, info)
    if not (cfg.in_channels and cfg.num_classes and cfg.image_size):
        raise ConfigError(
            "the server has no data to size the model: set in-channels, num-classes and "
            "image-size in the run config, or a data-path that exists on the server"
        )
    return ModelSpec(cfg.model, cfg.in_channels, cfg.num_classes, cfg.image_size, cfg.spatial_dims or 2)


def _initial_state(cfg: StudyConfig, spec: ModelSpec, strategy: Strategy, recorder: RunRecorder) -> _State:
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        _check_resume(cfg, spec, ckpt)
        arrays, frozen = split_frozen(cfg, ArrayRecord(ckpt.state_dict), spec)
        best = frozen.trainable(ArrayRecord(ckpt.best_state_dict)) if ckpt.best_state_dict else arrays
        restore_strategy_state(strategy, {k: {n: t.numpy() for n, t in v.items()} for k, v in ckpt.strategy_state.items()})
        saved = ckpt.metrics.get(PENDING)
        pending = None if saved is None else _Pending(int(saved["round"]), arrays, dict(saved["record"]),
                                                      dict(saved["train-rows"]), int(saved.get("asked", 0)))
        # a round still waiting for its evaluation has no metrics line yet: it is written when that comes
        recorder.truncate_after(ckpt.round - (pending is not None))
        log.info("resuming from %s: round %d done%s, continuing at round %d", cfg.resume, ckpt.round,
                 " (its evaluation rides on the next train message)" if pending else "", ckpt.round + 1)
        applied = [int(r) for r in ckpt.metrics.get(APPLIED, range(1, ckpt.round + 1))]
        return _State(arrays, best, Selection.from_dict(ckpt.selection), ckpt.round + 1,
                      dict(ckpt.metrics.get("sites", {})), dict(ckpt.metrics.get("privacy", {})), frozen,
                      applied=applied, pending=pending)
    arrays, frozen = initial_arrays(cfg, spec)
    recorder.reset()
    return _State(arrays, arrays, Selection(rule=cfg.selection), 1, {}, frozen=frozen)


def _check_resume(cfg: StudyConfig, spec: ModelSpec, ckpt: Checkpoint) -> None:
    if ckpt.model != spec:
        raise ConfigError(f"{cfg.resume}: checkpoint model {ckpt.model} differs from this study's {spec}")
    now = cfg.to_dict()
    changed = [k for k in RESUME_INVARIANTS if k in ckpt.config and ckpt.config[k] != now[k]]
    if changed:
        raise ConfigError(
            f"{cfg.resume}: cannot resume with changed {', '.join(changed)} "
            f"(checkpoint has {', '.join(f'{k}={ckpt.config[k]!r}' for k in changed)})"
        )
    if ckpt.round >= cfg.num_server_rounds:
        raise ConfigError(
            f"{cfg.resume}: checkpoint is at round {ckpt.round}, the study has "
            f"num-server-rounds={cfg.num_server_rounds}: raise num-server-rounds to continue"
        )


def _train_rows(train_ok: list[Message]) -> dict[str, dict[str, Any]]:
    """Per-site training metrics of a round (site -> row)."""
    from medfed.server.replies import site_of

    rows: dict[str, dict[str, Any]] = {}
    for msg in train_ok:
        m = msg.content[RecordKey.METRICS.value]
        rows.setdefault(site_of(msg) or "?", {}).update(
            {k: float(m[k]) for k in (MetricKey.NUM_EXAMPLES.value, MetricKey.TRAIN_LOSS.value,
                                      MetricKey.TRAIN_STEPS.value, MetricKey.TRAIN_SECONDS.value,
                                      *(d.value for d in DP_METRICS)) if k in m}
        )
    return rows


def _site_rows(train_rows: dict[str, dict[str, Any]], evals: dict[str, dict],
               fairness: dict[str, dict] | None = None) -> dict[str, dict[str, Any]]:
    """Per-site metrics of a round; ``fairness``: each site's per-group record (site -> record)."""
    rows = {site: dict(row) for site, row in train_rows.items()}
    for site, metrics in evals.items():
        row = rows.setdefault(site, {})
        for key, value in metrics.items():
            if isinstance(value, list) or key in GROUP_SCALAR_KEYS:
                continue  # histograms and per-group counts are pooled, not reported raw
            row["val-examples" if key == MetricKey.NUM_EXAMPLES.value else key] = value
    for site, record in (fairness or {}).items():
        rows.setdefault(site, {})[FAIRNESS] = record
    return dict(sorted(rows.items()))


def _central_test(spec: ModelSpec, arrays: ArrayRecord, central: CentralData | None,
                  cfg: StudyConfig, threshold: float | None) -> dict[str, float]:
    if central is None or central.test is None:
        return {}
    return evaluate_arrays(spec, arrays, central.test, cfg.device, threshold)


def _selection_note(cfg: StudyConfig) -> str:
    score = get_task(cfg.task).score
    if cfg.selection == "last" or not score:
        return "the last round is reported (no validation score chooses it)"
    if cfg.task == "classification":
        return "round and threshold chosen on pooled validation histograms; test data never used to choose"
    return f"round chosen on mean validation {score}; test data never used to choose"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "n/a"


def run_federated(grid: Grid, cfg: StudyConfig, *, simulation: bool = False) -> dict[str, Any]:
    """Run the whole study on ``grid``; returns the summary written to summary.json.

    ``simulation``: the server built the study's data itself (medfed's simulation engine) and
    evaluates centrally on its test split. Otherwise (a deployment) the server holds only
    data the run config names and that exists here; the sites first describe their data
    (:mod:`medfed.server.describe`) and the reported test metrics are the pool of theirs.
    The summary's ``outcome`` says whether the study completed, stopped or failed
    (:mod:`medfed.server.outcome`).
    """
    t_start = time.perf_counter()
    cfg = resolve_resume(cfg)  # resume=latest: the newest checkpoint of out-dir
    recorder = RunRecorder(cfg.out_dir)
    central = load_central(cfg, simulation=simulation)
    num_sites = cfg.num_sites
    avail = Availability(min(cfg.min_sites, num_sites), cfg.node_wait_timeout, cfg.max_failed_rounds)
    trail = ServerAudit.open(cfg)  # RUN_DIR/audit.jsonl; a resumed run's site bindings are restored
    described: Described | None = None
    info = central.info if central else None
    if not simulation:
        try:
            described = _describe(grid, cfg, avail, trail)
            info = _agreed(described, cfg, avail, info)
        except StudyFailed as exc:
            return _failed(cfg, recorder, trail, str(exc), described, time.perf_counter() - t_start)
    spec = model_spec_for(cfg, info)
    strategy = build_strategy(cfg, num_sites)
    fedbn = isinstance(strategy, FedBN)
    st = _initial_state(cfg, spec, strategy, recorder)
    st.avail = avail
    trail.record_start(cfg, st.arrays, st.start_round)
    if described is not None:
        trail.described(st.start_round - 1, described.sources(), described.failures, described.events)
    base_config = {ConfigKey.RUN_SEED.value: cfg.seed}
    if cfg.central_dp != "off":
        base_config[ConfigKey.CENTRAL_DP.value] = True
        restore_central_privacy(strategy, st.start_round - 1)
    names = config_group_names(cfg.group_attribute, cfg.group_names)
    st.simulation = simulation
    deadline = _deadline(cfg, simulation)

    rounds = _Rounds(cfg, spec, strategy, central, info, names, base_config, recorder, trail, grid, st, deadline)
    fusable = cfg.fused_evaluation and cfg.fraction_train >= 1.0  # every evaluating site gets a train message
    for rnd in range(st.start_round, cfg.num_server_rounds + 1):
        t_round = time.perf_counter()
        if st.pending is not None and not fusable:  # resumed with fused-evaluation off: evaluate it by itself
            rounds.close(st.pending, rounds.evaluate_separately(st.pending.rnd, st.pending.arrays))
        random.seed(derive_seed(cfg.seed, "sampling", rnd))  # Flower samples with `random`
        if (view := st.avail.view(grid, rnd, "train")) is None:  # bounded: Flower's own wait is not
            break
        try:
            train_msgs = st.frozen.attach(strategy.configure_train(rnd, st.arrays, ConfigRecord(dict(base_config)), view))
        except PrivacyBudgetExhausted as exc:
            st.avail.stop = StudyStop(rnd - 1, f"round {rnd}: central DP budget reached ({exc}): the study "
                                               f"stops after round {rnd - 1}")
            log.warning("%s", st.avail.stop.reason)
            break
        pending, st.pending = st.pending, None
        if pending is not None:  # the sites evaluate the model they receive: round rnd - 1's
            _ask_evaluation(train_msgs)
        log.info("round %d/%d: training at %d site(s)%s", rnd, cfg.num_server_rounds, len(train_msgs),
                 f" (and evaluating round {pending.rnd}'s model)" if pending else "")
        t0 = time.perf_counter()
        trained = exchange(grid, train_msgs, deadline)
        train_replies = bound_replies(trained.replies, cfg.max_reply_mb)
        train_s = time.perf_counter() - t0
        admitted, refused, events = trail.binding.admit(train_replies, grid.get_node_ids)
        if pending is not None:  # round rnd - 1 is recorded before round rnd's aggregate replaces its model
            rounds.close(pending, rounds.fused_evaluation(pending, admitted, refused + trained.missing))
        train_ok, failures = screen_train_replies(admitted, st.arrays, allow_subset=fedbn,
                                                  max_norm_ratio=cfg.max_update_norm_ratio)
        failures = trail.binding.name(refused + failures + trained.missing)
        log_failures("train", failures)
        capped = cap_weights(train_ok, cfg.max_site_weight_ratio)
        trail.train_round(rnd, train_msgs, train_replies, train_ok, failures, events, capped)
        if not train_ok and failures and all(BUDGET_EXHAUSTED in f.reason for f in failures):
            st.avail.stop = StudyStop(rnd - 1, f"round {rnd}: every site has exhausted its privacy budget: the "
                                               f"study stops after round {rnd - 1}")
            log.warning("%s", st.avail.stop.reason)
            break
        agg_metrics = None
        applied = False
        quorum = st.avail.quorum(rnd, len(train_ok))  # fewer than min-sites: the model stays unchanged
        if train_ok and quorum:
            new_arrays, agg_metrics = strategy.aggregate_train(rnd, train_ok)
            if new_arrays is not None:
                st.arrays = keep_dtypes(new_arrays, st.arrays)
                st.applied.append(rnd)
                applied = True
        elif not train_ok:
            log.warning("round %d: no site trained successfully; the global model is unchanged", rnd)
        trail.round_end(rnd, st.arrays, train_ok)
        train_rows = _train_rows(train_ok)
        for site, row in train_rows.items():  # privacy spent persists for sites that stop training
            st.privacy[site] = {d.value: row[d.value] for d in DP_METRICS if d.value in row} or st.privacy.get(site, {})
        done = _Pending(rnd, st.arrays, {
            "round": rnd,
            "time": {"round-s": time.perf_counter() - t_round, "train-s": train_s},
            "bytes": {"sent": _bytes(train_msgs), "received": _bytes(train_replies)},
            "train": dict(agg_metrics) if agg_metrics is not None else {},
            "failures": [f.to_dict() for f in failures],
            "capped": [c.to_dict() for c in capped],
            "quorum": quorum,
            "applied": applied,
        }, train_rows, len(train_msgs))

        # a round that changed nothing is not evaluated again: the sites would spend their evaluation
        # allowance (client/eval_guard.py) on a model they already evaluated
        evaluate_now = applied and (rnd % cfg.evaluate_every == 0 or rnd == cfg.num_server_rounds)
        if evaluate_now and fusable and rnd < cfg.num_server_rounds:
            st.pending = done  # evaluated inside the next round's train message
            rounds.checkpoint(rnd, None)
            log.info("round %d/%d: %d/%d sites trained | %.1fs; its model is evaluated with round %d's message",
                     rnd, cfg.num_server_rounds, len(train_ok), len(train_msgs), done.record["time"]["round-s"],
                     rnd + 1)
        else:
            evaluation = rounds.evaluate_separately(rnd, st.arrays) if evaluate_now else _Evaluation()
            rounds.checkpoint(rnd, rounds.close(done, evaluation))
        if st.avail.stop is not None:
            break  # logged: what, why and how to fix
    if st.pending is not None:  # the study ended before the next train message could carry the evaluation
        pending, st.pending = st.pending, None
        rounds.checkpoint(pending.rnd, rounds.close(pending, rounds.evaluate_separately(pending.rnd, pending.arrays)))

    if not st.applied:
        reason = _nothing_applied(cfg, st)
        return _failed(cfg, recorder, trail, reason, described, time.perf_counter() - t_start, spec=spec)
    if st.selection.best_round == 0 or st.selection.best_round not in st.applied:
        # no evaluated round was applied (every evaluation failed): report the last round the sites trained
        st.selection.best_round, st.selection.threshold = st.applied[-1], None
        st.best_arrays = st.arrays
    return _finish(grid, cfg, strategy, spec, central, info, recorder, st, time.perf_counter() - t_start, trail,
                   described)


def _deadline(cfg: StudyConfig, simulation: bool) -> Deadline:
    """round-timeout, and in deployment the straggler cut-off (simulated sites answer one after another)."""
    if simulation:
        return Deadline(cfg.round_timeout)
    return Deadline(cfg.round_timeout, cfg.straggler_factor, cfg.straggler_floor)


def _describe(grid: Grid, cfg: StudyConfig, avail: Availability, trail: ServerAudit) -> Described:
    """Wait (bounded) for min-sites sites and ask them to describe their data; StudyFailed when too few came."""
    view = avail.view(grid, 0, "describe")
    if view is None:
        raise StudyFailed(avail.stop.reason if avail.stop else "too few sites connected")
    return describe_sites(grid, view.get_node_ids(), cfg, trail.binding)


def _agreed(described: Described, cfg: StudyConfig, avail: Availability, central: DatasetInfo | None) -> DatasetInfo:
    """The data shape the describing sites share; StudyFailed when too few described it or they disagree."""
    if len(described.facts) < avail.min_sites:
        why = "; ".join(f"{f.who}: {f.reason}" for f in described.failures) or "no answer"
        raise StudyFailed(f"only {len(described.facts)} site(s) described their data, fewer than min-sites="
                          f"{avail.min_sites} ({why})")
    return agreed_info(described.facts, cfg, central)


def _nothing_applied(cfg: StudyConfig, st: _State) -> str:
    stop = st.avail.stop if st.avail else None
    if stop is not None:
        return f"no round was applied: {stop.reason}"
    return (f"no round was applied: in none of the {cfg.num_server_rounds} round(s) did min-sites={cfg.min_sites} "
            "site(s) train successfully; each round's failures, by site, are in metrics.jsonl and in the log")


def _failed(cfg: StudyConfig, recorder: RunRecorder, trail: ServerAudit, reason: str, described: Described | None,
            wall_s: float, spec: ModelSpec | None = None) -> dict[str, Any]:
    """The summary of a study with nothing to report: its reason, its failures, no test metrics, no model."""
    log.error("study failed: %s", reason)
    if not trail.started:
        trail.record_start(cfg, None, 1)
    if described is not None:
        trail.described(0, described.sources(), described.failures, described.events)
    summary: dict[str, Any] = {
        "mode": "federated", "strategy": cfg.strategy, "rounds": cfg.num_server_rounds, "task": cfg.task,
        "outcome": Outcome(FAILED, reason).to_dict(), "selected-round": None, "test": {},
        "failures": [f.to_dict() for f in (described.failures if described else [])],
        "model": spec.to_dict() if spec else None, "config": cfg.to_dict(),
        "dataset": _dataset_record(cfg, None, described), "wall-s": wall_s,
    }
    summary[AUDIT_HEAD] = trail.run_failed(reason)
    recorder.write_summary(summary)
    return summary


def _dataset_record(cfg: StudyConfig, central: CentralData | None, described: Described | None) -> dict[str, Any]:
    record: dict[str, Any] = {"name": central.info.name if central else cfg.dataset, "num-sites": cfg.num_sites}
    if described is not None:
        record["name"] = central.info.name if central else SITE_DATA_NAME
        record["sources"] = described.sources()  # what each site serves: synthetic, medmnist, manifest, dicom
    return record


def _screen_evaluation(grid: Grid, cfg: StudyConfig, trail: ServerAudit, rnd: int, phase: str,
                       done: Exchanged) -> tuple[dict[str, dict], list[Failure], list[Capped]]:
    """Bind, screen and cap one evaluation phase's replies, and audit what was refused or never came."""
    admitted, refused, events = trail.binding.admit(bound_replies(done.replies, cfg.max_reply_mb), grid.get_node_ids)
    return _screen_admitted(cfg, trail, rnd, phase, admitted, refused + done.missing, events)


def _screen_admitted(cfg: StudyConfig, trail: ServerAudit, rnd: int, phase: str, admitted: list[Message],
                     unanswered: list[Failure], events: list, fused: bool = False,
                     asked_again: frozenset[int] = frozenset(),
                     ) -> tuple[dict[str, dict], list[Failure], list[Capped]]:
    """Screen and cap admitted evaluation replies (``fused``: train replies carrying it), name and audit the
    failures, except those of the nodes in ``asked_again`` (they get a separate evaluate message)."""
    per_site, failures = screen_evaluate_replies(admitted, fused=fused)
    failures = trail.binding.name(unanswered + [f for f in failures if f.node not in asked_again])
    log_failures(phase, failures)
    capped = cap_eval_weights(per_site, cfg.max_site_weight_ratio, trail.binding.node_of)
    trail.evaluation(rnd, phase, failures, events, capped)
    return per_site, failures, capped


def _ask_evaluation(train_msgs: list[Message]) -> None:
    """Ask each site to evaluate the model its train message carries, in the same reply."""
    for msg in train_msgs:
        config = msg.content.get(RecordKey.CONFIG.value)
        if config is None:
            config = msg.content[RecordKey.CONFIG.value] = ConfigRecord()
        config[ConfigKey.EVALUATE_RECEIVED.value] = True


class _Rounds:
    """Evaluates and records rounds: one place for the separate and the fused evaluation."""

    def __init__(self, cfg: StudyConfig, spec: ModelSpec, strategy: Strategy, central: CentralData | None,
                 info: DatasetInfo | None, names: Any, base_config: dict[str, Any], recorder: RunRecorder,
                 trail: ServerAudit, grid: Grid, st: _State, deadline: Deadline) -> None:
        self.cfg, self.spec, self.strategy, self.central, self.info, self.names = cfg, spec, strategy, central, info, names
        self.base_config, self.recorder, self.trail, self.grid, self.st, self.deadline = (
            base_config, recorder, trail, grid, st, deadline)
        self.task = get_task(cfg.task)

    def evaluate_separately(self, rnd: int, arrays: ArrayRecord, only: frozenset[int] | None = None) -> _Evaluation:
        """Round ``rnd``'s model evaluated by its own message (``only``: at these nodes)."""
        st = self.st
        view = st.avail.view(self.grid, rnd, "evaluate") if st.avail else self.grid
        msgs = (st.frozen.attach(self.strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(self.base_config)),
                                                                  view)) if view is not None else [])
        if only is not None:
            msgs = [m for m in msgs if m.metadata.dst_node_id in only]
        t0 = time.perf_counter()
        done = exchange(self.grid, msgs, self.deadline)
        seconds = time.perf_counter() - t0
        per_site, failures, capped = _screen_evaluation(self.grid, self.cfg, self.trail, rnd, "evaluate", done)
        return _Evaluation(per_site, failures, capped, seconds, _bytes(msgs), _bytes(done.replies))

    def fused_evaluation(self, pending: _Pending, admitted: list[Message], unanswered: list[Failure]) -> _Evaluation:
        """Round ``pending.rnd``'s evaluation, taken out of the next round's (admitted) train replies.

        A site that answered the train message with an error (its privacy budget is spent, its
        training failed) released no evaluation: the site sends it only with a trained update, and
        counts it only then. It is asked by a separate evaluate message, as it would have been
        without fusing. ``unanswered``: refused and missing replies (not asked again).
        """
        errored = frozenset(m.metadata.src_node_id for m in admitted if m.has_error())
        per_site, failures, capped = _screen_admitted(self.cfg, self.trail, pending.rnd, "evaluate", admitted,
                                                      unanswered, [], fused=True, asked_again=errored)
        split_evaluation(admitted)
        fused = _Evaluation(per_site, failures, capped, with_round=pending.rnd + 1)
        if errored:
            log.info("round %d: %d site(s) that could not train evaluate its model by a separate message",
                     pending.rnd, len(errored))
            fused = fused.merge(self.evaluate_separately(pending.rnd, pending.arrays, only=errored))
        return fused

    def close(self, done: _Pending, ev: _Evaluation) -> dict[str, Any]:
        """Complete round ``done.rnd``'s record with its evaluation, choose, and append the metrics line."""
        cfg, st, rnd = self.cfg, self.st, done.rnd
        pooled = pool_validation(ev.per_site, score=self.task.score)
        if ev.per_site and st.selection.consider(rnd, pooled):
            st.best_arrays = done.arrays  # never a round in which no site trained or evaluated
        test_metrics = (_central_test(self.spec, st.frozen.full(done.arrays), self.central, cfg, pooled.threshold)
                        if self.central is not None else pool_test(ev.per_site, None).metrics)
        fairness, site_fairness = round_fairness(ev.per_site, self.base_config.get(ConfigKey.THRESHOLD.value),
                                                 self.info, self.names)
        sites = _site_rows(done.train_rows, ev.per_site, site_fairness)
        st.last_sites = sites
        part = done.record
        timing = {**part["time"], "evaluate-s": ev.seconds}
        timing["round-s"] += ev.seconds
        if ev.with_round is not None:  # the sites' evaluation time is inside that round's train-s
            timing["evaluated-with-round"] = ev.with_round
        record = {
            "round": rnd,
            "time": timing,
            "bytes": {"sent": part["bytes"]["sent"] + ev.sent, "received": part["bytes"]["received"] + ev.received},
            "train": part["train"],
            "val": pooled.metrics,
            "test": test_metrics,
            "sites": sites,
            "failures": part["failures"] + [f.to_dict() for f in ev.failures],
            "capped": part["capped"] + [c.to_dict() for c in ev.capped],
            "selected": st.selection.best_round == rnd,
            "quorum": part["quorum"],
            "applied": part["applied"],
        }
        if fairness is not None:  # per-group metrics at the threshold the sites applied (0.5 when none sent)
            record[FAIRNESS] = fairness
        self.recorder.append_round(record)
        log.info(
            "round %d/%d: val %s %s | test %s %s | %d/%d sites trained, %d evaluated%s | %.1fs",
            rnd, cfg.num_server_rounds, self.task.monitor, _fmt(pooled.metrics.get(self.task.monitor, pooled.score)),
            self.task.monitor, _fmt(test_metrics.get(self.task.monitor)), len(done.train_rows), done.asked,
            len(ev.per_site),
            "" if part["applied"] else " (not applied: the global model is unchanged)", timing["round-s"],
        )
        return record

    def checkpoint(self, rnd: int, record: dict[str, Any] | None) -> None:
        """Round ``rnd``'s checkpoint; ``record`` None: the round waits for its evaluation (``st.pending``)."""
        st = self.st
        metrics: dict[str, Any] = {"sites": st.last_sites, "val": {}, "test": {}, "privacy": st.privacy,
                                   APPLIED: list(st.applied)}
        if record is not None:
            metrics.update(sites=record["sites"], val=record["val"], test=record["test"])
        elif st.pending is not None:
            metrics[PENDING] = st.pending.to_dict()
        self.recorder.save_round_checkpoint(
            Checkpoint(
                model=self.spec,
                state_dict=arrays_to_state_dict(st.frozen.full(st.arrays)),
                config=self.cfg.to_dict(),
                round=rnd,
                metrics=metrics,
                strategy_state=_tensor_state(self.strategy),
                selection=st.selection.to_dict(),
                best_state_dict=arrays_to_state_dict(st.frozen.full(st.best_arrays)),
            )
        )


def _tensor_state(strategy: Strategy) -> dict[str, dict[str, Any]]:
    import torch

    return {k: {n: torch.from_numpy(a.copy()) for n, a in v.items()} for k, v in strategy_state(strategy).items()}


def _finish(grid: Grid, cfg: StudyConfig, strategy: Strategy, spec: ModelSpec, central: CentralData | None,
            info: DatasetInfo | None, recorder: RunRecorder, st: _State, wall_s: float, trail: ServerAudit,
            described: Described | None) -> dict[str, Any]:
    """Evaluate the selected model at every site and centrally with the chosen threshold."""
    sel = st.selection
    final_cfg: dict[str, Any] = {ConfigKey.RUN_SEED.value: cfg.seed, ConfigKey.FINAL_EVALUATION.value: True}
    if sel.threshold is not None:
        final_cfg[ConfigKey.THRESHOLD.value] = sel.threshold
    view = st.avail.final_view(grid) if st.avail else grid
    msgs = (st.frozen.attach(strategy.configure_evaluate(sel.best_round, st.best_arrays, ConfigRecord(final_cfg), view))
            if view is not None else [])
    best, last = st.frozen.full(st.best_arrays), st.frozen.full(st.arrays)
    done = exchange(grid, msgs, _deadline(cfg, st.simulation))
    per_site, failures, capped = _screen_evaluation(grid, cfg, trail, sel.best_round, "final-evaluate", done)
    fairness = summary_fairness(per_site, sel.threshold, info, cfg.seed, central_scores(
        spec, best, central.test if central else None, cfg.device, cfg.task),
        override=config_group_names(cfg.group_attribute, cfg.group_names))
    sites = _site_rows({}, per_site)
    for site, row in sites.items():
        for key in (MetricKey.NUM_EXAMPLES.value, MetricKey.TRAIN_LOSS.value):
            if key in st.last_sites.get(site, {}):
                row[key] = st.last_sites[site][key]
        row.update(st.privacy.get(site, {}))
    site_test = pool_test(per_site, sel.threshold)
    if central is not None:
        test = {**_central_test(spec, best, central, cfg, sel.threshold),
                **final_task_metrics(spec, best, central, cfg.device, cfg.seed)}
        source = {"kind": "server", "note": f"the server's own test split of {central.info.name}"}
        final_round_test = _central_test(spec, last, central, cfg, sel.threshold)
    else:
        test, final_round_test = site_test.metrics, {}  # the last model is not evaluated at the chosen threshold
        source = {"kind": "sites", "note": site_test.note}
    source["sites"] = site_test.counts
    stop = st.avail.stop if st.avail else None
    outcome = Outcome(STOPPED, stop.reason) if stop is not None else Outcome(COMPLETED)
    summary = {
        "mode": "federated",
        "outcome": outcome.to_dict(),
        "strategy": cfg.strategy,
        "rounds": cfg.num_server_rounds,
        "applied-rounds": list(st.applied),
        "selected-round": sel.best_round,
        "selection": sel.rule,
        "selection-note": _selection_note(cfg),
        "task": cfg.task,
        "threshold": sel.threshold,
        "test": test,
        "test-source": source,
        "final-round-test": final_round_test,
        "sites": sites,
        "failures": [f.to_dict() for f in failures],
        "capped": [c.to_dict() for c in capped],
        "model": spec.to_dict(),
        "config": cfg.to_dict(),
        "dataset": _dataset_record(cfg, central, described),
        "wall-s": wall_s,
    }
    if central is not None and site_test.metrics:
        summary["site-test"] = site_test.metrics  # the sites' own test splits, pooled, beside the server's
    if stop is not None:
        summary["stopped"] = stop.to_dict()
    if fairness is not None:
        summary[FAIRNESS] = fairness
    if (central_dp := central_privacy(strategy)) is not None:
        summary["central-dp"] = central_dp
    summary.update(trust_sections(cfg, per_site, info))  # explain-metrics, robustness-eval: the sites' aggregates
    recorder.save_model(
        Checkpoint(model=spec, state_dict=arrays_to_state_dict(best), config=cfg.to_dict(),
                   round=sel.best_round,
                   metrics={"test": summary["test"], "threshold": sel.threshold, "privacy": st.privacy},
                   selection=sel.to_dict())
    )
    summary[AUDIT_HEAD] = trail.run_end(sel.best_round, best, last)
    recorder.write_summary(summary)
    recorder.write_report()
    return summary
