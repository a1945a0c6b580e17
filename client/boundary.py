"""The privacy boundary: what a site's reply may contain, checked before it leaves.

A reply holds model arrays (only names the server sent), aggregate metrics under a fixed
set of names with numeric values (lists only for the fixed-size score histograms, pooled and
per group), the shape of the site's data in answer to ``describe``
(:mod:`medfed.common.site_facts`), and the site's id. Anything else (a path, a patient id, a DICOM tag value, a
per-sample value, a free-text string) is refused here, so a bug elsewhere cannot leak it.
Error replies carry the exception type and, only for :class:`PublicSiteError`, a message
written to be shared; details stay in the site log.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from medfed.common.constants import RecordKey, SiteKey
from medfed.common.errors import MedfedError
from medfed.common.hashing import is_sha256_hex
from medfed.common.reply_schema import metrics_problem
from medfed.common.site_facts import facts_problem

ALLOWED_RECORDS = frozenset({RecordKey.ARRAYS.value, RecordKey.METRICS.value, RecordKey.SITE.value,
                             RecordKey.FACTS.value, RecordKey.EVALUATION.value})
METRIC_RECORDS = frozenset({RecordKey.METRICS.value, RecordKey.EVALUATION.value})  # held to the same rules
_PARAMETER_DTYPES = ("float16", "float32", "float64", "bfloat16", "int64", "int32", "bool")


class PublicSiteError(MedfedError):
    """A site failure whose message is safe to send to the server (no paths, no ids, no values)."""


class BoundaryError(MedfedError):
    """A reply that would carry something other than model arrays and aggregate metrics."""


def check_reply(content: RecordDict, sent_shapes: Mapping[str, tuple[int, ...]], site_id: str) -> None:
    """Raise :class:`BoundaryError` unless ``content`` holds only what a site may share.

    ``sent_shapes``: the name and shape of every array the server sent; a reply's arrays must
    be among them, each with the shape it was sent with. Error texts never repeat a name
    that was refused.
    """
    extra = set(content.keys()) - ALLOWED_RECORDS
    if extra:
        raise BoundaryError(f"{len(extra)} record(s) other than arrays, metrics and the site id may not leave the site")
    for key, record in content.items():
        if key == RecordKey.ARRAYS.value:
            _check_arrays(record, sent_shapes)
        elif key in METRIC_RECORDS:
            _check_metrics(record)
        elif key == RecordKey.FACTS.value:
            _check_facts(record)
        else:
            _check_site_record(record, site_id)


def _check_arrays(record: object, sent_shapes: Mapping[str, tuple[int, ...]]) -> None:
    if not isinstance(record, ArrayRecord):
        raise BoundaryError("the arrays record must be an ArrayRecord")
    unknown = set(record.keys()) - set(sent_shapes)
    if unknown:
        raise BoundaryError(f"{len(unknown)} array(s) the server did not send may not leave the site")
    for name, arr in record.items():
        if arr.dtype not in _PARAMETER_DTYPES:
            raise BoundaryError(f"array {name!r} has dtype {arr.dtype}, not a model parameter type")
        if tuple(arr.shape) != tuple(sent_shapes[name]):
            raise BoundaryError(f"array {name!r} has shape {tuple(arr.shape)}, not the shape "
                                f"{tuple(sent_shapes[name])} the server sent")


def _check_metrics(record: object) -> None:
    if not isinstance(record, MetricRecord):
        raise BoundaryError("the metrics record must be a MetricRecord")
    problem = metrics_problem(dict(record))
    if problem:
        raise BoundaryError(problem)


def _check_facts(record: object) -> None:
    if not isinstance(record, ConfigRecord):
        raise BoundaryError("the facts record must be a ConfigRecord")
    problem = facts_problem(dict(record))
    if problem:
        raise BoundaryError(problem)


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
