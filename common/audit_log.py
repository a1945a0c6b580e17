"""An append-only, hash-chained audit trail: one JSON object per line.

Every entry carries ``seq`` (1, 2, ...), ``time`` (UTC ISO 8601), ``event``, ``actor``
(``server`` or a site id), the event's own fields, ``prev`` (the previous entry's
``hash``; 64 zeros for the first) and ``hash``: SHA-256 of the canonical JSON of the
entry without ``hash``. Editing any field of an entry breaks its hash; deleting or
reordering entries breaks the ``seq``/``prev`` chain; :func:`verify` names the first
broken entry and why.

What the chain cannot show by itself: that entries were cut off the *end*. Keep the
head hash somewhere else (the server writes it into ``summary.json`` as ``audit-head``)
and pass it to :func:`verify` as ``anchor``: the chain must still contain that entry.

Appends are safe across processes (a site runs a fresh ClientApp process per message):
under an exclusive ``fcntl.flock`` on the log file itself, the writer re-reads the last
entry from the file's tail, then writes one whole line with ``O_APPEND`` and fsyncs it.
A damaged tail (a crash mid-write, an edit) makes :meth:`AuditLog.append` raise
:class:`AuditError` rather than extend a broken chain.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medfed.common.errors import MedfedError
from medfed.common.hashing import HASH_HEX_LEN, canonical_json, plain, sha256_text

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * HASH_HEX_LEN
RESERVED = ("seq", "time", "event", "actor", "prev", "hash")
_TAIL_BLOCK = 8192


class AuditError(MedfedError):
    """The audit trail cannot be extended or read: it is damaged or unreadable."""


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of ``entry``'s canonical JSON without its ``hash`` field."""
    return sha256_text(canonical_json({k: v for k, v in entry.items() if k != "hash"}))


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _last_line(fd: int) -> bytes:
    """The file's last line (with its newline, if any), read backwards from the end."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    buf = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1:]
    return buf


class AuditLog:
    """Appends hash-chained entries to ``path`` as ``actor``."""

    def __init__(self, path: str | Path, actor: str):
        if not actor:
            raise ValueError("actor must name who writes the log ('server' or a site id)")
        self.path = Path(path)
        self.actor = str(actor)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry and return it (with its ``seq`` and ``hash``)."""
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise ValueError(f"audit fields {clash} are reserved by the log itself: rename them")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev = self._tail(fd)
            entry: dict[str, Any] = {"seq": seq + 1, "time": _utc_now(), "event": event, "actor": self.actor}
            entry.update(plain(fields))
            entry["prev"] = prev
            entry["hash"] = entry_hash(entry)
            data = (json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            written = 0
            while written < len(data):  # O_APPEND: every write lands at the end
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        return entry

    def _tail(self, fd: int) -> tuple[int, str]:
        """(seq, hash) of the last entry, or (0, GENESIS) for an empty log."""
        line = _last_line(fd)
        if not line:
            return 0, GENESIS
        how = (f"move {self.path} aside (keep it as evidence), run 'medfed audit verify' on it, "
               "and start a new log")
        if not line.endswith(b"\n"):
            raise AuditError(f"{self.path}: the last line is incomplete (a crash mid-write?): {how}")
        try:
            last = json.loads(line)
            seq, stored = int(last["seq"]), str(last["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"{self.path}: the last line is not an audit entry ({exc}): {how}") from exc
        if entry_hash(last) != stored:
            raise AuditError(f"{self.path}: the last entry (seq {seq}) was edited, its hash does not match: {how}")
        return seq, stored


SITE_AUDIT_HEAD = "site-audit-head"  # field of the server's update-received entries: the site trail's head


def site_anchor(server_log: str | Path, site: str) -> str | None:
    """The last head of ``site``'s trail that the server's log recorded (None: none recorded).

    A site sends its trail's head with every reply and the server logs it; if the site's log
    still verifies and contains that head, nothing before it was cut off or rewritten.
    """
    heads = [e[SITE_AUDIT_HEAD] for e in read_entries(server_log)
             if e.get("event") == "update-received" and e.get("site") == site and SITE_AUDIT_HEAD in e]
    return heads[-1] if heads else None


def read_entries(path: str | Path) -> Iterator[dict[str, Any]]:
    """The parsed entries of a log, unchecked (use :func:`verify` to check them)."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`: ``ok``, the entries read, the head, or the first problem."""

    ok: bool
    entries: int
    head: str
    problem: str | None = None
    seq: int | None = None  # seq of the first broken entry (None: none or unreadable)
    line: int | None = None  # 1-based line number of the first problem
    after_anchor: int = 0  # entries appended after the anchor entry

    def describe(self) -> str:
        if self.ok:
            extra = f" ({self.after_anchor} entries after the expected head)" if self.after_anchor else ""
            return f"OK: {self.entries} entries, head {self.head}{extra}"
        where = f"line {self.line}" + (f", seq {self.seq}" if self.seq is not None else "")
        return f"BROKEN at {where}: {self.problem}"


def _check_line(raw: str, expect_seq: int, prev: str) -> tuple[dict[str, Any] | None, int | None, str | None]:
    """(entry, seq, problem) of one line given the chain so far."""
    try:
        entry = json.loads(raw)
    except ValueError as exc:
        return None, None, f"not JSON ({exc.args[0] if exc.args else exc})"
    if not isinstance(entry, dict) or not all(k in entry for k in RESERVED):
        return None, None, f"not an audit entry (needs fields {', '.join(RESERVED)})"
    seq = entry["seq"] if isinstance(entry["seq"], int) else None
    if entry_hash(entry) != entry["hash"]:
        return entry, seq, "hash mismatch: the entry was edited after it was written"
    if seq != expect_seq:
        why = "an entry before it was deleted" if isinstance(seq, int) and seq > expect_seq else \
            "entries were reordered or duplicated"
        return entry, seq, f"seq {entry['seq']} where {expect_seq} was expected: {why}"
    if entry["prev"] != prev:
        return entry, seq, ("prev does not match the previous entry's hash: an entry was deleted, "
                            "reordered or rewritten (with its hash recomputed) before this one")
    return entry, seq, None


def verify(path: str | Path, anchor: str | None = None) -> VerifyResult:
    """Check the whole chain of ``path``; ``anchor``: a head hash recorded elsewhere that must still be in it."""
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"{p}: no such audit log: give the path of an audit.jsonl file")
    prev, count, anchor_at = GENESIS, 0, None
    with open(p, encoding="utf-8", errors="replace", newline="") as fh:
        lines = fh.read().split("\n")
    tail_complete = lines[-1] == ""
    body = lines[:-1] if tail_complete else lines
    for number, raw in enumerate(body, start=1):
        if not tail_complete and number == len(body):
            return VerifyResult(False, count, prev, "the last line is incomplete (truncated mid-write)",
                                None, number)
        entry, seq, problem = _check_line(raw, count + 1, prev)
        if problem or entry is None:
            return VerifyResult(False, count, prev, problem or "unreadable entry", seq, number)
        prev, count = entry["hash"], count + 1
        if anchor is not None and prev == anchor:
            anchor_at = count
    if anchor is not None and anchor_at is None:
        return VerifyResult(False, count, prev, f"the expected head {anchor} is not in the log: entries were "
                            "cut off its end (or the log belongs to another run)", None, None)
    return VerifyResult(True, count, prev, after_anchor=0 if anchor_at is None else count - anchor_at)
