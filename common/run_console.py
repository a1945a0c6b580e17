"""Each deployed study's progress on the server's console, through ``STATE_DIR/console/run-<id>.log``.

Flower 1.41's SuperExec starts every ServerApp process (``flwr-serverapp``) with its output
sent to ``/dev/null`` (``AutoExecPlugin`` shows only ClientApp output); the lines reach
only the run's log in ``superlink.db`` (``flwr log``, ``medfed run --stream``). So the
SuperLink is started with ``MEDFED_RUN_CONSOLE=STATE_DIR/console`` in its environment, which
the SuperExec and each ServerApp inherit. In the ServerApp,
:func:`medfed.common.logs.setup_logging` then also appends the ``medfed`` logger's lines to
``run-<run id>.log`` there (:func:`attach_run_console`), and ``medfed server start`` follows
that folder (:class:`ConsoleFollower`), printing each new line as ``[run <id>] <line>``.
The files stay: ``tail -f STATE_DIR/console/run-<id>.log`` shows a study later too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

RUN_CONSOLE_ENV = "MEDFED_RUN_CONSOLE"
CONSOLE_DIR = "console"
FILE_PREFIX, FILE_SUFFIX = "run-", ".log"
POLL_S = 0.5


def console_file(folder: str | Path, run_id: int) -> Path:
    return Path(folder) / f"{FILE_PREFIX}{int(run_id)}{FILE_SUFFIX}"


def current_run_id() -> int | None:
    """The run this process serves when it is a Flower task process (the ServerApp), else None.

    Flower's task runtime sets ``TaskIdentity.run_id`` before it calls the app; the module
    is looked up, never imported, so a process that is not a Flower task (the CLI, the
    guard) does not load Flower for this.
    """
    identity = sys.modules.get("flwr.supercore.task_identity")
    if identity is None:
        return None
    try:
        return int(identity.TaskIdentity.run_id)
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return None


class _RunFileHandler(logging.FileHandler):
    """Appends to one run's console file (opened on the first line)."""

    def __init__(self, path: Path, run_id: int) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.run_id = run_id


def attach_run_console(logger: logging.Logger, formatter: logging.Formatter) -> None:
    """Mirror ``logger``'s lines to this run's console file when the SuperLink asked for one (idempotent)."""
    folder = os.environ.get(RUN_CONSOLE_ENV, "")
    run_id = current_run_id() if folder else None
    for handler in [h for h in logger.handlers if isinstance(h, _RunFileHandler)]:
        if handler.run_id == run_id:
            return
        logger.removeHandler(handler)
        handler.close()
    if run_id is None:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        logger.warning("no console file for run %d in %s: %s", run_id, folder, exc)
        return
    handler = _RunFileHandler(console_file(folder, run_id), run_id)
    handler.setFormatter(formatter)
    logger.addHandler(handler)


class ConsoleFollower:
    """Prints the new lines of every ``run-<id>.log`` in ``folder`` as ``[run <id>] <line>``, from a thread.

    Files present at construction are followed from their end: a restarted server does not
    replay old studies. A line is printed once it is complete (ends with a newline).
    """

    def __init__(self, folder: str | Path, write: Callable[[str], None], poll_s: float = POLL_S) -> None:
        self.folder = Path(folder)
        self.write = write
        self.poll_s = poll_s
        self._offsets = {path: path.stat().st_size for path in self._files()}
        self._partial: dict[Path, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medfed-run-console", daemon=True)

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))

    def poll(self) -> None:
        """Print what was appended since the last poll."""
        for path in self._files():
            run = path.name[len(FILE_PREFIX):-len(FILE_SUFFIX)]
            try:
                size = path.stat().st_size
                offset = self._offsets.get(path, 0)
                if size < offset:  # replaced or truncated: start over
                    offset = 0
                    self._partial.pop(path, None)
                if size == offset:
                    continue
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read(size - offset)
            except OSError:
                continue
            self._offsets[path] = offset + len(data)
            *lines, rest = (self._partial.pop(path, b"") + data).split(b"\n")
            if rest:
                self._partial[path] = rest
            for line in lines:
                self.write(f"[run {run}] {line.decode('utf-8', errors='replace').rstrip()}")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def start(self) -> ConsoleFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following, after printing what is there now."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.poll()
