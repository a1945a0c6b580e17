"""A site bounds how often the server may evaluate: per model version, per run, one threshold per run."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from medfed.client.app import app
from medfed.client.eval_guard import EVALUATIONS_FILE, MAX_EVALS_PER_MODEL

from tests.test_client_app import _context, _message, _run_config


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _other_model(msg: Message, k: int) -> Message:
    arrays = {n: a.numpy().copy() for n, a in msg.content["arrays"].items()}
    first = next(n for n, a in arrays.items() if np.issubdtype(a.dtype, np.floating))
    arrays[first] = arrays[first] + np.float32(k * 1e-3)
    content = RecordDict({"arrays": ArrayRecord({n: Array(a) for n, a in arrays.items()}),
                          "config": msg.content["config"]})
    return Message(content, dst_node_id=1, message_type="evaluate")


def _ctx(tmp_path, **kw):
    return _context(_run_config(tmp_path, min_eval_n=5, **kw), {"partition-id": 0, "num-partitions": 3})


def test_a_model_version_is_evaluated_at_most_twice_per_run(tmp_path):
    ctx = _ctx(tmp_path)
    replies = [app(_message("evaluate"), ctx) for _ in range(MAX_EVALS_PER_MODEL + 1)]
    assert not any(r.has_error() for r in replies[:MAX_EVALS_PER_MODEL])
    assert replies[-1].has_error() and "already evaluated" in replies[-1].error.reason
    assert not app(_other_model(_message("evaluate"), 1), ctx).has_error(), "a new version may be evaluated"


def test_a_run_evaluates_at_most_once_per_round_and_once_more(tmp_path):
    ctx = _ctx(tmp_path, num_server_rounds=2)
    replies = [app(_other_model(_message("evaluate"), k), ctx) for k in range(4)]
    assert [r.has_error() for r in replies] == [False, False, False, True]
    assert "num-server-rounds" in replies[-1].error.reason


def test_one_threshold_per_run(tmp_path):
    ctx = _ctx(tmp_path)
    assert not app(_message("evaluate", {"threshold": 0.4}), ctx).has_error()
    probe = app(_other_model(_message("evaluate", {"threshold": 0.41}), 1), ctx)
    assert probe.has_error() and "one threshold per run" in probe.error.reason
    assert not app(_other_model(_message("evaluate", {"threshold": 0.4}), 2), ctx).has_error()


def test_a_damaged_count_refuses_instead_of_starting_over(tmp_path):
    ctx = _ctx(tmp_path)
    assert not app(_message("evaluate"), ctx).has_error()
    (log,) = tmp_path.rglob(EVALUATIONS_FILE)
    log.write_text("{not json")
    reply = app(_message("evaluate"), ctx)
    assert reply.has_error() and "damaged" in reply.error.reason and str(tmp_path) not in reply.error.reason
