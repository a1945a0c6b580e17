"""The hash-chained audit trail: chain checks, tampering detected, concurrent writers, a real study's trails."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from medfed.common.audit_log import GENESIS, AuditError, AuditLog, read_entries, verify
from medfed.common.cli import main
from medfed.common.hashing import arrays_hash, config_hash, study_config_hash

from tests.inprocess_grid import InProcessGrid


def _log(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    trail = AuditLog(path, "server")
    for i in range(n):
        trail.append("tick", round=i, note=f"entry {i}", score=0.5 * i)
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------- chain
def test_round_trip_chains_every_entry(tmp_path: Path):
    path = _log(tmp_path, 4)
    entries = list(read_entries(path))
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert entries[0]["prev"] == GENESIS
    assert [e["prev"] for e in entries[1:]] == [e["hash"] for e in entries[:-1]]
    assert all(e["actor"] == "server" and e["event"] == "tick" and e["time"].endswith("+00:00") for e in entries)
    assert entries[2]["note"] == "entry 2" and entries[2]["score"] == 1.0
    result = verify(path)
    assert result.ok and result.entries == 4 and result.head == entries[-1]["hash"]
    assert result.describe() == f"OK: 4 entries, head {entries[-1]['hash']}"


def test_an_edited_field_is_found_at_its_seq(tmp_path: Path):
    path = _log(tmp_path)
    lines = _lines(path)
    lines[2] = lines[2].replace('"entry 2"', '"entry two"')
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.seq == 3 and result.line == 3 and "hash mismatch" in result.problem


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(tmp_path: Path):
    from medfed.common.audit_log import entry_hash

    path = _log(tmp_path)
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["score"] = 99.0
    entry["hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry) + "\n"
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.seq == 3 and "prev does not match" in result.problem


def test_a_deleted_middle_entry_is_found(tmp_path: Path):
    path = _log(tmp_path)
    lines = _lines(path)
    del lines[2]
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.line == 3 and result.seq == 4 and "deleted" in result.problem


def test_reordered_entries_are_found(tmp_path: Path):
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.line == 2 and result.seq == 3


def test_a_truncated_last_line_is_found_and_not_extended(tmp_path: Path):
    path = _log(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    result = verify(path)
    assert not result.ok and result.line == 5 and "incomplete" in result.problem
    with pytest.raises(AuditError, match="last line is incomplete"):
        AuditLog(path, "server").append("tick")
    assert path.read_bytes() == data[:-20], "a damaged log is never extended"


def test_a_non_json_line_is_found(tmp_path: Path):
    path = _log(tmp_path)
    lines = _lines(path)
    lines.insert(2, "garbage\n")
    _write(path, lines)
    result = verify(path)
    assert not result.ok and result.line == 3 and "not JSON" in result.problem


def test_a_cut_off_tail_needs_the_head_kept_elsewhere(tmp_path: Path):
    path = _log(tmp_path)
    head = verify(path).head
    _write(path, _lines(path)[:-2])
    assert verify(path).ok, "the chain alone cannot show a cut-off tail (documented)"
    result = verify(path, anchor=head)
    assert not result.ok and "not in the log" in result.problem
    AuditLog(path, "server").append("tick")
    later = tmp_path / "later.jsonl"
    later_trail = AuditLog(later, "server")
    first = later_trail.append("a")["hash"]
    later_trail.append("b")
    assert verify(later, anchor=first).after_anchor == 1


def test_reserved_fields_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="reserved"):
        AuditLog(tmp_path / "a.jsonl", "server").append("x", hash="0")


_APPEND = "import sys; from medfed.common.audit_log import AuditLog; t = AuditLog(sys.argv[1], sys.argv[2]); " \
    "[t.append('tick', i=i) for i in range(int(sys.argv[3]))]"


def test_two_processes_appending_keep_one_valid_chain(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND, str(path), f"site-{k}", "60"]) for k in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    result = verify(path)
    assert result.ok and result.entries == 120
    actors = [e["actor"] for e in read_entries(path)]
    assert actors.count("site-0") == 60 and actors.count("site-1") == 60


# --------------------------------------------------------------------------- hashes
def test_arrays_hash_covers_keys_dtypes_shapes_and_bytes():
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(2)}
    record = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    ref = arrays_hash(state)
    assert arrays_hash(record) == ref == arrays_hash({"a": np.ones(2, np.float32), "b": state["b"].numpy()})
    changed = dict(state, a=torch.tensor([1.0, 1.0000001]))
    assert arrays_hash(changed) != ref
    assert arrays_hash(dict(state, a=torch.ones(2, dtype=torch.float64))) != ref
    assert arrays_hash(dict(state, b=state["b"].reshape(3, 2))) != ref
    assert arrays_hash({"c": state["a"], "b": state["b"]}) != ref


def test_config_hash_ignores_key_order_only():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1, "b": [1, 2]}) != config_hash({"a": 1, "b": [2, 1]})
    assert config_hash({"a": 1}) != config_hash({"a": 1.5})


# --------------------------------------------------------------------------- CLI
def test_cli_verify_exit_codes(tmp_path: Path, capsys):
    path = _log(tmp_path, 3)
    head = verify(path).head
    assert main(["audit", "verify", str(path)]) == 0
    assert f"OK: 3 entries, head {head}" in capsys.readouterr().out
    assert main(["audit", "verify", str(path), "--expect-head", head]) == 0
    assert main(["audit", "verify", str(path), "--expect-head", "f" * 64]) == 1
    assert "not in the log" in capsys.readouterr().out
    assert main(["audit", "verify", str(path), "--expect-head", "nothex"]) == 2
    (tmp_path / "summary.json").write_text(json.dumps({"audit-head": "e" * 64}))
    assert main(["audit", "verify", str(path)]) == 1, "the head in summary.json beside the log is checked"
    (tmp_path / "summary.json").unlink()
    _write(path, _lines(path)[::-1])
    assert main(["audit", "verify", str(path)]) == 1
    assert "BROKEN at line 1, seq 3" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 1


# --------------------------------------------------------------------------- a real study
@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture(scope="module")
def study_run(tmp_path_factory) -> Path:
    from medfed.common.config import StudyConfig
    from medfed.server.federation import run_federated

    out = tmp_path_factory.mktemp("audit-study")
    cfg = StudyConfig(num_sites=3, num_server_rounds=2, local_steps=2, batch_size=32, seed=3, out_dir=str(out))
    run_federated(InProcessGrid(3, cfg.to_dict()), cfg, simulation=True)
    return out


def test_a_study_writes_a_server_trail_that_verifies(study_run: Path):
    summary = json.loads((study_run / "summary.json").read_text())
    result = verify(study_run / "audit.jsonl", anchor=summary["audit-head"])
    assert result.ok and result.head == summary["audit-head"] and result.after_anchor == 0
    entries = list(read_entries(study_run / "audit.jsonl"))
    assert entries[0]["event"] == "run-start" and entries[-1]["event"] == "run-end"
    assert entries[0]["study-config-hash"] == study_config_hash(summary["config"])
    assert entries[0]["config"] == summary["config"]
    sites = {"site-0", "site-1", "site-2"}
    assert {e["site"] for e in entries if e["event"] == "site-joined"} == sites
    assert all(e["round"] == 1 for e in entries if e["event"] == "site-joined")
    for rnd in (1, 2):
        sent = [e for e in entries if e["event"] == "model-sent" and e["round"] == rnd]
        got = [e for e in entries if e["event"] == "update-received" and e["round"] == rnd]
        assert sorted(e["site"] for e in sent) == sorted(e["site"] for e in got) == sorted(sites)
        assert len({e["model"] for e in sent}) == 1 and all(e["accepted"] for e in got)
        assert all(e["num-examples"] > 0 and len(e["update"]) == 64 for e in got)
    aggregated = [e for e in entries if e["event"] == "aggregated"]
    assert [e["round"] for e in aggregated] == [1, 2] and aggregated[0]["sites"] == sorted(sites)
    round2_sent = {e["model"] for e in entries if e["event"] == "model-sent" and e["round"] == 2}
    assert round2_sent == {aggregated[0]["model"]}, "round 2 sends what round 1 aggregated"
    assert entries[-1]["last-model"] == aggregated[-1]["model"]


def test_site_trails_match_the_server_trail(study_run: Path):
    server = list(read_entries(study_run / "audit.jsonl"))
    run_hash = server[0]["study-config-hash"]
    for site in ("site-0", "site-1", "site-2"):
        path = study_run / "sites" / site / "state" / "audit.jsonl"
        assert verify(path).ok
        entries = list(read_entries(path))
        assert {e["actor"] for e in entries} == {site}
        received = [e for e in entries if e["event"] == "message-received" and e["phase"] == "train"]
        sent = [e for e in entries if e["event"] == "reply-sent" and e["phase"] == "train"]
        assert [e["round"] for e in received] == [e["round"] for e in sent] == [1, 2]
        assert all(e["study-config-hash"] == run_hash for e in entries if e["event"] == "message-received")
        for rnd in (1, 2):
            got = next(e for e in server if e["event"] == "update-received" and e["site"] == site
                       and e["round"] == rnd)
            model = next(e for e in server if e["event"] == "model-sent" and e["site"] == site and e["round"] == rnd)
            assert sent[rnd - 1]["update"] == got["update"], "the update the site sent is the one the server got"
            assert sent[rnd - 1]["num-examples"] == got["num-examples"]
            assert received[rnd - 1]["model"] == model["model"]
            assert received[rnd - 1]["config-hash"] == model["config-hash"]


def test_the_server_log_anchors_each_sites_trail_against_a_cut_off_end(study_run: Path, tmp_path: Path, capsys):
    import shutil

    from medfed.common.audit_log import site_anchor

    server_log = study_run / "audit.jsonl"
    src = study_run / "sites" / "site-1" / "state" / "audit.jsonl"
    entries = list(read_entries(src))
    last_train = [e for e in entries if e["event"] == "message-received" and e["phase"] == "train"][-1]
    assert site_anchor(server_log, "site-1") == last_train["hash"], "the head the site sent with its last update"
    assert site_anchor(server_log, "site-9") is None
    site_log = tmp_path / "audit.jsonl"
    shutil.copy(src, site_log)
    assert main(["audit", "verify", str(site_log), "--against", str(server_log)]) == 0
    _write(site_log, _lines(src)[: last_train["seq"] - 1])  # the end cut off, from round 2's training on
    assert verify(site_log).ok, "the shortened chain is still a valid chain on its own"
    assert main(["audit", "verify", str(site_log), "--against", str(server_log)]) == 1
    assert "is not in the log" in capsys.readouterr().out


def test_a_resumed_study_continues_the_same_trail(study_run: Path, tmp_path: Path):
    import shutil

    from medfed.common.config import StudyConfig
    from medfed.server.federation import run_federated

    run = tmp_path / "run"
    shutil.copytree(study_run, run)
    before = len(list(read_entries(run / "audit.jsonl")))
    cfg = StudyConfig(num_sites=3, num_server_rounds=2, local_steps=2, batch_size=32, seed=3, out_dir=str(run),
                      resume=str(run / "checkpoints" / "round-0001.pt"))
    run_federated(InProcessGrid(3, cfg.to_dict()), cfg, simulation=True)
    summary = json.loads((run / "summary.json").read_text())
    result = verify(run / "audit.jsonl", anchor=summary["audit-head"])
    assert result.ok and result.after_anchor == 0
    new = list(read_entries(run / "audit.jsonl"))[before:]
    assert new[0]["event"] == "run-resumed" and new[0]["from-round"] == 2
    assert not [e for e in new if e["event"] == "site-joined"], "sites seen before the checkpoint are not new"
    assert {e["site"] for e in new if e["event"] == "model-sent"} == {"site-0", "site-1", "site-2"}


def test_refusals_are_recorded_at_the_site_and_the_server(tmp_path: Path):
    from medfed.common.config import StudyConfig
    from medfed.server.federation import run_federated

    cfg = StudyConfig(num_sites=2, num_server_rounds=2, local_steps=2, batch_size=32, seed=3, out_dir=str(tmp_path),
                      model="cnn-dp", epsilon=1e-4)
    run_federated(InProcessGrid(2, cfg.to_dict()), cfg, simulation=True)
    server = list(read_entries(tmp_path / "audit.jsonl"))
    rejected = [e for e in server if e["event"] == "rejected"]
    assert len(rejected) == 2 and all("privacy budget exhausted" in e["reason"] for e in rejected)
    assert verify(tmp_path / "audit.jsonl").ok
    site = list(read_entries(tmp_path / "sites" / "site-0" / "state" / "audit.jsonl"))
    refused = [e for e in site if e["event"] == "refused"]
    assert refused and refused[0]["phase"] == "train" and "privacy budget exhausted" in refused[0]["reason"]


@pytest.mark.slow
def test_medfed_simulate_trails_match_on_the_simulation_engine(tmp_path: Path):
    out = tmp_path / "sim"
    res = subprocess.run([sys.executable, "-m", "medfed.common.cli", "simulate", "--sites", "2", "--rounds", "1",
                          "--local-steps", "2", "--batch-size", "32", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert main(["audit", "verify", str(out / "audit.jsonl")]) == 0  # against summary.json's audit-head
    server = list(read_entries(out / "audit.jsonl"))
    for site in ("site-0", "site-1"):
        entries = list(read_entries(out / "sites" / site / "state" / "audit.jsonl"))
        sent = next(e for e in entries if e["event"] == "reply-sent" and e["phase"] == "train")
        got = next(e for e in server if e["event"] == "update-received" and e["site"] == site)
        assert sent["update"] == got["update"]
        assert {e["study-config-hash"] for e in entries if e["event"] == "message-received"} == {
            server[0]["study-config-hash"]}, "the sites' shard folder does not change the study's hash"
