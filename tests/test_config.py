"""Config parsing: typed, validated once, unknown keys and bad ranges name the key."""

from __future__ import annotations

import pytest

from medfed.common.config import (
    STRATEGIES,
    StudyConfig,
    load_study_config,
    parse_study_config,
)
from medfed.common.site_config import load_site_config, parse_site_config
from medfed.common.errors import ConfigError


def test_defaults_round_trip_through_flat_mapping():
    cfg = StudyConfig()
    again = parse_study_config(cfg.to_dict())
    assert again == cfg
    assert "num-server-rounds" in cfg.to_dict()


def test_pyproject_run_config_parses():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    run_config = data["tool"]["flwr"]["app"]["config"]
    cfg = parse_study_config(run_config)
    assert cfg.strategy in STRATEGIES
    # `flwr run . <connection>` must submit exactly what `medfed run` submits by default: the sites' own data
    from medfed.server.submit import deployment_run_config

    assert set(run_config) == set(deployment_run_config())
    assert cfg.replace(out_dir=StudyConfig().out_dir) == parse_study_config(deployment_run_config())
    assert cfg.dataset == "site-data" and cfg.replace(dataset="synthetic", out_dir=StudyConfig().out_dir) == StudyConfig()


@pytest.mark.parametrize(
    "mapping, needle",
    [
        ({"strategy": "fedsgd"}, "strategy='fedsgd' is not allowed: choose one of fedavg"),
        ({"num-server-rounds": 0}, "num-server-rounds=0 is out of range"),
        ({"alpha": -1.0}, "alpha=-1.0 is out of range"),
        ({"learning-rate": 0.1}, "unknown study config key(s): learning-rate; allowed keys:"),
        ({"num-sites": 2.5}, "num-sites=2.5 must be an integer"),
        ({"lr": "fast"}, "lr='fast' must be a number"),
        ({"dataset": "medmnist"}, "needs data-path"),
        ({"local-epochs": 0, "local-steps": 0}, "both 0"),
        ({"num-sites": 2, "min-sites": 3}, "min-sites=3 is larger than num-sites=2"),
        ({"strategy": "qfedavg", "epsilon": 8}, "qfedavg weights sites by their training loss"),
        ({"group-contrast": "0.4"}, "group-contrast='0.4' must be two numbers in 0..2"),
        ({"group-contrast": "0.4,1", "dataset": "medmnist", "data-path": "x.npz"}, "needs dataset synthetic"),
        ({"spatial-dims": 3}, "spatial-dims 3 (volumes) is for segmentation only"),
    ],
)
def test_bad_study_values_name_the_key(mapping, needle):
    with pytest.raises(ConfigError) as err:
        parse_study_config(mapping)
    assert needle in str(err.value)


def test_config_is_frozen():
    cfg = StudyConfig()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]


def test_yaml_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "study.yaml"
    p.write_text("num-server-rounds: 3\nrounds: 4\n")
    with pytest.raises(ConfigError) as err:
        load_study_config(p)
    assert str(p) in str(err.value) and "rounds" in str(err.value)


def test_yaml_values_are_plain_data(tmp_path):
    p = tmp_path / "study.yaml"
    p.write_text("strategy: !!python/name:os.system ''\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study_config(p)
    p.write_text("strategy: {name: fedavg}\n")
    with pytest.raises(ConfigError, match="plain value"):
        load_study_config(p)


def test_yaml_overrides_win(tmp_path):
    p = tmp_path / "study.yaml"
    p.write_text("num-server-rounds: 3\nstrategy: fedprox\n")
    cfg = load_study_config(p, {"num-server-rounds": 7})
    assert (cfg.num_server_rounds, cfg.strategy) == (7, "fedprox")


def test_site_yaml_resolves_relative_paths(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text(
        "site-id: hospital-a\ndata-root: data\ndataset: medmnist\ndata-file: x.npz\nstate-dir: state\n"
    )
    site = load_site_config(p)
    assert site.site_id == "hospital-a"
    assert site.data_root == str((tmp_path / "data").resolve())
    assert site.data_file_path == (tmp_path / "data" / "x.npz").resolve()


@pytest.mark.parametrize(
    "mapping, needle",
    [
        ({"site-id": "a b", "data-root": "d", "state-dir": "s", "dataset": "synthetic"}, "site-id='a b'"),
        ({"data-root": "d", "state-dir": "s"}, "missing required key 'site-id'"),
        ({"site-id": "a", "data-root": "d", "state-dir": "s", "dataset": "synthetic", "colour": 1},
         "unknown site config key(s): colour"),
        ({"site-id": "a", "data-root": "d", "state-dir": "s", "dataset": "synthetic",
          "shard-index": 3, "shard-count": 2}, "shard-index=3 is out of range"),
    ],
)
def test_bad_site_config(mapping, needle):
    with pytest.raises(ConfigError) as err:
        parse_site_config(mapping)
    assert needle in str(err.value)
