"""The site's ClientApp launcher: runs the installed medfed ClientApp, never the FAB's code.

``medfed site start`` runs this launcher, which starts ``flower-supernode --isolation
process`` as its child (the SuperNode then starts no ClientApp processes itself)::

    python -m medfed.client.app_runner launcher --runtime-api-address 127.0.0.1:PORT \
        --config site.yaml -- flower-supernode ... --isolation process

and exits with the SuperNode's exit code. The SuperNode runs through
:mod:`medfed.client.supernode_poll`, which shortens its idle poll of the SuperLink from
Flower's 3 s to ``MEDFED_SUPERNODE_POLL_S`` (0.2 s). The launcher polls the SuperNode's local
runtime API for ClientApp tasks (as Flower's ``flower-superexec`` does, but for ClientApp
tasks only) and runs each task in a process of its own: forked by the warm worker
(:mod:`medfed.client.worker`, ``python -m medfed.client.app_runner task --warm``, which has
torch, Flower and medfed imported already), or, with ``MEDFED_WARM_WORKER=0`` or when no warm
worker can start, a cold ``python -m medfed.client.app_runner task`` process. Either way the
task process pulls the message, the context and the FAB, checks the FAB against site.yaml
(:func:`medfed.client.trusted_app.check_fab`) and then calls the *installed*
``medfed.client.app.app``. It never unpacks the FAB nor puts it on ``sys.path``. A refused
FAB is answered with an error reply naming its hash, and logged here. Each task logs when
its handler starts, counted from the moment the launcher acquired it.

Task processes exit when the launcher exits (Flower's parent monitor; warm ones also by
``PR_SET_PDEATHSIG``), and the SuperNode gets SIGTERM when the launcher dies
(``PR_SET_PDEATHSIG`` on Linux). ``medfed site start`` runs the launcher under
:mod:`medfed.common.guard`, which stops the launcher, the SuperNode, the warm worker and
every task process when ``medfed site start`` dies, even by SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.client.worker_handle import WarmWorker
from medfed.client.worker_protocol import Progress, TaskRequest, warm_enabled
from medfed.common.guard import die_with_parent

log = logging.getLogger("medfed.client.app_runner")  # also when run as __main__

TOKEN_ENV = "MEDFED_RUNTIME_TOKEN"  # the task's token, kept off the command line
SEEN_ENV = "MEDFED_TASK_SEEN"  # a cold task: when the launcher acquired it (time.time())
DEFAULT_POLL_S = 0.1
MAX_FAILED_POLLS = 20  # consecutive failed polls of a running SuperNode before the launcher gives up
HANDLER_STARTS = "handler starts"  # the log line's words, for bench/task_start.py
REPLY_GRACE_S = 60.0  # a task runs this long past the server's round-timeout before the warm worker stops it


def launcher_command(address: str, site_yaml: Path, supernode_cmd: list[str]) -> list[str]:
    """The launcher that starts ``supernode_cmd`` (runtime API at ``address``) and serves its tasks."""
    return [sys.executable, "-m", "medfed.client.app_runner", "launcher", "--runtime-api-address", address,
            "--config", str(site_yaml), "--", *supernode_cmd]


def task_command(address: str, site_yaml: Path, warm: bool = False) -> list[str]:
    """One cold task process; with ``warm`` the warm worker that forks one process per task."""
    return [sys.executable, "-m", "medfed.client.app_runner", "task", *(["--warm"] if warm else []),
            "--runtime-api-address", address, "--config", str(site_yaml), "--parent-pid", str(os.getpid())]


def _wait_for_runtime(address: str, supernode: subprocess.Popen[bytes]) -> bool:
    """True once the SuperNode's runtime API accepts connections; False if the SuperNode exited."""
    import socket

    host, port = address.rsplit(":", 1)
    while supernode.poll() is None:
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def run_launcher(address: str, site_yaml: Path, supernode_cmd: list[str], poll_s: float = DEFAULT_POLL_S) -> int:
    """Start the SuperNode and the warm worker, then run each ClientApp task; the SuperNode's exit code."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from medfed.client.runtime_api import LAUNCHER_COMPONENT, runtime_client
    from medfed.client.supernode_poll import wrapped_command

    # same process group: stopped together; no thread runs yet, so preexec_fn is safe here
    supernode = subprocess.Popen(wrapped_command(supernode_cmd),  # noqa: PLW1509
                                 preexec_fn=die_with_parent(signal.SIGTERM))
    running: list[subprocess.Popen[bytes]] = []

    def cold(request: TaskRequest) -> None:
        env = {**os.environ, TOKEN_ENV: request.token, SEEN_ENV: repr(request.seen)}
        running.append(subprocess.Popen(task_command(address, site_yaml), env=env))

    worker = WarmWorker(task_command(address, site_yaml, warm=True), cold) if warm_enabled() else None
    if worker is not None:
        worker.start()  # its imports overlap the SuperNode's start
    try:
        if not _wait_for_runtime(address, supernode):
            return supernode.returncode
        return _serve(address, supernode, worker, cold, running, poll_s,
                      runtime_client(address, LAUNCHER_COMPONENT, max_tries=3),  # failures come back here
                      AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
    finally:
        if worker is not None:
            worker.close()


def _serve(address: str, supernode: subprocess.Popen[bytes], worker: WarmWorker | None,
           cold: Callable[[TaskRequest], None], running: list[subprocess.Popen[bytes]], poll_s: float, client: Any,
           acquire: Any) -> int:
    """Poll the runtime API for tasks while the SuperNode runs; hand each to the warm worker (else cold)."""
    failed_polls = 0
    log.info("medfed launcher: running the installed medfed ClientApp for the SuperNode at %s (%s)", address,
             "warm worker" if worker is not None else "one cold process per task")
    try:
        while supernode.poll() is None:
            if worker is not None:
                worker.check()
            try:
                res = client.AcquireTask(acquire)
                failed_polls = 0
            except Exception:  # noqa: BLE001 - the SuperNode may just have exited: checked above
                failed_polls += 1
                if failed_polls >= MAX_FAILED_POLLS and supernode.poll() is None:
                    log.exception("the SuperNode's runtime API at %s does not answer; stopping it", address)
                    supernode.terminate()
                    supernode.wait()
                    return 1
                time.sleep(poll_s)
                continue
            if res.HasField("task") and res.token:
                request = TaskRequest(res.token, res.task.task_id, res.task.run_id, time.time())
                (worker.hand if worker is not None else cold)(request)
                log.info("task %d of run %d: acquired", res.task.task_id, res.task.run_id)
                continue  # the next task may be waiting already
            running[:] = [p for p in running if p.poll() is None]  # reap finished cold tasks
            time.sleep(poll_s)
    finally:
        client.close()
    log.info("the SuperNode exited with code %s", supernode.returncode)
    return supernode.returncode


def run_task(address: str, token: str, site_yaml: Path, parent_pid: int | None, seen: float | None = None,
             progress: Progress | None = None) -> int:
    """Handle one task: pull it, check the FAB, run the installed medfed ClientApp, push the reply.

    ``seen``: when the launcher acquired the task (``time.time()``), for the handler-start log
    line; ``progress``: reports to the warm worker, which answers for the task should it die.
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output
    from medfed.client.runtime_api import CLIENTAPP_COMPONENT, message_metadata, pull_task_input, runtime_client
    from medfed.client.trusted_app import ERROR_CODE_UNTRUSTED_APP, UntrustedAppError, check_fab
    from medfed.common.site_config import load_site_config

    report = progress or Progress(None)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = runtime_client(address, CLIENTAPP_COMPONENT, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        pull_started = time.time()
        message, context, run, fab = pull_task_input(client)
        pulled_s = time.time() - pull_started  # includes waiting for the SuperNode to receive the message
        meta = message.metadata
        report.pulled(message_metadata(message), context.node_id, context.run_id, _reply_deadline(context, meta))
        site = load_site_config(site_yaml)
        digest = check_fab(fab.content, site.trusted_apps)
        log.info("site %s: run %d uses app sha256=%s; running the installed medfed ClientApp",
                 site.site_id, run.run_id, digest)
        from medfed.client.app import app  # the installed package; the FAB is never imported

        if seen is not None:
            log.info("task %d: %s %.3f s after the launcher acquired the task, %.3f s of it pulling the %s message",
                     TaskIdentity.task_id, HANDLER_STARTS, time.time() - seen, pulled_s, meta.message_type)
        reply = app(message=message, context=context)
        status, details, code = SubStatus.COMPLETED, "", 0
    except UntrustedAppError as exc:
        log.error("site %s: %s", site.site_id, exc)
        reply = Message(Error(code=ERROR_CODE_UNTRUSTED_APP, reason=f"site {site.site_id}: {exc}"),
                        reply_to=message)
        details = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure becomes an error reply
        log.exception("ClientApp task failed")
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(exc).__name__} (details in the site's log)"), reply_to=message)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
                report.replied()
            except Exception:  # noqa: BLE001
                log.exception("could not push the reply to the SuperNode")
                code = 1
        push_task_output(client, context, status, details)
        report.finished()
        heartbeat.stop()
        client.close()
    return code


def _reply_deadline(context: Any, meta: Any) -> float:
    """When (``time.time()``) a reply is of no use any more: the server stopped waiting or the message expired.

    The server waits at most ``round-timeout`` from when it sent the message; counted here from
    the pull (this host's clock, so no clock skew can make it early), plus a grace period.
    """
    from medfed.common.config import parse_study_config
    from medfed.common.errors import ConfigError

    expires = meta.created_at + meta.ttl
    try:
        waits = parse_study_config(context.run_config).round_timeout
    except (ConfigError, ValueError, TypeError):  # the ClientApp answers for an invalid config itself
        return expires
    return min(expires, time.time() + waits + REPLY_GRACE_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medfed.client.app_runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("launcher", "task"))
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
    parser.add_argument("--parent-pid", type=int, default=None, help="task: exit when this process exits")
    parser.add_argument("--warm", action="store_true",
                        help="task: be the warm worker, forking one process per task token read on stdin")
    parser.add_argument("--status-fd", type=int, default=None, help="warm worker: report to the launcher on this fd")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, supernode_cmd = parser.parse_args(argv[:split]), argv[split + 1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runtime API poll otherwise
    if args.mode == "launcher":
        if not supernode_cmd:
            parser.error("launcher needs the SuperNode command after --")
        try:
            return run_launcher(args.runtime_api_address, args.config, supernode_cmd)
        except KeyboardInterrupt:
            return 0
    if args.warm:
        return _run_warm(args.runtime_api_address, args.config, args.parent_pid, args.status_fd)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        log.error("no task token in $%s: this process is started by the medfed launcher", TOKEN_ENV)
        return 2
    seen = os.environ.pop(SEEN_ENV, "")
    return run_task(args.runtime_api_address, token, args.config, args.parent_pid,
                    seen=float(seen) if seen else None)


def _run_warm(address: str, site_yaml: Path, parent_pid: int | None, status_fd: int | None) -> int:
    """The warm worker (:mod:`medfed.client.worker`): each task runs :func:`run_task` in a forked process."""
    from medfed.client.runtime_api import answer_for
    from medfed.client.worker import run_template
    from medfed.client.worker_protocol import Unanswered

    if parent_pid is None:
        log.error("the warm worker needs --parent-pid (the launcher)")
        return 2

    def run_one(request: TaskRequest, progress: Progress) -> int:
        return run_task(address, request.token, site_yaml, parent_pid, seen=request.seen, progress=progress)

    def answer(task: Unanswered, reason: str, reply: bool) -> bool:
        return answer_for(address, task.request.token, task.metadata, task.node_id, task.run_id, reason, reply)

    return run_template(run_one, answer, parent_pid, status_fd)


if __name__ == "__main__":
    sys.exit(main())
