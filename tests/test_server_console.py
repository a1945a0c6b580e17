"""The server console shows each study's progress (issue 15, item 5).

Flower sends a deployed ServerApp's output to /dev/null; its ``medfed`` log lines go to
``STATE_DIR/console/run-<id>.log`` (:mod:`medfed.common.run_console`) and ``medfed server
start`` prints them as ``[run <id>] ...``. Quick tests check the writer and the follower;
the slow one runs a real study (server, one site, ``medfed run --wait``) and reads the
server's console.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from medfed.common.run_console import (
    RUN_CONSOLE_ENV,
    ConsoleFollower,
    attach_run_console,
    console_file,
    current_run_id,
)

from tests.medfed_procs import Processes, site_yaml, start_server, wait_for

IDENTITY_MODULE = "flwr.supercore.task_identity"


def _identity(monkeypatch: pytest.MonkeyPatch, run_id: int | None) -> None:
    """Pretend to be a Flower task process serving ``run_id`` (None: not one)."""
    if run_id is None:
        monkeypatch.delitem(sys.modules, IDENTITY_MODULE, raising=False)
        return
    fake = types.SimpleNamespace(TaskIdentity=types.SimpleNamespace(run_id=run_id))
    monkeypatch.setitem(sys.modules, IDENTITY_MODULE, fake)


def _files(log: logging.Logger) -> list[logging.Handler]:
    return [h for h in log.handlers if isinstance(h, logging.FileHandler)]


@pytest.fixture
def logger() -> logging.Logger:
    log = logging.getLogger("medfed-test-run-console")  # outside "medfed": the suite's own handlers stay
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    for handler in _files(log):
        log.removeHandler(handler)
        handler.close()


def test_follower_prints_new_complete_lines_with_the_run_id(tmp_path: Path) -> None:
    (tmp_path / "run-5.log").write_text("an old study\n")
    (tmp_path / "notes.txt").write_text("not a console file\n")
    printed: list[str] = []
    follower = ConsoleFollower(tmp_path, printed.append)
    follower.poll()
    assert printed == []  # history is not replayed
    with (tmp_path / "run-5.log").open("a") as f:
        f.write("round 1/2: ok\nround 2/2")
    (tmp_path / "run-7.log").write_text("waiting up to 300 s for sites\n")
    follower.poll()
    assert printed == ["[run 5] round 1/2: ok", "[run 7] waiting up to 300 s for sites"]
    with (tmp_path / "run-5.log").open("a") as f:
        f.write(": done\n")
    follower.stop()  # never started: stop still prints what is there
    assert printed[-1] == "[run 5] round 2/2: done"
    (tmp_path / "run-7.log").write_text("new\n")  # shorter: rewritten, read from the start
    follower.poll()
    assert printed[-1] == "[run 7] new"


def test_run_console_only_in_a_flower_task_with_the_folder_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               logger: logging.Logger) -> None:
    formatter = logging.Formatter("%(levelname)s %(message)s")
    folder = tmp_path / "console"
    _identity(monkeypatch, 42)
    monkeypatch.delenv(RUN_CONSOLE_ENV, raising=False)
    attach_run_console(logger, formatter)
    assert _files(logger) == []  # no folder asked for (a site, a simulation)

    monkeypatch.setenv(RUN_CONSOLE_ENV, str(folder))
    _identity(monkeypatch, None)
    assert current_run_id() is None
    attach_run_console(logger, formatter)
    assert _files(logger) == []  # not a Flower task (the CLI, the guard)

    _identity(monkeypatch, 42)
    attach_run_console(logger, formatter)
    attach_run_console(logger, formatter)
    assert len(_files(logger)) == 1
    logger.info("round 1/1: done")
    _identity(monkeypatch, 43)
    attach_run_console(logger, formatter)
    logger.warning("train from site site-b (node 7) failed: timeout")
    assert console_file(folder, 42).read_text() == "INFO round 1/1: done\n"
    assert console_file(folder, 43).read_text() == "WARNING train from site site-b (node 7) failed: timeout\n"
    assert len(_files(logger)) == 1


SERVERAPP = """
import logging
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id = 9
from medfed.common.logs import setup_logging
setup_logging()
logging.getLogger("medfed.server.federation").info("round 1/3: 2/2 sites trained")
logging.getLogger("flwr").warning("not a medfed line")
"""


def test_setup_logging_in_a_serverapp_writes_the_console_file(tmp_path: Path) -> None:
    env = {**os.environ, RUN_CONSOLE_ENV: str(tmp_path / "console")}
    res = subprocess.run([sys.executable, "-c", SERVERAPP], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert "round 1/3: 2/2 sites trained" in res.stderr  # stderr as before (Flower uploads it to the run's log)
    lines = console_file(tmp_path / "console", 9).read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("medfed INFO round 1/3: 2/2 sites trained")


@pytest.mark.slow
def test_server_start_prints_the_study_progress(tmp_path: Path) -> None:
    """`medfed server start`, a study submitted before its site exists, then `medfed site start`."""
    procs = Processes(tmp_path)
    try:
        server, address = start_server(procs, tmp_path)
        run = procs.medfed(["run", "--server", address, "--insecure", "--wait", "--timeout", "240", "--run-config",
                            "num-server-rounds=1 num-sites=1 min-sites=1 local-steps=2 batch-size=16"], "run")
        wait_for("the wait for sites on the server console", lambda: "waiting up to" in procs.text("server"), 60)
        procs.medfed(["site", "start", "--config", str(site_yaml(tmp_path, "site-a", address)), "--insecure"],
                     "site-a")
        assert run.wait(timeout=240) == 0, procs.text("run")
        run_id = re.search(r"run (\d+): finished:completed", procs.text("run")).group(1)
        console = wait_for("the end of the study on the server console",
                           lambda: "study finished" in (text := procs.text("server")) and text, 15)
    finally:
        leftovers = procs.cleanup()
        print(procs.tails())
    assert leftovers == []
    lines = [line for line in console.splitlines() if line.startswith(f"[run {run_id}] ")]
    assert any("waiting up to" in line and "for sites" in line for line in lines)
    assert any("site-a" in line for line in lines)
    assert any(re.search(r"round 1/1: .*sites trained", line) for line in lines)
    assert any("study finished" in line for line in lines)
    assert not [line for line in lines if "not a medfed line" in line or "uvicorn" in line]
