"""Sites run only the medfed they installed: FAB checks, the launcher, and a refused app end to end."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from medfed.client.daemon import load_site_yaml, supernode_command
from medfed.client.trusted_app import TRUSTED_CLIENTAPP, UntrustedAppError, app_hash, build_fab, check_fab
from medfed.common.errors import ConfigError
from medfed.common.site_config import parse_site_config
from medfed.server.submit import default_app

EVIL = "from pathlib import Path\nPath(__file__).with_name('EVIL_RAN').write_text('x')\napp = None\n"


def _fab(folder: Path, *, extra: dict[str, str] | None = None, clientapp: str | None = None) -> bytes:
    app = default_app(folder)
    for name, text in (extra or {}).items():
        (app / name).write_text(text)
    if clientapp is not None:
        py = app / "pyproject.toml"
        py.write_text(py.read_text().replace(f'clientapp = "{TRUSTED_CLIENTAPP}"', f'clientapp = "{clientapp}"'))
    return build_fab(app)


def test_genuine_app_is_accepted_and_its_hash_is_what_app_hash_prints(tmp_path):
    fab = _fab(tmp_path / "app")
    digest = check_fab(fab)
    assert digest == app_hash() == check_fab(fab, [digest])
    assert len(digest) == 64


def test_app_with_a_python_module_is_refused_naming_hash_and_file(tmp_path):
    fab = _fab(tmp_path / "app", extra={"evil.py": EVIL})
    with pytest.raises(UntrustedAppError, match=r"sha256=[0-9a-f]{64}.*evil\.py.*trusted-apps"):
        check_fab(fab)


def test_changed_clientapp_component_is_refused_even_when_pinned(tmp_path):
    fab = _fab(tmp_path / "app", clientapp="evil:app")
    from medfed.client.trusted_app import fab_sha256

    for trusted in ((), (fab_sha256(fab),)):
        with pytest.raises(UntrustedAppError, match="clientapp is 'evil:app'"):
            check_fab(fab, trusted)


def test_pinned_hashes_refuse_other_apps_and_accept_listed_ones(tmp_path):
    genuine = _fab(tmp_path / "a")
    with_code = _fab(tmp_path / "b", extra={"helper.py": "x = 1\n"})
    from medfed.client.trusted_app import fab_sha256

    with pytest.raises(UntrustedAppError, match="not in the site's trusted-apps"):
        check_fab(genuine, [fab_sha256(with_code)])
    # listed on purpose: accepted (its code is never imported; the installed medfed runs)
    assert check_fab(with_code, [fab_sha256(with_code)]) == fab_sha256(with_code)


@pytest.mark.parametrize("content", [b"not a zip", b""])
def test_garbage_is_refused(content):
    with pytest.raises(UntrustedAppError, match="not a valid FAB"):
        check_fab(content)


def test_fab_without_pyproject_is_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("README.md", "hi")
    with pytest.raises(UntrustedAppError, match="no pyproject.toml"):
        check_fab(buf.getvalue())


def test_site_yaml_trusted_apps_must_be_sha256():
    base = {"site-id": "a", "data-root": "/d", "state-dir": "/s", "dataset": "synthetic"}
    assert parse_site_config({**base, "trusted-apps": ["ab" * 32]}).trusted_apps == ("ab" * 32,)
    with pytest.raises(ConfigError, match="trusted-apps.*medfed site app-hash"):
        parse_site_config({**base, "trusted-apps": ["deadbeef"]})


def test_supernode_runs_in_process_isolation_unless_run_app_code(tmp_path):
    lines = ["site-id: a", "data-root: d", "state-dir: s", "dataset: synthetic", "clientappio-port: 9100"]
    (tmp_path / "s.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.yaml").write_text("\n".join([*lines, "run-app-code: true"]) + "\n")
    cmd = supernode_command(load_site_yaml(tmp_path / "s.yaml"), insecure=True)
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert "--isolation" not in supernode_command(load_site_yaml(tmp_path / "dev.yaml"), insecure=True)


@pytest.mark.slow
def test_modified_app_is_refused_at_the_site_and_visible_at_the_server(tmp_path):
    """Genuine app: trains. App shipping code for the ClientApp: refused, its code never runs."""
    from medfed.server.submit import run_exit, submit_run
    from medfed.simulations.loopback import LocalDeployment, run_config_string

    evil_app = default_app(tmp_path / "evil-app")
    (evil_app / "evil.py").write_text(EVIL)
    py = evil_app / "pyproject.toml"
    py.write_text(py.read_text().replace(f'clientapp = "{TRUSTED_CLIENTAPP}"', 'clientapp = "evil:app"'))
    dep = LocalDeployment(tmp_path / "dep", sites=1, insecure=True)
    try:
        with dep:
            out = dep.run_study(rounds=1, extra={"local-steps": 2}, out_dir="runs/genuine")
            rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert rounds[0]["sites"] and not rounds[0]["failures"]
            config = {"num-server-rounds": 1, "num-sites": 1, "min-sites": 1, "local-steps": 2,
                      "out-dir": "runs/evil", "round-timeout": 120.0}
            result = submit_run(dep.server, app_dir=evil_app, insecure=True, run_config=run_config_string(config),
                                wait=True, timeout=600)
    finally:
        print(dep.log_tails())
    # the site refuses the app from its first message (describe): the study fails, naming why, and nothing trains
    code, line = run_exit(result)
    assert code == 4 and "refused app sha256=" in line, line
    summary = json.loads((dep.state_dir / "runs/evil/summary.json").read_text())
    reasons = [f["reason"] for f in summary["failures"]]
    assert reasons and all("refused app sha256=" in r and "evil:app" in r for r in reasons), reasons
    assert summary["outcome"]["status"] == "failed" and not (dep.state_dir / "runs/evil/metrics.jsonl").exists()
    assert [f["site"] for f in summary["failures"]] == ["site-a"]  # named by its error reply
    site_log = (dep.base / "site-a.log").read_text()
    assert "refused app sha256=" in site_log
    assert not list(dep.base.rglob("EVIL_RAN")) and not list(Path.home().joinpath(".flwr").rglob("EVIL_RAN"))
