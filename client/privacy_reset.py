"""``medfed site privacy reset``: retire a site's privacy ledger, on the record, for a new dataset.

A DP site refuses to train when its ledger is missing, older than its audit trail or does
not match it (:mod:`medfed.client.privacy`). When the site genuinely starts over (a new
dataset, whose records no earlier round touched) the administrator resets it: the ledger
is renamed ``privacy-ledger.retired-<UTC time>.json`` (never deleted) and a
``privacy-reset`` entry is appended to the audit trail; only charges after that entry count.
Without ``--i-understand`` nothing is touched.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from medfed.common.errors import ConfigError, DataError, MedfedError
from medfed.common.logs import emit

log = logging.getLogger(__name__)

RESET_WAIT_S = 10.0  # how long a reset waits for a running DP task before it gives up


def add_reset_arguments(subparsers: Any) -> None:
    """``medfed site privacy reset`` on the ``site`` command's subparsers."""
    group = subparsers.add_parser("privacy", help="the site's privacy ledger")
    psub = group.add_subparsers(dest="site_privacy_cmd", required=True, parser_class=type(group))
    p = psub.add_parser(
        "reset", help="retire the privacy ledger (kept as a retired file) and start a fresh budget",
        description="Retire the site's privacy ledger for a genuinely new dataset: rename it to "
        "privacy-ledger.retired-<UTC time>.json in the state dir and record a privacy-reset entry in the "
        "site's audit trail. The next DP round starts a fresh budget. Never do this to train the same "
        "data again: its earlier rounds still leak what the retired ledger counted.",
    )
    p.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
    p.add_argument("--i-understand", action="store_true",
                   help="confirm that the site's data is new and the old budget no longer applies")
    p.set_defaults(func=cmd_privacy_reset)


def cmd_privacy_reset(args: argparse.Namespace) -> int:
    from medfed.common.site_config import load_site_config

    site = load_site_config(args.config)
    state = Path(site.state_dir)
    if not args.i_understand:
        raise ConfigError(f"site {site.site_id}: the privacy ledger in {state} was not reset: a reset gives the "
                          "site a fresh privacy budget and is right only for a genuinely new dataset; rerun with "
                          "--i-understand")
    retired, entry = reset_ledger(site.site_id, state)
    where = f"retired to {retired}" if retired else "not present (nothing to retire)"
    emit(f"site {site.site_id}: privacy ledger {where}; privacy-reset recorded in {state / 'audit.jsonl'} "
         f"(seq {entry['seq']}); the next DP round starts a fresh budget")
    return 0


def reset_ledger(site_id: str, state_dir: str | Path, wait_s: float = RESET_WAIT_S) -> tuple[Path | None, dict]:
    """Retire the ledger and append the ``privacy-reset`` trail entry; (retired file or None, the entry).

    Waits up to ``wait_s`` seconds for a running DP task (``dp-training.lock``), then raises
    :class:`MedfedError`; holds the ledger lock while it moves the file.
    """
    from medfed.client.audit import PRIVACY_RESET, PrivacyTrail, site_log
    from medfed.client.privacy import TRAINING_LOCK
    from medfed.common.dp.ledger import (
        LEDGER_LOCK,
        PrivacyLedger,
        retire_ledger,
    )
    from medfed.common.locks import LockBusy, hold_lock

    state = Path(state_dir)
    try:
        with hold_lock(state / TRAINING_LOCK, wait_s), hold_lock(state / LEDGER_LOCK):
            trail = PrivacyTrail.read(state)  # a damaged trail fails here, before anything moves
            try:
                old = PrivacyLedger.load(state)
            except DataError as exc:  # an unreadable ledger is retired as it is
                log.warning("site %s: retiring an unreadable ledger: %s", site_id, exc)
                old = None
            retired = retire_ledger(state)
            entry = site_log(site_id, state).append(PRIVACY_RESET, retired=retired.name if retired else None, **{
                "retired-charges": None if old is None else old.charges,
                "retired-epsilon": None if old is None else old.spent(),
                "trail-charges": len(trail.charges),
            })
    except LockBusy as exc:
        raise MedfedError(f"site {site_id}: a DP training task is running ({exc}): reset the ledger when it "
                          "has finished") from exc
    log.warning("site %s: privacy ledger reset by an administrator (%s); audit trail entry seq %d", site_id,
                retired or "no ledger to retire", entry["seq"])
    return retired, entry
