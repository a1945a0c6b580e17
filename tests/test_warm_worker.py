"""Warm site workers (client/worker.py) and the SuperNode's short poll (client/supernode_poll.py).

Layers: the Flower patch point and its clock exactly; the template process for real (it forks)
with a stand-in task function, so crashes, hangs, expiry, memory and lifetimes are checked in
seconds; the launcher's end with stand-in templates; then, marked slow, a real loopback
deployment: a task SIGKILLed mid-round is answered for and the site trains the next round, and
a FAB the site refuses is refused by a warm task process.
"""

from __future__ import annotations

import importlib

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from medfed.client import supernode_poll
from medfed.client.supernode_poll import (
    DEFAULT_POLL_S,
    LOCAL_WAIT_S,
    POLL_ENV,
    PatchPointMissing,
    PollClock,
    check_patch_point,
    poll_interval,
    quick_pull_objects,
    wrapped_command,
)
from medfed.client.worker_handle import MAX_FAILED_STARTS, WarmWorker
from medfed.client.worker_protocol import TASK_TIMEOUT_ENV, TaskRequest, task_timeout, warm_enabled
from medfed.common.proctree import is_alive
from tests.medfed_procs import wait_for

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and PR_SET_PDEATHSIG")


# --- the SuperNode's poll: one patch point in Flower -------------------------------------------------------------


def test_flower_still_has_the_supernode_patch_point():
    """Fails loudly, naming the Flower version and the symbol, when a Flower upgrade moved the SuperNode's poll."""
    try:
        module = check_patch_point()
    except PatchPointMissing as exc:
        pytest.fail(f"medfed.client.supernode_poll cannot shorten the SuperNode's poll: {exc}")
    assert module.__name__ == "flwr.supernode.start_client_internal"


def _fake_flower(folder: Path, source_call: str = "time.sleep(3)", time_module: object = time,
                 pull: object = "original") -> types.ModuleType:
    """A stand-in for Flower's module, as a later Flower might have it (a real file: its source is read)."""
    import importlib.util

    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    path = folder / "fake_start_client_internal.py"
    path.write_text(f"def start_client_internal():\n    {source_call}\n")
    spec = importlib.util.spec_from_file_location("fake_start_client_internal", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.time = time_module
    module.pull_objects = pull_objects if pull == "original" else pull
    return module


@pytest.mark.parametrize(("fake", "symbol"), [
    (dict(time_module=None), "`time`"),
    (dict(source_call="time.sleep(POLL)"), "time.sleep(3)"),
    (dict(pull=lambda *a, **k: None), "`pull_objects`"),
])
def test_missing_patch_point_names_flower_version_and_symbol(fake, symbol, tmp_path):
    from flwr.supercore.version import package_version

    module = _fake_flower(tmp_path, **fake)
    with pytest.raises(PatchPointMissing) as exc:
        check_patch_point(module)
    assert f"Flower {package_version}" in str(exc.value) and symbol in str(exc.value)


def test_the_fake_flower_module_passes_when_unchanged(tmp_path):
    module = _fake_flower(tmp_path)
    assert check_patch_point(module) is module


def test_patch_shortens_the_idle_poll_and_the_pull_retry_only(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    monkeypatch.setattr(sci, "time", sci.time)  # restored after the test
    monkeypatch.setattr(sci, "pull_objects", sci.pull_objects)
    assert supernode_poll.patch(0.25) is True
    assert isinstance(sci.time, PollClock) and sci.time.poll_s == 0.25
    assert sci.pull_objects is quick_pull_objects
    assert supernode_poll.patch(0.25) is True  # patching twice is harmless


def test_missing_patch_point_leaves_flower_as_it_is(monkeypatch, caplog):
    import flwr.supernode.start_client_internal as sci

    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(sci, "pull_objects", lambda *a, **k: None)  # "a later Flower"
    assert supernode_poll.patch(0.2) is False
    assert sci.time is time and "keeps Flower's own 3 s poll" in caplog.text


def test_poll_clock_sleeps_the_poll_for_flowers_idle_sleep_and_briefly_for_local_waits(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(supernode_poll._time, "sleep", slept.append)
    clock = PollClock(0.2)
    clock.sleep(3)  # Flower: no message from the SuperLink
    clock.sleep(0.5)  # Flower: waiting for the ClientApp's reply
    clock.sleep(0.01)
    assert slept == [0.2, LOCAL_WAIT_S, 0.01]
    assert clock.monotonic is time.monotonic and clock.time is time.time  # the rest is the time module
    with pytest.raises(ValueError, match="poll_s"):
        PollClock(0)


def test_quick_pull_objects_retries_sooner_unless_told_otherwise(monkeypatch):
    from medfed.common import flwr_pull

    seen: list[dict] = []
    monkeypatch.setattr(flwr_pull, "original_pull", lambda: lambda *a, **k: seen.append(k))
    quick_pull_objects(["id"], pull_object_fn=None)
    quick_pull_objects(["id"], pull_object_fn=None, initial_backoff=2.0)
    assert seen[0]["initial_backoff"] == flwr_pull.PULL_BACKOFF_S
    assert seen[0]["backoff_cap"] == flwr_pull.PULL_BACKOFF_CAP_S
    assert seen[1]["initial_backoff"] == 2.0


def test_the_server_apps_grid_pulls_replies_sooner(monkeypatch):
    """The deployed ServerApp patches its grid's pull (common/flwr_pull.py); a changed Flower is refused by name."""
    from medfed.common import flwr_pull

    grid_module = importlib.import_module(flwr_pull.HTTP_GRID_MODULE)
    monkeypatch.setattr(grid_module, "pull_objects", flwr_pull.original_pull())
    assert flwr_pull.patch_pull(flwr_pull.HTTP_GRID_MODULE)
    assert grid_module.pull_objects is quick_pull_objects
    changed = types.ModuleType("flwr.superlink.grid.http_grid")
    with pytest.raises(flwr_pull.PullPatchMissing, match=r"Flower .* has no global `pull_objects`"):
        flwr_pull.check_pull(changed)
    assert not flwr_pull.patch_pull(changed) and not hasattr(changed, "pull_objects")


def test_poll_interval_from_the_environment():
    assert poll_interval({}) == DEFAULT_POLL_S == 0.2
    assert poll_interval({POLL_ENV: " 0.5 "}) == 0.5
    for bad in ("0", "-1", "61", "soon"):
        with pytest.raises(ValueError, match=POLL_ENV):
            poll_interval({POLL_ENV: bad})


def test_only_flower_supernode_is_wrapped():
    cmd = ["/venv/bin/flower-supernode", "--superlink", "x:1"]
    assert wrapped_command(cmd) == [sys.executable, "-m", "medfed.client.supernode_poll", *cmd]
    assert wrapped_command(["/bin/sleep", "1"]) == ["/bin/sleep", "1"]


def test_poll_wrapper_refuses_other_commands_and_bad_intervals(monkeypatch):
    import medfed.common.logs

    monkeypatch.setattr(medfed.common.logs, "setup_logging", lambda: None)  # leave this process's logging alone
    assert supernode_poll.main(["/bin/sleep", "1"]) == 2
    monkeypatch.setenv(POLL_ENV, "never")
    assert supernode_poll.main(["/venv/bin/flower-supernode"]) == 2


def test_worker_settings_from_the_environment():
    assert warm_enabled({}) and not warm_enabled({"MEDFED_WARM_WORKER": "0"})
    assert task_timeout({}) is None and task_timeout({TASK_TIMEOUT_ENV: "90"}) == 90.0
    for bad in ("0", "-5", "later"):
        with pytest.raises(ValueError, match=TASK_TIMEOUT_ENV):
            task_timeout({TASK_TIMEOUT_ENV: bad})


def test_task_request_round_trips_without_the_token_on_a_command_line():
    request = TaskRequest("tok", 12, 34, 1.5)
    assert TaskRequest.parse(request.line()) == request and request.line().endswith(b"\n")


# --- the template, for real, with a stand-in task -----------------------------------------------------------------

# Stand-in for run_task: what the task does is named by its token. Every task writes ran-<task>.json.
TEMPLATE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from medfed.client.worker import run_template

    out, parent, modules = sys.argv[1], int(sys.argv[2]), [m for m in sys.argv[3].split(",") if m]

    def run_one(request, progress):
        kind = request.token
        expires = time.time() + (1.0 if kind == "expire" else 3600.0)
        progress.pulled(b"meta", 7, request.run_id, expires)
        facts = {"pid": os.getpid(), "ppid": os.getppid(), "had-opacus": "opacus" in sys.modules}
        if kind == "opacus":
            import opacus
        if "torch" in sys.modules:
            import numpy, torch
            facts.update(np=float(numpy.random.rand()), torch=float(torch.rand(1)), threads=torch.get_num_threads(),
                         cuda=torch.cuda.is_initialized())
        with open(os.path.join(out, f"ran-{request.task_id}.json"), "w") as f:
            json.dump(facts, f)
        if kind == "crash":
            os._exit(3)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind in ("hang", "expire"):
            time.sleep(3600)
        progress.replied()
        if kind == "crash-after-reply":
            os._exit(4)
        progress.finished()
        return 0

    def answer(task, reason, reply):
        with open(os.path.join(out, f"answer-{task.request.task_id}.json"), "w") as f:
            json.dump({"reason": reason, "reply": reply, "metadata": task.metadata.hex(), "node": task.node_id}, f)

    sys.exit(run_template(run_one, answer, parent, modules=modules))
    """
)


class Template:
    """A template process started by this test (its parent), fed task requests on stdin."""

    def __init__(self, out: Path, modules: str = "", env: dict[str, str] | None = None) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-c", TEMPLATE, str(out), str(os.getpid()), modules],
                                     stdin=subprocess.PIPE, env={**os.environ, **(env or {})})

    def send(self, kind: str, task_id: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(TaskRequest(kind, task_id, 1, time.time()).line())
        self.proc.stdin.flush()

    def ran(self, task_id: int, timeout: float = 60) -> dict:
        path = self.out / f"ran-{task_id}.json"
        wait_for(f"task {task_id} to run", lambda: path.is_file() and path.stat().st_size > 0, timeout, 0.02)
        return json.loads(path.read_text())

    def answer(self, task_id: int, timeout: float = 10) -> dict:
        path = self.out / f"answer-{task_id}.json"
        wait_for(f"an answer for task {task_id}", lambda: path.is_file() and path.stat().st_size > 0, timeout, 0.02)
        return json.loads(path.read_text())

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def template(tmp_path):
    made: list[Template] = []

    def start(modules: str = "", env: dict[str, str] | None = None) -> Template:
        made.append(Template(tmp_path, modules, env))
        return made[-1]

    yield start
    for t in made:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


@linux_only
@pytest.mark.parametrize(("kind", "why"), [("crash", "exited with code 3"), ("kill", "killed by SIGKILL")])
def test_a_task_that_dies_is_answered_for_and_the_next_task_runs(template, kind, why):
    t = template()
    t.send(kind, 1)
    answer = t.answer(1)
    assert why in answer["reason"] and answer["reply"] is True
    assert answer["metadata"] == b"meta".hex() and answer["node"] == 7  # what the task reported when it pulled
    t.send("ok", 2)
    first, second = t.ran(1), t.ran(2)
    assert first["pid"] != second["pid"] and first["ppid"] == second["ppid"] == t.proc.pid  # one process per task
    assert t.close() == 0
    assert not (t.out / "answer-2.json").exists()  # a task that finished is not answered for


@linux_only
def test_a_task_that_dies_after_replying_is_finished_without_a_second_reply(template):
    t = template()
    t.send("crash-after-reply", 1)
    assert t.answer(1)["reply"] is False
    assert t.close() == 0


@linux_only
def test_a_hung_task_is_stopped_at_the_task_timeout_and_the_next_task_runs(template):
    t = template(env={TASK_TIMEOUT_ENV: "1"})
    t.send("hang", 1)
    hung = t.ran(1)
    t.send("ok", 2)
    t.ran(2)  # runs beside the hung one: the template is not blocked
    assert not (t.out / "answer-2.json").exists()
    answer = t.answer(1, timeout=10)
    assert f"{TASK_TIMEOUT_ENV}=1 s" in answer["reason"] and answer["reply"] is True
    wait_for("the hung task to be gone", lambda: not is_alive(hung["pid"]), 5, 0.05)
    assert t.close() == 0


@linux_only
def test_a_task_whose_reply_is_of_no_use_any_more_is_stopped(template):
    t = template()
    t.send("expire", 1)  # the server stops waiting 1 s after it was pulled
    assert "the server no longer waits for its reply" in t.answer(1, timeout=10)["reason"]
    assert t.close() == 0


@linux_only
def test_the_template_waits_for_running_tasks_when_its_stdin_closes(template):
    t = template()
    t.send("ok", 1)
    assert t.close() == 0
    assert t.ran(1, timeout=1)


@pytest.mark.slow
@linux_only
def test_template_with_torch_forks_fresh_tasks_and_its_memory_stays_flat_over_100_tasks(template):
    """Design (a): the template runs no task, so its memory cannot grow with the tasks it served."""
    t = template(modules="torch")
    for i in range(1, 11):
        t.send("ok", i)
    facts = [t.ran(i) for i in range(1, 11)]
    rss_after_10 = t.rss_kb()
    for i in range(11, 111):
        t.send("ok", i)
        if i % 10 == 0:
            t.ran(i)
    for i in range(11, 111):
        t.ran(i)
    wait_for("the last children to be reaped", lambda: not any(is_alive(t.ran(i)["pid"]) for i in range(100, 111)),
             10, 0.05)
    rss_after_110 = t.rss_kb()
    assert rss_after_110 - rss_after_10 < 2048, (rss_after_10, rss_after_110)  # kB
    assert len({f["np"] for f in facts}) == len({f["torch"] for f in facts}) == 10  # fresh random state per task
    assert not any(f["cuda"] for f in facts)
    assert {f["threads"] for f in facts} == {_torch_threads_in_a_fresh_process()}  # fork left torch's threads intact
    assert t.close() == 0


@pytest.mark.slow
@linux_only
def test_the_template_imports_opacus_once_a_task_needed_it(template):
    pytest.importorskip("opacus")
    t = template()
    t.send("opacus", 1)
    first = t.ran(1)
    assert first["had-opacus"] is False
    # once the template reaped the task, it has its report and imports opacus before it reads the next request
    wait_for("the template to reap the task", lambda: not Path(f"/proc/{first['pid']}").exists(), 60, 0.05)
    t.send("ok", 2)
    assert t.ran(2, timeout=120)["had-opacus"] is True
    assert t.close() == 0


def _torch_threads_in_a_fresh_process() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


STAND_IN_LAUNCHER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from medfed.client.worker_protocol import TaskRequest
    template, out = sys.argv[1], sys.argv[2]
    proc = subprocess.Popen([sys.executable, "-c", template, out, str(os.getpid()), ""], stdin=subprocess.PIPE)
    proc.stdin.write(TaskRequest("hang", 1, 1, time.time()).line())
    proc.stdin.flush()
    print(proc.pid, flush=True)
    time.sleep(3600)
    """
)


@linux_only
def test_template_and_its_tasks_die_with_the_launcher_even_by_sigkill(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", STAND_IN_LAUNCHER, TEMPLATE, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        template_pid = int(launcher.stdout.readline())
        path = tmp_path / "ran-1.json"
        wait_for("the task to run", lambda: path.is_file() and path.stat().st_size > 0, 60, 0.05)
        task_pid = json.loads(path.read_text())["pid"]
        assert is_alive(template_pid) and is_alive(task_pid)
        launcher.kill()
        launcher.wait()
        wait_for("the template and its task to be gone", lambda: not is_alive(template_pid) and not is_alive(task_pid),
                 5, 0.05)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# --- the launcher's end: stand-in templates ----------------------------------------------------------------------

STAND_IN = textwrap.dedent(
    """
    import os, sys
    behaviour = sys.argv[1]
    fd = int(sys.argv[sys.argv.index("--status-fd") + 1])
    if behaviour == "dies-at-start":
        sys.exit(1)
    os.write(fd, b"ready\\n")
    line = sys.stdin.readline()  # takes one task, acknowledges none, and dies
    sys.exit(5)
    """
)


def _stand_in(behaviour: str) -> list[str]:
    return [sys.executable, "-c", STAND_IN, behaviour]


def test_a_task_the_dead_template_did_not_start_goes_to_a_cold_process():
    cold: list[TaskRequest] = []
    worker = WarmWorker(_stand_in("takes-one-and-dies"), cold.append)
    worker.start()
    request = TaskRequest("tok", 1, 2, time.time())
    worker.hand(request)
    try:
        wait_for("the template to die", lambda: worker.check() or cold, 30, 0.05)
        assert cold == [request]
        assert worker.proc is not None  # a new template is warming up already
    finally:
        worker.close(timeout=5)


def test_templates_that_die_before_ready_fall_back_to_cold_processes():
    cold: list[TaskRequest] = []
    worker = WarmWorker(_stand_in("dies-at-start"), cold.append)
    worker.start()
    for i in range(MAX_FAILED_STARTS):
        assert worker.proc is not None
        worker.proc.wait(timeout=30)
        worker.check()
    assert worker.disabled and worker.proc is None
    request = TaskRequest("tok", 9, 2, time.time())
    worker.hand(request)
    assert cold == [request]
    worker.close()


# --- end to end: a real SuperLink and two sites on loopback ------------------------------------------------------

EVIL = "from pathlib import Path\nPath(__file__).with_name('EVIL_RAN').write_text('x')\napp = None\n"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from medfed.simulations.loopback import LocalDeployment

    dep = LocalDeployment(tmp_path_factory.mktemp("warm") / "dep", sites=2, insecure=True)
    with dep:
        yield dep
    print(dep.log_tails())


def _warm_pids(log: str) -> dict[str, int]:
    """task id -> the pid of the warm process the site's worker started it in."""
    pids = {}
    for line in log.splitlines():
        if ": started in warm process " in line:
            task = line.split("task ", 1)[1].split()[0]
            pids[task] = int(line.rsplit(" ", 1)[1])
    return pids


def _kill_first_train_task(log_path: Path, killed: list[int], stop: object) -> None:
    """SIGKILL site-a's first task that handles a train message, as soon as its handler starts."""
    while not stop.is_set() and not killed:
        log = log_path.read_text(errors="replace") if log_path.is_file() else ""
        for line in log.splitlines():
            if "handler starts" in line and "the train message" in line:
                task = line.split("task ", 1)[1].split(":")[0]
                pid = _warm_pids(log)[task]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


@pytest.mark.slow
@linux_only
def test_a_task_killed_mid_round_is_answered_for_and_the_site_trains_the_next_round(deployment):
    import threading

    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_first_train_task, args=(deployment.base / "site-a.log", killed, stop))
    watcher.start()
    try:  # local-steps: training lasts long enough for the watcher to catch it
        run_dir = deployment.run_study(rounds=2, extra={"local-steps": 60, "min-sites": 1}, out_dir="runs/crash")
    finally:
        stop.set()
        watcher.join()
    assert killed, "no train task of site-a was seen"
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, second = rounds
    assert "train-s" not in first["sites"].get("site-a", {}) and "train-s" in first["sites"]["site-b"]
    reasons = [f["reason"] for f in first["failures"] if f.get("site") == "site-a"]
    assert reasons and "killed by SIGKILL" in reasons[0], first["failures"]  # the worker's answer, not a timeout
    assert all("train-s" in second["sites"][s] for s in ("site-a", "site-b")) and not second["failures"]
    site_log = (deployment.base / "site-a.log").read_text()
    assert "answering for it so the site goes on" in site_log


@pytest.mark.slow
@linux_only
def test_an_app_the_site_does_not_trust_is_refused_by_the_warm_worker(deployment, tmp_path):
    from medfed.client.trusted_app import TRUSTED_CLIENTAPP
    from medfed.server.submit import default_app, run_exit, submit_run
    from medfed.simulations.loopback import run_config_string

    evil_app = default_app(tmp_path / "evil-app")
    (evil_app / "evil.py").write_text(EVIL)
    py = evil_app / "pyproject.toml"
    py.write_text(py.read_text().replace(f'clientapp = "{TRUSTED_CLIENTAPP}"', 'clientapp = "evil:app"'))
    config = {"num-server-rounds": 1, "num-sites": 2, "min-sites": 2, "local-steps": 2, "out-dir": "runs/evil",
              "round-timeout": 120.0}
    result = submit_run(deployment.server, app_dir=evil_app, insecure=True, run_config=run_config_string(config),
                        wait=True, timeout=600)
    code, line = run_exit(result)
    assert code == 4 and "refused app sha256=" in line, line
    for site in ("site-a", "site-b"):
        log = (deployment.base / f"{site}.log").read_text()
        refused = [x for x in log.splitlines() if "refused app sha256=" in x and "evil:app" in x]
        assert refused, f"{site} did not refuse the app"
        refusal = log.index(refused[0])
        started = log.rfind(": started in warm process ", 0, refusal)  # the refusing task was a warm one
        assert started != -1 and "one cold process" not in log[started:refusal]
    assert not list(deployment.base.rglob("EVIL_RAN")) and not list(Path.home().joinpath(".flwr").rglob("EVIL_RAN"))


def test_a_reply_is_of_no_use_once_the_server_stopped_waiting_or_the_message_expired():
    from medfed.client.app_runner import REPLY_GRACE_S, _reply_deadline

    now = time.time()
    meta = types.SimpleNamespace(created_at=now, ttl=3600.0)
    waits = _reply_deadline(types.SimpleNamespace(run_config={"round-timeout": 100.0}), meta)
    assert now + 100 + REPLY_GRACE_S <= waits <= time.time() + 100 + REPLY_GRACE_S
    assert _reply_deadline(types.SimpleNamespace(run_config={"round-timeout": "soon"}), meta) == now + 3600.0
    short = types.SimpleNamespace(created_at=now, ttl=10.0)
    assert _reply_deadline(types.SimpleNamespace(run_config={"round-timeout": 100.0}), short) == now + 10.0
