"""Warm site workers: a pre-imported template process forks one fresh process per ClientApp task.

Flower starts a new ClientApp process for every message, and each one imports torch, Flower and
medfed again (2-5 s of CPU) before its handler runs. The site launcher
(:mod:`medfed.client.app_runner`) instead keeps one *template* process
(``python -m medfed.client.app_runner task --warm ...``) that has imported :data:`PRELOAD`
(torch, Flower's runtime, medfed's ClientApp: 270 MB, 2-3 s once) and nothing else happens in
it: it never pulls a message, never reads site data or site.yaml, never initializes CUDA
(checked before every fork). :data:`ON_DEMAND` libraries (Opacus +110 MB, MONAI +60 MB, about
1.5 s each) are imported by the template once a task of its reported needing them, so only
studies that use DP or segmentation pay for them, and only once. For each task the launcher
writes the task's token on the template's stdin; the template forks, and the child runs exactly one task
(``run_one``: pull the message, check the FAB against site.yaml, run the installed medfed
ClientApp, reply) and exits. Each task so still has a process of its own, started from the
same clean state: nothing one task leaves in memory reaches the next, and the template's
memory does not grow with the tasks it served.

The template supervises its children. A child that dies before it finished (``os._exit``,
SIGKILL, the OOM killer) or runs past its deadline (``MEDFED_TASK_TIMEOUT_S`` when set, and
always once the server no longer waits for its reply: the study's ``round-timeout`` after the
task pulled its message, plus a grace period, or the message's expiry) is answered for: ``answer`` pushes an error reply and finishes
the task with the task's token, so the SuperNode goes on with its next message at once
(Flower itself answers only after the task's heartbeat lapsed, about 60 s). A task that died
before it pulled its message is left to Flower.

Lifetimes: the template and every child set ``PR_SET_PDEATHSIG`` (SIGKILL) to their parent and
exit if that parent is already gone; children also run Flower's parent monitor on the launcher.
Both stay inside the process tree of :mod:`medfed.common.guard`, which stops them with the rest.
The template reports ``ready`` and each ``started TASK PID`` on a status pipe to the launcher's
end, :class:`medfed.client.worker_handle.WarmWorker` (the pipes' contents:
:mod:`medfed.client.worker_protocol`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from medfed.client.worker_protocol import (
    READY,
    STARTED,
    TASK_TIMEOUT_ENV,
    Answer,
    Event,
    Key,
    Progress,
    RunOne,
    TaskRequest,
    Unanswered,
    task_timeout,
)
from medfed.common.guard import PR_SET_PDEATHSIG, prctl

log = logging.getLogger("medfed.client.worker")

PRELOAD = (
    "torch", "flwr.supernode.runtime.run_clientapp", "flwr.supercore.heartbeat", "medfed.client.runtime_api",
    "medfed.client.trusted_app", "medfed.common.site_config", "medfed.client.app", "medfed.client.task",
    "medfed.client.eval_guard", "medfed.common.data.federated", "medfed.common.metrics", "medfed.common.fairness",
)
ON_DEMAND = ("opacus", "monai")  # heavy extras: imported once a task needed them (skipped where not installed)
POLL_S = 0.2


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import ``modules`` (:data:`ON_DEMAND` ones where installed); the names imported."""
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            if name not in ON_DEMAND:
                raise
            log.debug("warm worker: %s is not installed; tasks that need it import it themselves", name)
            continue
        done.append(name)
    return done


def cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@dataclass
class _Child:
    pid: int
    request: TaskRequest
    fd: int | None
    started: float = field(default_factory=time.monotonic)
    buffer: bytes = b""
    pulled: Unanswered | None = None
    expires: float | None = None  # time.monotonic() after which its reply is of no use
    replied: bool = False
    finished: bool = False
    stopped: str | None = None  # why the template killed it


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Template:
    """The template's bookkeeping: forks children, reads their reports, reaps them, enforces deadlines."""

    def __init__(self, run_one: RunOne, answer: Answer, timeout_s: float | None = None,
                 status_fd: int | None = None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive or None")
        self.run_one = run_one
        self.answer = answer
        self.timeout_s = timeout_s
        self.status_fd = status_fd
        self.children: dict[int, _Child] = {}
        self.wanted: set[str] = set()  # ON_DEMAND modules a task imported: the template imports them next
        self.pid = os.getpid()

    def status(self, text: str) -> None:
        if self.status_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.status_fd, (text + "\n").encode())

    def fork(self, request: TaskRequest) -> int:
        """Start ``request`` in a new child; its pid."""
        if cuda_initialized():  # a forked child could not use CUDA: never serve from such a template
            raise RuntimeError("the warm worker's template initialized CUDA; it cannot fork task processes")
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one task, then _exit; nothing of the template's loop runs here
            code = 1
            try:
                os.close(read_fd)
                self._become_task()
                progress = Progress(write_fd)
                code = self.run_one(request, progress)
                progress.imported([m for m in ON_DEMAND if m in sys.modules])
            except KeyboardInterrupt:  # the launcher exited (Flower's parent monitor)
                code = 130
            except BaseException:  # noqa: BLE001 - the child must not return into the template
                with contextlib.suppress(Exception):
                    log.exception("task %d: the task process failed", request.task_id)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.children[pid] = _Child(pid, request, read_fd)
        self.status(f"{STARTED} {request.task_id} {pid}")
        log.info("task %d of run %d: started in warm process %d", request.task_id, request.run_id, pid)
        return pid

    def _become_task(self) -> None:
        """In the child: die with the template, drop its pipes and signal handlers, fresh random state."""
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(1)
        for child in self.children.values():
            if child.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(child.fd)
        if self.status_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.status_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if "numpy" in sys.modules:  # forked children share the template's generator state otherwise
            sys.modules["numpy"].random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        self.children = {}

    def read(self, child: _Child) -> None:
        """Take in what ``child`` reported; close its pipe at EOF."""
        if child.fd is None:
            return
        while True:
            try:
                chunk = os.read(child.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                os.close(child.fd)
                child.fd = None
                break
            child.buffer += chunk
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            self._event(child, line)

    def _event(self, child: _Child, line: bytes) -> None:
        try:
            report = json.loads(line)
            event = Event(report[Key.EVENT.value])
            if event is Event.PULLED:
                child.pulled = Unanswered(child.request, bytes.fromhex(report[Key.METADATA.value]),
                                          int(report[Key.NODE_ID.value]), int(report[Key.RUN_ID.value]))
                child.expires = time.monotonic() + float(report[Key.EXPIRES_AT.value]) - time.time()
            elif event is Event.REPLIED:
                child.replied = True
            elif event is Event.FINISHED:
                child.finished = True
            elif event is Event.IMPORTED:
                self.wanted.update(m for m in map(str, report[Key.MODULES.value])
                                   if m in ON_DEMAND and m not in sys.modules)
        except (ValueError, KeyError, TypeError):
            log.warning("task %d: unreadable report from its process: %r", child.request.task_id, line[:200])

    def deadline(self, child: _Child) -> float | None:
        limits = [t for t in (child.expires, child.started + self.timeout_s if self.timeout_s else None)
                  if t is not None]
        return min(limits) if limits else None

    def enforce(self) -> None:
        """SIGKILL children past their deadline (reaped and answered for by :meth:`reap`)."""
        now = time.monotonic()
        for child in self.children.values():
            end = self.deadline(child)
            if child.stopped is None and end is not None and now >= end:
                expired = child.expires is not None and end == child.expires
                child.stopped = ("the server no longer waits for its reply (round-timeout or message expiry)"
                                 if expired else f"it did not finish within {TASK_TIMEOUT_ENV}={self.timeout_s:g} s")
                log.error("task %d: %s; stopping process %d", child.request.task_id, child.stopped, child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    def reap(self) -> None:
        """Wait for exited children; answer for those that did not finish."""
        for pid, child in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                done, status = pid, 255 << 8
            if done == 0:
                continue
            self.read(child)  # what it wrote before it exited
            if child.fd is not None:
                os.close(child.fd)
            del self.children[pid]
            self._finished(child, os.waitstatus_to_exitcode(status))

    def _finished(self, child: _Child, code: int) -> None:
        task = child.request.task_id
        if child.finished and child.stopped is None:
            log.log(logging.INFO if code == 0 else logging.WARNING, "task %d: done (process %d %s)", task,
                    child.pid, _exit_text(code))
            return
        why = child.stopped or f"the ClientApp process {_exit_text(code)}"
        if child.pulled is None:
            log.error("task %d: %s before it pulled its message; the SuperNode notices once its heartbeat lapses",
                      task, why)
            return
        log.error("task %d: %s before it finished; %s so the site goes on", task, why,
                  "finishing it" if child.replied else "answering for it")
        self.answer(child.pulled, f"{why} (details in the site's log)", not child.replied)

    def wait_s(self) -> float:
        ends = [end for c in self.children.values() if c.stopped is None and (end := self.deadline(c)) is not None]
        return max(0.0, min([POLL_S, *(end - time.monotonic() for end in ends)]))

    def serve(self, commands: int = 0) -> int:
        """Fork a child per request line read from ``commands``; at EOF, wait for the children, then return 0."""
        buffer = b""
        open_ = True
        while open_ or self.children:
            fds = ([commands] if open_ else []) + [c.fd for c in self.children.values() if c.fd is not None]
            with contextlib.suppress(InterruptedError):
                ready = select.select(fds, [], [], self.wait_s())[0]
                if commands in ready:
                    chunk = os.read(commands, 65536)
                    open_ = bool(chunk)
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in filter(None, lines):
                        self.fork(TaskRequest.parse(line))
                for child in list(self.children.values()):
                    if child.fd in ready:
                        self.read(child)
            self.reap()
            self.enforce()
            if self.wanted:
                self.import_wanted()
        return 0

    def import_wanted(self) -> None:
        """Import what tasks needed, so the next tasks find it imported (once per template)."""
        wanted, self.wanted = sorted(self.wanted), set()
        t0 = time.perf_counter()
        preload(wanted)
        if cuda_initialized():
            raise RuntimeError(f"importing {', '.join(wanted)} initialized CUDA; the warm worker stops")
        log.info("warm worker: %s imported in %.1f s for the next tasks", ", ".join(wanted), time.perf_counter() - t0)


def run_template(run_one: RunOne, answer: Answer, parent_pid: int, status_fd: int | None = None,
                 modules: Sequence[str] = PRELOAD) -> int:
    """The template's life: die with ``parent_pid``, import ``modules``, then serve tasks until stdin closes."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        log.warning("warm worker: launcher %d exited before the worker started", parent_pid)
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the launcher decides
    try:
        timeout_s = task_timeout()
    except ValueError as exc:
        log.error("warm worker: %s", exc)
        return 2
    t0 = time.perf_counter()
    loaded = preload(modules)
    if cuda_initialized():
        log.error("warm worker: importing %s initialized CUDA; tasks run in cold processes", ", ".join(loaded))
        return 3
    log.info("warm worker %d ready: %s imported in %.1f s", os.getpid(), ", ".join(loaded), time.perf_counter() - t0)
    template = Template(run_one, answer, timeout_s, status_fd)
    template.status(READY)
    return template.serve()
