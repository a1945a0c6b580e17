"""Children die with their parent: the guard between a medfed command and the daemon it starts.

:func:`medfed.common.process.start_process_group` runs every daemon command (the SuperLink;
a site's launcher with its SuperNode) as ``python -m medfed.common.guard --parent-pid PID
-- CMD...``, the leader of a new session. The guard

* becomes a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): a descendant whose parent
  dies is re-parented to the guard, also one that called ``setsid`` (Flower's SuperLink
  detaches ``flower-superexec`` into its own session), so the guard finds it in ``/proc``
  and reaps it;
* hears at once when its parent dies (``PR_SET_PDEATHSIG``; that signal also comes when only
  the parent's *thread* that started the guard ends, so ``getppid()`` decides) and polls
  ``getppid()`` every 0.2 s besides. ``PR_SET_PDEATHSIG`` alone would not do: the kernel
  clears it in every child a process forks, so Flower's own children would live on;
* starts CMD with ``PR_SET_PDEATHSIG=SIGKILL``, so CMD dies even if the guard is SIGKILLed.

The guard stops the whole tree (SIGTERM to CMD and every descendant, SIGKILL to what is left
after a grace period) when its parent dies, when it is asked to stop (SIGTERM, SIGINT or
SIGHUP), and when CMD exits leaving descendants behind. It then exits with CMD's status
(128 + N when signal N ended CMD). Without Linux's ``prctl`` and ``/proc`` it still notices
its parent's death by polling and stops CMD and its process group.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from medfed.common.logs import setup_logging
from medfed.common.proctree import live_descendants

log = logging.getLogger("medfed.common.guard")  # also when run as __main__

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PARENT_DEATH_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_S = 0.2
STOP_GRACE_S = 8.0  # CMD's own shutdown when the guard is asked to stop (below process.STOP_TIMEOUT_S)
ORPHAN_GRACE_S = 2.0  # after the parent died or CMD exited: SIGTERM, then SIGKILL after this long
GIVE_UP_S = 10.0  # after SIGKILL: what still runs (uninterruptible sleep) is logged and left
HAS_PROC = os.path.exists("/proc/self/stat")


def guard_command(cmd: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """``cmd`` under the guard, which stops it and its descendants when ``parent_pid`` (default: this process) exits."""
    pid = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", "medfed.common.guard", "--parent-pid", str(pid), "--", *cmd]


@functools.lru_cache(maxsize=1)
def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


def prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)``; False where it is missing or refused."""
    fn = _libc_prctl()
    return fn is not None and fn(option, value, 0, 0, 0) == 0


def label(cmd: Sequence[str]) -> str:
    """A short name for ``cmd`` in log lines: the program, or the module of ``python -m``."""
    args = [str(a) for a in cmd]
    if len(args) > 2 and args[1] == "-m":
        return args[2]
    return os.path.basename(args[0]) if args else "?"


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when this process dies (Linux; elsewhere nothing).

    Only for a parent with no other threads at the time it starts the child (the guard;
    the site launcher starting its SuperNode): code after ``fork`` in a threaded parent may
    deadlock. The kernel clears the setting in the child's own children.
    """
    parent = os.getpid()
    _libc_prctl()  # resolved before fork, not in the child

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _Tree:
    """CMD and its descendants: reaped as they exit, and stopped (SIGTERM, then SIGKILL) once asked."""

    def __init__(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        self.status: int | None = None
        self.kill_at: float | None = None
        self.give_up_at: float | None = None
        self.termed: set[int] = set()

    def reap(self) -> None:
        """Wait for every exited child (orphans re-parented to the guard too); note CMD's status."""
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child.pid:
                code = os.waitstatus_to_exitcode(wstatus)
                self.child.returncode = code
                self.status = 128 - code if code < 0 else code

    def left(self) -> list[int]:
        """Processes still running in the tree (CMD itself where ``/proc`` cannot tell)."""
        pids = live_descendants(os.getpid())
        if self.status is None and self.child.pid not in pids:
            pids.append(self.child.pid)
        return pids

    def stop(self, grace: float, why: str, level: int = logging.INFO) -> None:
        """Stop the tree: SIGTERM now, SIGKILL after ``grace`` s (an earlier deadline stays)."""
        deadline = time.monotonic() + grace
        if self.kill_at is None:
            log.log(level, "%s: stopping %s and its descendants", why, label(self.child.args))
            if not HAS_PROC:  # no process tree to walk: CMD's process group (the guard's own) is the best reach
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgrp(), signal.SIGTERM)
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)

    def enforce(self, left: list[int]) -> bool:
        """Signal what is ``left`` of a tree being stopped; False once SIGKILL did not end it in time."""
        if self.kill_at is None:
            return True
        now = time.monotonic()
        sig = signal.SIGTERM if now < self.kill_at else signal.SIGKILL
        for pid in left:
            if sig == signal.SIGKILL or pid not in self.termed:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
                self.termed.add(pid)
        if sig == signal.SIGKILL and self.give_up_at is None:
            self.give_up_at = now + GIVE_UP_S
        return self.give_up_at is None or now < self.give_up_at


def _signal_pipe(received: list[int]) -> int:
    """Handle the stop, parent-death and child signals by noting them; returns a fd that wakes on each."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    for sig in (*STOP_SIGNALS, PARENT_DEATH_SIGNAL, signal.SIGCHLD):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    return read_fd


def run_guard(cmd: Sequence[str], parent_pid: int) -> int:
    """Run ``cmd``; stop its whole tree when ``parent_pid`` exits first or the guard is told to. CMD's status."""
    if not prctl(PR_SET_CHILD_SUBREAPER, 1):
        log.debug("no child subreaper on %s: descendants that leave %s's tree outlive the guard",
                  sys.platform, label(cmd))
    received: list[int] = []
    wake = _signal_pipe(received)
    if not prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL):
        log.debug("no parent-death signal on %s: polling for parent %d every %.1f s", sys.platform, parent_pid, POLL_S)
    if os.getppid() != parent_pid:
        log.warning("parent process %d exited before %s started: not starting it", parent_pid, label(cmd))
        return 1
    try:
        tree = _Tree(subprocess.Popen(list(cmd), preexec_fn=die_with_parent()))  # noqa: PLW1509 - single-threaded
    except OSError as exc:  # not found, not executable
        log.error("could not start %s: %s", label(cmd), exc)
        return 127
    while True:
        tree.reap()
        while received:
            signum = received.pop()
            if signum in STOP_SIGNALS:
                tree.stop(STOP_GRACE_S, signal.Signals(signum).name, logging.DEBUG)
        if os.getppid() != parent_pid:
            tree.stop(ORPHAN_GRACE_S, f"parent process {parent_pid} exited", logging.WARNING)
        if tree.status is not None or tree.kill_at is not None:  # the /proc walk only when something ends
            left = tree.left()
            if tree.status is not None and not left:
                return tree.status
            if tree.status is not None:
                tree.stop(ORPHAN_GRACE_S, f"{label(cmd)} exited with code {tree.status}, {len(left)} process(es) left")
            if not tree.enforce(left):
                log.error("processes %s did not exit after SIGKILL; leaving them", " ".join(map(str, left)))
                return 1 if tree.status is None else tree.status
        with contextlib.suppress(InterruptedError):
            select.select([wake], [], [], POLL_S)
        with contextlib.suppress(BlockingIOError):
            os.read(wake, 512)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medfed.common.guard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent-pid", type=int, required=True, help="stop CMD when this process exits")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, cmd = parser.parse_args(argv[:split]), argv[split + 1:]
    if not cmd:
        parser.error("give the command to run after --")
    setup_logging()
    return run_guard(cmd, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
