"""`medfed simulate --ray-address`: the sites run on an existing Ray cluster (a local head here).

The head runs in its own process group and is stopped by killing that group only: never
`ray stop`, which would stop every Ray instance on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfed.common.errors import MedfedError

RAY = Path(sys.executable).parent / "ray"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all sockets stay bound until every port is picked, so none repeats."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _processes_of(session: int, marker: str) -> list[tuple[int, str]]:
    """Live processes in ``session`` or naming ``marker`` (the head's temp dir) on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, _ppid, _pgid, sid = stat[stat.rindex(")") + 2:].split()[:4]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # it exited while we looked
        if state != "Z" and (int(sid) == session or marker in cmdline):
            found.append((int(entry.name), cmdline[:160]))
    return found


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs; yields (address, temp dir)."""
    if not RAY.is_file():
        pytest.skip(f"the ray CLI is not at {RAY}")
    # Not under tmp_path: Ray puts unix sockets below its temp dir, and their paths must stay
    # under 108 bytes. Every port is free-picked so the head never collides with other Ray
    # instances on this machine (the defaults 10001 and 52365 are fixed).
    temp_dir = Path(tempfile.mkdtemp(prefix="medfed-ray-", dir="/tmp"))
    flags = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    port, *others = _free_ports(len(flags) + 1)
    ports = dict(zip(flags, others, strict=True))
    cmd = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
           "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block",
           *(f"--{flag}={value}" for flag, value in ports.items())]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(temp_dir / "head.log", "wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_until_ready(head, temp_dir, port)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        left = _stop_group(head, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"the Ray head left processes running: {left}"


def _wait_until_ready(head: subprocess.Popen, temp_dir: Path, port: int, timeout_s: float = 180.0) -> None:
    """`ray start` writes ray_current_cluster once every head process is up; the GCS then accepts connections."""
    deadline = time.monotonic() + timeout_s
    log = temp_dir / "head.log"
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}: {log.read_text()[-2000:]}")
        if (temp_dir / "ray_current_cluster").is_file():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return
            except OSError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not come up in {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def _stop_group(head: subprocess.Popen, marker: str) -> list[tuple[int, str]]:
    """SIGTERM the head's process group, then SIGKILL what remains of it; return what had to be killed."""
    session = head.pid  # start_new_session: the head leads its own session and process group
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(session, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _processes_of(session, marker):
            time.sleep(0.5)
        try:
            head.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        left = _processes_of(session, marker)
        if not left:
            return []
    for pid, _ in left:  # ours (our session, or naming our temp dir) but escaped the group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.slow
def test_simulate_on_an_existing_ray_cluster(ray_head: tuple[str, Path], tmp_path: Path):
    address, temp_dir = ray_head
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-m", "medfed.common.cli", "simulate", "--sites", "2", "--rounds", "1", "--local-steps", "2",
         "--batch-size", "32", "--ray-address", address, "--site-cpus", "1", "--site-gpus", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and set(summary["sites"]) == {"site-0", "site-1"}
    assert summary["config"]["ray-address"] == address and summary["config"]["site-cpus"] == 1.0
    assert 0.0 <= summary["test"]["auc"] <= 1.0
    # The ClientApps ran on this head, not on a local Ray instance: its session logged the
    # actors, one per site-cpus CPU of the head's 2 (2 actors).
    logs = list((temp_dir / "session_latest" / "logs").glob("worker-*.out"))
    actors = [p for p in logs if ":actor_name:ClientAppActor" in p.read_text(errors="replace")]
    assert len(actors) == 2, [p.name for p in logs]
    assert not (out / ".sites").exists()


def test_an_unreachable_cluster_fails_fast_with_the_fix():
    from medfed.simulations.engine import check_cluster_reachable

    (port,) = _free_ports(1)  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(MedfedError, match=f"no Ray cluster answers at ray-address=127.0.0.1:{port}.*ray start --head"):
        check_cluster_reachable(f"127.0.0.1:{port}", timeout_s=2.0)
    assert time.monotonic() - t0 < 5.0
