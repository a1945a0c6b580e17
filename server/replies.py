"""Screening of site replies before aggregation: a bad site is data, not a crash.

Error replies, replies without the expected records, and updates with NaN/Inf or with
keys, shapes or dtypes that differ from the global model are logged with the site and
excluded; the rest are sorted by site id so aggregation order, and hence the result,
does not depend on arrival order.

Norm screening (``max-update-norm-ratio``): of the valid replies, an update whose L2
distance to the global model exceeds ``ratio`` times the round's median distance is
excluded the same way. The median is robust to a minority of poisoned sites, so a scaled
or sign-flipped update stands out however large it is. It needs at least
``MIN_REPLIES_FOR_NORM_SCREEN`` (3) valid replies: with two, the median is their mean and
one huge update can never exceed 10x of it; with one there is nothing to compare. With
fewer, the round is not norm-screened (logged).

Weight capping (``max-site-weight-ratio``): a kept update's ``num-examples`` above ``ratio``
times the round's (lower) median weight is lowered to that bound before aggregation, and
the capped claim is logged and audited. One site claiming 10^12 samples can then weigh at
most ``ratio`` honest sites' worth, however much it claims.

Metrics of training and evaluation replies are held to :func:`medfed.common.reply_schema.metrics_problem`
(the same rules the site's boundary applies before sending): a reply that breaks them is
excluded and its metrics are never pooled, so no reply can end a study.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message
from medfed.common.constants import MetricKey, RecordKey, SiteKey
from medfed.common.reply_schema import metrics_problem

log = logging.getLogger(__name__)

MIN_REPLIES_FOR_NORM_SCREEN = 3


@dataclass(frozen=True)
class Failure:
    site: str | None
    node: int
    reason: str
    bound: bool = True  # False: the site id is only what this node's error reply said (not yet bound to it)

    def to_dict(self) -> dict[str, object]:
        record: dict[str, object] = {"site": self.site, "node": self.node, "reason": self.reason}
        if not self.bound:
            record["site-unverified"] = True
        return record

    @property
    def who(self) -> str:
        """The site id first, the node id beside it (the id alone when no reply ever named the site)."""
        if self.site and self.bound:
            return f"site {self.site} (node {self.node})"
        if self.site:
            return f"site {self.site} (node {self.node}; named by its error reply, not yet bound)"
        return f"node {self.node} (site id unknown: no reply from this node has named its site)"


_CLAIM = re.compile(r"site ([A-Za-z0-9][A-Za-z0-9_.-]{0,63}): ")


def claimed_site(reason: str) -> str | None:
    """The site id an error reply's reason starts with (``site X: ...``, as every medfed site writes it)."""
    match = _CLAIM.match(reason)
    return match.group(1) if match else None


def error_failure(msg: Message) -> Failure | None:
    """The failure an error reply reports (its site is named later by the binding), or None for a reply."""
    if not msg.has_error():
        return None
    return Failure(None, msg.metadata.src_node_id, msg.error.reason or f"error code {msg.error.code}")


def log_failures(phase: str, failures: list[Failure]) -> None:
    """One warning per failure, after the binding named it: ``train from site X (node N) failed: why``."""
    for f in failures:
        log.warning("%s from %s failed: %s", phase, f.who, f.reason)


def site_of(msg: Message) -> str | None:
    if not msg.has_content():
        return None
    rec = msg.content.get(RecordKey.SITE.value)
    return None if rec is None else str(rec.get(SiteKey.SITE_ID.value))


TRAIN_RECORDS = frozenset({RecordKey.ARRAYS.value, RecordKey.METRICS.value, RecordKey.SITE.value})
EVALUATE_RECORDS = frozenset({RecordKey.METRICS.value, RecordKey.SITE.value})
FUSED_RECORDS = TRAIN_RECORDS | {RecordKey.EVALUATION.value}  # a train reply that carries its evaluation


def _records_problem(msg: Message, allowed: frozenset[str]) -> str | None:
    extra = set(msg.content.keys()) - allowed
    return f"reply carries {len(extra)} record(s) besides {', '.join(sorted(allowed))}" if extra else None


def _check_update(msg: Message, reference: ArrayRecord, allow_subset: bool) -> str | None:
    content = msg.content
    arrays = content.get(RecordKey.ARRAYS.value)
    metrics = content.get(RecordKey.METRICS.value)
    if not isinstance(arrays, ArrayRecord) or metrics is None:
        return "reply lacks the 'arrays' or 'metrics' record"
    if problem := _records_problem(msg, TRAIN_RECORDS) or metrics_problem(dict(metrics)):
        return problem
    weight = metrics.get(MetricKey.NUM_EXAMPLES.value)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"num-examples={weight!r} is not a positive number"
    extra = set(arrays) - set(reference)
    missing = set(reference) - set(arrays)
    if extra or (missing and not allow_subset):
        return f"update keys differ from the global model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
    for key, arr in arrays.items():
        ref = reference[key]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
            return f"array {key!r} is {arr.dtype}{tuple(arr.shape)}, expected {ref.dtype}{tuple(ref.shape)}"
        if not np.all(np.isfinite(arr.numpy())):
            return f"array {key!r} contains NaN or Inf"
    return None


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over the floating-point arrays ``arrays`` holds."""
    total = 0.0
    for key, arr in arrays.items():
        local = arr.numpy()
        if not np.issubdtype(local.dtype, np.floating):
            continue  # counters (BatchNorm's num_batches_tracked) are not model weights
        diff = local.astype(np.float64) - reference[key].numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def screen_update_norms(
    good: list[tuple[str, Message]], reference: ArrayRecord, max_ratio: float
) -> tuple[list[tuple[str, Message]], list[Failure]]:
    """Keep the (site, reply) pairs whose update norm is at most ``max_ratio`` x the median."""
    if max_ratio <= 0 or not good:
        return good, []
    if len(good) < MIN_REPLIES_FOR_NORM_SCREEN:
        log.warning("%d valid update(s): norm screening needs at least %d, this round is not screened",
                    len(good), MIN_REPLIES_FOR_NORM_SCREEN)
        return good, []
    norms = [update_norm(m.content[RecordKey.ARRAYS.value], reference) for _, m in good]
    median = float(np.median(norms))
    if median <= 0.0:
        log.warning("median update norm is 0 (most sites sent the global model back): not norm-screened")
        return good, []
    kept: list[tuple[str, Message]] = []
    failures: list[Failure] = []
    for (site, msg), norm in zip(good, norms, strict=True):
        if norm > max_ratio * median:
            failures.append(Failure(site or None, msg.metadata.src_node_id,
                                    f"update norm {norm:.4g} is {norm / median:.1f}x the round's median "
                                    f"{median:.4g} (max-update-norm-ratio={max_ratio:g})"))
        else:
            kept.append((site, msg))
    log.info("update norms: median %.4g, max %.4g (%.1fx), %d excluded", median, max(norms),
             max(norms) / median, len(failures))
    return kept, failures


@dataclass(frozen=True)
class Capped:
    """A training reply whose claimed ``num-examples`` was lowered to the round's cap."""

    site: str
    node: int
    claimed: float
    weight: float

    def to_dict(self) -> dict[str, object]:
        return {"site": self.site, "node": self.node, "claimed": self.claimed, "weight": self.weight}

    @property
    def reason(self) -> str:
        return (f"num-examples={self.claimed:g} rejected: more than max-site-weight-ratio x the round's median; "
                f"weighted as {self.weight:g}")


def _weight_bound(weights: list[float], max_ratio: float) -> float | None:
    """``max_ratio`` x the lower median of ``weights``; None when capping is off or has nothing to compare."""
    if max_ratio <= 0 or len(weights) < 2:
        return None
    return max_ratio * sorted(weights)[(len(weights) - 1) // 2]


def cap_weights(good: list[Message], max_ratio: float) -> list[Capped]:
    """Lower every ``num-examples`` above ``max_ratio`` x the round's lower median to that bound.

    Changes the replies' metric records in place (what the strategy then weighs by); 0: off.
    The lower median (``sorted(w)[(n - 1) // 2]``) is a weight an honest majority sent.
    """
    key = MetricKey.NUM_EXAMPLES.value
    bound = _weight_bound([float(m.content[RecordKey.METRICS.value][key]) for m in good], max_ratio)
    if bound is None:
        return []
    capped: list[Capped] = []
    for msg in good:
        metrics = msg.content[RecordKey.METRICS.value]
        claimed = float(metrics[key])
        if claimed > bound:
            metrics[key] = bound
            capped.append(Capped(site_of(msg) or "", msg.metadata.src_node_id, claimed, bound))
    for c in capped:
        log.warning("site %s (node %s) claims num-examples=%g, more than max-site-weight-ratio=%g x the round's "
                    "median: weighted as %g", c.site, c.node, c.claimed, max_ratio, c.weight)
    return capped


def cap_eval_weights(per_site: dict[str, dict], max_ratio: float, nodes: dict[str, int]) -> list[Capped]:
    """:func:`cap_weights` for evaluation metrics: each split's count and its score histograms.

    A site whose validation (or test) count exceeds the bound has that count lowered to it
    and the split's pooled histograms scaled down by the same factor, so it cannot choose the
    round or the threshold, or move the pooled test metrics, alone by claiming a huge split.
    ``nodes``: site -> node, for the record.
    """
    from medfed.common.reply_schema import SPLIT_HISTOGRAMS

    capped: list[Capped] = []
    for split, (pos, neg, key) in SPLIT_HISTOGRAMS.items():
        bound = _weight_bound([w for m in per_site.values() if (w := float(m.get(key, 0.0))) > 0], max_ratio)
        if bound is None:
            continue
        for site, metrics in per_site.items():
            claimed = float(metrics.get(key, 0.0))
            if claimed <= bound:
                continue
            factor = bound / claimed
            metrics[key] = bound
            for hist in (pos, neg):
                if hist in metrics:
                    metrics[hist] = [float(v) * factor for v in metrics[hist]]
            capped.append(Capped(site, nodes.get(site, 0), claimed, bound))
            log.warning("site %s claims %g %s samples, more than max-site-weight-ratio=%g x the median: "
                        "weighted as %g", site, claimed, split, max_ratio, bound)
    return capped


def screen_train_replies(
    replies: list[Message], reference: ArrayRecord, allow_subset: bool = False, max_norm_ratio: float = 0.0
) -> tuple[list[Message], list[Failure]]:
    """Valid training replies (sorted by site id) and the failures.

    ``max_norm_ratio`` > 0 also excludes updates whose norm exceeds that multiple of the
    median over the valid replies (see the module docstring; 0: off). Weights are capped
    afterwards by :func:`cap_weights`.
    """
    good: list[tuple[str, Message]] = []
    failures: list[Failure] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if (error := error_failure(msg)) is not None:
            failures.append(error)
            continue
        site = site_of(msg)
        problem = _check_update(msg, reference, allow_subset)
        if site is None:
            problem = problem or "reply carries no site id"
        if problem:
            failures.append(Failure(site, node, problem))
            continue
        good.append((site or "", msg))
    if allow_subset and good:
        keys = {frozenset(m.content[RecordKey.ARRAYS.value].keys()) for _, m in good}
        if len(keys) > 1:
            failures += [Failure(s, m.metadata.src_node_id, "sites sent different key sets") for s, m in good]
            good = []
    good, too_large = screen_update_norms(good, reference, max_norm_ratio)
    failures += too_large
    good.sort(key=lambda pair: pair[0])
    return [m for _, m in good], failures


def screen_evaluate_replies(replies: list[Message], fused: bool = False) -> tuple[dict[str, dict], list[Failure]]:
    """Per-site evaluation metrics (site id -> metrics) and the failures.

    A reply whose records or metrics break the schema (:func:`metrics_problem`: a NaN, a
    histogram of the wrong length or with a non-count, a positives histogram without its
    negatives, per-group aggregates that disagree) drops that site's metrics for the phase.
    ``fused``: the replies are train replies that carry the evaluation in their
    ``evaluation`` record (:func:`split_evaluation` then takes it out before aggregation).
    """
    record, allowed = ((RecordKey.EVALUATION.value, FUSED_RECORDS) if fused
                       else (RecordKey.METRICS.value, EVALUATE_RECORDS))
    per_site: dict[str, dict] = {}
    failures: list[Failure] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if (error := error_failure(msg)) is not None:
            failures.append(error)
            continue
        site = site_of(msg)
        metrics = msg.content.get(record)
        if site is None or metrics is None:
            failures.append(Failure(site, node, f"evaluation reply lacks site id or {record}"))
            continue
        if problem := _records_problem(msg, allowed) or metrics_problem(dict(metrics)):
            failures.append(Failure(site, node, f"evaluation metrics dropped: {problem}"))
            continue
        if site in per_site:
            failures.append(Failure(site, node, f"a second evaluation reply for site {site} is refused"))
            continue
        per_site[site] = dict(metrics)
    return dict(sorted(per_site.items())), failures


def split_evaluation(replies: list[Message]) -> None:
    """Take the ``evaluation`` record out of train replies (in place): what remains is a plain train reply."""
    for msg in replies:
        if msg.has_content() and RecordKey.EVALUATION.value in msg.content:
            del msg.content[RecordKey.EVALUATION.value]
