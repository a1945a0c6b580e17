"""Follow the SuperNode's log: copy it to the operator's terminal, and notice when the server accepted it.

``medfed site start`` writes the SuperNode's output to ``<state-dir>/supernode.log`` and a
:class:`SupernodeLog` thread copies every new byte to stderr, so the terminal (or
``docker logs``) shows what it always showed. Flower 1.41's SuperNode logs
``SuperNode ID: <id>`` once the SuperLink has registered and activated it; that line is
what "started" means: the thread calls ``on_accepted`` with the node id when it appears.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

LOG_NAME = "supernode.log"
ROTATE_BYTES = 64 * 1024 * 1024  # a longer log moves to supernode.log.1 when the site starts
ACCEPTED = re.compile(rb"SuperNode ID: (\d+)")  # flwr/supernode/start_client_internal.py, after ActivateNode
POLL_S = 0.2


def rotate(path: Path, max_bytes: int = ROTATE_BYTES) -> None:
    """Keep one previous log: a log over ``max_bytes`` becomes ``<name>.1`` before the next start."""
    if path.is_file() and path.stat().st_size > max_bytes:
        path.replace(path.with_name(path.name + ".1"))


class SupernodeLog(threading.Thread):
    """Copy ``path`` from its current end to ``sink``; remember the node id once the server accepted it."""

    def __init__(self, path: Path, sink: IO[bytes] | None = None,
                 on_accepted: Callable[[str], None] | None = None) -> None:
        super().__init__(name="supernode-log", daemon=True)
        self.path = path
        self.sink = sink if sink is not None else sys.stderr.buffer
        self.on_accepted = on_accepted
        self.node_id = ""
        self.accepted = threading.Event()
        self._stopping = threading.Event()
        self._offset = path.stat().st_size if path.is_file() else 0
        self._tail = b""

    def stop(self) -> None:
        """Copy what is left, then end the thread."""
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            chunk = self._read()
            if chunk:
                self.sink.write(chunk)
                self.sink.flush()
                self._scan(chunk)
            elif stopping:
                return
            else:
                time.sleep(POLL_S)

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read(1 << 16)
        except FileNotFoundError:
            return b""
        self._offset += len(chunk)
        return chunk

    def _scan(self, chunk: bytes) -> None:
        if self.accepted.is_set():
            return
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()[-4096:]
        for line in lines:
            match = ACCEPTED.search(line)
            if match:
                self.node_id = match.group(1).decode("ascii")
                self.accepted.set()
                if self.on_accepted is not None:
                    self.on_accepted(self.node_id)
                return
