"""The SuperLink's SQLite lock wait, set before Flower's ``flower-superlink`` starts.

Why: Flower 1.41's SQL state (``flwr.supercore.sql_mixin``) opens ``superlink.db`` in WAL
mode with ``PRAGMA busy_timeout = 5000`` on every connection, and nearly every Fleet call
writes, reads included: ``pull-messages`` claims rows with an ``UPDATE``, ``pull-object``
and ``push-messages`` add to the run's traffic counters and expire task tokens
(``check_abort`` -> ``get_run_status``), heartbeats update the node. SQLite admits one
writer at a time and its busy handler polls (it is no queue), so with ten or more sites
on a busy host a write can wait longer than 5 s. SQLite then answers "database is locked",
the SuperLink answers HTTP 500, and Flower's HTTP retry gives up on a 500: the SuperNode
exits or its reply is lost (9 of 10 sites answered), and a ``flower-superexec`` that gets
the 500 stops launching ServerApps.

What: ``medfed server start`` runs ``flower-superlink`` in this module's process
(``python -m medfed.server.superlink_db --busy-timeout S -- flower-superlink ...``),
which sets ``PRAGMA busy_timeout`` to ``S`` seconds each time Flower takes a SQLite
connection from its pool (after Flower's own pragmas, which stay as they are: WAL,
``synchronous=NORMAL``) and then calls Flower's own entry point with the same arguments.
The default, 60 s, is longer than a SuperNode's HTTP read timeout (30 s, which Flower
retries), so a write that waits long surfaces as a retried timeout at the site, not as
a 500 that ends it. Flower has no command-line flag for this: a ``timeout`` in a
``sqlite://`` ``--database`` URL is overwritten by its pragma.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

log = logging.getLogger("medfed.server.superlink_db")  # also when run as __main__

DEFAULT_BUSY_TIMEOUT_S = 60.0
MAX_BUSY_TIMEOUT_S = 3600.0
FLOWER_SUPERLINK = "flower-superlink"
FLOWER_DISTRIBUTIONS = ("flwr", "flwr-nightly")

BusyTimeoutListener = Callable[[Any, Any, Any], None]


def check_busy_timeout(seconds: float) -> float:
    """``seconds`` as a float in (0, 3600]; ValueError naming the option otherwise."""
    value = float(seconds)
    if not 0 < value <= MAX_BUSY_TIMEOUT_S:
        raise ValueError(f"busy-timeout={seconds!r} must be more than 0 and at most {MAX_BUSY_TIMEOUT_S:g} seconds")
    return value


def install_busy_timeout(seconds: float = DEFAULT_BUSY_TIMEOUT_S) -> BusyTimeoutListener:
    """Set ``PRAGMA busy_timeout`` on every SQLite connection SQLAlchemy hands out in this process.

    Returns the listener, for :func:`remove_busy_timeout`. A pool ``checkout`` listener runs
    after the ``connect`` listeners, so it wins over Flower's ``busy_timeout = 5000``.
    """
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    milliseconds = int(check_busy_timeout(seconds) * 1000)

    def set_busy_timeout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if isinstance(dbapi_connection, sqlite3.Connection):
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {milliseconds}")
            finally:
                cursor.close()

    event.listen(Pool, "checkout", set_busy_timeout)
    return set_busy_timeout


def remove_busy_timeout(listener: BusyTimeoutListener) -> None:
    """Undo :func:`install_busy_timeout` (tests)."""
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    event.remove(Pool, "checkout", listener)


def launch_command(flower_cmd: Sequence[str], busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> list[str]:
    """``flower_cmd`` (a ``flower-superlink`` command line) run through this module."""
    if not flower_cmd or Path(flower_cmd[0]).name != FLOWER_SUPERLINK:
        raise ValueError(f"flower_cmd must start with {FLOWER_SUPERLINK}, got {list(flower_cmd)[:1]}")
    return [sys.executable, "-m", "medfed.server.superlink_db",
            "--busy-timeout", f"{check_busy_timeout(busy_timeout_s):g}", "--", *flower_cmd]


def flower_superlink_main() -> Callable[[], Any]:
    """Flower's own ``flower-superlink`` entry point, from the installed flwr distribution."""
    found = [ep for ep in entry_points(group="console_scripts", name=FLOWER_SUPERLINK)
             if ep.dist is None or ep.dist.name in FLOWER_DISTRIBUTIONS]
    if not found:
        raise RuntimeError(f"no {FLOWER_SUPERLINK} entry point in this environment: install flwr")
    return found[0].load()


def main(argv: Sequence[str] | None = None) -> int:
    from medfed.common.logs import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(prog="python -m medfed.server.superlink_db", description=__doc__.splitlines()[0])
    parser.add_argument("--busy-timeout", type=float, default=DEFAULT_BUSY_TIMEOUT_S,
                        help=f"seconds a SQLite write waits for the lock (default {DEFAULT_BUSY_TIMEOUT_S:g})")
    opts, flower_cmd = parser.parse_args(args[:split]), args[split + 1:]
    setup_logging()
    if not flower_cmd or Path(flower_cmd[0]).name != FLOWER_SUPERLINK:
        parser.error(f"give the {FLOWER_SUPERLINK} command after --")
    try:
        install_busy_timeout(opts.busy_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    log.info("SuperLink database: SQLite busy timeout %g s", opts.busy_timeout)
    sys.argv = [flower_cmd[0], *flower_cmd[1:]]
    result = flower_superlink_main()()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
