"""The privacy boundary: what a site's reply may contain, checked before it leaves.

A reply holds model arrays (only names the server sent), aggregate metrics under a fixed
set of names with numeric values (lists only for the fixed-size score histograms, pooled and
per group), and the site's id. Anything else (a path, a patient id, a DICOM tag value, a
per-sample value, a free-text string) is refused here, so a bug elsewhere cannot leak it.
Error replies carry the exception type and, only for :class:`PublicSiteError`, a message
written to be shared; details stay in the site log.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from medfed.common.constants import (
    GROUP_HISTOGRAM_KEYS,
    GROUP_SCALAR_KEYS,
    NUM_HIST_BINS,
    SPLITS,
    MetricKey,
    RecordKey,
    SiteKey,
)
from medfed.common.errors import MedfedError
from medfed.common.hashing import is_sha256_hex

EVAL_METRICS = (
    MetricKey.LOSS, MetricKey.AUC, MetricKey.ACCURACY, MetricKey.BALANCED_ACCURACY,
    MetricKey.SENSITIVITY, MetricKey.SPECIFICITY, MetricKey.NUM_EXAMPLES,
    MetricKey.DICE, MetricKey.HD95, MetricKey.HD95_COUNT, MetricKey.D_LOSS, MetricKey.D_ACCURACY,
)
HISTOGRAM_KEYS = frozenset({MetricKey.VAL_HIST_POS.value, MetricKey.VAL_HIST_NEG.value}) | GROUP_HISTOGRAM_KEYS
ALLOWED_METRICS = frozenset(
    {k.value for k in MetricKey} | {f"{s}-{m.value}" for s in SPLITS for m in EVAL_METRICS}
    | GROUP_SCALAR_KEYS | GROUP_HISTOGRAM_KEYS  # per-group counts (medfed.common.fairness), k-anonymous
)
ALLOWED_RECORDS = frozenset({RecordKey.ARRAYS.value, RecordKey.METRICS.value, RecordKey.SITE.value})


class PublicSiteError(MedfedError):
    """A site failure whose message is safe to send to the server (no paths, no ids, no values)."""


class BoundaryError(MedfedError):
    """A reply that would carry something other than model arrays and aggregate metrics."""


def check_reply(content: RecordDict, sent_array_keys: Iterable[str], site_id: str) -> None:
    """Raise :class:`BoundaryError` unless ``content`` holds only what a site may share."""
    extra = set(content.keys()) - ALLOWED_RECORDS
    if extra:
        raise BoundaryError(f"record(s) {sorted(extra)} may not leave the site")
    for key, record in content.items():
        if key == RecordKey.ARRAYS.value:
            _check_arrays(record, set(sent_array_keys))
        elif key == RecordKey.METRICS.value:
            _check_metrics(record)
        else:
            _check_site_record(record, site_id)


def _check_arrays(record: object, allowed: set[str]) -> None:
    if not isinstance(record, ArrayRecord):
        raise BoundaryError("the arrays record must be an ArrayRecord")
    unknown = set(record.keys()) - allowed
    if unknown:
        raise BoundaryError(f"{len(unknown)} array(s) the server did not send may not leave the site")
    for name, arr in record.items():
        if arr.dtype not in ("float16", "float32", "float64", "bfloat16", "int64", "int32", "bool"):
            raise BoundaryError(f"array {name!r} has dtype {arr.dtype}, not a model parameter type")


def _check_metrics(record: object) -> None:
    if not isinstance(record, MetricRecord):
        raise BoundaryError("the metrics record must be a MetricRecord")
    for name, value in record.items():
        if name not in ALLOWED_METRICS:
            raise BoundaryError(f"metric {name!r} is not an allowed aggregate metric")
        if isinstance(value, list):
            if name not in HISTOGRAM_KEYS or len(value) != NUM_HIST_BINS:
                raise BoundaryError(f"metric {name!r} may not be a list (per-sample values stay at the site)")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BoundaryError(f"metric {name!r} must be a number")


def _check_site_record(record: object, site_id: str) -> None:
    fields = dict(record) if isinstance(record, ConfigRecord) else None
    head = None if fields is None else fields.pop(SiteKey.AUDIT_HEAD.value, None)
    if fields != {SiteKey.SITE_ID.value: site_id}:
        raise BoundaryError("the site record may hold only the site id and the audit trail's head")
    if head is not None and not is_sha256_hex(head):
        raise BoundaryError("the site record's audit-head must be a sha256 hex digest")


def public_reason(site_label: str, exc: BaseException) -> str:
    """The error text a failed site sends: the type, and the message only if it is public."""
    if isinstance(exc, (PublicSiteError, BoundaryError)):
        return f"site {site_label}: {type(exc).__name__}: {exc}"
    return f"site {site_label}: {type(exc).__name__} (details in the site's log)"
