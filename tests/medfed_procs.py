"""Real ``medfed server start`` / ``medfed site start`` processes for tests, and their cleanup.

Each command runs as the leader of its own session (so a test can SIGKILL that one pid,
or clean up its whole group); :class:`Processes` stops every process it started or saw,
also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from medfed.common.process import stop_process_group
from medfed.common.proctree import descendants, proc_table

MEDFED = str(Path(sys.executable).parent / "medfed")
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, poll: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def site_yaml(base: Path, site_id: str, server: str, index: int = 0, count: int = 1) -> Path:
    """A minimal site.yaml: synthetic data, one shard of ``count``, a free ClientApp port."""
    lines = [f"site-id: {site_id}", f"state-dir: {site_id}/state", f"server: '{server}'", "task: classification",
             f"shard-index: {index}", f"shard-count: {count}", "clientappio-port: 0",
             f"data-root: {site_id}/data", "dataset: synthetic"]
    path = base / f"{site_id}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Processes:
    """The medfed commands a test started, and every descendant seen: all stopped by :meth:`cleanup`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.seen: dict[int, int] = {}  # pid -> start time (a reused pid is not killed)
        self.logs: list[Path] = []

    def medfed(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        """``medfed ARGS`` in its own session, stdout and stderr to ``BASE/NAME.out``."""
        log = self.base / f"{name}.out"
        self.logs.append(log)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as out:
            proc = subprocess.Popen([MEDFED, *args], cwd=self.base, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def tree(self, proc: subprocess.Popen[bytes]) -> list[int]:
        """The descendants of ``proc`` now, remembered for the cleanup."""
        table = proc_table()
        pids = descendants(proc.pid, table)
        self.seen.update({pid: table[pid][3] for pid in pids if pid in table})
        return pids

    def cleanup(self) -> list[int]:
        """Stop everything; returns the pids that were still running and had to be SIGKILLed here."""
        for proc in self.procs:
            self.tree(proc)
        for proc in reversed(self.procs):
            stop_process_group(proc, timeout=5)
        table = proc_table()
        leftovers = [pid for pid, start in self.seen.items()
                     if pid in table and table[pid][3] == start and table[pid][2] != "Z"]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return leftovers

    def text(self, name: str) -> str:
        path = self.base / f"{name}.out"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""

    def tails(self, lines: int = 40) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(self.text(log.stem).splitlines()[-lines:])
                         for log in self.logs)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    def listening() -> bool:
        assert proc.poll() is None, f"exited with code {proc.returncode} before listening on {port}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    wait_for(f"port {port}", listening, timeout)


def start_server(procs: Processes, base: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`medfed server start --insecure` on a free loopback port, listening; (its process, its address)."""
    from medfed.common.process import free_port

    port = free_port()
    server = procs.medfed(["server", "start", "--insecure", "--state-dir", str(base / "server"),
                           "--port", str(port)], "server")
    wait_for_port(port, server)
    return server, f"127.0.0.1:{port}"
