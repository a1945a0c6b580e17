"""``medfed server start`` / ``medfed server register-site``: run and manage the Flower SuperLink.

In Flower 1.41 one ``flower-superlink`` process serves the Fleet API (sites), the Control
API (``flwr run``, ``flwr supernode register``) and the ServerApp runtime API on a single
HTTP(S) port (``--host``/``--port``). medfed always starts it with

* a persistent state database (``--database STATE_DIR/superlink.db``): runs and registered
  site keys survive a restart. Flower opens it in WAL mode; medfed runs ``flower-superlink``
  through :mod:`medfed.server.superlink_db`, which lets a write wait 60 s for SQLite's lock
  instead of Flower's 5 s (with ten or more sites the SuperLink otherwise answers
  "database is locked" and sites drop out of the study);
* ``--disable-runtime-dependency-installation``: a submitted app never runs ``uv sync`` on
  the server; the ServerApp imports ``medfed`` from this environment;
* TLS unless ``--insecure`` is asked for (``ca.crt``, ``server.crt``, ``server.key`` from
  ``medfed certs``), and optionally SuperNode authentication (``--enable-site-auth``;
  register each site's public key with ``medfed server register-site``).

The SuperLink runs with ``cwd=STATE_DIR`` and ``FLWR_HOME=STATE_DIR/flwr-home`` (where
submitted apps are unpacked), so a relative ``out-dir`` in the run config lands under
``STATE_DIR``. Each ServerApp writes its ``medfed`` log lines to
``STATE_DIR/console/run-<id>.log`` (Flower sends ServerApp output to ``/dev/null``), and
``medfed server start`` prints them as ``[run <id>] ...``: rounds, sites that answered,
failures with site and reason, waits for sites, the end of the study
(:mod:`medfed.common.run_console`). The SuperLink, its SuperExec and every ServerApp run
under :mod:`medfed.common.guard`: they stop when ``medfed server start`` dies, even by SIGKILL.

The process helpers below (start in a new session, wait for the port, stop the whole
tree) are shared with ``medfed.client.daemon`` and the deployment tests.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.common.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from medfed.common.errors import ConfigError
from medfed.common.logs import emit
from medfed.common.process import run_in_foreground, start_process_group, wait_for_port
from medfed.common.run_console import CONSOLE_DIR, RUN_CONSOLE_ENV, ConsoleFollower
from medfed.server.submit import (
    CONNECTION,
    check_reachable,
    flower_cli_home,
    flower_executable,
    flwr_json,
    parse_server_address,
    run_flwr,
)
from medfed.server.superlink_db import DEFAULT_BUSY_TIMEOUT_S, launch_command

if TYPE_CHECKING:
    import argparse

DEFAULT_SUPERLINK_HOST = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 9092
DATABASE_FILE = "superlink.db"
FLWR_HOME_DIR = "flwr-home"
READY_TIMEOUT_S = 60.0
SERVER_YAML_KEYS = ("state-dir", "certs", "host", "port", "enable-site-auth")


@dataclass(frozen=True)
class ServerDeployConfig:
    """Where and how the SuperLink runs. ``certs_dir`` defaults to ``STATE_DIR/certs``."""

    state_dir: Path
    certs_dir: Path | None = None
    host: str = DEFAULT_SUPERLINK_HOST
    port: int = DEFAULT_SUPERLINK_PORT
    insecure: bool = False
    enable_site_auth: bool = False

    def __post_init__(self) -> None:
        if not 1 <= int(self.port) <= 65535:
            raise ConfigError(f"port={self.port} must be between 1 and 65535")
        if self.enable_site_auth and self.insecure:
            raise ConfigError(
                "--enable-site-auth needs TLS (Flower refuses SuperNode authentication on an "
                "insecure SuperLink): drop --insecure and give --certs"
            )

    @property
    def tls_files(self) -> tuple[Path, Path, Path]:
        """(CA certificate, server certificate, server key)."""
        certs = self.certs_dir if self.certs_dir is not None else self.state_dir / "certs"
        return certs / CA_CERT, certs / SERVER_CERT, certs / SERVER_KEY

    @property
    def address(self) -> str:
        """The address clients dial when they run on this host."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def load_server_yaml(path: str | Path) -> ServerDeployConfig:
    """Read ``server.yaml`` (keys: state-dir, certs, host, port, enable-site-auth).

    Relative paths are resolved against the file's folder. ``insecure`` is deliberately
    not a key: plain HTTP must be asked for with ``--insecure`` on the command line.
    """
    from medfed.common.config import load_yaml_mapping

    p = Path(path)
    mapping = load_yaml_mapping(p)
    unknown = sorted(set(mapping) - set(SERVER_YAML_KEYS))
    if unknown:
        hint = "; pass --insecure on the command line instead" if "insecure" in unknown else ""
        raise ConfigError(
            f"{p}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(SERVER_YAML_KEYS)}{hint}"
        )
    if "state-dir" not in mapping:
        raise ConfigError(f"{p}: missing required key 'state-dir'")
    base = p.resolve().parent
    certs = mapping.get("certs")
    enable = mapping.get("enable-site-auth", False)
    if not isinstance(enable, bool):
        raise ConfigError(f"{p}: enable-site-auth must be true or false, got {enable!r}")
    try:
        port = int(mapping.get("port", DEFAULT_SUPERLINK_PORT))
    except (TypeError, ValueError):
        raise ConfigError(f"{p}: port must be a whole number, got {mapping['port']!r}") from None
    return ServerDeployConfig(
        state_dir=(base / str(mapping["state-dir"])).resolve(),
        certs_dir=(base / str(certs)).resolve() if certs else None,
        host=str(mapping.get("host", DEFAULT_SUPERLINK_HOST)),
        port=port,
        enable_site_auth=enable,
    )


def superlink_command(cfg: ServerDeployConfig) -> list[str]:
    """The ``flower-superlink`` command line for ``cfg``; TLS files must exist unless insecure.

    :func:`start_superlink` runs it through :func:`superlink_launch_command`.
    """
    cmd = [
        flower_executable("flower-superlink"),
        "--host", cfg.host,
        "--port", str(cfg.port),
        "--database", str(Path(cfg.state_dir).resolve() / DATABASE_FILE),
        "--disable-runtime-dependency-installation",
    ]
    if cfg.insecure:
        return cmd + ["--insecure"]
    ca, cert, key = (p.resolve() for p in cfg.tls_files)
    missing = [str(p) for p in (ca, cert, key) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"TLS is on by default but these files are missing: {', '.join(missing)}. Create them "
            f"with `medfed certs all --out {ca.parent} --host <server name or IP>` (or point --certs "
            "at the folder holding ca.crt, server.crt and server.key), or pass --insecure for a "
            "local test without encryption"
        )
    cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    if cfg.enable_site_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def superlink_launch_command(cfg: ServerDeployConfig, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> list[str]:
    """What :func:`start_superlink` runs: :func:`superlink_command` with a longer SQLite lock wait."""
    return launch_command(superlink_command(cfg), busy_timeout_s)


def console_dir(cfg: ServerDeployConfig) -> Path:
    """Where each ServerApp writes its console lines (``run-<id>.log``)."""
    return Path(cfg.state_dir).resolve() / CONSOLE_DIR


def start_superlink(
    cfg: ServerDeployConfig,
    *,
    log_path: str | Path | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> subprocess.Popen[bytes]:
    """Start the SuperLink in its own session and return once its port accepts connections."""
    cmd = superlink_launch_command(cfg)
    state = Path(cfg.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {"FLWR_HOME": str(state / FLWR_HOME_DIR), RUN_CONSOLE_ENV: str(console_dir(cfg))}
    proc = start_process_group(cmd, cwd=state, env=env, log_path=log_path)
    host, port = parse_server_address(cfg.address)
    wait_for_port(host, port, proc, ready_timeout, "SuperLink", log_path)
    return proc


def register_site(
    server: str,
    public_key: str | Path,
    *,
    insecure: bool = False,
    root_cert: str | Path | None = None,
    name: str | None = None,
    timeout: float = 60.0,
) -> int:
    """Register a site's public key with the SuperLink (``flwr supernode register``); return its node id."""
    key = Path(public_key).expanduser().resolve()
    if not key.is_file():
        raise ConfigError(f"public key {key} not found: create it at the site with `medfed certs site`")
    if b"PRIVATE KEY" in key.read_bytes()[:200]:
        raise ConfigError(f"{key} is a private key: register the site's .pub file; the private key stays at the site")
    with flower_cli_home(server, insecure=insecure, root_cert=root_cert) as home:
        check_reachable(server)
        args = ["supernode", "register", str(key), CONNECTION, "--format", "json"]
        if name:
            args += ["--name", name]
        data = flwr_json(run_flwr(args, home, timeout=timeout), f"registering {key.name} at {server}")
    return int(data["node-id"])


# -- process helpers ---------------------------------------------------------------------


# -- CLI wiring --------------------------------------------------------------------------


def add_server_arguments(subparsers: Any) -> None:
    """``medfed server {start,register-site}`` on the ``server`` command's subparsers."""
    start = subparsers.add_parser("start", help="run the SuperLink (TLS unless --insecure)")
    add_server_start_arguments(start)
    start.set_defaults(func=cmd_server_start)
    reg = subparsers.add_parser("register-site", help="register a site's public key (SuperNode authentication)")
    add_register_site_arguments(reg)
    reg.set_defaults(func=cmd_register_site)


def add_server_start_arguments(parser: argparse.ArgumentParser) -> None:
    """``medfed server start``."""
    parser.add_argument("--config", type=Path, default=None, help="server.yaml (flags override it)")
    parser.add_argument("--state-dir", type=Path, default=None, help="persistent state: database, unpacked apps, run outputs (relative out-dir)")
    parser.add_argument("--certs", type=Path, default=None, help="folder with ca.crt, server.crt, server.key (default STATE_DIR/certs)")
    parser.add_argument("--host", default=None, help=f"address to listen on (default {DEFAULT_SUPERLINK_HOST})")
    parser.add_argument("--port", type=int, default=None, help=f"port for sites, `medfed run` and the ServerApp (default {DEFAULT_SUPERLINK_PORT})")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP without TLS: local tests only")
    parser.add_argument("--enable-site-auth", action="store_true", default=None, help="accept only sites whose key was registered")


def server_config_from_args(args: argparse.Namespace) -> ServerDeployConfig:
    """Merge ``--config`` server.yaml with the command-line flags (flags win)."""
    if args.config is None and args.state_dir is None:
        raise ConfigError("give --state-dir DIR (database, logs, run outputs) or --config server.yaml")
    base = load_server_yaml(args.config) if args.config else ServerDeployConfig(state_dir=args.state_dir)
    return ServerDeployConfig(
        state_dir=args.state_dir or base.state_dir,
        certs_dir=args.certs or base.certs_dir,
        host=args.host or base.host,
        port=args.port or base.port,
        insecure=bool(args.insecure),
        enable_site_auth=base.enable_site_auth if args.enable_site_auth is None else args.enable_site_auth,
    )


def cmd_server_start(args: argparse.Namespace) -> int:
    """Run ``medfed server start`` in the foreground until Ctrl-C / SIGTERM; prints every study's progress."""
    cfg = server_config_from_args(args)
    follower = ConsoleFollower(console_dir(cfg), emit)  # before the SuperLink: no line of a new run is missed
    proc = start_superlink(cfg)
    scheme = "insecure, no TLS" if cfg.insecure else "TLS" + (", site authentication" if cfg.enable_site_auth else "")
    emit(f"SuperLink listening on {cfg.host}:{cfg.port} ({scheme}); state in {Path(cfg.state_dir).resolve()}")
    emit(f"each study's progress follows as [run ID] lines (also in {console_dir(cfg)}/run-ID.log)")
    follower.start()
    try:
        return run_in_foreground(proc)
    finally:
        follower.stop()


def add_register_site_arguments(parser: argparse.ArgumentParser) -> None:
    """``medfed server register-site``."""
    parser.add_argument("--public-key", required=True, type=Path, help="the site's <site-id>.pub from `medfed certs site`")
    parser.add_argument("--server", default=f"127.0.0.1:{DEFAULT_SUPERLINK_PORT}", help="SuperLink address HOST:PORT")
    parser.add_argument("--root-cert", type=Path, default=None, help="CA certificate (ca.crt) that signed the server certificate")
    parser.add_argument("--insecure", action="store_true", help="connect without TLS")
    parser.add_argument("--name", default=None, help="a label for the site (e.g. its site-id)")


def cmd_register_site(args: argparse.Namespace) -> int:
    """Run ``medfed server register-site``; prints the node id Flower gave the site."""
    node_id = register_site(
        args.server, args.public_key, insecure=args.insecure, root_cert=args.root_cert, name=args.name
    )
    emit(f"registered {args.public_key} as SuperNode {node_id}")
    return 0
