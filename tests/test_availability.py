"""Bounded waits for sites, k-of-n rounds and resume=latest, with a fake Grid and a fake clock."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from medfed.common.config import StudyConfig
from medfed.common.errors import ConfigError
from medfed.server.availability import Availability, NodeView, wait_for_nodes
from medfed.server.resume import LATEST, latest_checkpoint, resolve_resume
from medfed.server.submit import add_run_arguments, resume_latest


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeGrid:
    """Nodes connected over (fake) time: ``schedule`` is [(from_time, node_ids), ...]."""

    def __init__(self, schedule: list[tuple[float, list[int]]], clock: FakeClock) -> None:
        self.schedule, self.clock, self.calls = schedule, clock, 0
        self.pushed: list = []

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return next(nodes for start, nodes in reversed(self.schedule) if self.clock.now >= start)

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return [str(i) for i, _ in enumerate(messages)]


def _avail(clock: FakeClock, min_sites: int = 2, timeout: float = 10.0, max_failed: int = 2) -> Availability:
    return Availability(min_sites, timeout, max_failed, poll_s=1.0, sleep=clock.sleep, clock=clock)


def test_wait_returns_at_once_when_enough_nodes() -> None:
    clock = FakeClock()
    grid = FakeGrid([(0, [5, 3, 9])], clock)
    assert wait_for_nodes(grid, 2, 10, sleep=clock.sleep, clock=clock) == [3, 5, 9]
    assert clock.now == 0 and grid.calls == 1


def test_wait_ends_when_sites_connect() -> None:
    clock = FakeClock()
    grid = FakeGrid([(0, [1]), (4.0, [1, 2])], clock)
    assert wait_for_nodes(grid, 2, 10, sleep=clock.sleep, clock=clock) == [1, 2]
    assert clock.now == 4.0


def test_wait_is_bounded_by_the_timeout() -> None:
    clock = FakeClock()
    grid = FakeGrid([(0, [1]), (60.0, [1, 2])], clock)
    assert wait_for_nodes(grid, 2, 7.5, sleep=clock.sleep, clock=clock) == [1]
    assert clock.now == pytest.approx(7.5)


def test_view_shows_the_snapshot_so_flowers_sampler_returns() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # Messages outside a runtime
    clock = FakeClock()
    grid = FakeGrid([(0, [11, 12]), (1.0, [11])], clock)  # node 12 drops right after the snapshot
    view = _avail(clock).view(grid, 1, "train")
    assert isinstance(view, NodeView) and view.get_node_ids() == [11, 12]
    clock.now = 5.0
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(list(strategy.configure_train(
        1, ArrayRecord(), ConfigRecord(), view))), daemon=True)
    worker.start()
    worker.join(timeout=10)  # on the live grid (1 node) Flower's sample_nodes would loop forever
    assert done and sorted(m.metadata.dst_node_id for m in done[0]) == [11, 12]


def test_view_gives_up_with_a_clear_stop_reason() -> None:
    clock = FakeClock()
    avail = _avail(clock, min_sites=3, timeout=5.0)
    assert avail.view(FakeGrid([(0, [1, 2])], clock), 4, "train") is None
    assert clock.now == pytest.approx(5.0)
    assert avail.stop is not None and avail.stop.after_round == 3
    for part in ("only 2 site(s) connected", "node-wait-timeout=5 s", "min-sites=3", "stops after round 3",
                 "medfed site start", "medfed run --resume"):
        assert part in avail.stop.reason
    assert avail.stop.to_dict() == {"after-round": 3, "reason": avail.stop.reason}


def test_evaluate_phase_stop_keeps_the_round_it_trained() -> None:
    clock = FakeClock()
    avail = _avail(clock, min_sites=2, timeout=1.0)
    assert avail.view(FakeGrid([(0, [1])], clock), 4, "evaluate") is None
    assert avail.stop is not None and avail.stop.after_round == 4


def test_quorum_counts_failed_rounds_in_a_row_and_stops_at_the_limit() -> None:
    avail = _avail(FakeClock(), min_sites=2, max_failed=2)
    assert avail.quorum(1, 3) and avail.quorum(2, 2)
    assert not avail.quorum(3, 1) and avail.stop is None
    assert avail.quorum(4, 2) and avail.failed_in_a_row == 0  # a good round resets the count
    assert not avail.quorum(5, 0) and not avail.quorum(6, 1)
    assert avail.stop is not None and avail.stop.after_round == 6
    assert "max-failed-rounds=2" in avail.stop.reason and "min-sites=2" in avail.stop.reason


def test_final_view_does_not_wait_again_after_a_stop() -> None:
    clock = FakeClock()
    avail = _avail(clock, min_sites=2, timeout=30.0)
    grid = FakeGrid([(0, [1])], clock)
    assert avail.view(grid, 1, "train") is None and clock.now == pytest.approx(30.0)
    assert avail.final_view(grid) is None and clock.now == pytest.approx(30.0)
    assert avail.final_view(FakeGrid([(0, [1, 2])], clock)).get_node_ids() == [1, 2]


@pytest.mark.parametrize("args", [(0, 1.0, 1), (1, -1.0, 1), (1, 1.0, 0)])
def test_availability_rejects_bad_arguments(args) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        Availability(*args)


@pytest.mark.parametrize(("key", "value"), [("node-wait-timeout", -1.0), ("max-failed-rounds", 0)])
def test_config_range_checks(key: str, value: float) -> None:
    from medfed.common.config import parse_study_config

    with pytest.raises(ConfigError, match=key):
        parse_study_config({key: value})


def test_latest_checkpoint_is_the_highest_round(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("round-0009.pt", "round-0010.pt", "round-0002.pt", "round-0011.pt.tmp", "model.pt"):
        (folder / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == folder / "round-0010.pt"


def test_resolve_resume(tmp_path: Path) -> None:
    cfg = StudyConfig(out_dir=str(tmp_path), resume=LATEST)
    with pytest.raises(ConfigError, match="nothing to continue"):
        resolve_resume(cfg)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "round-0003.pt").write_bytes(b"")
    assert resolve_resume(cfg).resume == str(tmp_path / "checkpoints" / "round-0003.pt")
    plain = StudyConfig(out_dir=str(tmp_path), resume="elsewhere.pt")
    assert resolve_resume(plain) is plain


def test_medfed_run_resume_flag() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    assert parser.parse_args(["--server", "h:1", "--resume"]).resume is True
    assert resume_latest(None) == "resume='latest'"
    assert resume_latest("out-dir='runs/a' rounds=4") == "out-dir='runs/a' rounds=4 resume='latest'"
    with pytest.raises(ConfigError, match="keep one of them"):
        resume_latest("resume='x.pt'")


def test_study_without_sites_fails_and_still_writes_its_summary(tmp_path: Path) -> None:
    """The whole ServerApp loop on a grid where no site ever connects: bounded, failed, summary written."""
    from medfed.server.federation import run_federated

    cfg = StudyConfig(dataset="synthetic", num_sites=2, min_sites=2, num_server_rounds=3, node_wait_timeout=0.0,
                      out_dir=str(tmp_path / "run"))
    clock = FakeClock()
    summary = run_federated(FakeGrid([(0, [])], clock), cfg, simulation=True)
    outcome = summary["outcome"]
    assert outcome["status"] == "failed" and "no round was applied" in outcome["reason"]
    assert "min-sites=2" in outcome["reason"] and "after waiting node-wait-timeout=0 s" in outcome["reason"]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert summary["test"] == {} and summary["selected-round"] is None  # nothing trained: no test metrics
    assert not (tmp_path / "run" / "model.pt").exists()
