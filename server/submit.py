"""``medfed run``: submit the medfed Flower app to a running SuperLink with the real ``flwr`` CLI.

Flower 1.41's ``flwr`` CLI reads SuperLink connections only from ``$FLWR_HOME/config.toml``
(default ``~/.flwr/config.toml``), never from ``[tool.flwr.federations]``. Every call here
therefore runs ``flwr`` with a throw-away ``FLWR_HOME`` whose config holds exactly one
connection, ``medfed``, with the explicit SuperLink address: the ``:local:`` address that
makes ``flwr`` start a detached local SuperLink never appears.

The app folder is staged (copied) before ``flwr run`` because ``flwr run APP`` *rewrites*
``APP/pyproject.toml`` when it still has a ``[tool.flwr.federations]`` table (it comments
the table out and migrates it into ``$FLWR_HOME``). The staged copy has that table removed
and holds only source and config files; with runtime dependency installation disabled the
SuperLink and SuperNodes import ``medfed`` from their own installed environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.common.errors import ConfigError, MedfedError
from medfed.common.logs import emit
from medfed.common.process import FLOWER_ENV
from medfed.server.outcome import EXIT_RUN_ERROR, EXIT_TIMEOUT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; tomli comes with flwr
    import tomli as tomllib

if TYPE_CHECKING:
    import argparse

CONNECTION = "medfed"
"""Name of the one SuperLink connection in the generated Flower config."""

CONNECT_TIMEOUT_S = 5.0
CLI_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 3.0
RUN_COMPLETED = "finished:completed"

_APP_SUFFIXES = frozenset({".py", ".toml", ".md", ".yaml", ".yml"})
_SKIP_DIRS = frozenset({"runs", "tests", "build", "dist", "node_modules", "venv", "__pycache__"})
_MAX_FILE_BYTES = 1024 * 1024  # Flower refuses FAB members larger than 1 MB
_FEDERATIONS_HEADER = re.compile(r"^\s*\[\s*tool\.flwr\.federations[\].]")
_ANY_HEADER = re.compile(r"^\s*\[")


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str | None = None  # None when not waited for, else e.g. "finished:completed"
    details: str = ""  # Flower's status details: a failed ServerApp's exception (medfed: the study's outcome)


class WaitTimeout(MedfedError):
    """``--timeout`` passed before the run finished (the run goes on at the server)."""


def parse_server_address(server: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); errors name the expected form."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", server or "")
    if not match:
        raise ConfigError(f"server address {server!r} must look like HOST:PORT, e.g. 127.0.0.1:9092")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ConfigError(f"server address {server!r}: port must be between 1 and 65535")
    return host, port


def check_reachable(server: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise one clear MedfedError when nothing accepts TCP connections at ``server``."""
    host, port = parse_server_address(server)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise MedfedError(
            f"cannot reach the SuperLink at {server} ({reason}); start it with "
            "`medfed server start` or fix --server"
        ) from None


def flwr_executable() -> str:
    """The ``flwr`` CLI next to this interpreter, else on PATH."""
    return flower_executable("flwr")


def flower_executable(name: str) -> str:
    """A Flower command (``flwr``, ``flower-superlink``, ...) next to this interpreter, else on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise MedfedError(f"`{name}` not found: install Flower 1.41 (pip install 'flwr>=1.41,<1.42')")
    return found


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@contextmanager
def flower_cli_home(server: str, *, insecure: bool = False, root_cert: str | Path | None = None) -> Iterator[Path]:
    """A temporary ``FLWR_HOME`` whose ``config.toml`` holds only the ``medfed`` connection.

    TLS is the default: ``root_cert`` is the CA certificate that signed the SuperLink's
    certificate (omit it to trust the system CAs); ``insecure=True`` must be asked for.
    """
    parse_server_address(server)
    lines = ["[superlink]", f"default = {_toml_str(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {_toml_str(server)}"]
    if insecure:
        if root_cert:
            raise ConfigError("--insecure disables TLS but a root certificate was given: drop one of them")
        lines.append("insecure = true")
    elif root_cert:
        cert = Path(root_cert).expanduser().resolve()
        if not cert.is_file():
            raise ConfigError(
                f"root certificate {cert} not found: use the CA certificate (ca.crt) made by "
                "`medfed certs`, or pass --insecure for a server started with --insecure"
            )
        lines.append(f"root-certificates = {_toml_str(str(cert))}")
    with tempfile.TemporaryDirectory(prefix="medfed-flwr-home-") as home:
        (Path(home) / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        yield Path(home)


def run_flwr(
    args: Sequence[str], flwr_home: Path, *, timeout: float | None = CLI_TIMEOUT_S, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` with ``FLWR_HOME=flwr_home`` (cwd there too); bounded by ``timeout``."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    try:
        return subprocess.run(
            [flwr_executable(), *args], cwd=flwr_home, env=env, text=True,
            capture_output=capture, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise MedfedError(
            f"`flwr {args[0]}` did not finish within {timeout:.0f} s; check that the SuperLink "
            "is running and reachable"
        ) from None


def flwr_json(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    """Parse ``flwr ... --format json`` output; it exits 0 even on failure, so check ``success``."""
    out = proc.stdout or ""
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        detail = _error_text(proc.stderr) or _error_text(out) or f"exit code {proc.returncode}"
        raise MedfedError(f"{what} failed: {detail}") from None
    if not data.get("success", False):
        detail = _error_text(str(data.get("error-message", "")))
        if "404 Not Found" in detail:
            detail += " (is this address a Flower 1.41 SuperLink?)"
        elif "Connection to the SuperLink is unavailable" in detail:
            detail = (
                "the SuperLink did not answer over the chosen transport; check TLS: use --insecure "
                "only for a server started with --insecure, otherwise --root-cert must be the "
                "ca.crt that signed its certificate"
            )
        raise MedfedError(f"{what} failed: {detail}")
    return data


_NOISE = ("Flower App configuration warnings", "- Recommended property", "Using SuperLink", "For more information")


def _error_text(text: str | None) -> str:
    """Flower's error message on one line, without its preamble, links and box drawing."""
    lines = [ln.strip(" \u2502\u256d\u256e\u2570\u256f\u2500") for ln in (text or "").splitlines()]
    kept = [
        ln for ln in lines
        if ln and ln != "Error" and not ln.startswith(_NOISE) and not (ln.startswith("http") and " " not in ln)
    ]
    return " ".join(kept)


def deployment_run_config() -> dict[str, Any]:
    """The run config a deployed study starts from: StudyConfig's defaults on the sites' own data."""
    from medfed.common.config import SITE_DATA, StudyConfig

    return StudyConfig(dataset=SITE_DATA).to_dict()


def default_app(dest: Path) -> Path:
    """The installed medfed app: components + default run config (code is installed at both ends)."""
    from medfed.common.flwr_app import write_flower_app

    return write_flower_app(dest, deployment_run_config())


def _is_flower_app(folder: Path) -> bool:
    try:
        with (folder / "pyproject.toml").open("rb") as f:
            return "components" in tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False


def strip_federations(pyproject_text: str) -> str:
    """Remove every ``[tool.flwr.federations...]`` table (header and its lines)."""
    out, skipping = [], False
    for line in pyproject_text.splitlines(keepends=True):
        if _ANY_HEADER.match(line):
            skipping = bool(_FEDERATIONS_HEADER.match(line))
        if not skipping:
            out.append(line)
    return "".join(out)


def stage_app(app_dir: str | Path, dest: str | Path) -> Path:
    """Copy the app's source and config files to ``dest`` with federations removed."""
    src, dst = Path(app_dir).resolve(), Path(dest)
    if not _is_flower_app(src):
        raise ConfigError(
            f"{src} is not a Flower app: it needs a pyproject.toml with [tool.flwr.app.components]"
        )
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".") and d not in _SKIP_DIRS and not d.endswith(".egg-info")
        )
        for name in files:
            path = Path(root) / name
            if path.suffix not in _APP_SUFFIXES or path.is_symlink():
                continue
            if path.stat().st_size > _MAX_FILE_BYTES:
                continue  # data, not app code; Flower would refuse the FAB
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    pyproject = dst / "pyproject.toml"
    text = strip_federations(pyproject.read_text(encoding="utf-8"))
    tomllib.loads(text)  # still valid TOML
    pyproject.write_text(text, encoding="utf-8")
    return dst


def run_info(run_id: int, flwr_home: Path, timeout: float = CLI_TIMEOUT_S) -> tuple[str, str]:
    """(status, status details) of one run, e.g. ``("finished:failed", "ServerApp failed with exception: ...")``."""
    proc = run_flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], flwr_home, timeout=timeout)
    runs = flwr_json(proc, "`flwr ls`").get("runs", [])
    if not runs:
        raise MedfedError(f"the SuperLink does not know run {run_id}")
    return str(runs[0]["status"]), str(runs[0].get("status-details") or "")


def run_status(run_id: int, flwr_home: Path, timeout: float = CLI_TIMEOUT_S) -> str:
    """Status of one run, e.g. ``running`` or ``finished:completed``."""
    return run_info(run_id, flwr_home, timeout)[0]


def submit_run(
    server: str,
    *,
    app_dir: str | Path | None = None,
    insecure: bool = False,
    root_cert: str | Path | None = None,
    run_config: str | None = None,
    wait: bool = False,
    stream: bool = False,
    timeout: float | None = None,
    poll_interval: float = POLL_INTERVAL_S,
) -> RunResult:
    """Submit the app to the SuperLink at ``server``; optionally stream logs / wait for the end.

    ``run_config`` uses Flower's syntax (``"num-server-rounds=2 out-dir='runs/x'"``).
    ``timeout`` bounds the wait for the run to finish (None: no bound).
    """
    with flower_cli_home(server, insecure=insecure, root_cert=root_cert) as home:
        check_reachable(server)
        if app_dir:
            staged = stage_app(Path(app_dir), home / "app")
        else:
            staged = default_app(home / "app")
        args = ["run", str(staged), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", run_config]
        started = flwr_json(run_flwr(args, home), f"`flwr run` to {server}")
        run_id = int(started["run-id"])
        if not (wait or stream):
            return RunResult(run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        if stream:
            remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
            try:
                run_flwr(["log", str(run_id), CONNECTION, "--stream"], home, timeout=remaining, capture=False)
            except MedfedError:
                raise WaitTimeout(f"run {run_id} did not finish within --timeout={timeout:.0f} s; it goes on at "
                                  "the server (follow it with `flwr log` or wait again)") from None
        while True:
            status, details = run_info(run_id, home)
            if status.startswith("finished"):
                return RunResult(run_id, status, details)
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"run {run_id} did not finish within --timeout={timeout:.0f} s (status: {status}); "
                                  "it goes on at the server")
            time.sleep(poll_interval)


def resume_latest(run_config: str | None) -> str:
    """``run_config`` plus ``resume='latest'``: the ServerApp continues from out-dir's newest checkpoint."""
    if run_config and re.search(r"(^|\s)resume\s*=", run_config):
        raise ConfigError("--resume and a resume= key in --run-config both choose a checkpoint: keep one of them")
    return f"{run_config or ''} resume='latest'".strip()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``medfed run``."""
    parser.add_argument("--server", required=True, help="SuperLink address HOST:PORT")
    parser.add_argument("--app", type=Path, default=None, help="Flower app folder (default: the installed medfed project)")
    parser.add_argument("--insecure", action="store_true", help="connect without TLS (server started with --insecure)")
    parser.add_argument("--root-cert", type=Path, default=None, help="CA certificate (ca.crt) that signed the server certificate")
    parser.add_argument("--run-config", default=None, help="overrides, e.g. \"num-server-rounds=2 lr=0.01 out-dir='runs/a'\"")
    parser.add_argument("--resume", action="store_true",
                        help="continue out-dir's study from its newest checkpoints/round-NNNN.pt (found by the server)")
    parser.add_argument("--wait", action="store_true",
                        help="wait until the run finishes; exit 0 completed, 3 stopped early, 4 failed, "
                             "1 other run error, 5 --timeout passed")
    parser.add_argument("--stream", action="store_true", help="stream the run's logs until it finishes (implies --wait)")
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    parser.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """Run ``medfed run``: print the run id and, when waiting, how the study ended; exit with its code.

    0: completed; 3: the study stopped early (partial results written); 4: it failed (nothing to
    report); 1: the run ended otherwise (the ServerApp crashed, ``flwr stop``); 5: --timeout passed.
    """
    try:
        result = submit_run(
            args.server, app_dir=args.app, insecure=args.insecure, root_cert=args.root_cert,
            run_config=resume_latest(args.run_config) if args.resume else args.run_config,
            wait=args.wait, stream=args.stream, timeout=args.timeout,
        )
    except WaitTimeout as exc:
        emit(f"medfed: {exc}")
        return EXIT_TIMEOUT
    if result.status is None:
        emit(f"submitted run {result.run_id} to {args.server}")
        return 0
    code, line = run_exit(result)
    emit(line)
    return code


def run_exit(result: RunResult) -> tuple[int, str]:
    """(exit code, one line) for a finished run: the study's outcome when medfed recorded one."""
    from medfed.server.outcome import outcome_from_details

    if result.status == RUN_COMPLETED:
        return 0, f"run {result.run_id}: {result.status}"
    outcome = outcome_from_details(result.details)
    if outcome is not None:
        return outcome.exit_code, f"run {result.run_id}: study {outcome.status}: {outcome.reason}"
    why = result.details or f"see `flwr log {result.run_id}` on the server"
    return EXIT_RUN_ERROR, f"run {result.run_id}: {result.status}: {why}"
