"""DP noise and Poisson sampling the coordinator cannot replay: they come from the site's own os.urandom.

The server chooses the seed and the round and learns the site id. If those seeded the DP
noise, the server could recompute it and subtract it (the security review recovered the
clipped gradient sum exactly). Through the real ClientApp train handler: two DP rounds
with identical inputs differ, non-DP rounds stay exactly reproducible, and with the
site's CSPRNG pinned the server's seed changes nothing of the DP update.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from medfed.client.app import app

from tests.test_client_app import _context, _message, _run_config


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _update(out, server_round: int = 1, **kw) -> dict[str, np.ndarray]:
    """One training round at a fresh site 0 (its own state dir, a fresh ledger); the arrays it sends."""
    ctx = _context(_run_config(out, **kw), {"partition-id": 0, "num-partitions": 3})
    reply = app(_message("train", {"server-round": server_round}), ctx)
    assert not reply.has_error(), reply.error.reason
    return {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_two_dp_rounds_with_identical_inputs_and_seed_differ(tmp_path):
    first = _update(tmp_path / "a", epsilon=3.0, seed=7)
    second = _update(tmp_path / "b", epsilon=3.0, seed=7)
    assert _distance(first, second) > 1e-3, "the same seed, round and site id must not give the same noise"


def test_non_dp_rounds_stay_exactly_reproducible(tmp_path):
    first = _update(tmp_path / "a", seed=7)
    second = _update(tmp_path / "b", seed=7)
    assert _distance(first, second) == 0.0


def test_only_the_sites_csprng_decides_the_dp_noise_and_batches(tmp_path, monkeypatch):
    """With os.urandom pinned (a test can; a server cannot), the DP update no longer depends on
    the round the server sends, which seeded the noise before: the training seed is
    ``derive_seed(seed, round, site id)``, all three known to the server."""
    pinned = os.urandom(8)
    monkeypatch.setattr(os, "urandom", lambda n: (pinned * (n // 8 + 1))[:n])
    first = _update(tmp_path / "a", server_round=1, epsilon=3.0, seed=7)
    other_round = _update(tmp_path / "b", server_round=2, epsilon=3.0, seed=7)
    assert _distance(first, other_round) == 0.0
    monkeypatch.undo()
    assert _distance(first, _update(tmp_path / "c", server_round=1, epsilon=3.0, seed=7)) > 1e-3
