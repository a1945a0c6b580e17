"""Issue 15: a site checks its data and its server before it joins; `site check` covers every kind of site.

- `medfed site start` builds the site's data as training does before any SuperNode exists;
  a problem is one line naming the site, the site.yaml key and the file, exit 2;
- the first contact with the server (TLS handshake included) is bounded by --connect-timeout;
- "started" is logged once the SuperLink accepted the SuperNode (`SuperNode ID` in its log);
- `medfed site check` reports on MedMNIST files and synthetic shards like on manifest sites.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from medfed.client.array_qc import check_array_site
from medfed.client.site_preflight import preflight_site
from medfed.client.supernode_log import SupernodeLog
from medfed.common.certs import create_ca, create_server_cert
from medfed.common.cli import main
from medfed.common.errors import MedfedError
from medfed.common.server_contact import wait_for_server
from medfed.common.site_config import load_site_config
from medfed.common.site_files import SiteDataError, check_site_files

from tests.intake_factory import dicom_site, write_manifest, write_site_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


def _yaml(tmp_path: Path, **keys: object) -> Path:
    return write_site_yaml(tmp_path / "site.yaml", **{"site-id": "hosp-a", "data-root": "data",
                                                       "state-dir": "state", **keys})


def _npz(shared_data: Path) -> Path:
    return shared_data / "pneumoniamnist" / "pneumoniamnist.npz"


def _no_supernode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `site start` got as far as the server or a SuperNode."""
    import medfed.common.server_contact as contact
    from medfed.client import daemon

    def _reached(*_a: object, **_k: object) -> None:
        raise AssertionError("site start went past the data check")

    monkeypatch.setattr(daemon, "start_supernode", _reached)
    monkeypatch.setattr(contact, "wait_for_server", _reached)


# --------------------------------------------------------------------------- files named by site.yaml keys
@pytest.mark.parametrize("keys, make, key, missing", [
    ({"manifest": "m.csv", "labels": ["a", "b"]}, [], "data-root", "data"),
    ({"manifest": "m.csv", "labels": ["a", "b"]}, ["data/"], "manifest", "data/m.csv"),
    ({"dicom-dir": "dcm", "labels-csv": "l.csv", "labels": ["a", "b"]}, ["data/"], "dicom-dir", "data/dcm"),
    ({"dicom-dir": "dcm", "labels-csv": "l.csv", "labels": ["a", "b"]}, ["data/dcm/"], "labels-csv", "data/l.csv"),
    ({"data-file": "p.npz"}, [], "data-root", "data"),
    ({"data-file": "p.npz"}, ["data/"], "data-file", "data/p.npz"),
    ({"data-file": "p.npz"}, ["data/p.npz/"], "data-file", "data/p.npz"),  # a folder, not a file
])
def test_missing_data_is_named_by_its_site_yaml_key(tmp_path, keys, make, key, missing):
    for rel in make:
        (tmp_path / rel).mkdir(parents=True, exist_ok=True)
    path = _yaml(tmp_path, **keys)
    with pytest.raises(SiteDataError) as err:
        check_site_files(load_site_config(path), path)
    msg = str(err.value)
    assert msg.startswith(f"site hosp-a: {key} {tmp_path / missing} ")
    assert str(path) in msg and "\n" not in msg and "data-path" not in msg
    assert err.value.detail == msg.removeprefix("site hosp-a: ")


def test_synthetic_and_absolute_data_file_need_no_data_root(tmp_path, shared_data):
    check_site_files(load_site_config(_yaml(tmp_path, dataset="synthetic")))
    check_site_files(load_site_config(_yaml(tmp_path, **{"data-file": str(_npz(shared_data))})))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_data_file_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    npz = tmp_path / "data" / "p.npz"
    npz.write_bytes(b"x")
    npz.chmod(0)
    with pytest.raises(SiteDataError, match="data-file .* cannot be read by this user"):
        check_site_files(load_site_config(_yaml(tmp_path, **{"data-file": "p.npz"})))


def test_a_file_this_user_cannot_read_is_named_even_as_root(tmp_path, monkeypatch):
    from medfed.common import site_files

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.npz").write_bytes(b"x")

    def _denied(path: object, *_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(site_files, "open", _denied, raising=False)
    with pytest.raises(SiteDataError) as err:
        check_site_files(load_site_config(_yaml(tmp_path, **{"data-file": "p.npz"})))
    assert str(err.value) == (f"site hosp-a: data-file {tmp_path / 'data' / 'p.npz'} cannot be read by this user "
                              "(Permission denied): let the user that runs medfed read it (owner, group or mode; "
                              "for a mount, its options) (in site.yaml)")


# --------------------------------------------------------------------------- site start: data first
def test_site_start_with_a_missing_data_root_prints_one_line_and_exits_2(tmp_path):
    path = _yaml(tmp_path, manifest="manifest.csv", labels=["normal", "abnormal"])
    out = subprocess.run([sys.executable, "-m", "medfed.common.cli", "site", "start", "--config", str(path),
                          "--connect-timeout", "1"], check=False, capture_output=True, text=True, timeout=120,
                         cwd=REPO_ROOT)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0] == (f"medfed: config error: site hosp-a: data-root {tmp_path / 'data'} does not exist: mount "
                        "or copy the site's data there, or set data-root to the folder that holds it "
                        f"(in {path})")
    assert not (tmp_path / "state").exists()  # no SuperNode, no state


@pytest.mark.parametrize("case", ["missing", "corrupt", "no-usable-row"])
def test_site_start_refuses_data_that_gives_no_training_example(tmp_path, monkeypatch, capsys, case):
    _no_supernode(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    if case == "no-usable-row":
        write_manifest(data / "manifest.csv", [{"path": "gone.png", "label": "normal"}])
        path, key = _yaml(tmp_path, manifest="manifest.csv", labels=["normal", "abnormal"]), "manifest"
    else:
        if case == "corrupt":
            (data / "p.npz").write_bytes(b"PK\x03\x04 truncated")
        path, key = _yaml(tmp_path, **{"data-file": "p.npz"}), "data-file"
    assert main(["site", "start", "--config", str(path), "--insecure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"medfed: config error: site hosp-a: {key} {data / ('manifest.csv' if key == 'manifest' else 'p.npz')}")
    assert "data-path" not in err and "num-sites" not in err


def test_preflight_builds_the_data_as_training_does(tmp_path, shared_data):
    from medfed.client.site_data import site_runtime
    from medfed.common.config import StudyConfig

    site = load_site_config(_yaml(tmp_path, **{"data-file": str(_npz(shared_data)), "shard-index": 1,
                                               "shard-count": 3}))
    ready = preflight_site(site, tmp_path / "site.yaml")
    data = site_runtime(site, StudyConfig()).data
    assert (ready.train, ready.val, ready.test) == (len(data.train), len(data.val), len(data.test))
    assert 0 < ready.train < 4708  # one shard of the official train split

    manifest_site = load_site_config(dicom_site(tmp_path / "dicom", n_patients=6, images_per_patient=2))
    ready = preflight_site(manifest_site, tmp_path / "dicom" / "site.yaml")
    assert ready.train + ready.val + ready.test == 12 and ready.train > 0


# --------------------------------------------------------------------------- the first contact, bounded
class _Listener:
    """A TCP listener on 127.0.0.1: ``silent`` accepts and never answers, else answers HTTP (TLS with ``context``)."""

    def __init__(self, silent: bool = False, context: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.silent, self.context, self.held = silent, context, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if not self.silent:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture()
def tls(tmp_path):
    """(ca.crt, a server-side TLS context) for 127.0.0.1, and a second CA that did not sign it."""
    ca = create_ca(tmp_path / "ca")
    server = create_server_cert(tmp_path / "server", tmp_path / "ca", ["127.0.0.1", "localhost"])
    other = create_ca(tmp_path / "other-ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert, server.key)
    return ca.cert, context, other.cert


@pytest.mark.parametrize("secure", [True, False])
def test_a_listener_that_never_answers_fails_within_the_timeout(tls, secure):
    ca, _, _ = tls
    listener = _Listener(silent=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(MedfedError) as err:
            wait_for_server(listener.address, "127.0.0.1", listener.port, timeout=1.5, tls=secure, root_cert=ca)
        elapsed = time.monotonic() - t0
    finally:
        listener.close()
    assert 1.3 <= elapsed < 3.0, elapsed  # Flower's own TLS handshake timeout would be 30 s
    msg = str(err.value)
    stage = "did not complete the TLS handshake" if secure else "did not answer an HTTP request"
    assert msg.startswith(f"the server at {listener.address} accepted the connection but {stage} within 1.5 s")
    assert "--connect-timeout" in msg and "\n" not in msg


def test_site_start_gives_up_on_a_silent_server_after_connect_timeout(tmp_path, tls, monkeypatch, capsys):
    from medfed.client import daemon

    def _no_supernode(*_a: object, **_k: object) -> None:
        raise AssertionError("a SuperNode was started although the server never answered")

    monkeypatch.setattr(daemon, "start_supernode", _no_supernode)
    ca, _, _ = tls
    listener = _Listener(silent=True)
    path = _yaml(tmp_path, dataset="synthetic", server=listener.address, **{"root-cert": str(ca)})
    try:
        t0 = time.monotonic()
        code = main(["site", "start", "--config", str(path), "--connect-timeout", "2"])
        elapsed = time.monotonic() - t0
    finally:
        listener.close()
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"medfed: error: site hosp-a: the server at {listener.address} accepted the connection but did "
                   f"not complete the TLS handshake within 2 s in all: check that {listener.address} is the "
                   "SuperLink's address and port and that it serves TLS, or raise --connect-timeout")
    assert elapsed < 2 + 15, elapsed  # the bound, plus building the synthetic shard once
    assert not (tmp_path / "state" / "supernode.log").exists()


def test_first_contact_succeeds_over_tls_and_names_a_refused_certificate(tls):
    ca, context, other_ca = tls
    listener = _Listener(context=context)
    try:
        wait_for_server(listener.address, "127.0.0.1", listener.port, timeout=5, root_cert=ca)
        t0 = time.monotonic()
        with pytest.raises(MedfedError, match="presented a certificate that was refused .*set root-cert to the "
                                              "server operator's ca.crt"):
            wait_for_server(listener.address, "127.0.0.1", listener.port, timeout=5, root_cert=other_ca)
        assert time.monotonic() - t0 < 2  # not retried until the timeout
        with pytest.raises(MedfedError, match="drop --insecure"):
            wait_for_server(listener.address, "127.0.0.1", listener.port, timeout=5, tls=False)
    finally:
        listener.close()
    plain = _Listener()
    try:
        wait_for_server(plain.address, "127.0.0.1", plain.port, timeout=5, tls=False)
        with pytest.raises(MedfedError, match="TLS handshake with the server at .* failed .*--insecure"):
            wait_for_server(plain.address, "127.0.0.1", plain.port, timeout=5, root_cert=ca)
    finally:
        plain.close()


def test_a_refused_address_is_retried_until_the_timeout(tls):
    ca, _, _ = tls
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again below: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(MedfedError, match=rf"cannot reach the server at 127.0.0.1:{port} \(Connection refused; "
                                          r"gave up after 1.5 s\).*--connect-timeout"):
        wait_for_server(f"127.0.0.1:{port}", "127.0.0.1", port, timeout=1.5, root_cert=ca)
    assert 1.3 <= time.monotonic() - t0 < 3.0


# --------------------------------------------------------------------------- "started" once accepted
def test_started_is_reported_only_once_the_supernode_log_says_it_was_accepted(tmp_path):
    log_path = tmp_path / "supernode.log"
    log_path.write_bytes(b"old run: SuperNode ID: 1\n")  # an earlier start's lines are not looked at
    sink, accepted = io.BytesIO(), []
    follower = SupernodeLog(log_path, sink=sink, on_accepted=accepted.append)
    follower.start()
    try:
        with open(log_path, "ab") as fh:
            fh.write(b"\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n")
            fh.flush()
            time.sleep(0.6)
            assert not follower.accepted.is_set() and accepted == []
            fh.write(b"\x1b[92mINFO \x1b[0m:      SuperNode ID: 1718766395")
            fh.flush()
            time.sleep(0.6)
            assert accepted == []  # half a line: not yet
            fh.write(b"7764874721\nINFO:     more\n")
        assert follower.accepted.wait(5)
    finally:
        follower.stop()
    assert accepted == ["17187663957764874721"] and follower.node_id == accepted[0]
    assert sink.getvalue().startswith(b"\x1b[92mINFO") and sink.getvalue().endswith(b"INFO:     more\n")
    assert b"old run" not in sink.getvalue()  # only what this start wrote is copied


@pytest.mark.slow
def test_site_start_reports_started_after_the_superlink_accepted_it(tmp_path):
    from medfed.common.process import free_port, stop_process_group
    from medfed.server.deploy import ServerDeployConfig, start_superlink

    port = free_port()
    superlink = start_superlink(ServerDeployConfig(state_dir=tmp_path / "server", insecure=True, port=port),
                                log_path=tmp_path / "superlink.log")
    path = _yaml(tmp_path, dataset="synthetic", server=f"127.0.0.1:{port}")
    site = subprocess.Popen([sys.executable, "-m", "medfed.common.cli", "site", "start", "--config", str(path),
                             "--insecure", "--connect-timeout", "30"], stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT)
    seen: list[str] = []
    try:
        assert site.stderr is not None
        for line in site.stderr:
            seen.append(line)
            if "SuperNode started" in line:
                break
    finally:
        site.terminate()
        site.wait(timeout=60)
        stop_process_group(superlink)
    text = "".join(seen)
    assert "SuperNode started (insecure, no TLS): accepted by the server" in text, text
    assert text.index("SuperNode ID: ") < text.index("SuperNode started")
    assert (tmp_path / "state" / "supernode.log").is_file()


# --------------------------------------------------------------------------- site check: every kind of site
def test_site_check_reports_on_a_medmnist_shard(tmp_path, shared_data, capsys):
    npz = _npz(shared_data)
    with np.load(npz) as z:
        file_counts = {s: len(z[f"{s}_labels"]) for s in SPLITS}
    shards = []
    for index in range(3):
        path = write_site_yaml(tmp_path / f"s{index}.yaml", **{
            "site-id": f"pm-{index}", "data-root": str(npz.parent), "data-file": npz.name,
            "state-dir": f"state-{index}", "shard-index": index, "shard-count": 3})
        assert main(["site", "check", "--config", str(path)]) == 0
        shards.append(json.loads((tmp_path / f"state-{index}" / "qc-report.json").read_text()))
    printed = capsys.readouterr().out
    assert "site pm-1: MedMNIST file" in printed and "shard 1 of 3" in printed and "result: OK" in printed
    assert "normal" in printed and "pneumonia" in printed and "size: 1x28x28" in printed
    report = shards[1]
    assert report["ok"] and report["rows"] == sum(file_counts.values())
    assert report["counts"]["shard"] == {"index": 1, "count": 3}
    assert sum(report["counts"]["split"].values()) == report["usable"] < report["rows"]
    for s in SPLITS:  # the shards honour shard-index: together they are the file, each a part
        assert sum(r["counts"]["split"][s] for r in shards) <= file_counts[s]
        assert all(0 < r["counts"]["split"][s] < file_counts[s] for r in shards)
    assert set(report["counts"]["label"]) == {"normal", "pneumonia"}
    assert report["images"]["size"] == {"1x28x28": report["usable"]}
    assert report["images"]["channels"] == {"1": report["usable"]}


@pytest.mark.parametrize("damage, needle", [
    ("labels", "labels go up to 7"),
    ("keys", "missing key(s) val_images"),
    ("truncated", "cannot be read as a .npz"),
])
def test_site_check_fails_a_bad_medmnist_file(tmp_path, shared_data, capsys, damage, needle):
    data = tmp_path / "data"
    data.mkdir()
    with np.load(_npz(shared_data)) as z:
        arrays = {k: z[k] for k in z.files}
    target = data / "pneumoniamnist.npz"
    if damage == "labels":
        arrays["train_labels"] = arrays["train_labels"].copy()
        arrays["train_labels"][0] = 7
        np.savez(target, **arrays)
    elif damage == "keys":
        del arrays["val_images"]
        np.savez(target, **arrays)
    else:
        target.write_bytes(_npz(shared_data).read_bytes()[:5000])
    path = _yaml(tmp_path, **{"data-file": "pneumoniamnist.npz"})
    assert main(["site", "check", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"FATAL data-file {target}" in captured.out and needle in captured.out
    assert "site check failed for hosp-a: data-file" in captured.err
    report = json.loads((tmp_path / "state" / "qc-report.json").read_text())
    assert report["ok"] is False and needle in report["fatal"][0]


def test_site_check_reports_on_a_synthetic_demo_shard(tmp_path, capsys):
    from medfed.client.site_data import site_runtime
    from medfed.common.config import StudyConfig

    path = _yaml(tmp_path, dataset="synthetic", **{"shard-index": 1, "shard-count": 2})
    assert main(["site", "check", "--config", str(path), "--report", str(tmp_path / "qc.json")]) == 0
    assert "synthetic demo data, shard 1 of 2" in capsys.readouterr().out
    report = json.loads((tmp_path / "qc.json").read_text())
    data = site_runtime(load_site_config(path), StudyConfig()).data
    assert report["counts"]["split"] == {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    assert report["ok"] and report["usable"] == report["rows"] == len(data.train) + len(data.val) + len(data.test)
    assert report["counts"]["attributes"]  # the synthetic groups (sex)


def test_site_check_of_a_shard_too_small_names_shard_count(tmp_path, shared_data):
    site = load_site_config(_yaml(tmp_path, **{"data-file": str(_npz(shared_data)), "shard-count": 5000}))
    report = check_array_site(site)
    assert not report.ok and report.fatal[0].startswith("shard-count 5000 cannot be taken")


def test_site_check_of_missing_files_names_the_key_for_every_kind(tmp_path):
    for keys in ({"data-file": "p.npz"}, {"manifest": "m.csv", "labels": ["a", "b"]}):
        path = _yaml(tmp_path, **keys)
        assert main(["site", "check", "--config", str(path), "--report", str(tmp_path / "qc.json")]) == 1
        report = json.loads((tmp_path / "qc.json").read_text())
        assert report["fatal"][0].startswith(f"data-root {tmp_path / 'data'} does not exist")
