"""Strategy registry, FedBN merge, reply screening, strategy-state round trip."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from medfed.common.config import STRATEGIES, StudyConfig
from medfed.common.constants import MetricKey, RecordKey, SiteKey
from medfed.server.replies import screen_train_replies
from medfed.server.strategies import (
    FedBN,
    build_strategy,
    keep_dtypes,
    restore_strategy_state,
    strategy_state,
)


@pytest.fixture(autouse=True)
def _task_identity():
    # Creating Messages outside a Flower runtime needs the task identity set.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


def _reply(site: str, arrays: dict[str, np.ndarray], n: float, loss: float = 0.5) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=7, message_type="train")
    content = RecordDict(
        {
            RecordKey.ARRAYS.value: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            RecordKey.METRICS.value: MetricRecord(
                {MetricKey.NUM_EXAMPLES.value: n, MetricKey.TRAIN_LOSS.value: loss}
            ),
            RecordKey.SITE.value: ConfigRecord({SiteKey.SITE_ID.value: site}),
        }
    )
    return Message(content, reply_to=ins)


EXPECTED = {
    "fedavg": fl.FedAvg, "fedprox": fl.FedProx, "fedadam": fl.FedAdam, "fedyogi": fl.FedYogi,
    "fedadagrad": fl.FedAdagrad, "fedavgm": fl.FedAvgM, "fedmedian": fl.FedMedian,
    "fedtrimmedavg": fl.FedTrimmedAvg, "krum": fl.Krum, "multikrum": fl.MultiKrum,
    "bulyan": fl.Bulyan, "qfedavg": fl.QFedAvg, "fedbn": FedBN,
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_name_builds_flowers_own_strategy(name):
    s = build_strategy(StudyConfig(strategy=name, num_sites=5, min_sites=2), num_sites=5)
    assert type(s) is EXPECTED[name]
    assert isinstance(s, fl.QFedAvg) == (name == "qfedavg")
    assert s.weighted_by_key == MetricKey.NUM_EXAMPLES.value


def test_fedavg_weights_by_samples_against_np_average():
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3))
    replies = [_reply("s0", {"w": a}, 10), _reply("s1", {"w": b}, 30), _reply("s2", {"w": c}, 60)]
    agg, _ = build_strategy(StudyConfig(), 3).aggregate_train(1, replies)
    ref = np.average(np.stack([a, b, c]), axis=0, weights=[10, 30, 60])
    np.testing.assert_allclose(agg["w"].numpy(), ref, rtol=1e-6)


def test_fedbn_keeps_norm_layers_of_previous_global():
    strat = FedBN()
    glob = ArrayRecord({"conv.w": Array(np.zeros(2, np.float32)), "gn.w": Array(np.full(2, 7.0, np.float32))})
    strat._current = glob  # what configure_train records
    replies = [_reply("s0", {"conv.w": np.ones(2, np.float32)}, 1),
               _reply("s1", {"conv.w": np.full(2, 3.0, np.float32)}, 1)]
    agg, _ = strat.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["conv.w"].numpy(), [2.0, 2.0])
    np.testing.assert_allclose(agg["gn.w"].numpy(), [7.0, 7.0])


def test_screen_excludes_bad_updates_and_sorts_by_site():
    ref = ArrayRecord({"w": Array(np.zeros((2,), np.float32))})
    good_b = _reply("b", {"w": np.ones(2, np.float32)}, 5)
    good_a = _reply("a", {"w": np.ones(2, np.float32)}, 5)
    nan = _reply("c", {"w": np.array([np.nan, 1], np.float32)}, 5)
    shape = _reply("d", {"w": np.ones(3, np.float32)}, 5)
    dtype = _reply("e", {"w": np.ones(2, np.float64)}, 5)
    keys = _reply("f", {"v": np.ones(2, np.float32)}, 5)
    zero = _reply("g", {"w": np.ones(2, np.float32)}, 0)
    ok, failures = screen_train_replies([good_b, nan, shape, good_a, dtype, keys, zero], ref)
    assert [m.content["site"]["site-id"] for m in ok] == ["a", "b"]
    reasons = {f.site: f.reason for f in failures}
    assert "NaN" in reasons["c"] and "shape" not in reasons["c"]
    assert "(3,)" in reasons["d"] and "float64" in reasons["e"]
    assert "keys differ" in reasons["f"] and "num-examples" in reasons["g"]


def test_fedadam_state_round_trip():
    cfg = StudyConfig(strategy="fedadam")
    s1 = build_strategy(cfg, 2)
    s1.m_t = {"w": np.arange(3.0)}
    s1.v_t = {"w": np.ones(3)}
    s2 = build_strategy(cfg, 2)
    restore_strategy_state(s2, strategy_state(s1))
    np.testing.assert_array_equal(s2.m_t["w"], s1.m_t["w"])
    np.testing.assert_array_equal(s2.v_t["w"], s1.v_t["w"])
    with pytest.raises(ValueError, match="unknown strategy state"):
        restore_strategy_state(s2, {"evil": {}})


def test_qfedavg_aggregate_in_the_models_dtypes_weights_sites_by_their_loss():
    """Flower's q-FedAvg returns float64 for a float32 model (sites refuse it); keep_dtypes restores float32."""
    glob = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "b": Array(np.zeros(1, np.float16))})
    replies = [_reply("s0", {"w": np.ones(2, np.float32), "b": np.ones(1, np.float16)}, 10, loss=0.1),
               _reply("s1", {"w": np.full(2, -1.0, np.float32), "b": np.ones(1, np.float16)}, 10, loss=2.0)]
    ours = build_strategy(StudyConfig(strategy="qfedavg", lr=0.1, qfedavg_q=1.0, num_sites=2, min_sites=2), 2)
    ours.current_arrays = ArrayRecord({k: Array(v.numpy().copy()) for k, v in glob.items()})
    ref, _ = ours.aggregate_train(1, replies)
    assert ref["w"].numpy().dtype == np.float64  # the upstream behaviour keep_dtypes corrects
    agg = keep_dtypes(ref, glob)
    assert agg["w"].numpy().dtype == np.float32 and agg["b"].numpy().dtype == np.float16
    np.testing.assert_allclose(agg["w"].numpy(), ref["w"].numpy(), rtol=1e-6)
    assert agg["w"].numpy()[0] < 0  # q > 0: the site with the higher loss (s1, at -1) pulls harder
