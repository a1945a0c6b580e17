"""What the launcher, the warm worker's template and each task process tell each other.

Launcher -> template (stdin): one :class:`TaskRequest` JSON line per task. Template -> launcher
(status pipe): ``ready``, then ``started TASK PID`` per task. Task -> template (a pipe per task):
:class:`Progress` reports, in order ``pulled`` (with the message's metadata, never its content),
``replied``, ``finished``, ``imported``. See :mod:`medfed.client.worker`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from medfed.common.env_seconds import env_seconds

WARM_ENV = "MEDFED_WARM_WORKER"  # "0": one cold process per task, as Flower does
TASK_TIMEOUT_ENV = "MEDFED_TASK_TIMEOUT_S"  # unset: a task runs until its message expires
READY = "ready"  # template -> launcher, on the status pipe: "ready", then "started TASK PID" per task
STARTED = "started"


class Key(str, Enum):
    """Keys of the JSON lines: launcher -> template (a request) and task -> template (a report)."""

    TOKEN = "token"
    TASK_ID = "task-id"
    RUN_ID = "run-id"
    SEEN = "seen"
    EVENT = "event"
    METADATA = "metadata"  # hex
    NODE_ID = "node-id"
    EXPIRES_AT = "expires-at"  # time.time() after which the task's reply is of no use
    MODULES = "modules"


class Event(str, Enum):
    """What a task reports to its template, in this order."""

    PULLED = "pulled"  # with its message's metadata: the template can answer for it from now on
    REPLIED = "replied"
    FINISHED = "finished"  # its task output is pushed: nothing left to answer for
    IMPORTED = "imported"  # the ON_DEMAND modules it imported


@dataclass(frozen=True)
class TaskRequest:
    """One task the launcher acquired: its token (never on a command line) and when it was seen."""

    token: str
    task_id: int
    run_id: int
    seen: float  # time.time() when the launcher acquired it

    def line(self) -> bytes:
        return (json.dumps({Key.TOKEN.value: self.token, Key.TASK_ID.value: self.task_id,
                            Key.RUN_ID.value: self.run_id, Key.SEEN.value: self.seen}) + "\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> TaskRequest:
        data = json.loads(line)
        return cls(str(data[Key.TOKEN.value]), int(data[Key.TASK_ID.value]), int(data[Key.RUN_ID.value]),
                   float(data[Key.SEEN.value]))


@dataclass(frozen=True)
class Unanswered:
    """What the template knows of a task whose process stopped before it finished."""

    request: TaskRequest
    metadata: bytes  # of the task's message (:func:`medfed.client.runtime_api.message_metadata`)
    node_id: int
    run_id: int


class Progress:
    """A task's reports to its template (``fd``); with no ``fd`` (a cold task) reports go nowhere."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def pulled(self, metadata: bytes, node_id: int, run_id: int, expires_at: float) -> None:
        self._send(Event.PULLED, {Key.METADATA: metadata.hex(), Key.NODE_ID: node_id, Key.RUN_ID: run_id,
                                  Key.EXPIRES_AT: expires_at})

    def replied(self) -> None:
        self._send(Event.REPLIED)

    def finished(self) -> None:
        self._send(Event.FINISHED)

    def imported(self, modules: Sequence[str]) -> None:
        self._send(Event.IMPORTED, {Key.MODULES: list(modules)})

    def _send(self, event: Event, fields: dict[Key, object] | None = None) -> None:
        if self.fd is None:
            return
        line = {Key.EVENT.value: event.value, **{k.value: v for k, v in (fields or {}).items()}}
        with contextlib.suppress(OSError):  # a report lost never stops the task
            os.write(self.fd, (json.dumps(line) + "\n").encode())


RunOne = Callable[[TaskRequest, Progress], int]
Answer = Callable[[Unanswered, str, bool], object]  # (task, reason, reply too: False once it replied)


def task_timeout(env: dict[str, str] | None = None) -> float | None:
    """``MEDFED_TASK_TIMEOUT_S`` in seconds, None when unset; ValueError when not a positive number."""
    return env_seconds(TASK_TIMEOUT_ENV, None, env=env)


def warm_enabled(env: dict[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get(WARM_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}
