"""``flower-supernode`` with a short idle poll: the one module that patches Flower's SuperNode.

Flower 1.41's SuperNode main loop (``flwr.supernode.start_client_internal.start_client_internal``)
asks the SuperLink for a message and, when there is none, sleeps a hard-coded ``time.sleep(3)``
before asking again: a message the server sends waits 1.5 s on average, 3 s at worst, before the
site even sees it, twice per round (train, then evaluate). It then pulls the message's contents
with Flower's default retry (1 s, then 2 s, ... while the server is still uploading them), and
waits for the ClientApp's reply (``_push_messages``) and its contents with ``time.sleep(0.5)`` loops.

What is touched, exactly, and nothing else (two globals of ``flwr.supernode.start_client_internal``):

* ``time``: that module's name for the :mod:`time` module is replaced by a :class:`PollClock`.
  Its ``sleep(s)`` sleeps the idle poll (``MEDFED_SUPERNODE_POLL_S``, default
  :data:`DEFAULT_POLL_S`) where Flower sleeps :data:`FLOWER_IDLE_SLEEP_S` or more, and at most
  :data:`LOCAL_WAIT_S` where Flower waits for the local ClientApp (an in-memory check, no
  network). Every other attribute is the real :mod:`time` module's.
* ``pull_objects`` (Flower's ``flwr.supercore.inflatable.inflatable_utils.pull_objects``, as
  imported there): replaced by :func:`medfed.common.flwr_pull.quick_pull_objects`, the same
  function with a first retry after 0.02 s and at most 0.5 s between retries, where its caller
  passes none.

:func:`check_patch_point` checks both before patching: the globals exist and are Flower's
originals, ``start_client_internal``'s source still calls ``time.sleep(3)`` and ``pull_objects``
still takes ``initial_backoff`` and ``backoff_cap``. If not (a later Flower), the SuperNode runs
unpatched, with a warning naming the Flower version and the symbol, and
``tests/test_warm_worker.py`` fails saying the same.

Run as ``python -m medfed.client.supernode_poll /path/to/flower-supernode ARGS...``: it patches,
then calls Flower's own ``flower-supernode`` entry point with ``ARGS`` (same process, same
command-line parsing, same exit codes). The site launcher (:mod:`medfed.client.app_runner`)
starts the SuperNode this way. The idle poll costs one Fleet API request per interval and site at
the SuperLink: 0.2 s is 5 requests a second per site, measured on loopback at about 4 % of one
core of the SuperLink per idle site (Flower's 3 s: under 1 %).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time as _time
from collections.abc import Sequence
from types import ModuleType

from medfed.common.env_seconds import env_seconds
from medfed.common.flwr_pull import (
    PATCHED_PULL,
    PullPatchMissing,
    check_pull,
    flower_version,
    quick_pull_objects,
)

log = logging.getLogger("medfed.client.supernode_poll")  # also when run as __main__

POLL_ENV = "MEDFED_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.2
MAX_POLL_S = 60.0
LOCAL_WAIT_S = 0.05  # the SuperNode waiting for its own ClientApp's reply: an in-memory check
FLOWER_IDLE_SLEEP_S = 3.0  # Flower 1.41's hard-coded idle sleep in start_client_internal
TESTED_FLOWER = ("1.41", "1.42")  # versions whose patch point was read and tested
PATCHED_MODULE = "flwr.supernode.start_client_internal"
PATCHED_GLOBAL = "time"
PATCHED_CALL = "time.sleep(3)"
SUPERNODE_SCRIPT = "flower-supernode"


class PatchPointMissing(RuntimeError):
    """This Flower's SuperNode loop is not the one :mod:`medfed.client.supernode_poll` patches."""


def poll_interval(env: dict[str, str] | None = None) -> float:
    """The idle poll in seconds from ``MEDFED_SUPERNODE_POLL_S`` (default 0.2); ValueError when invalid."""
    return float(env_seconds(POLL_ENV, DEFAULT_POLL_S, maximum=MAX_POLL_S, env=env))


class PollClock:
    """The :mod:`time` module as ``start_client_internal`` sees it: shorter sleeps, all else unchanged."""

    def __init__(self, poll_s: float, local_wait_s: float = LOCAL_WAIT_S) -> None:
        if poll_s <= 0 or local_wait_s <= 0:
            raise ValueError(f"poll_s={poll_s} and local_wait_s={local_wait_s} must be positive")
        self.poll_s = poll_s
        self.local_wait_s = local_wait_s

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_SLEEP_S:  # no message from the SuperLink: poll again soon
            _time.sleep(self.poll_s)
        else:  # waiting for the local ClientApp
            _time.sleep(min(seconds, self.local_wait_s))

    def __getattr__(self, name: str) -> object:
        return getattr(_time, name)


def check_patch_point(module: ModuleType | None = None) -> ModuleType:
    """The module to patch; :class:`PatchPointMissing` naming the Flower version and symbol otherwise."""
    if module is None:
        import importlib

        module = importlib.import_module(PATCHED_MODULE)
    where = f"Flower {flower_version()} ({PATCHED_MODULE}, tested with Flower {', '.join(TESTED_FLOWER)})"
    fix = "update medfed.client.supernode_poll"
    current = getattr(module, PATCHED_GLOBAL, None)
    if not isinstance(current, PollClock) and current is not _time:
        raise PatchPointMissing(f"{where} has no global `{PATCHED_GLOBAL}` bound to the time module: {fix}")
    loop = getattr(module, "start_client_internal", None)
    if loop is None:
        raise PatchPointMissing(f"{where} has no function `start_client_internal`: {fix}")
    try:
        source = inspect.getsource(loop)
    except (OSError, TypeError) as exc:
        raise PatchPointMissing(f"{where}: cannot read the source of `start_client_internal` ({exc}): {fix}") from None
    if PATCHED_CALL not in source:
        raise PatchPointMissing(f"{where}: `start_client_internal` no longer calls `{PATCHED_CALL}` "
                                f"(its idle poll changed): {fix}")
    try:
        check_pull(module)
    except PullPatchMissing as exc:
        raise PatchPointMissing(str(exc)) from None
    return module


def patch(poll_s: float | None = None) -> bool:
    """Shorten the SuperNode's idle poll in this process; False (and a warning) where Flower changed."""
    interval = poll_interval() if poll_s is None else poll_s
    try:
        module = check_patch_point()
    except PatchPointMissing as exc:
        log.warning("%s; the SuperNode keeps Flower's own %g s poll", exc, FLOWER_IDLE_SLEEP_S)
        return False
    setattr(module, PATCHED_GLOBAL, PollClock(interval))
    setattr(module, PATCHED_PULL, quick_pull_objects)
    log.debug("SuperNode idle poll %g s (Flower %s: %s.%s and .%s)", interval, flower_version(), PATCHED_MODULE,
              PATCHED_GLOBAL, PATCHED_PULL)
    return True


def wrapped_command(supernode_cmd: Sequence[str]) -> list[str]:
    """``flower-supernode ARGS`` through this module; any other command unchanged."""
    cmd = list(supernode_cmd)
    if cmd and os.path.basename(cmd[0]) == SUPERNODE_SCRIPT:
        return [sys.executable, "-m", "medfed.client.supernode_poll", *cmd]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or os.path.basename(args[0]) != SUPERNODE_SCRIPT:
        sys.stderr.write(f"usage: python -m medfed.client.supernode_poll /path/to/{SUPERNODE_SCRIPT} ARGS...\n")
        return 2
    from medfed.common.logs import setup_logging

    setup_logging()  # medfed's logger only: Flower's lines keep their own handler
    try:
        interval = poll_interval()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    patch(interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = args  # Flower parses sys.argv; its program name stays flower-supernode
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
