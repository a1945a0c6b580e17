"""End-to-end deployment: a real SuperLink and two SuperNodes on 127.0.0.1, 2 rounds.

Each scenario runs once insecure and once with TLS + SuperNode authentication. Every
process is started in its own session and stopped (with all descendants, including the
SuperExec Flower detaches) in a ``finally``, also when the test fails.

* ``test_probe_app_*`` uses a minimal Message-API app written by the test: it proves the
  deployment machinery (flags, node config, key registration, result location).
* ``test_medfed_app_*`` runs the real medfed ServerApp/ClientApp on synthetic data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from medfed.client.daemon import load_site_yaml, start_supernode
from medfed.common.certs import create_ca, create_server_cert, create_site_keys
from medfed.common.errors import MedfedError
from medfed.common.process import descendants, free_port, is_alive, stop_process_group
from medfed.server.deploy import ServerDeployConfig, register_site, start_superlink
from medfed.server.submit import RUN_COMPLETED, flower_cli_home, run_flwr, submit_run

pytestmark = pytest.mark.slow

SITES = ("site-a", "site-b")
RUN_TIMEOUT_S = 300.0

PROBE_PYPROJECT = """\
[project]
name = "medfedprobe"
version = "1.0.0"
description = "deployment probe"
license = "Apache-2.0"
dependencies = ["flwr>=1.41,<1.42"]

[tool.flwr.app]
publisher = "medfed"

[tool.flwr.app.components]
serverapp = "medfedprobe.server_app:app"
clientapp = "medfedprobe.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-nodes = 2
out-dir = "probe-out"
"""

PROBE_SERVER = '''\
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.monotonic() + 60
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < int(cfg["min-nodes"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    rounds = []
    for rnd in range(1, int(cfg["num-server-rounds"]) + 1):
        msgs = [Message(RecordDict({"cfg": ConfigRecord({"round": rnd})}), dst_node_id=n, message_type="query")
                for n in nodes]
        rounds.append([dict(r.content["reply"]) if r.has_content() else {"error": str(r.error)}
                       for r in grid.send_and_receive(msgs, timeout=120)])
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"run-id": context.run_id, "rounds": rounds}))
'''

PROBE_CLIENT = '''\
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    reply = {k: str(v) for k, v in context.node_config.items()}
    reply["round"] = int(msg.content["cfg"]["round"])
    return Message(RecordDict({"reply": ConfigRecord(reply)}), reply_to=msg)
'''


@dataclass
class Deployment:
    server: str
    state_dir: Path
    root_cert: Path | None
    secure: bool
    site_yamls: dict[str, Path]
    logs: list[Path]
    procs: list


def _write_probe_app(folder: Path) -> Path:
    (folder / "medfedprobe").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (folder / "medfedprobe" / "__init__.py").write_text("")
    (folder / "medfedprobe" / "server_app.py").write_text(PROBE_SERVER)
    (folder / "medfedprobe" / "client_app.py").write_text(PROBE_CLIENT)
    return folder


def _site_yaml(base: Path, site_id: str, index: int, server: str, secure: bool) -> Path:
    lines = [
        f"site-id: {site_id}", f"data-root: {site_id}/data", f"state-dir: {site_id}/state",
        f"server: '{server}'", "dataset: synthetic", "task: classification",
        f"shard-index: {index}", f"shard-count: {len(SITES)}", "clientappio-port: 0",
        "run-app-code: true",  # the probe app ships its own ClientApp (medfed sites refuse that by default)
    ]
    if secure:
        lines += ["root-cert: certs/ca.crt", f"auth-key: keys/{site_id}.key"]
    path = base / f"{site_id}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def deployment(base: Path, *, secure: bool) -> Iterator[Deployment]:
    """SuperLink + 2 SuperNodes; TLS + site authentication when ``secure``. Always torn down."""
    procs: list = []
    logs: list[Path] = []
    certs = base / "certs"
    try:
        if secure:
            create_ca(certs)
            create_server_cert(certs, certs, ["127.0.0.1", "localhost"])
        cfg = ServerDeployConfig(
            state_dir=base / "server", certs_dir=certs if secure else None, port=free_port(),
            insecure=not secure, enable_site_auth=secure,
        )
        logs.append(base / "superlink.log")
        procs.append(start_superlink(cfg, log_path=logs[-1]))
        root_cert = certs / "ca.crt" if secure else None
        yamls = {}
        for index, site_id in enumerate(SITES):
            if secure:
                keys = create_site_keys(base / "keys", site_id)
                register_site(cfg.address, keys.public_key, root_cert=root_cert, name=site_id)
            yamls[site_id] = _site_yaml(base, site_id, index, cfg.address, secure)
            logs.append(base / f"{site_id}.log")
            procs.append(start_supernode(load_site_yaml(yamls[site_id]), insecure=not secure, log_path=logs[-1]))
        yield Deployment(cfg.address, cfg.state_dir, root_cert, secure, yamls, logs, procs)
    finally:
        everything = {pid for p in procs for pid in (p.pid, *descendants(p.pid))}
        for proc in reversed(procs):
            stop_process_group(proc)
        for log in logs:  # shown by pytest when the test fails
            if log.is_file():
                print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        leftovers = [pid for pid in everything if is_alive(pid)]
        assert not leftovers, f"processes left running: {leftovers}"


def _submit(dep: Deployment, app_dir: Path | None, run_config: str) -> None:
    start = time.monotonic()
    result = submit_run(
        dep.server, app_dir=app_dir, insecure=not dep.secure, root_cert=dep.root_cert,
        run_config=run_config, wait=True, timeout=RUN_TIMEOUT_S, poll_interval=1.0,
    )
    print(f"run {result.run_id}: {result.status} in {time.monotonic() - start:.1f} s")
    if result.status != RUN_COMPLETED:
        with flower_cli_home(dep.server, insecure=not dep.secure, root_cert=dep.root_cert) as home:
            print(run_flwr(["log", str(result.run_id), "medfed", "--show"], home).stdout)
    assert result.status == RUN_COMPLETED


@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-auth"])
def test_probe_app_two_sites_two_rounds(tmp_path: Path, secure: bool) -> None:
    app = _write_probe_app(tmp_path / "app")
    with deployment(tmp_path, secure=secure) as dep:
        _submit(dep, app, "num-server-rounds=2")
        # relative out-dir: lands in the SuperLink's state dir (its working directory)
        result = json.loads((dep.state_dir / "probe-out" / "result.json").read_text())
        assert len(result["rounds"]) == 2
        for rnd, replies in enumerate(result["rounds"], start=1):
            assert sorted(r["site-id"] for r in replies) == list(SITES)
            for reply in replies:
                assert int(reply["round"]) == rnd
                assert reply["site-config"] == str(dep.site_yamls[reply["site-id"]])
                assert reply["state-dir"] == str(tmp_path / reply["site-id"] / "state")
                assert reply["data-root"] == str(tmp_path / reply["site-id"] / "data")
        if secure:
            # a site whose key was never registered is turned away
            create_site_keys(tmp_path / "keys", "site-x")
            intruder = load_site_yaml(_site_yaml(tmp_path, "site-x", 0, dep.server, True))
            try:  # it may be refused before or after its local port opens
                proc = start_supernode(intruder, log_path=tmp_path / "site-x.log")
            except MedfedError:
                pass
            else:
                try:
                    assert proc.wait(timeout=60) != 0
                finally:
                    stop_process_group(proc)
            assert "Failed to activate SuperNode" in (tmp_path / "site-x.log").read_text()
            # and a client that skips TLS gets a clear error
            with pytest.raises(MedfedError, match="check TLS"):
                submit_run(dep.server, app_dir=app, insecure=True)


@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-auth"])
def test_medfed_app_two_sites_two_rounds(tmp_path: Path, shared_data: Path, secure: bool) -> None:
    """The real medfed apps on PneumoniaMNIST shards from ../shared/data, 2 rounds."""
    from medfed.simulations.loopback import LocalDeployment

    data = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    dep = LocalDeployment(tmp_path / "dep", data=data, sites=2, insecure=not secure)
    try:
        with dep:
            out = dep.run_study(rounds=2, extra={"local-steps": 10}, out_dir="runs/e2e")
            leftovers_before = dep.stop()
    finally:
        print(dep.log_tails())
    assert not leftovers_before, f"processes left running: {leftovers_before}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "federated" and summary["rounds"] == 2
    assert set(summary["sites"]) == {"site-a", "site-b"}
    assert 0.5 < summary["test"]["auc"] <= 1.0  # the sites' test shards, pooled: the server holds no data
    assert summary["test-source"]["kind"] == "sites" and sum(summary["test-source"]["sites"].values()) == 624
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r["sites"]) == {"site-a", "site-b"} and not r["failures"]
    assert (out / "checkpoints" / "round-0002.pt").is_file() and (out / "model.pt").is_file()
    assert (out / "report.md").is_file()
    # one message per round: round 1's model is evaluated inside round 2's train message; round 2's
    # and the final (selected) model by their own evaluate messages
    assert rounds[0]["time"]["evaluated-with-round"] == 2 and "evaluated-with-round" not in rounds[1]["time"]
    assert all("val-auc" in row for r in rounds for row in r["sites"].values())
    for site in ("site-a", "site-b"):
        text = (dep.base / f"{site}.log").read_text(errors="replace")
        assert (text.count("Receiving: train message"), text.count("Receiving: evaluate message")) == (2, 2), site


def test_dp_ledger_survives_site_restarts(tmp_path: Path) -> None:
    """DP sites in a real deployment: SuperNodes killed and restarted between rounds keep their ledgers."""
    from medfed.common.dp.ledger import PrivacyLedger
    from medfed.simulations.loopback import LocalDeployment

    dep = LocalDeployment(tmp_path / "dep", data=None, sites=2, insecure=True)
    dp = {"local-steps": 3, "batch-size": 32, "epsilon": 3.0}
    try:
        with dep:
            out = dep.run_study(rounds=2, extra=dp, out_dir="runs/dp")
            first = {s: PrivacyLedger.load(dep.base / s / "state") for s in SITES}
            dep.restart_sites()  # every site process is killed and started again
            ckpt = out / "checkpoints" / "round-0002.pt"
            out = dep.run_study(rounds=4, extra={**dp, "resume": str(ckpt)}, out_dir="runs/dp")
            leftovers = dep.stop()
    finally:
        print(dep.log_tails())
    assert not leftovers
    summary = json.loads((out / "summary.json").read_text())
    for site in SITES:
        before, after = first[site], PrivacyLedger.load(dep.base / site / "state")
        assert [r["round"] for r in before.rounds] == [1, 2]
        assert [r["round"] for r in after.rounds] == [1, 2, 3, 4]  # restored, not restarted from zero
        assert after.history[:2] == before.history
        assert before.spent() < after.spent() <= 3.0
        assert summary["sites"][site]["epsilon"] == pytest.approx(after.spent())
