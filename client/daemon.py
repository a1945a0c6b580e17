"""``medfed site start --config site.yaml``: run one hospital's Flower SuperNode.

The SuperNode connects out to the SuperLink (TLS unless ``--insecure`` is asked for; with
the site's private key when the server requires SuperNode authentication) and starts the
medfed ClientApp for each message. Site-specific values reach the ClientApp as node config
(``context.node_config``): ``site-id``, ``data-root``, ``site-config`` (absolute path of
site.yaml) and ``state-dir``.

Each SuperNode also serves its own ClientApp runtime API on ``127.0.0.1:PORT``
(``flower-supernode --port``, default 9094), so two sites on one host need different
ports: ``clientappio-port`` in site.yaml, 0 (the default) picks a free port at start.
The SuperNode runs with ``cwd=STATE_DIR`` and ``FLWR_HOME=STATE_DIR/flwr-home``.

Trusted code: the SuperNode runs with ``--isolation process`` as the child of medfed's
launcher (:mod:`medfed.client.app_runner`; one process group, one exit code), which runs the
*installed* medfed ClientApp for every task and refuses FABs that site.yaml does not
accept (:mod:`medfed.client.trusted_app`). ``run-app-code: true`` in site.yaml gives
Flower's default instead (the ClientApp code the server ships runs): development only.

``medfed site start`` joins only a site that can train and a server that answers: it
builds the site's data as training does (:mod:`medfed.client.site_preflight`), makes the
first contact with the server, TLS handshake included, within ``--connect-timeout``
(:mod:`medfed.common.server_contact`), and logs "started" once the SuperLink has accepted
the SuperNode (:mod:`medfed.client.supernode_log`; output in ``STATE_DIR/supernode.log``).
"""

from __future__ import annotations

import logging
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.common.constants import NodeConfigKey
from medfed.common.errors import ConfigError, MedfedError
from medfed.common.process import (
    free_port,
    run_in_foreground,
    start_process_group,
    wait_for_port,
)
from medfed.server.deploy import DEFAULT_SUPERLINK_PORT, FLWR_HOME_DIR, READY_TIMEOUT_S
from medfed.server.submit import (
    flower_executable,
    parse_server_address,
)

if TYPE_CHECKING:
    import argparse
    import subprocess


log = logging.getLogger(__name__)


DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_SUPERLINK_PORT}"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
RUNTIME_HOST = "127.0.0.1"


@dataclass(frozen=True)
class SiteDaemonConfig:
    """What the site daemon needs from site.yaml; paths are absolute."""

    site_id: str
    data_root: Path
    state_dir: Path
    site_config: Path
    server: str = DEFAULT_SERVER
    root_cert: Path | None = None
    auth_key: Path | None = None
    clientappio_port: int = 0  # 0: pick a free port at start
    run_app_code: bool = False  # Flower's default isolation: runs the FAB's code (development only)


def load_site_yaml(path: str | Path) -> SiteDaemonConfig:
    """Parse site.yaml once with the shared :func:`medfed.common.site_config.load_site_config`.

    Relative paths are resolved against the file's folder; unknown keys and bad values
    are errors naming the file, the key and the allowed values.
    """
    from medfed.common.site_config import load_site_config

    p = Path(path).resolve()
    site = load_site_config(p)
    try:
        parse_server_address(site.server)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return SiteDaemonConfig(
        site_id=site.site_id,
        data_root=Path(site.data_root),
        state_dir=Path(site.state_dir),
        site_config=p,
        server=site.server,
        root_cert=Path(site.root_cert) if site.root_cert else None,
        auth_key=Path(site.auth_key) if site.auth_key else None,
        clientappio_port=site.clientappio_port,
        run_app_code=site.run_app_code,
    )


def node_config_string(cfg: SiteDaemonConfig) -> str:
    """``--node-config`` value: TOML literal strings, so paths need no escaping (but no quote)."""
    values = {
        NodeConfigKey.SITE_ID: cfg.site_id,
        NodeConfigKey.DATA_ROOT: str(cfg.data_root),
        NodeConfigKey.SITE_CONFIG: str(cfg.site_config),
        NodeConfigKey.STATE_DIR: str(cfg.state_dir),
    }
    for key, value in values.items():
        if "'" in value or "\n" in value:
            raise ConfigError(f"{key.value}={value!r} contains a quote or newline, which node config cannot carry: rename it")
    return " ".join(f"{key.value}='{value}'" for key, value in values.items())


def supernode_command(
    site_cfg: SiteDaemonConfig,
    *,
    server: str | None = None,
    insecure: bool = False,
    root_cert: str | Path | None = None,
    auth_key: str | Path | None = None,
    port: int | None = None,
) -> list[str]:
    """The ``flower-supernode`` command for this site; arguments override site.yaml.

    TLS is the default: the SuperLink certificate is checked against ``root-cert`` (the
    ``ca.crt`` from ``medfed certs``; without it, the system CAs). ``auth-key`` is the
    site's private key for SuperNode authentication. ``insecure=True`` (asked for on the
    command line) drops both site.yaml settings with a warning; passing them explicitly
    together with ``insecure`` is an error.
    """
    address = server or site_cfg.server
    parse_server_address(address)
    runtime_port = port if port is not None else site_cfg.clientappio_port
    if not 1 <= runtime_port <= 65535:
        raise ConfigError(f"ClientApp runtime port {runtime_port} must be between 1 and 65535")
    cert, key, ignored = site_connection(site_cfg, insecure=insecure, root_cert=root_cert, auth_key=auth_key)
    cmd = [flower_executable("flower-supernode"), "--superlink", address]
    if insecure:
        if ignored:
            log.warning("--insecure: ignoring %s from %s", " and ".join(ignored), site_cfg.site_config)
        cmd.append("--insecure")
    elif cert is not None:
        cmd += ["--root-certificates", str(cert)]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    cmd += ["--host", RUNTIME_HOST, "--port", str(runtime_port), "--node-config", node_config_string(site_cfg)]
    if not site_cfg.run_app_code:
        cmd += ["--isolation", "process"]  # medfed's launcher runs the ClientApps (start_supernode)
    return cmd


def site_connection(
    site_cfg: SiteDaemonConfig,
    *,
    insecure: bool = False,
    root_cert: str | Path | None = None,
    auth_key: str | Path | None = None,
) -> tuple[Path | None, Path | None, list[str]]:
    """The CA certificate and private key the site connects with (arguments override site.yaml).

    Returns ``(root_cert, auth_key, ignored)``: ``ignored`` names the site.yaml settings that
    ``insecure`` drops. Missing files and a private key others can read are errors.
    """
    cert = Path(root_cert).resolve() if root_cert else site_cfg.root_cert
    key = Path(auth_key).resolve() if auth_key else site_cfg.auth_key
    ignored: list[str] = []
    if insecure:
        conflicts = [name for name, value in (("--root-cert", root_cert), ("--auth-key", auth_key)) if value]
        if conflicts:
            raise ConfigError(f"--insecure turns TLS off but {' and '.join(conflicts)} was given: drop one of them")
        ignored = [name for name, value in (("root-cert", cert), ("auth-key", key)) if value]
        return None, None, ignored
    if cert is not None and not cert.is_file():
        raise ConfigError(f"root-cert {cert} not found: copy the server operator's ca.crt there")
    if key is not None:
        _check_private_key(key, site_cfg.site_id)
    return cert, key, ignored


def _check_private_key(key: Path, site_id: str) -> None:
    if not key.is_file():
        raise ConfigError(
            f"auth-key {key} not found: create it with `medfed certs site --site-id {site_id} "
            f"--out {key.parent}` and have the server register the .pub file"
        )
    if stat.S_IMODE(key.stat().st_mode) & 0o077:
        raise ConfigError(f"auth-key {key} is readable by other users: run `chmod 600 {key}`")


def start_supernode(
    site_cfg: SiteDaemonConfig,
    *,
    log_path: str | Path | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> subprocess.Popen[bytes]:
    """Start the SuperNode in its own session; return once its runtime port listens.

    ``overrides`` are :func:`supernode_command` keywords. Readiness means the process is
    up, not that the SuperLink accepted it (it keeps retrying; a rejected key exits).
    """
    port = overrides.pop("port", None) or site_cfg.clientappio_port or free_port(RUNTIME_HOST)
    cmd = supernode_command(site_cfg, port=port, **overrides)
    state = site_cfg.state_dir
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    full_env = {"FLWR_HOME": str(state / FLWR_HOME_DIR), **(env or {})}
    if site_cfg.run_app_code:
        log.warning("site %s: run-app-code is true: the ClientApp code the server sends will run here",
                    site_cfg.site_id)
    else:  # medfed's launcher starts the SuperNode as its child and runs the installed ClientApp
        from medfed.client.app_runner import launcher_command

        cmd = launcher_command(f"{RUNTIME_HOST}:{port}", site_cfg.site_config, cmd)
    proc = start_process_group(cmd, cwd=state, env=full_env, log_path=log_path)
    wait_for_port(RUNTIME_HOST, port, proc, ready_timeout, f"SuperNode for {site_cfg.site_id}", log_path)
    return proc


def add_site_arguments(subparsers: Any) -> None:
    """``medfed site start`` on the ``site`` command's subparsers."""
    start = subparsers.add_parser("start", help="run this site's SuperNode (TLS unless --insecure)")
    add_site_start_arguments(start)
    start.set_defaults(func=cmd_site_start)
    app_hash = subparsers.add_parser(
        "app-hash", help="print the sha256 of the app `medfed run` submits (for trusted-apps in site.yaml)")
    app_hash.add_argument("--app", type=Path, default=None,
                          help="a Flower app folder, as given to `medfed run --app` (default: the installed medfed app)")
    app_hash.set_defaults(func=cmd_site_app_hash)


def add_site_start_arguments(parser: argparse.ArgumentParser) -> None:
    """``medfed site start``."""
    parser.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
    parser.add_argument("--server", default=None, help="SuperLink address HOST:PORT (overrides site.yaml)")
    parser.add_argument("--insecure", action="store_true", help="connect without TLS: local tests only")
    parser.add_argument("--root-cert", type=Path, default=None, help="CA certificate (ca.crt) of the server")
    parser.add_argument("--auth-key", type=Path, default=None, help="the site's private key (<site-id>.key)")
    parser.add_argument("--clientappio-port", type=int, default=None, help="local ClientApp runtime port (default: site.yaml, else a free port)")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S,
                        help="seconds for the first contact with the server in all (TCP, TLS handshake, first "
                        "answer; retried while the server is not up yet); also how long the server may take to "
                        f"accept the SuperNode before a warning (default {DEFAULT_CONNECT_TIMEOUT_S:g})")


def cmd_site_start(args: argparse.Namespace) -> int:
    """Run ``medfed site start`` in the foreground until Ctrl-C / SIGTERM.

    In order, each failing with one line: the site's data gives training examples
    (:mod:`medfed.client.site_preflight`, exit 2), the server answers within
    ``--connect-timeout`` (TLS handshake included), the SuperNode starts; "started" is
    logged once the server has accepted the SuperNode (its log says ``SuperNode ID``).
    """
    from medfed.client.site_preflight import preflight_site
    from medfed.common.server_contact import wait_for_server
    from medfed.common.site_config import load_site_config

    cfg = load_site_yaml(args.config)
    if args.connect_timeout <= 0:
        raise ConfigError(f"--connect-timeout {args.connect_timeout:g} must be a positive number of seconds")
    preflight_site(load_site_config(cfg.site_config), cfg.site_config)
    address = args.server or cfg.server
    host, port = parse_server_address(address)
    cert, _key, _ignored = site_connection(cfg, insecure=args.insecure, root_cert=args.root_cert,
                                           auth_key=args.auth_key)
    try:
        wait_for_server(address, host, port, timeout=args.connect_timeout, tls=not args.insecure, root_cert=cert)
    except MedfedError as exc:
        raise MedfedError(f"site {cfg.site_id}: {exc}") from None
    return _run_supernode(cfg, args, address)


def _run_supernode(cfg: SiteDaemonConfig, args: argparse.Namespace, address: str) -> int:
    """Start the SuperNode, its output to ``<state-dir>/supernode.log`` and copied to stderr; wait for it."""
    from medfed.client.supernode_log import LOG_NAME, SupernodeLog, rotate

    mode = "insecure, no TLS" if args.insecure else "TLS"
    log_path = cfg.state_dir / LOG_NAME
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    rotate(log_path)

    def _started(node_id: str) -> None:
        log.info("site %s: SuperNode started (%s): accepted by the server at %s as node %s; state in %s, "
                 "SuperNode log %s", cfg.site_id, mode, address, node_id, cfg.state_dir, log_path)

    def _not_yet() -> None:
        if not follower.accepted.is_set() and proc.poll() is None:
            log.warning("site %s: the server at %s answers, but has not accepted this SuperNode within %g s; "
                        "it keeps trying (see %s)", cfg.site_id, address, args.connect_timeout, log_path)

    follower = SupernodeLog(log_path, on_accepted=_started)
    follower.start()
    try:
        proc = start_supernode(cfg, server=args.server, insecure=args.insecure, root_cert=args.root_cert,
                               auth_key=args.auth_key, port=args.clientappio_port, log_path=log_path)
        watchdog = threading.Timer(args.connect_timeout, _not_yet)
        watchdog.daemon = True
        watchdog.start()
        code = run_in_foreground(proc)
        watchdog.cancel()
    finally:
        follower.stop()
    if code != 0 and not follower.accepted.is_set():
        raise MedfedError(
            f"site {cfg.site_id}: the SuperNode exited with code {code} before the server at {address} "
            f"accepted it (see {log_path}): if its key is not registered there, run `medfed server "
            "register-site` on the server"
        )
    return code


def cmd_site_app_hash(args: argparse.Namespace) -> int:
    """Print the sha256 of the FAB ``medfed run`` would submit, built from this installation."""
    from medfed.client.trusted_app import app_hash
    from medfed.common.logs import emit

    emit(app_hash(args.app))
    return 0
