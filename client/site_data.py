"""Which data, model spec and state folder a ClientApp call works with.

In simulation Flower's node config carries ``partition-id``/``num-partitions`` and the
site's data is that partition of the study's dataset. In deployment the SuperNode's node
config names the site (``site-id``, ``data-root``, ``state-dir``, ``site-config``) and the
data is the site's own. Either way the result is a :class:`SiteRuntime`; the training
code never knows which.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.common.config import StudyConfig
from medfed.common.constants import NodeConfigKey
from medfed.common.data.splits import DatasetInfo, SiteData
from medfed.common.errors import ConfigError
from medfed.common.site_config import SiteConfig, load_site_config, parse_site_config
from medfed.common.site_facts import SiteFacts

PARTITION_ID = NodeConfigKey.PARTITION_ID.value
NUM_PARTITIONS = NodeConfigKey.NUM_PARTITIONS.value
NODE_SITE_CONFIG = NodeConfigKey.SITE_CONFIG.value
NODE_SITE_KEYS = tuple(k.value for k in (NodeConfigKey.SITE_ID, NodeConfigKey.DATA_ROOT, NodeConfigKey.STATE_DIR))


@dataclass(frozen=True)
class SiteRuntime:
    site_id: str
    info: DatasetInfo
    data: SiteData
    state_dir: Path
    epsilon: float = 0.0  # the site's own privacy budget (0: none; the study's applies)
    delta: float = 1e-5
    min_eval_n: int | None = None  # the site's own (site.yaml); None: a simulated partition, the study's applies
    data_root: Path | None = None  # a site described by site.yaml: where its data lives
    source: str = "partition"  # what it serves (medfed.common.site_facts.SOURCES)
    task: str = ""  # the task its site.yaml declares; "": a simulated partition, the study's

    def eval_minimum(self, cfg: StudyConfig) -> int:
        """Smallest split this site sends metrics for: its own setting wins over the study's."""
        return cfg.min_eval_n if self.min_eval_n is None else self.min_eval_n


def simulation_state_dir(cfg: StudyConfig, site_id: str) -> Path:
    return Path(cfg.out_dir).resolve() / "sites" / site_id / "state"


def resolve_site(node_config: Mapping[str, Any], cfg: StudyConfig) -> SiteRuntime:
    """Build the site's runtime from the node config (simulation or deployment)."""
    if PARTITION_ID in node_config:
        return _simulated_site(cfg, int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS]))
    site = _deployed_site_config(node_config)
    return site_runtime(site, cfg)


def site_runtime(site: SiteConfig, cfg: StudyConfig) -> SiteRuntime:
    """The runtime of a site described by its own config (deployment, or simulation over site files)."""
    from medfed.common.site_files import check_site_files

    check_site_files(site)  # a missing or unreadable file is named by its site.yaml key
    info, data = _site_data_cached(site, cfg.seed, cfg.image_size, cfg.in_channels)
    return SiteRuntime(site.site_id, info, data, Path(site.state_dir), site.epsilon, site.delta,
                       min_eval_n=site.min_eval_n, data_root=Path(site.data_root), source=site.dataset,
                       task=site.task)


def site_facts(site: SiteRuntime, cfg: StudyConfig) -> SiteFacts:
    """What this site answers to the describe query: the shape of its data, from its own config."""
    info = site.info
    return SiteFacts(
        task=site.task or cfg.task, source=site.source, num_classes=info.num_classes, in_channels=info.in_channels,
        image_size=info.image_size, spatial_dims=info.spatial_dims, label_names=tuple(info.label_names),
        group_attribute=info.group_name or "", group_names=tuple(info.group_values),
    )


def _simulated_site(cfg: StudyConfig, partition_id: int, num_partitions: int) -> SiteRuntime:
    if num_partitions != cfg.num_sites:
        raise ConfigError(
            f"the simulation has {num_partitions} nodes but num-sites={cfg.num_sites}: "
            "make them equal"
        )
    if cfg.dataset == "sites":  # a real site description: its own data, state and cache
        from medfed.common.intake.federated_sites import load_site_configs

        return site_runtime(load_site_configs(cfg.data_path)[partition_id], cfg)
    if cfg.site_shards:  # written by the simulation driver: map this site's arrays, nothing else
        info, data = _shard_site_cached(cfg.site_shards, partition_id, num_partitions, _mtime_ns(cfg.site_shards))
        return SiteRuntime(data.site_id, info, data, simulation_state_dir(cfg, data.site_id),
                           source=_partition_source(cfg))
    from medfed.common.data.federated import load_study_data

    fed = load_study_data(cfg)  # direct callers: the whole study, memoised per process
    data = fed.sites[partition_id]
    return SiteRuntime(data.site_id, fed.info, data, simulation_state_dir(cfg, data.site_id),
                       source=_partition_source(cfg))


def _partition_source(cfg: StudyConfig) -> str:
    return "synthetic" if cfg.dataset == "synthetic" else "partition"


@functools.lru_cache(maxsize=1)  # one actor runs many sites in turn: keep only the latest one
def _shard_site_cached(shard_dir: str, partition_id: int, num_partitions: int,
                       mtime_ns: int) -> tuple[DatasetInfo, SiteData]:
    from medfed.common.data.shards import load_site_shard

    del mtime_ns  # cache key only: rewritten shards are read again
    return load_site_shard(Path(shard_dir), partition_id, num_partitions)


def _mtime_ns(shard_dir: str) -> int:
    from medfed.common.data.shards import MANIFEST

    try:
        return (Path(shard_dir) / MANIFEST).stat().st_mtime_ns
    except OSError:
        return 0  # load_site_shard raises the DataError saying what is missing


def _deployed_site_config(node_config: Mapping[str, Any]) -> SiteConfig:
    if node_config.get(NODE_SITE_CONFIG):
        site = load_site_config(str(node_config[NODE_SITE_CONFIG]))
        # The node config may name the site itself; it must agree with the file.
        if "site-id" in node_config and node_config["site-id"] != site.site_id:
            raise ConfigError(
                f"node config site-id={node_config['site-id']!r} disagrees with "
                f"{node_config[NODE_SITE_CONFIG]} (site-id={site.site_id!r})"
            )
        return site
    missing = [k for k in NODE_SITE_KEYS if k not in node_config]
    if missing:
        raise ConfigError(
            f"this SuperNode's node config lacks {', '.join(missing)}: start it with "
            "'medfed site start --config site.yaml'"
        )
    mapping = {k: v for k, v in node_config.items() if k != NODE_SITE_CONFIG}
    return parse_site_config(mapping)


@functools.lru_cache(maxsize=4)
def _site_data_cached(site: SiteConfig, seed: int, image_size: int, channels: int) -> tuple[DatasetInfo, SiteData]:
    from medfed.common.data.federated import load_federated_cached
    from medfed.common.data.medmnist import load_medmnist_cached
    from medfed.common.data.partition import partition_splits

    if site.task == "segmentation":
        if site.dataset != "manifest":
            raise ConfigError(f"site {site.site_id}: task segmentation reads image+mask pairs from a manifest "
                              "(columns path, mask): set manifest in site.yaml")
        from medfed.common.segmentation.site import build_seg_site_data

        return build_seg_site_data(site, image_size, channels)
    if site.dataset in ("manifest", "dicom"):
        from medfed.common.intake.site_dataset import build_site_data

        info, data, _ = build_site_data(site, image_size, channels)
        return info, data
    if site.dataset == "synthetic":
        fed = load_federated_cached("synthetic", "", site.shard_count, "iid", 1.0, seed)
        shard = fed.sites[site.shard_index]
        return fed.info, SiteData(site.site_id, shard.train, shard.val, shard.test)
    info, train, val, test = load_medmnist_cached(site.data_file_path)
    if site.shard_count > 1:
        # A demo site holding one shard of a public file; shards are fixed (seed 0).
        train, val, test = partition_splits(train, val, test, site.shard_count, "iid", 1.0, 0)[
            site.shard_index
        ]
    return info, SiteData(site.site_id, train, val, test)
