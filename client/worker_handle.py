"""The launcher's end of the warm worker (:mod:`medfed.client.worker`): start it, hand it tasks, restart it.

:class:`WarmWorker` writes each task's request on the template's stdin and reads the template's
status pipe (``ready``, ``started TASK PID``). When the template dies, every task it had not
acknowledged goes to a cold process (``cold``) and a new template starts at once, so it is warm
by the next task; after :data:`MAX_FAILED_STARTS` templates in a row died before they were
ready, every task runs in a cold process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Callable, Sequence

from medfed.client.worker_protocol import READY, STARTED, TaskRequest

log = logging.getLogger("medfed.client.worker_handle")

MAX_FAILED_STARTS = 3


class WarmWorker:
    """The launcher's end of the template: start it, hand it tasks, notice when it died."""

    def __init__(self, command: Sequence[str], cold: Callable[[TaskRequest], object]) -> None:
        self.command = list(command)
        self.cold = cold  # runs one request in a cold process
        self.proc: subprocess.Popen[bytes] | None = None
        self.status_fd: int | None = None
        self.buffer = b""
        self.ready = False
        self.pending: dict[int, TaskRequest] = {}  # handed, not yet acknowledged (by task id)
        self.failed_starts = 0
        self.disabled = False

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen([*self.command, "--status-fd", str(write_fd)], stdin=subprocess.PIPE,
                                         pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.status_fd, self.buffer, self.ready = read_fd, b"", False

    def hand(self, request: TaskRequest) -> None:
        """Run ``request`` in a warm process (the template, started where needed), else in a cold one."""
        self.check()
        if self.proc is None and not self.disabled:
            self.start()
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is None:
            self.cold(request)
            return
        try:
            stdin.write(request.line())
            stdin.flush()
        except OSError:
            log.warning("task %d: the warm worker does not take tasks; starting a cold process", request.task_id)
            self.cold(request)
            return
        self.pending[request.task_id] = request

    def check(self) -> None:
        """Read the template's status; when it died, give what it did not start to cold processes."""
        if self.proc is None:
            return
        self._read_status()
        code = self.proc.poll()
        if code is None:
            return
        self._read_status()
        self.failed_starts = 0 if self.ready else self.failed_starts + 1
        log.warning("the warm worker exited with code %s%s", code, "" if self.ready else " before it was ready")
        self._close_pipes()
        self.proc = None
        if self.failed_starts >= MAX_FAILED_STARTS:
            log.error("%d warm workers in a row died before they were ready: one cold process per task from now on",
                      self.failed_starts)
            self.disabled = True
        for request in self.pending.values():
            log.warning("task %d: not started by the warm worker; starting a cold process", request.task_id)
            self.cold(request)
        self.pending.clear()
        if not self.disabled:
            self.start()  # warm again before the next task comes

    def _read_status(self) -> None:
        if self.status_fd is None:
            return
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.status_fd, 4096):
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            words = line.decode(errors="replace").split()
            if words == [READY]:
                self.ready = True
                self.failed_starts = 0
            elif len(words) == 3 and words[0] == STARTED and words[1].isdigit():
                self.pending.pop(int(words[1]), None)

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None

    def close(self, timeout: float = 5.0) -> None:
        """Close the template's stdin (it exits once its tasks ended); SIGKILL it after ``timeout``."""
        if self.proc is None:
            return
        proc = self.proc
        self._close_pipes()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.proc = None
