"""Interpretability: saliency on known answers, the aggregates and their privacy boundary, the flag rule,
the planted shortcut, ``medfed explain`` end to end and its bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from medfed.common.cli import main
from medfed.common.constants import EXPLAIN_CELLS
from medfed.common.errors import ConfigError
from medfed.common.explain import metrics as xm
from medfed.common.explain import saliency as sal
from medfed.common.models import ModelSpec, build_model
from torch import nn


class OneRegion(nn.Module):
    """Class-1 logit = the sum of the image inside a fixed region; class 0 = minus that: only the region matters."""

    def __init__(self, side: int = 16, rows=slice(2, 6), cols=slice(9, 14)):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)
        mask = torch.zeros(1, 1, side, side)
        mask[..., rows, cols] = 0.1  # logits of order 1: the softmax does not saturate (occlusion reads it)
        self.register_buffer("mask", mask)

    def forward(self, x):
        score = (self.features(x) * self.mask).flatten(1).sum(1)
        return torch.stack([-score, score], 1)


def _share_inside(maps: np.ndarray, region: np.ndarray) -> np.ndarray:
    dist, ok = xm.mass(maps)
    assert ok.all()
    return xm.region_shares(dist, region)


def test_saliency_of_a_model_that_reads_one_region_lies_in_that_region():
    model = OneRegion()
    x = torch.rand(6, 1, 16, 16) * 0.8 + 0.1
    region = model.mask[0, 0].numpy() > 0
    gx = sal.saliency_maps(model, x, "gradxinput", "features.1", class_idx=1)
    assert np.allclose(_share_inside(gx, region), 1.0)  # gradient x input: exactly the region
    occ = sal.saliency_maps(model, x, "occlusion", "features.1", class_idx=1)
    grown = np.zeros_like(region)
    grown[0:8, 7:16] = True  # the region plus the occluding window's reach (3 px)
    assert (_share_inside(occ, grown) > 0.95).all()
    assert (_share_inside(occ, region) > 3 * region.mean()).all()  # far above its area


def test_input_gradient_is_monais_vanillagrad_and_batched_gradcampp_is_monais_per_image():
    from monai.visualize import GradCAMpp, VanillaGrad

    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 1, 2, 28))
    x, t = torch.rand(5, 1, 28, 28), torch.tensor([0, 1, 1, 0, 1])
    ref = torch.cat([VanillaGrad(model)(x[i:i + 1].clone(), index=int(t[i])) for i in range(5)])
    assert torch.allclose(sal.input_gradient(model, x, t), ref, atol=1e-7)
    layer = sal.target_layer(model, "cnn", 1, 28)
    batch = sal.saliency_maps(model, x, "gradcampp", layer, class_idx=1)
    assert all(p.grad is None for p in model.parameters())  # the CAM's backward pass left nothing behind
    one = np.concatenate([GradCAMpp(model, layer, postprocessing=lambda a: a)(x[i:i + 1], class_idx=1)[:, 0]
                          .detach().numpy() for i in range(5)])
    assert np.allclose(batch, np.maximum(one, 0), atol=1e-5)


def test_mixed_predicted_classes_are_explained_each_by_its_own_class():
    """MONAI scores logits[:, tensor] as a matrix; medfed calls it per class, so each image gets its own."""
    model = OneRegion()
    x = torch.rand(4, 1, 16, 16) * 0.8 + 0.1
    per_class = [sal.saliency_maps(model, x[i:i + 1], "gradcam", "features.1", class_idx=c)
                 for i, c in enumerate((0, 1, 0, 1))]
    mixed = sal.saliency_maps(model, x, "gradcam", "features.1", class_idx=[0, 1, 0, 1])
    assert np.allclose(mixed, np.concatenate(per_class))


@pytest.mark.parametrize("name,layer", [("cnn", "features.6"), ("cnn-dp", "features.6"),
                                        ("densenet121", "1.features.denseblock1"), ("resnet18", "layer1")])
def test_default_layer_is_the_deepest_at_least_8_px_wide_at_28_px(name, layer):
    model = build_model(ModelSpec(name, 1, 2, 28))
    assert sal.target_layer(model, name, 1, 28) == layer
    maps = sal.saliency_maps(model, torch.rand(2, 1, 28, 28), "gradcam", layer)
    assert maps.shape == (2, 28, 28) and (maps >= 0).all()


def test_a_dp_trained_model_resolves_the_same_layer_names():
    from opacus import GradSampleModule

    model = build_model(ModelSpec("cnn-dp", 1, 2, 28))
    wrapped = GradSampleModule(model)
    assert sal.resolve_layer(wrapped, "features.6") == "_module.features.6"
    with pytest.raises(ConfigError, match="layer 'features.99' does not exist"):
        sal.resolve_layer(model, "features.99")
    for bad in ("unet", "cgan", "logreg"):
        with pytest.raises(ConfigError, match="image classifiers"):
            sal.check_explainable(bad)


# ---------------------------------------------------------------------------
# Aggregates
# ---------------------------------------------------------------------------
def test_border_share_mask_share_and_coarse_maps_on_hand_made_maps():
    side = 20
    band = xm.border_region((side, side), 0.1)
    assert band.sum() == side * side - 16 * 16  # 2 px per side at 20 px
    at_border = np.zeros((6, side, side))
    at_border[:, 0, :] = 1.0
    uniform = np.ones((6, side, side))
    labels = np.array([0, 0, 0, 1, 1, 1])
    agg = xm.explain_aggregates(np.concatenate([at_border, uniform]), np.concatenate([labels, labels + 2]), "test",
                                min_samples=3)
    assert agg["test-explain-n"] == 12
    assert agg["test-c0-explain-border"] == pytest.approx(1.0)
    assert agg["test-c2-explain-border"] == pytest.approx(band.mean())
    top_row = np.asarray(agg["test-c0-explain-map"]).reshape(8, 8)
    assert top_row[0].sum() == pytest.approx(1.0) and len(agg["test-c2-explain-map"]) == EXPLAIN_CELLS
    assert np.allclose(agg["test-c2-explain-map"], 1 / 64, atol=0.01)
    masks = np.zeros((12, side, side))
    masks[:, 5:10, 5:10] = 1
    with_masks = xm.explain_aggregates(np.concatenate([at_border, uniform]), np.concatenate([labels, labels]),
                                       "val", masks=masks, min_samples=3)
    assert with_masks["val-explain-mask"] == pytest.approx(0.5 * 25 / 400)  # half the maps put 25/400 inside


def test_k_anonymity_suppresses_small_splits_classes_and_groups():
    maps = np.random.default_rng(0).random((9, 16, 16))
    labels = np.array([0] * 6 + [1] * 3)
    groups = np.array([0, 1] * 4 + [1])
    agg = xm.explain_aggregates(maps, labels, "test", groups=groups)
    assert "test-c0-explain-map" in agg and not any(k.startswith("test-c1-") for k in agg)  # 3 < 5 images
    assert "test-g1-explain-border" in agg and "test-g0-explain-border" not in agg  # 4 < 5 images
    assert xm.explain_aggregates(maps[:4], labels[:4], "test") == {}  # a split of 4: nothing at all


def test_the_boundary_refuses_any_saliency_array_but_the_coarse_map():
    from flwr.app import MetricRecord, RecordDict
    from medfed.client.boundary import BoundaryError, check_reply
    from medfed.common.reply_schema import metrics_problem

    maps = np.random.default_rng(1).random((10, 28, 28))
    good = xm.explain_aggregates(maps, np.array([0] * 5 + [1] * 5), "test")
    assert metrics_problem(good) is None
    check_reply(RecordDict({"metrics": MetricRecord(good)}), {}, "site-0")
    bad_cases = [
        {**good, "test-c0-explain-map": [float(v) for v in maps[0].ravel() / maps[0].sum()]},  # a whole image map
        {**good, "test-explain-saliency": [0.1] * 64},  # a name outside the allowlist
        {**good, "test-c0-explain-map": [0.5] * 64},  # not shares adding up to 1
        {**good, "test-c0-explain-n": 3.0},  # below the k-anonymity floor
        {**good, "test-explain-border": 1.5},  # not a share
        {**good, "test-explain-border": [0.2] * 64},  # a list where a number belongs
    ]
    for bad in bad_cases:
        assert metrics_problem(bad) is not None
        with pytest.raises(BoundaryError):
            check_reply(RecordDict({"metrics": MetricRecord(bad)}), {}, "site-0")


# ---------------------------------------------------------------------------
# The server's flag rule
# ---------------------------------------------------------------------------
def _record(rng, corner: float = 0.0, n: int = 40) -> dict:
    """A site's explain record: class maps near uniform (noise ~ 1/sqrt(n)), class 1 with extra mass in a corner."""
    classes = {}
    for c in ("0", "1"):
        m = np.full(64, 1 / 64) * (1 + rng.normal(0, 0.3 / np.sqrt(n), 64))
        if c == "1":
            m[0] += corner
        classes[c] = {"border-share": 0.3, "n": n, "map": list(m / m.sum())}
    return {"border-share": 0.3, "n": 2 * n, "classes": classes}


def test_flag_rule_names_the_site_with_a_border_hot_spot_and_only_it():
    from medfed.server.explain import flag_sites

    rng = np.random.default_rng(0)
    similar = {f"site-{k}": _record(rng) for k in range(5)}
    assert flag_sites(similar)[0] == []
    planted = {**similar, "site-2": _record(rng, corner=0.06)}
    flagged, found = flag_sites(planted)
    assert flagged == ["site-2"] and found["site-2"]["1"]["cell"] == [0, 0] and found["site-2"]["1"]["z"] > 3.5
    inner = _record(rng)
    inner["classes"]["1"]["map"] = list(np.asarray(inner["classes"]["1"]["map"]) * 0 + 1 / 64)
    inner["classes"]["1"]["map"][27] += 0.06  # mass in the middle of the image: not a border artefact
    inner["classes"]["1"]["map"] = list(np.asarray(inner["classes"]["1"]["map"]) / 1.06)
    assert flag_sites({**similar, "site-2": inner})[0] == []
    assert flag_sites({k: planted[k] for k in ("site-0", "site-2")})[0] == []  # two sites: nothing to compare
    small = _record(rng, corner=0.03, n=5)  # five images: a corner that wanders by chance
    small["classes"]["1"]["n"] = 5
    assert flag_sites({**similar, "site-2": small})[0] == []


def test_summary_explain_reads_only_site_aggregates_and_lists_flags():
    from medfed.server.explain import summary_explain

    rng = np.random.default_rng(2)
    per_site = {}
    for k in range(4):
        maps = rng.random((12, 20, 20)) + 1.0
        if k == 3:
            maps[6:, :3, :3] += 40.0  # class-1 mass in the top-left corner
        per_site[f"site-{k}"] = xm.explain_aggregates(maps, np.array([0] * 6 + [1] * 6), "test",
                                                      groups=np.array([0, 1] * 6))
    per_site["site-4"] = {"test-auc": 0.8}  # a site that sent no saliency aggregates
    out = summary_explain(per_site, 0.1, "gradxinput", ("female", "male"))
    assert out["flagged"] == ["site-3"] and set(out["sites"]) == {f"site-{k}" for k in range(4)}
    assert set(out["sites"]["site-0"]["groups"]) == {"female", "male"}
    assert len(out["sites"]["site-0"]["classes"]["1"]["map"]) == 64
    assert summary_explain({"site-0": {"test-auc": 0.8}}, 0.1, "gradxinput") is None


# ---------------------------------------------------------------------------
# The planted shortcut
# ---------------------------------------------------------------------------
def test_shortcut_marks_only_class_1_images_of_the_chosen_site_near_the_border():
    from medfed.common.data.federated import build_federated_data
    from medfed.common.data.shortcut import marker_region

    plain = build_federated_data("synthetic", "", 3, "dirichlet", 1.0, 0)
    marked = build_federated_data("synthetic", "", 3, "dirichlet", 1.0, 0, shortcut_site=1, shortcut_strength=1.0)
    rows, cols = marker_region(28)
    band = xm.border_region((28, 28), 0.1)
    assert band[rows, cols].mean() >= 0.6  # mostly in the 10 % band, as a burned-in marker is
    for k in range(3):
        for split in ("train", "val", "test"):
            a, b = getattr(plain.sites[k], split), getattr(marked.sites[k], split)
            changed = np.abs(a.images - b.images).reshape(len(a), -1).max(1) > 0
            if k != 1:
                assert not changed.any()
                continue
            assert (changed == (a.labels == 1)).all()
            assert np.allclose(b.images[b.labels == 1][:, :, rows, cols], 1.0)
    assert len(marked.central_test) == sum(len(s.test) for s in marked.sites)


def test_shortcut_keys_are_checked():
    from medfed.common.config import parse_study_config

    for bad, match in (({"shortcut-site": 4}, "0..3"), ({"shortcut-site": 0, "dataset": "uci-heart",
                        "data-path": "x", "partition": "natural", "model": "logreg"}, "image classifier"),
                       ({"shortcut-strength": 1.5}, "shortcut-strength"), ({"explain-band": 0.6}, "explain-band"),
                       ({"explain-metrics": True, "task": "segmentation"}, "image classifier"),
                       ({"explain-method": "occlusion"}, "explain-method")):
        with pytest.raises(ConfigError, match=match):
            parse_study_config(bad)


# ---------------------------------------------------------------------------
# The site's evaluation and medfed explain
# ---------------------------------------------------------------------------
def test_site_evaluation_adds_explain_aggregates_only_when_asked(tmp_path):
    from medfed.client.site_data import SiteRuntime
    from medfed.client.task import evaluate_round
    from medfed.common.arrays import model_to_arrays
    from medfed.common.config import StudyConfig
    from medfed.common.data.synthetic import make_synthetic
    from medfed.common.reply_schema import metrics_problem

    fed = make_synthetic(num_sites=2, seed=0, samples_per_site=[200, 100])
    site = SiteRuntime("site-0", fed.info, fed.sites[0], tmp_path / "state")
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(ModelSpec("cnn", 1, 2, 28)))
    cfg = StudyConfig(num_sites=2, out_dir=str(tmp_path), min_eval_n=5)
    asked = cfg.replace(explain_metrics=True)
    assert not any("explain" in k for k in evaluate_round(asked, site, arrays, {}))  # a round's evaluation
    plain = evaluate_round(cfg, site, arrays, {"final-evaluation": True, "threshold": 0.4})
    final = evaluate_round(cfg.replace(explain_metrics=True), site, arrays,
                           {"final-evaluation": True, "threshold": 0.4})
    assert {"test-explain-border", "test-c1-explain-map", "test-explain-n"} <= set(final)
    assert not any(k.startswith("val-") and "explain" in k for k in final)  # the reported split only
    assert metrics_problem(final) is None
    for key, value in plain.items():  # one forward pass for metrics and saliency: the same metrics
        assert final[key] == pytest.approx(value, abs=1e-6), key
    every = evaluate_round(cfg.replace(explain_metrics=False, explain_every=True), site, arrays, {})
    assert "test-explain-border" in every


def _checkpoint(tmp_path, name="cnn", **config):
    from medfed.common.checkpoint import Checkpoint, save_checkpoint
    from medfed.common.config import StudyConfig

    spec = ModelSpec(name, 1, 2, 28)
    torch.manual_seed(0)
    model = build_model(spec)
    cfg = StudyConfig(num_sites=2, out_dir=str(tmp_path), model="" if name == "cgan" else name,
                      task="generation" if name == "cgan" else "classification", **config)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(Checkpoint(model=spec, state_dict=model.state_dict(), config=cfg.to_dict()), path)
    return path


def test_medfed_explain_writes_a_gallery_that_stays_at_the_site(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, shortcut_site=0)
    out = tmp_path / "explain"
    assert main(["explain", "--model", str(ckpt), "--out", str(out), "--n", "6", "--method", "gradcam"]) == 0
    page = (out / "explain.html").read_text()
    assert "contains patient images" in page and "stays at the site" in page
    assert page.count("data:image/png;base64,") == 6 and "<script" not in page
    index = json.loads((out / "explain.json").read_text())
    assert len(index["images"]) == 6 and index["layer"] == "features.6" and index["site"] == "site-0"
    assert {i["group"] for i in index["images"]} <= {"true positive", "false positive", "true negative",
                                                      "false negative"}
    assert "gallery" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--method", "lime"], "saliency method 'lime'"),
    (["--layer", "features.42", "--method", "gradcam"], "layer 'features.42' does not exist"),
    (["--class", "5"], "--class 5"),
    (["--n", "0"], "--n 0"),
])
def test_explain_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, match):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "explain"
    assert main(["explain", "--model", str(ckpt), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_explain_refuses_a_gan_and_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    gan = _checkpoint(tmp_path, name="cgan")
    assert main(["explain", "--model", str(gan), "--out", str(tmp_path / "o")]) == 2
    assert "generation model" in capsys.readouterr().err
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["explain", "--model", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable medfed checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_final_evaluation_flag_is_checked_at_the_site():
    from medfed.client.boundary import PublicSiteError
    from medfed.client.incoming import check_message_config

    check_message_config({"final-evaluation": True})
    with pytest.raises(PublicSiteError, match="final-evaluation"):
        check_message_config({"final-evaluation": 1})


def test_report_sections_show_the_flag_the_maps_and_the_robustness_curves(tmp_path):
    from medfed.server.explain import summary_explain
    from medfed.server.report_trust import trust_sections
    from medfed.server.robustness import summary_robustness

    rng = np.random.default_rng(3)
    per_site = {}
    for k in range(3):
        maps = rng.random((12, 20, 20)) + 1.0
        if k == 1:
            maps[6:, :3, :3] += 40.0
        per_site[f"site-{k}"] = {**xm.explain_aggregates(maps, np.array([0] * 6 + [1] * 6), "test"),
                                 "test-accuracy": 0.9, "test-robust-n": 12.0,
                                 "test-robust-pgd-e0-accuracy": 0.7, "test-robust-pgd-e1-accuracy": 0.2}
    summary = {"explain": summary_explain(per_site, 0.1, "gradxinput"),
               "robustness": summary_robustness(per_site, ("pgd",), (("2", 2 / 255), ("8", 8 / 255)), 10)}
    text = "\n".join(trust_sections(tmp_path, summary))
    assert "**Flagged: site-1**" in text and "| site-1 |" in text
    assert "| pooled | pgd | 0.900 | 0.700 | 0.200 |" in text
    assert (tmp_path / "explain_maps.png").is_file() and (tmp_path / "robustness_sites.png").is_file()
    assert trust_sections(tmp_path, {}) == []
