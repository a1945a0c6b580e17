"""The site's ClientApp launcher: runs the installed medfed ClientApp, never the FAB's code.

``medfed site start`` runs this launcher, which starts ``flower-supernode --isolation
process`` as its child (the SuperNode then starts no ClientApp processes itself)::

    python -m medfed.client.app_runner launcher --runtime-api-address 127.0.0.1:PORT \
        --config site.yaml -- flower-supernode ... --isolation process

and exits with the SuperNode's exit code. The launcher polls the SuperNode's local runtime
API for ClientApp tasks (as Flower's ``flower-superexec`` does, but for ClientApp tasks
only) and starts one process per task
(``python -m medfed.client.app_runner task``). That process pulls the message, the
context and the FAB, checks the FAB against site.yaml
(:func:`medfed.client.trusted_app.check_fab`) and then calls the *installed*
``medfed.client.app.app``. It never unpacks the FAB nor puts it on ``sys.path``. A refused
FAB is answered with an error reply naming its hash, and logged here.

Task processes exit when the launcher exits (Flower's parent monitor), and the SuperNode
gets SIGTERM when the launcher dies (``PR_SET_PDEATHSIG`` on Linux). ``medfed site start``
runs the launcher under :mod:`medfed.common.guard`, which stops the launcher, the SuperNode
and every task process when ``medfed site start`` dies, even by SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medfed.common.guard import die_with_parent

log = logging.getLogger("medfed.client.app_runner")  # also when run as __main__

TOKEN_ENV = "MEDFED_RUNTIME_TOKEN"  # the task's token, kept off the command line
DEFAULT_POLL_S = 0.2
MAX_FAILED_POLLS = 20  # consecutive failed polls of a running SuperNode before the launcher gives up


def _runtime_client(address: str, component: str, token: str | None = None, max_tries: int | None = None) -> Any:
    """A Runtime API client for the SuperNode on loopback (plain HTTP, as Flower's own)."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    retry = make_simple_http_retry_invoker()
    if max_tries is not None:
        retry.max_tries = max_tries
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, interceptors=interceptors, retry_invoker=retry,
    )


def launcher_command(address: str, site_yaml: Path, supernode_cmd: list[str]) -> list[str]:
    """The launcher that starts ``supernode_cmd`` (runtime API at ``address``) and serves its tasks."""
    return [sys.executable, "-m", "medfed.client.app_runner", "launcher", "--runtime-api-address", address,
            "--config", str(site_yaml), "--", *supernode_cmd]


def task_command(address: str, site_yaml: Path) -> list[str]:
    return [sys.executable, "-m", "medfed.client.app_runner", "task",
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
    """Start the SuperNode, then one :func:`run_task` process per ClientApp task; its exit code."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    # same process group: stopped together; no thread runs yet, so preexec_fn is safe here
    supernode = subprocess.Popen(supernode_cmd, preexec_fn=die_with_parent(signal.SIGTERM))  # noqa: PLW1509
    if not _wait_for_runtime(address, supernode):
        return supernode.returncode
    client = _runtime_client(address, "SuperExec", max_tries=3)  # failures come back here
    running: list[subprocess.Popen[bytes]] = []
    failed_polls = 0
    log.info("medfed launcher: running the installed medfed ClientApp for the SuperNode at %s", address)
    try:
        while supernode.poll() is None:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
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
                env = {**os.environ, TOKEN_ENV: res.token}
                running.append(subprocess.Popen(task_command(address, site_yaml), env=env))
                log.info("task %d of run %d: started", res.task.task_id, res.task.run_id)
            running = [p for p in running if p.poll() is None]  # reap finished tasks
            time.sleep(poll_s)
    finally:
        client.close()
    log.info("the SuperNode exited with code %s", supernode.returncode)
    return supernode.returncode


def run_task(address: str, token: str, site_yaml: Path, parent_pid: int | None) -> int:
    """Handle one task: pull it, check the FAB, run the installed medfed ClientApp, push the reply."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
    from medfed.client.trusted_app import ERROR_CODE_UNTRUSTED_APP, UntrustedAppError, check_fab
    from medfed.common.site_config import load_site_config

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = _runtime_client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        message, context, run, fab = pull_task_input(client)
        site = load_site_config(site_yaml)
        digest = check_fab(fab.content, site.trusted_apps)
        log.info("site %s: run %d uses app sha256=%s; running the installed medfed ClientApp",
                 site.site_id, run.run_id, digest)
        from medfed.client.app import app  # the installed package; the FAB is never imported

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
            except Exception:  # noqa: BLE001
                log.exception("could not push the reply to the SuperNode")
                code = 1
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medfed.client.app_runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("launcher", "task"))
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
    parser.add_argument("--parent-pid", type=int, default=None, help="task: exit when this process exits")
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
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        log.error("no task token in $%s: this process is started by the medfed launcher", TOKEN_ENV)
        return 2
    return run_task(args.runtime_api_address, token, args.config, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
