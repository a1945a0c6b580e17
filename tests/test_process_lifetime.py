"""Children die with their parent: a SIGKILLed medfed command leaves no daemon behind (issue 15, item 6).

The guard (:mod:`medfed.common.guard`) sits between every medfed command and the daemon it
starts. Quick tests drive it with shell trees (one branch leaves the session with
``setsid``, as Flower's SuperExec does, and ignores SIGTERM); the slow test SIGKILLs a real
``medfed site start`` while its ClientApp trains, then the real ``medfed server start`` while
its ServerApp waits for that reply, and checks that every process they had started is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.common import guard
from medfed.common.process import start_process_group, stop_process_group
from medfed.common.proctree import descendants, is_alive

from tests.medfed_procs import Processes, cmdline, site_yaml, start_server, wait_for

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")

GONE_WITHIN_S = 10.0  # the guard notices at once (parent-death signal), SIGKILLs after 2 s of SIGTERM

# a shell with one child in its group and one that left with setsid and ignores SIGTERM, with a child of its own
TREE = "sleep 300 & setsid sh -c \"trap '' TERM; sleep 301 & sleep 302\" & wait"

PARENT = """
import sys, time
from medfed.common.process import start_process_group
proc = start_process_group(["/bin/sh", "-c", sys.argv[1]], cwd=sys.argv[2])
print(proc.pid, flush=True)
time.sleep(600)
"""


def _gone(pids: list[int], timeout: float = GONE_WITHIN_S) -> list[int]:
    """Waits until every pid is gone; returns those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if is_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _tree(pid: int, size: int) -> list[int]:
    """The descendants of ``pid`` once there are ``size`` of them."""
    return wait_for(f"{size} descendants of {pid}", lambda: (d := descendants(pid)) and len(d) >= size and d, 10)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_guard_command_runs_the_guard_module_with_this_process_as_parent() -> None:
    cmd = guard.guard_command(["flower-superlink", "--insecure"])
    assert cmd[:3] == [sys.executable, "-m", "medfed.common.guard"]
    assert cmd[3:] == ["--parent-pid", str(os.getpid()), "--", "flower-superlink", "--insecure"]


def test_prctl_degrades_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    guard._libc_prctl.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert guard.prctl(guard.PR_SET_CHILD_SUBREAPER, 1) is False
    finally:
        guard._libc_prctl.cache_clear()


@linux_only
def test_sigkilled_parent_takes_the_whole_tree_with_it(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, TREE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    tree: list[int] = []
    try:
        guard_pid = int(parent.stdout.readline())
        tree = _tree(parent.pid, 6)
        assert guard_pid in tree
        assert any("setsid" in cmdline(pid) or "sleep 302" in cmdline(pid) for pid in tree)
        parent.send_signal(signal.SIGKILL)  # the parent alone: the guard leads another session
        parent.wait()
        assert _gone(tree) == []
    finally:
        parent.kill()
        parent.wait()
        _kill_all(tree)


@linux_only
def test_guard_exits_with_the_command_status(tmp_path: Path) -> None:
    for script, code in (("exit 3", 3), ("kill -KILL $$", 128 + signal.SIGKILL)):
        proc = start_process_group(["/bin/sh", "-c", script], cwd=tmp_path)
        try:
            assert proc.wait(timeout=10) == code
        finally:
            stop_process_group(proc, timeout=1)


@linux_only
def test_guard_stops_what_the_command_left_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    proc = start_process_group(["/bin/sh", "-c", f"setsid sleep 300 & echo $! > {pid_file}; exit 0"], cwd=tmp_path)
    orphan = None
    try:
        orphan = int(wait_for("the orphan's pid", lambda: pid_file.is_file() and pid_file.read_text().strip(), 10))
        assert proc.wait(timeout=GONE_WITHIN_S) == 0
        assert _gone([orphan]) == []
    finally:
        stop_process_group(proc, timeout=1)
        if orphan is not None:
            _kill_all([orphan])


@linux_only
def test_guard_stops_its_tree_when_told_to(tmp_path: Path) -> None:
    proc = start_process_group(["/bin/sh", "-c", TREE], cwd=tmp_path)
    tree: list[int] = []
    try:
        tree = _tree(proc.pid, 5)
        os.kill(proc.pid, signal.SIGTERM)  # the guard alone, not its group
        assert proc.wait(timeout=GONE_WITHIN_S) == 128 + signal.SIGTERM
        assert _gone(tree) == []
    finally:
        stop_process_group(proc, timeout=1)
        _kill_all(tree)


def _names(pids: list[int]) -> str:
    return " | ".join(cmdline(pid) for pid in pids)


@pytest.mark.slow
@linux_only
def test_sigkilled_site_and_server_leave_no_process_behind(tmp_path: Path) -> None:
    """A study in round 1: SIGKILL `medfed site start` while it trains, then `medfed server start`."""
    from medfed.server.submit import submit_run

    procs = Processes(tmp_path)
    try:
        server, server_address = start_server(procs, tmp_path)
        site = procs.medfed(["site", "start", "--config", str(site_yaml(tmp_path, "site-a", server_address)),
                             "--insecure"], "site-a")
        wait_for("the site to join", lambda: "accepted by the server" in procs.text("site-a"), 60)
        # one training round far longer than this test: a ClientApp and the ServerApp are running when killed
        submit_run(server_address, insecure=True, run_config="num-server-rounds=1 num-sites=1 min-sites=1 "
                   "local-steps=1000000 batch-size=8 round-timeout=600")
        wait_for("round 1 on the server console", lambda: "round 1/1: training at" in procs.text("server"), 90)
        site_tree = wait_for("the site's ClientApp training",
                             lambda: (t := procs.tree(site)) and "app_runner task" in _names(t) and t, 60)
        names = _names(site_tree)
        assert "medfed.common.guard" in names and "app_runner launcher" in names and "flower-supernode" in names
        os.kill(site.pid, signal.SIGKILL)  # the parent alone, not its group
        site.wait()
        assert _gone(site_tree) == [], f"left running: {_names(_gone(site_tree, 0))}"

        server_tree = wait_for("the ServerApp", lambda: (t := procs.tree(server)) and "flwr-serverapp" in _names(t) and t,
                               10)
        names = _names(server_tree)
        assert "flower-superlink" in names and "flower-superexec" in names
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        assert _gone(server_tree) == [], f"left running: {_names(_gone(server_tree, 0))}"
    finally:
        leftovers = procs.cleanup()
        print(procs.tails())
    assert leftovers == []
