"""Command builders and config parsing for `medfed server start`, `site start` and `run` (no processes)."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

import pytest

from medfed.client.daemon import (
    add_site_arguments,
    load_site_yaml,
    node_config_string,
    supernode_command,
)
from medfed.common.certs import create_ca, create_server_cert, create_site_keys
from medfed.common.errors import ConfigError, MedfedError
from medfed.server.deploy import (
    ServerDeployConfig,
    add_server_arguments,
    load_server_yaml,
    register_site,
    server_config_from_args,
    superlink_command,
)
from medfed.common.process import free_port
from medfed.server.submit import (
    flower_cli_home,
    parse_server_address,
    stage_app,
    strip_federations,
    submit_run,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.fixture()
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    create_ca(out)
    create_server_cert(out, out, ["127.0.0.1", "localhost"])
    return out


# -- SuperLink -----------------------------------------------------------------------------


def test_superlink_uses_tls_persistent_db_and_no_runtime_installs_by_default(tmp_path: Path, certs: Path) -> None:
    cmd = superlink_command(ServerDeployConfig(state_dir=tmp_path / "state", certs_dir=certs, port=9555))
    assert Path(cmd[0]).name == "flower-superlink"
    assert "--insecure" not in cmd
    assert _flag(cmd, "--ssl-ca-certfile") == str(certs / "ca.crt")
    assert _flag(cmd, "--ssl-certfile") == str(certs / "server.crt")
    assert _flag(cmd, "--ssl-keyfile") == str(certs / "server.key")
    assert _flag(cmd, "--database") == str((tmp_path / "state" / "superlink.db").resolve())
    assert "--disable-runtime-dependency-installation" in cmd
    assert (_flag(cmd, "--host"), _flag(cmd, "--port")) == ("127.0.0.1", "9555")
    assert "--enable-supernode-auth" not in cmd


def test_superlink_site_auth_flag(tmp_path: Path, certs: Path) -> None:
    cmd = superlink_command(ServerDeployConfig(state_dir=tmp_path, certs_dir=certs, enable_site_auth=True))
    assert "--enable-supernode-auth" in cmd


def test_superlink_insecure_must_be_explicit_and_needs_no_certs(tmp_path: Path) -> None:
    cmd = superlink_command(ServerDeployConfig(state_dir=tmp_path, insecure=True))
    assert "--insecure" in cmd and "--ssl-certfile" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd and "--database" in cmd


def test_superlink_missing_certs_error_names_files_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        superlink_command(ServerDeployConfig(state_dir=tmp_path / "state"))
    msg = str(info.value)
    for name in ("ca.crt", "server.crt", "server.key", "medfed certs", "--insecure"):
        assert name in msg
    assert str(tmp_path / "state" / "certs") in msg


def test_site_auth_refused_without_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs TLS"):
        ServerDeployConfig(state_dir=tmp_path, insecure=True, enable_site_auth=True)


def test_server_yaml_example_and_errors(tmp_path: Path) -> None:
    cfg = load_server_yaml(DEPLOY / "server.yaml")
    assert cfg.enable_site_auth and not cfg.insecure and cfg.port == 9092
    assert cfg.state_dir.is_absolute() and cfg.certs_dir is not None and cfg.certs_dir.is_absolute()
    bad = tmp_path / "server.yaml"
    bad.write_text("state-dir: s\ninsecure: true\n")
    with pytest.raises(ConfigError, match="insecure.*allowed keys.*--insecure on the command line"):
        load_server_yaml(bad)
    bad.write_text("certs: c\n")
    with pytest.raises(ConfigError, match="state-dir"):
        load_server_yaml(bad)


def test_server_start_cli_flags_override_yaml(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["start", "--config", str(DEPLOY / "server.yaml"), "--port", "9777", "--state-dir", str(tmp_path)])
    cfg = server_config_from_args(args)
    assert (cfg.port, cfg.state_dir, cfg.enable_site_auth, cfg.insecure) == (9777, tmp_path, True, False)
    args = parser.parse_args(["start"])
    with pytest.raises(ConfigError, match="--state-dir"):
        server_config_from_args(args)
    args = parser.parse_args(["start", "--state-dir", str(tmp_path), "--insecure"])
    assert server_config_from_args(args).insecure
    assert args.func.__name__ == "cmd_server_start"


# -- SuperNode -----------------------------------------------------------------------------


def _site_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    if "site-id" in text and "dataset" not in text:
        text += "dataset: synthetic\n"
    path.write_text(text)
    return path


def test_example_site_yamls_parse_in_both_parsers() -> None:
    from medfed.common.site_config import load_site_config

    ports = set()
    for name in ("site-a", "site-b"):
        daemon_cfg = load_site_yaml(DEPLOY / f"{name}.yaml")
        shared_cfg = load_site_config(DEPLOY / f"{name}.yaml")  # the ClientApp's parser
        assert daemon_cfg.site_id == shared_cfg.site_id == name
        assert str(daemon_cfg.state_dir) == shared_cfg.state_dir
        ports.add(daemon_cfg.clientappio_port)
    assert len(ports) == 2  # two sites on one host need their own runtime port


def test_supernode_command_tls_auth_and_node_config(tmp_path: Path, certs: Path) -> None:
    keys = create_site_keys(tmp_path / "keys", "site-a")
    cfg = load_site_yaml(_site_yaml(tmp_path, (
        "site-id: site-a\ndata-root: data dir\nstate-dir: state\nserver: 'fl.example.org:9092'\n"
        f"root-cert: {certs / 'ca.crt'}\nauth-key: keys/site-a.key\nclientappio-port: 9311\n"
        "dataset: synthetic\nshard-index: 0\nshard-count: 2\n"
    )))
    cmd = supernode_command(cfg)
    assert Path(cmd[0]).name == "flower-supernode"
    assert "--insecure" not in cmd
    assert _flag(cmd, "--superlink") == "fl.example.org:9092"
    assert _flag(cmd, "--root-certificates") == str(certs / "ca.crt")
    assert _flag(cmd, "--auth-supernode-private-key") == str(keys.private_key)
    assert (_flag(cmd, "--host"), _flag(cmd, "--port")) == ("127.0.0.1", "9311")
    from flwr.common.config import parse_config_args  # what flower-supernode does with it

    node_config = parse_config_args([_flag(cmd, "--node-config")])
    assert node_config == {
        "site-id": "site-a",
        "data-root": str(tmp_path / "data dir"),
        "site-config": str(tmp_path / "site.yaml"),
        "state-dir": str(tmp_path / "state"),
    }
    override = supernode_command(cfg, server="10.0.0.9:1234", port=9400)
    assert (_flag(override, "--superlink"), _flag(override, "--port")) == ("10.0.0.9:1234", "9400")


def test_supernode_insecure_is_explicit_and_overrides_yaml_tls(tmp_path: Path, certs: Path, caplog) -> None:
    plain = load_site_yaml(_site_yaml(tmp_path, "site-id: s1\ndata-root: d\nstate-dir: s\n"))
    assert "--insecure" not in supernode_command(plain, port=9300)  # TLS with the system CAs
    cmd = supernode_command(plain, insecure=True, port=9300)
    assert "--insecure" in cmd and "--root-certificates" not in cmd
    with pytest.raises(ConfigError, match="--insecure turns TLS off but --root-cert was given"):
        supernode_command(plain, insecure=True, root_cert=certs / "ca.crt", port=9300)
    tls = load_site_yaml(_site_yaml(tmp_path, f"site-id: s1\ndata-root: d\nstate-dir: s\nroot-cert: {certs / 'ca.crt'}\n"))
    with caplog.at_level("WARNING"):
        cmd = supernode_command(tls, insecure=True, port=9300)
    assert "--insecure" in cmd and "--root-certificates" not in cmd
    assert "ignoring root-cert" in caplog.text


def test_supernode_missing_or_open_key_files(tmp_path: Path) -> None:
    cfg = load_site_yaml(_site_yaml(tmp_path, "site-id: s1\ndata-root: d\nstate-dir: s\nauth-key: k/s1.key\n"))
    with pytest.raises(ConfigError, match="medfed certs site --site-id s1"):
        supernode_command(cfg, port=9300)
    keys = create_site_keys(tmp_path / "k", "s1")
    os.chmod(keys.private_key, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        supernode_command(cfg, port=9300)
    with pytest.raises(ConfigError, match="root-cert .* not found"):
        supernode_command(cfg, root_cert=tmp_path / "nope.crt", port=9300)
    with pytest.raises(ConfigError, match="port"):
        supernode_command(cfg, port=0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("site-id: a\ndata-root: d\nstate-dir: s\nsite_id: typo\n", r"unknown site config key\(s\): site_id; allowed keys: .*data-root"),
        ("site-id: a\ndata-root: d\nstate-dir: s\nclientappio_port: 1\nfoo: 2\n", "unknown site config key\\(s\\): clientappio_port, foo"),
        ("data-root: d\nstate-dir: s\n", "missing required key 'site-id'"),
        ("site-id: a\ndata-root: d\n", "state-dir"),
        ("site-id: 'a b'\ndata-root: d\nstate-dir: s\n", "site-id='a b' is not allowed"),
        ("site-id: a\ndata-root: d\nstate-dir: s\nserver: nohostport\n", "HOST:PORT"),
        ("site-id: a\ndata-root: d\nstate-dir: s\nclientappio-port: 70000\n", "clientappio-port"),
        ("site-id: a\ndata-root: d\nstate-dir: s\nclientappio-port: true\n", "clientappio-port"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_site_yaml_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_site_yaml(_site_yaml(tmp_path, text))


def test_site_yaml_allowed_keys_cover_the_site_format() -> None:
    from medfed.common.site_config import SiteConfig

    assert {"site-id", "data-root", "dataset", "data-file", "task", "state-dir", "server", "root-cert",
            "auth-key", "shard-index", "shard-count"} <= set(SiteConfig("a", "d", "s", dataset="synthetic").to_dict())


def test_node_config_refuses_quotes(tmp_path: Path) -> None:
    cfg = load_site_yaml(_site_yaml(tmp_path, "site-id: a\ndata-root: \"it's\"\nstate-dir: s\n"))
    with pytest.raises(ConfigError, match="quote"):
        node_config_string(cfg)


def test_site_start_cli_wiring(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_site_arguments(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["start", "--config", "x.yaml", "--insecure", "--server", "h:1"])
    assert (args.insecure, args.server, args.func.__name__) == (True, "h:1", "cmd_site_start")


# -- flwr CLI: connection config, app staging, unreachable server ---------------------------


@pytest.mark.parametrize("server", ["127.0.0.1:9092", "fl.example.org:443", "[::1]:9092"])
def test_parse_server_address_ok(server: str) -> None:
    host, port = parse_server_address(server)
    assert port in (9092, 443) and host


@pytest.mark.parametrize("server", ["127.0.0.1", "http://h:1", "h:0", "h:99999", ""])
def test_parse_server_address_bad(server: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT|port"):
        parse_server_address(server)


def test_flower_cli_home_holds_one_explicit_connection(certs: Path) -> None:
    with flower_cli_home("127.0.0.1:9092", root_cert=certs / "ca.crt") as home:
        conf = tomllib.loads((home / "config.toml").read_text())
    assert conf["superlink"]["default"] == "medfed"
    assert conf["superlink"]["medfed"] == {"address": "127.0.0.1:9092", "root-certificates": str(certs / "ca.crt")}
    assert not home.exists()  # removed afterwards
    with flower_cli_home("127.0.0.1:9092", insecure=True) as home:
        conf = tomllib.loads((home / "config.toml").read_text())
    assert conf["superlink"]["medfed"] == {"address": "127.0.0.1:9092", "insecure": True}
    with pytest.raises(ConfigError, match="drop one"):
        with flower_cli_home("127.0.0.1:9092", insecure=True, root_cert=certs / "ca.crt"):
            pass
    with pytest.raises(ConfigError, match="ca.crt"):
        with flower_cli_home("127.0.0.1:9092", root_cert=certs / "missing.crt"):
            pass


def test_stage_app_drops_federations_and_leaves_source_untouched(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "tests").mkdir()
    (app / ".venv").mkdir()
    pyproject = (
        '[project]\nname = "x"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "p"\n\n'
        '[tool.flwr.app.components]\nserverapp = "pkg.s:app"\nclientapp = "pkg.c:app"\n\n'
        '[tool.flwr.federations]\ndefault = "local-simulation"\n\n'
        "[tool.flwr.federations.local-simulation]\noptions.num-supernodes = 4\n\n"
        '[tool.pytest.ini_options]\naddopts = "-q"\n'
    )
    (app / "pyproject.toml").write_text(pyproject)
    (app / "pkg" / "s.py").write_text("app = 1\n")
    (app / "pkg" / "big.json").write_text("{}")
    (app / "tests" / "test_x.py").write_text("")
    (app / ".venv" / "junk.py").write_text("")
    staged = stage_app(app, tmp_path / "staged")
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == ["pkg/s.py", "pyproject.toml"]
    conf = tomllib.loads((staged / "pyproject.toml").read_text())
    assert "federations" not in conf["tool"]["flwr"]
    assert conf["tool"]["pytest"]["ini_options"]["addopts"] == "-q"
    assert (app / "pyproject.toml").read_text() == pyproject
    assert "federations" not in strip_federations(pyproject)
    with pytest.raises(ConfigError, match="not a Flower app"):
        stage_app(tmp_path / "staged" / "pkg", tmp_path / "again")


def test_run_to_unreachable_server_fails_fast_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(MedfedError) as info:
        submit_run(f"127.0.0.1:{port}", app_dir=tmp_path, insecure=True)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "medfed server start" in msg


def test_register_site_refuses_private_key(tmp_path: Path) -> None:
    keys = create_site_keys(tmp_path, "site-a")
    with pytest.raises(ConfigError, match="private key"):
        register_site("127.0.0.1:9", keys.private_key, insecure=True)
    with pytest.raises(ConfigError, match="medfed certs site"):
        register_site("127.0.0.1:9", tmp_path / "nope.pub", insecure=True)


def test_commands_are_shell_safe(tmp_path: Path) -> None:
    cfg = load_site_yaml(_site_yaml(tmp_path, "site-id: a\ndata-root: d\nstate-dir: s\n"))
    cmd = supernode_command(cfg, insecure=True, port=9300)
    assert shlex.split(shlex.join(cmd)) == cmd


# -- process helpers -----------------------------------------------------------------------


def test_stop_process_group_reaches_children_that_left_the_session(tmp_path: Path) -> None:
    from medfed.common.process import descendants, is_alive, start_process_group, stop_process_group

    # the second sleep starts its own session, like Flower's SuperExec; the shell ignores SIGTERM
    script = "trap '' TERM; sleep 60 & setsid sleep 60 & wait"
    proc = start_process_group(["/bin/sh", "-c", script], cwd=tmp_path)
    deadline = time.monotonic() + 5
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = descendants(proc.pid)
    assert len(children) >= 2
    start = time.monotonic()
    stop_process_group(proc, timeout=0.5)
    assert time.monotonic() - start < 8
    assert proc.poll() is not None
    assert not [pid for pid in children if is_alive(pid)]


def test_wait_for_port_reports_early_exit_with_log_tail(tmp_path: Path) -> None:
    from medfed.common.process import start_process_group, wait_for_port

    log = tmp_path / "x.log"
    proc = start_process_group(["/bin/sh", "-c", "echo boom-reason; exit 3"], cwd=tmp_path, log_path=log)
    with pytest.raises(MedfedError, match="exited with code 3.*boom-reason"):
        wait_for_port("127.0.0.1", free_port(), proc, 10, "thing", log)
