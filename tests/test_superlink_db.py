"""The SuperLink's SQLite lock wait (medfed.server.superlink_db): set, winning over Flower's, applied at start.

Issue 16.5: with 10 SuperNodes Flower 1.41's 5 s ``busy_timeout`` ran out, the SuperLink
answered 500 ("database is locked") and sites dropped out. These tests check that the
longer wait reaches the very connections Flower's state uses, and that ``medfed server
start`` runs the SuperLink with it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from medfed.common.process import free_port, stop_process_group
from medfed.server.deploy import (
    ServerDeployConfig,
    start_superlink,
    superlink_command,
    superlink_launch_command,
)
from medfed.server.superlink_db import (
    DEFAULT_BUSY_TIMEOUT_S,
    check_busy_timeout,
    install_busy_timeout,
    launch_command,
    remove_busy_timeout,
)
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

FLOWER_BUSY_TIMEOUT_MS = 5000  # flwr.supercore.constant.SQLITE_PRAGMAS in 1.41 and 1.42


def _flower_state(db: Path):
    """Flower's SQL LinkState on ``db``, built the way flower-superlink builds it."""
    from flwr.server.superlink.linkstate.linkstate_factory import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.config_loader import get_federation_manager

    return LinkStateFactory(str(db), get_federation_manager(), ObjectStoreFactory(str(db))).state()


def _pragma(state, name: str):
    with state.session() as session:
        return session.execute(text(f"PRAGMA {name}")).scalar()


@pytest.fixture()
def busy_timeout():
    """install_busy_timeout, removed again after the test (the listener is process-wide)."""
    installed = []

    def install(seconds: float):
        installed.append(install_busy_timeout(seconds))
        return installed[-1]

    yield install
    for listener in installed:
        remove_busy_timeout(listener)


def test_flower_alone_waits_5_s_in_wal_mode(tmp_path: Path) -> None:
    state = _flower_state(tmp_path / "superlink.db")
    assert _pragma(state, "journal_mode") == "wal"
    assert _pragma(state, "busy_timeout") == FLOWER_BUSY_TIMEOUT_MS, (
        "Flower's own SQLite busy timeout changed: check whether medfed.server.superlink_db is still needed")


def test_installed_timeout_wins_over_flowers_pragma(tmp_path: Path, busy_timeout) -> None:
    busy_timeout(DEFAULT_BUSY_TIMEOUT_S)
    state = _flower_state(tmp_path / "superlink.db")
    assert _pragma(state, "busy_timeout") == int(DEFAULT_BUSY_TIMEOUT_S * 1000)
    assert _pragma(state, "journal_mode") == "wal"  # Flower's other pragmas stay
    assert _pragma(state, "foreign_keys") == 1


def _hold_write_lock(db: Path, seconds: float, held: threading.Event) -> None:
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        other.execute("COMMIT")
    finally:
        other.close()


@pytest.mark.parametrize(("wait_s", "succeeds"), [(0.2, False), (5.0, True)])
def test_flower_write_waits_as_long_as_installed(tmp_path: Path, busy_timeout, wait_s: float,
                                                 succeeds: bool) -> None:
    """A Flower write while another connection holds the lock 1 s: fails after 0.2 s, succeeds with 5 s."""
    db = tmp_path / "superlink.db"
    busy_timeout(wait_s)
    state = _flower_state(db)
    held = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(db, 1.0, held))
    holder.start()
    try:
        assert held.wait(5)
        # store_traffic: the UPDATE on every pull-object; past the lock it finds no run 12345
        expected = (ValueError, "Run 12345 not found") if succeeds else (OperationalError, "database is locked")
        with pytest.raises(expected[0], match=expected[1]):
            state.store_traffic(12345, bytes_sent=1, bytes_recv=1)
    finally:
        holder.join()


@pytest.mark.parametrize("bad", [0, -1, 3601, float("nan")])
def test_busy_timeout_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="busy-timeout"):
        check_busy_timeout(bad)


def test_launch_command_wraps_flowers_command_unchanged(tmp_path: Path) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    cfg = ServerDeployConfig(state_dir=tmp_path, insecure=True)
    cmd = superlink_launch_command(cfg)
    split = cmd.index("--")
    assert cmd[1:split] == ["-m", "medfed.server.superlink_db", "--busy-timeout", f"{DEFAULT_BUSY_TIMEOUT_S:g}"]
    assert cmd[split + 1:] == superlink_command(cfg)
    args = _parse_args_run_superlink().parse_args(cmd[split + 2:])
    assert args.database == str(tmp_path.resolve() / "superlink.db")


def test_launch_command_runs_only_the_superlink() -> None:
    with pytest.raises(ValueError, match="flower-superlink"):
        launch_command(["flower-supernode", "--insecure"])


def test_started_superlink_has_the_longer_wait_and_a_wal_database(tmp_path: Path) -> None:
    cfg = ServerDeployConfig(state_dir=tmp_path / "state", insecure=True, port=free_port())
    log = tmp_path / "superlink.log"
    proc = start_superlink(cfg, log_path=log)
    try:
        text_ = log.read_text(errors="replace")
        assert f"SQLite busy timeout {DEFAULT_BUSY_TIMEOUT_S:g} s" in text_, text_[-2000:]
        db = tmp_path / "state" / "superlink.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        stop_process_group(proc)
