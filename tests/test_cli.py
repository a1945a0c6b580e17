"""The `medfed` command line: help everywhere, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from medfed.common.cli import main

SUBCOMMANDS = [
    [], ["simulate"], ["report"], ["data"], ["data", "fetch"], ["server"], ["server", "start"],
    ["server", "register-site"], ["site"], ["site", "start"], ["run"], ["certs"], ["certs", "all"],
    ["certs", "ca"], ["certs", "server"], ["certs", "site"],
]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "medfed")
def test_help_everywhere(words, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*words, "--help"])
    assert exc.value.code == 0
    assert "usage: medfed" in capsys.readouterr().out


def test_usage_error_is_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--rounds", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rounds" in err[0]


def test_fetch_without_internet_is_one_clear_line(tmp_path, monkeypatch, capsys):
    def offline(*_a, **_k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code = main(["data", "fetch", "pneumoniamnist", "--dest", str(tmp_path)])
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("medfed: error")]
    assert code == 1 and len(errors) == 1 and "pneumoniamnist" in errors[0]
    assert list(tmp_path.iterdir()) == [], "nothing half-downloaded is left"
    assert main(["data", "fetch", "nosuchmnist", "--dest", str(tmp_path)]) == 2


def test_report_of_missing_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err or "does not exist" in err or "nope" in err


def test_console_script_entry_point_is_installed():
    res = subprocess.run([sys.executable, "-m", "medfed.common.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "simulate" in res.stdout
