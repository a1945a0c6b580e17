"""Process helpers for the daemons and tests: start in a new session, wait, stop the whole tree.

Shared by ``medfed server start``, ``medfed site start``, the loopback deployment and
its tests. Linux ``/proc`` is used to find descendants that left the process group
(Flower's SuperLink and SuperNode detach ``flower-superexec`` into its own session).
Every daemon runs under :mod:`medfed.common.guard`, so it and everything it started stop
when the medfed process that started it dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from medfed.common.errors import MedfedError
from medfed.common.flwr_pull import transfer_concurrency_env
from medfed.common.guard import guard_command
from medfed.common.proctree import descendants, is_alive
from medfed.common.proctree import proc_table as _proc_table

__all__ = ["FLOWER_ENV", "descendants", "free_port", "is_alive", "run_in_foreground", "start_process_group",
           "stop_process_group", "wait_for_port"]

STOP_TIMEOUT_S = 10.0

# Environment for Flower's daemons:
# - no telemetry: Flower otherwise POSTs platform details to its servers on every event,
#   from every process; nothing may leave a hospital that the site did not decide to send;
# - no update check (no internet at a hospital);
# - the SuperExec that launches each ServerApp/ClientApp process polls every 0.2 s
#   instead of 1 s, which takes up to 0.8 s off every message a site handles;
# - and (medfed.common.flwr_pull.transfer_concurrency_env, unless set) a message's objects move
#   16 at a time, not 2.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_process_group(
    cmd: Sequence[str],
    *,
    cwd: str | Path,
    env: Mapping[str, str] | None = None,
    log_path: str | Path | None = None,
    guard: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session; output to ``log_path`` (appended) or inherited.

    The folder of ``cmd[0]`` goes first on PATH: Flower's SuperLink and SuperNode start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by bare name.
    ``guard`` (POSIX): the session leader is :mod:`medfed.common.guard`, with ``cmd`` as its
    child, so ``cmd`` and all its descendants stop when this process dies; the returned
    process is the guard, which exits with ``cmd``'s status.
    """
    path = os.pathsep.join([str(Path(cmd[0]).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PATH": path, **FLOWER_ENV, **transfer_concurrency_env(), **(env or {})}
    argv = guard_command(cmd) if guard and os.name == "posix" else list(cmd)
    out: IO[Any] | None = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - the child keeps the descriptor
    try:
        return subprocess.Popen(
            argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()


def wait_for_port(
    host: str,
    port: int,
    proc: subprocess.Popen[bytes],
    timeout: float,
    what: str,
    log_path: str | Path | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections; stop ``proc`` and raise if it cannot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MedfedError(f"{what} exited with code {proc.returncode} before it was ready{_log_tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    stop_process_group(proc)
    raise MedfedError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s{_log_tail(log_path)}")


def _log_tail(log_path: str | Path | None, lines: int = 5) -> str:
    if log_path is None or not Path(log_path).is_file():
        return ""
    tail = Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f" (see {log_path}; last lines: {' | '.join(t.strip() for t in tail)})"


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S, *,
                       crash: bool = False) -> None:
    """SIGTERM the process group of ``proc``, wait, then SIGKILL what is left of it.

    Descendants that left the group (Flower starts its SuperExec in a new session) are
    remembered with their start time first, so only those very processes are killed.
    ``crash``: SIGKILL everything at once, as a crash or power cut would (fault tests).
    """
    table = _proc_table()
    others = {pid: table[pid][3] for pid in descendants(proc.pid) if pid in table}

    def _left() -> list[int]:
        now = _proc_table()
        return [pid for pid, start in others.items() if pid in now and now[pid][3] == start and now[pid][2] != "Z"]

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL if crash else signal.SIGTERM)
    if crash:
        for pid in _left():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)

    deadline = time.monotonic() + 2.0
    while _left() and time.monotonic() < deadline:
        time.sleep(0.1)
    if any(pgid == proc.pid for _ppid, pgid, _state, _start in _proc_table().values()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in _left():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    deadline = time.monotonic() + 5.0  # SIGKILL is not instant on a loaded machine: return once they are gone
    while _left() and time.monotonic() < deadline:
        time.sleep(0.05)


def run_in_foreground(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc``; on Ctrl-C, SIGTERM or SIGHUP stop its whole process tree. Returns its exit code."""

    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_process_group(proc)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
