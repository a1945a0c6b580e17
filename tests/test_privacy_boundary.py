"""Nothing identifying leaves a site: the reply allowlist, and a full cycle on identifiable DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import message_to_proto
from medfed.client.app import app
from medfed.client.boundary import BoundaryError, check_reply, public_reason
from medfed.common.arrays import model_to_arrays
from medfed.common.config import StudyConfig
from medfed.common.models import ModelSpec, build_model

from tests.intake_factory import SECRET_INSTITUTION, SECRET_NAME, dicom_site


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _ok_content() -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        "metrics": MetricRecord({"num-examples": 100.0, "val-auc": 0.7, "val-hist-pos": [0.0] * 100,
                                 "val-hist-neg": [1.0] * 100}),
        "site": ConfigRecord({"site-id": "a"}),
    })


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.__setitem__("extra", ConfigRecord({"path": "/data/x.dcm"})), "may not leave"),
    (lambda c: c["metrics"].__setitem__("patient-42-score", 0.3), "outside the allowlist"),
    (lambda c: c["metrics"].__setitem__("test-auc", [0.1, 0.9]), "may not be a list"),
    (lambda c: c["site"].__setitem__("patient", "Doe^John"), "only the site id"),
    (lambda c: c["site"].__setitem__("audit-head", "Doe^John"), "sha256 hex digest"),
    (lambda c: c["arrays"].__setitem__("leak", Array(np.zeros(2, np.float32))), "did not send"),
    # raw images under a parameter's name: the name was sent, the shape was not
    (lambda c: c["arrays"].__setitem__("w", Array(np.zeros((50, 1, 28, 28), np.float32))), "not the shape"),
    # histograms: exactly 100 non-negative whole counts, in pos/neg pairs
    (lambda c: c["metrics"].__setitem__("val-hist-pos", [0.37] * 100), "whole count"),
    (lambda c: c["metrics"].__setitem__("val-hist-pos", [float("nan")] * 100), "whole count"),
    (lambda c: c["metrics"].__setitem__("val-hist-neg", [-1.0] * 100), "whole count"),
    (lambda c: c["metrics"].__setitem__("val-hist-pos", [1.0] * 5), "5 bins"),
    (lambda c: c["metrics"].pop("val-hist-neg"), "must come together"),
    (lambda c: c["metrics"].__setitem__("val-auc", float("nan")), "not a finite number"),
    (lambda c: c["metrics"].__setitem__("num-examples", 2.5), "whole count"),
    (lambda c: c["metrics"].__setitem__("num-examples", 99.0), "do not add up"),
])
def test_reply_allowlist_refuses_anything_else(mutate, needle):
    check_reply(_ok_content(), {"w": (3,)}, "a")  # the allowed shape passes
    content = _ok_content()
    mutate(content)
    with pytest.raises(BoundaryError, match=needle):
        check_reply(content, {"w": (3,)}, "a")


def test_a_refused_metric_name_is_never_repeated_in_the_error():
    content = _ok_content()
    content["metrics"]["score-of-patient-PID0042"] = 0.71241
    with pytest.raises(BoundaryError) as err:
        check_reply(content, {"w": (3,)}, "a")
    assert "PID0042" not in str(err.value) and "0.71241" not in str(err.value)
    assert "PID0042" not in public_reason("a", err.value)


def test_the_site_record_may_carry_the_audit_trails_head():
    content = _ok_content()
    content["site"]["audit-head"] = "ab" * 32
    check_reply(content, {"w": (3,)}, "a")


def test_error_reasons_are_public_only_when_marked():
    assert public_reason("a", FileNotFoundError("/data/Doe_John/1.dcm")) == (
        "site a: FileNotFoundError (details in the site's log)")


def _identifiers(site_dir: Path) -> set[str]:
    """Every identifying string at the site: tag values, file and folder names, paths."""
    found = {SECRET_NAME, SECRET_INSTITUTION, str(site_dir), "manifest.csv"}
    for f in (site_dir / "data").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        found |= {str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.SOPInstanceUID,
                  ds.StudyInstanceUID, ds.PatientBirthDate}
        found |= {f.name, f.parent.name}
    return {s for s in found if len(s) >= 6}


def _message(kind: str) -> Message:
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(ModelSpec("cnn", 1, 2, 32)))
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=1, message_type=kind)


def _site_context(site_yaml: Path, tmp_path: Path) -> Context:
    run_config = StudyConfig(num_sites=2, local_steps=2, image_size=32, in_channels=1, num_classes=2,
                             out_dir=str(tmp_path / "run")).to_dict()
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml), "site-id": "hosp-a"},
                   state=RecordDict(), run_config=run_config)


def test_a_split_below_min_eval_n_sends_no_metrics(tmp_path):
    """With the default min-eval-n (20), a site of 16 images sends no per-split metric or histogram."""
    ctx = _site_context(dicom_site(tmp_path, n_patients=8, images_per_patient=2), tmp_path)
    reply = app(_message("evaluate"), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content["metrics"])
    assert metrics == {"num-examples": 0.0}, metrics


def test_full_cycle_on_identifiable_dicom_leaks_nothing(tmp_path):
    site_yaml = dicom_site(tmp_path, n_patients=8, images_per_patient=2, **{"min-eval-n": 2})
    secrets = _identifiers(tmp_path)
    assert any(s.startswith("PID-") for s in secrets) and len(secrets) > 40
    ctx = _site_context(site_yaml, tmp_path)
    describe = Message(RecordDict({"config": ConfigRecord({"query": "describe"})}), dst_node_id=1,
                       message_type="query")
    replies = [app(_message("train"), ctx), app(_message("evaluate"), ctx), app(describe, ctx)]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    assert replies[0].content["metrics"]["num-examples"] > 0
    assert "test-auc" in replies[1].content["metrics"] and "test-hist-pos" in replies[1].content["metrics"]
    facts = dict(replies[2].content["facts"])  # the shape of the site's data, from its site.yaml
    assert facts["source"] == "manifest" and facts["num-classes"] == 2 and facts["image-size"] == 32
    # a failing site (its data gone) answers with an error that names no path
    (tmp_path / "data" / "manifest.csv").rename(tmp_path / "data" / "moved.csv")
    from medfed.client.site_data import _site_data_cached

    _site_data_cached.cache_clear()
    failed = app(_message("train"), ctx)
    assert failed.has_error() and "hosp-a" in failed.error.reason
    replies.append(failed)
    for reply in replies:
        wire = message_to_proto(reply).SerializeToString()
        leaked = sorted(s for s in secrets if s.encode() in wire)
        assert not leaked, f"identifying strings in a serialised reply: {leaked}"
