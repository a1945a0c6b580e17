"""Per-site shards: the driver writes each site once, each ClientApp maps its own site only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medfed.common.config import StudyConfig, parse_study_config
from medfed.common.data.shards import MANIFEST, load_site_shard, read_manifest, shard_kind, write_site_shards
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.errors import ConfigError, DataError
from medfed.common.segmentation.data import SegSplit

INFO = DatasetInfo("toy", 3, 2, 4, ("a", "b", "c"), "sex", ("female", "male"))


def _image_split(n: int, seed: int, groups: bool = True) -> ImageSplit:
    rng = np.random.default_rng(seed)
    return ImageSplit(rng.random((n, 2, 4, 4), dtype=np.float32), rng.integers(0, 3, n).astype(np.int64),
                      rng.integers(0, 2, n).astype(np.int64) if groups else None)


def _image_study(groups: bool = True) -> FederatedData:
    info = INFO if groups else DatasetInfo("toy", 3, 2, 4, ("a", "b", "c"))
    sites = tuple(SiteData(f"site-{k}", _image_split(5 + 3 * k, k, groups), _image_split(2 + k, 10 + k, groups),
                           _image_split(3, 20 + k, groups)) for k in range(3))  # unequal sizes
    return FederatedData(info, sites, central_test=None, central_val=None)


def _seg_split(n: int, seed: int, spatial: tuple[int, ...]) -> SegSplit:
    rng = np.random.default_rng(seed)
    return SegSplit(rng.random((n, 1, *spatial), dtype=np.float32), rng.integers(0, 2, (n, *spatial)).astype(np.int64),
                    rng.integers(0, 2, n).astype(np.int64))


def _assert_same_split(a, b, target: str) -> None:
    assert type(a) is type(b)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(getattr(a, target), getattr(b, target))
    if b.groups is None:
        assert a.groups is None
    else:
        np.testing.assert_array_equal(a.groups, b.groups)


@pytest.mark.parametrize("groups", [True, False])
def test_classification_sites_round_trip(tmp_path: Path, groups: bool):
    fed = _image_study(groups)
    shard_dir = write_site_shards(fed, tmp_path / "shards")
    assert read_manifest(shard_dir).site_ids == ("site-0", "site-1", "site-2")
    for k, site in enumerate(fed.sites):
        info, data = load_site_shard(shard_dir, k, 3)
        assert info == fed.info and data.site_id == site.site_id
        for split in ("train", "val", "test"):
            _assert_same_split(getattr(data, split), getattr(site, split), "labels")
            assert isinstance(getattr(data, split).images, np.memmap)  # mapped, not read into memory


@pytest.mark.parametrize("spatial", [(4, 4), (4, 4, 4)], ids=["2d", "3d"])
def test_segmentation_sites_round_trip(tmp_path: Path, spatial: tuple[int, ...]):
    info = DatasetInfo("seg", 2, 1, 4, ("background", "lesion"), "sex", ("female", "male"),
                       spatial_dims=len(spatial))
    sites = tuple(SiteData(f"site-{k}", _seg_split(4 + k, k, spatial), _seg_split(2, 9 + k, spatial),
                           _seg_split(2, 19 + k, spatial)) for k in range(2))
    fed = FederatedData(info, sites, central_test=None, central_val=None)
    assert shard_kind(fed) == "segmentation"
    shard_dir = write_site_shards(fed, tmp_path / "shards")
    got_info, data = load_site_shard(shard_dir, 1, 2)
    assert got_info == info and data.site_id == "site-1"
    for split in ("train", "val", "test"):
        _assert_same_split(getattr(data, split), getattr(sites[1], split), "masks")


def test_a_site_reads_only_its_own_files(tmp_path: Path):
    shard_dir = write_site_shards(_image_study(), tmp_path / "shards")
    shutil.rmtree(shard_dir / "site-0")
    shutil.rmtree(shard_dir / "site-2")
    _, data = load_site_shard(shard_dir, 1, 3)
    assert len(data.train) == 8
    with pytest.raises(DataError, match="site-0/train-images.npy is missing"):
        load_site_shard(shard_dir, 0, 3)


def test_writes_stay_in_the_reading_process(tmp_path: Path):
    fed = _image_study()
    shard_dir = write_site_shards(fed, tmp_path / "shards")
    _, data = load_site_shard(shard_dir, 0, 3)
    data.train.images[0] = 0.0  # copy-on-write: torch.from_numpy may take it, the file never changes
    _, again = load_site_shard(shard_dir, 0, 3)
    np.testing.assert_array_equal(again.train.images, fed.sites[0].train.images)


def test_rewriting_replaces_the_previous_shards(tmp_path: Path):
    shard_dir = write_site_shards(_image_study(), tmp_path / "shards")
    (shard_dir / "site-9").mkdir()
    two = FederatedData(INFO, _image_study().sites[:2], None, None)
    write_site_shards(two, shard_dir)
    assert sorted(p.name for p in shard_dir.iterdir()) == [MANIFEST, "site-0", "site-1"]
    assert not list(tmp_path.glob(".shards.tmp-*"))


def test_bad_shards_say_what_and_how_to_fix(tmp_path: Path):
    with pytest.raises(DataError, match="no site shards at .*medfed simulate"):
        load_site_shard(tmp_path, 0, 1)
    shard_dir = write_site_shards(_image_study(), tmp_path / "shards")
    with pytest.raises(ConfigError, match="4 nodes but the site shards .* hold 3 sites"):
        load_site_shard(shard_dir, 0, 4)
    np.save(shard_dir / "site-1" / "val-labels.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="without pickles"):
        load_site_shard(shard_dir, 1, 3)
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    manifest["sites"][0] = "../outside"
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="cannot name a shard folder"):
        load_site_shard(shard_dir, 0, 3)
    manifest["format"] = 99
    (shard_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format 99, expected 1"):
        read_manifest(shard_dir)


def test_simulated_site_from_shards_equals_the_full_build(tmp_path: Path):
    from medfed.client.site_data import _shard_site_cached, _simulated_site
    from medfed.common.data.federated import load_study_data

    cfg = StudyConfig(num_sites=3, seed=5, out_dir=str(tmp_path / "run"))
    shard_dir = write_site_shards(load_study_data(cfg), tmp_path / "run" / ".sites")
    sharded = cfg.replace(site_shards=str(shard_dir))
    _shard_site_cached.cache_clear()
    for k in (2, 0):
        want, got = _simulated_site(cfg, k, 3), _simulated_site(sharded, k, 3)
        assert (got.site_id, got.info, got.state_dir) == (want.site_id, want.info, want.state_dir)
        for split in ("train", "val", "test"):
            _assert_same_split(getattr(got.data, split), getattr(want.data, split), "labels")
    assert _shard_site_cached.cache_info().currsize == 1  # an actor keeps at most the site it runs


def test_simulated_segmentation_site_from_shards(tmp_path: Path):
    from medfed.client.site_data import _simulated_site
    from medfed.common.data.federated import load_study_data

    cfg = StudyConfig(task="segmentation", num_sites=2, image_size=16, out_dir=str(tmp_path))
    shard_dir = write_site_shards(load_study_data(cfg), tmp_path / ".sites")
    want, got = _simulated_site(cfg, 1, 2), _simulated_site(cfg.replace(site_shards=str(shard_dir)), 1, 2)
    assert got.info == want.info and got.site_id == want.site_id
    _assert_same_split(got.data.train, want.data.train, "masks")


def test_engine_shards_partitioned_studies_only(tmp_path: Path):
    from medfed.simulations.engine import SHARD_DIR_NAME, write_site_shards_for

    shard_dir = write_site_shards_for(StudyConfig(num_sites=2), tmp_path)
    assert shard_dir == tmp_path / SHARD_DIR_NAME and read_manifest(shard_dir).site_ids == ("site-0", "site-1")
    sites = StudyConfig(dataset="sites", data_path="a.yaml,b.yaml", num_sites=2)  # they read their own files
    assert write_site_shards_for(sites, tmp_path / "other") is None
    assert not (tmp_path / "other").exists()


def test_backend_config_local_and_cluster(monkeypatch):
    import os

    from medfed.simulations.engine import backend_config

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    local = backend_config(StudyConfig(num_sites=100, site_gpus=0.0))
    assert local["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}  # 4 actors for 100 sites
    assert local["init_args"]["num_cpus"] == 8 and local["init_args"]["address"] == "local"
    cluster = backend_config(StudyConfig(ray_address="10.0.0.5:6379", site_cpus=1.0, site_gpus=0.25))
    assert cluster["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert cluster["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in cluster["init_args"]
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert backend_config(StudyConfig(site_gpus=0.0))["client_resources"]["num_cpus"] == 1


@pytest.mark.parametrize("mapping, needle", [
    ({"ray-address": "ray://head:10001"}, "Ray Client addresses"),
    ({"ray-address": "head"}, "ray-address='head' is not allowed"),
    ({"ray-address": "head:99999"}, "GCS address HOST:PORT"),
    ({"site-gpus": -0.5}, "site-gpus=-0.5 is out of range"),
    ({"site-cpus": -1}, "site-cpus=-1.0 is out of range"),
])
def test_bad_engine_keys_name_the_key(mapping, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_study_config(mapping)


def test_simulate_flags_set_the_engine_keys():
    from medfed.common.cli import build_parser, study_from_args

    args = build_parser().parse_args(["simulate", "--ray-address", "auto", "--site-cpus", "1", "--site-gpus", "0.25"])
    cfg = study_from_args(args)
    assert (cfg.ray_address, cfg.site_cpus, cfg.site_gpus, cfg.site_shards) == ("auto", 1.0, 0.25, "")


@pytest.mark.slow
def test_simulation_clients_read_shards_and_the_run_removes_them(tmp_path: Path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "medfed.common.cli", "simulate", "--sites", "3", "--rounds", "1",
                          "--local-steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sites"]) == {"site-0", "site-1", "site-2"}  # a site that failed to load would be missing
    assert summary["config"]["site-shards"] == ""  # no run-local path in what the run keeps
    client_config = (out / ".flwr-app" / "pyproject.toml").read_text()
    assert f'site-shards = "{out / ".sites"}"' in client_config  # the ClientApps were told to read shards
    assert not (out / ".sites").exists()
