"""A simulated study over real site descriptions: one ``site.yaml`` per simulated site.

Researchers who hold several sites' data on one machine (or a public dataset split by
patient into site manifests) run ``medfed simulate --site-configs a.yaml,b.yaml`` and each
simulated node reads its own site exactly as a deployed site daemon would. The pooled
validation and test splits (every site's, concatenated) give the server's central
evaluation and the centralized baseline.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.errors import ConfigError
from medfed.common.site_config import SiteConfig, load_site_config


def site_config_paths(data_path: str) -> tuple[str, ...]:
    """The site.yaml paths of a ``dataset: sites`` study (``data-path`` is comma-separated)."""
    return tuple(p.strip() for p in data_path.split(",") if p.strip())


def load_site_configs(data_path: str) -> tuple[SiteConfig, ...]:
    sites = tuple(load_site_config(p) for p in site_config_paths(data_path))
    ids = [s.site_id for s in sites]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"site ids must be unique across --site-configs, got {ids}")
    labels = {s.labels for s in sites}
    if len(labels) > 1:
        raise ConfigError(
            f"sites declare different label lists {sorted(labels)}: every site of a study must "
            "declare the same labels in the same order (the order is the class index)"
        )
    return sites


@functools.lru_cache(maxsize=2)
def load_sites_federated(data_path: str, image_size: int, channels: int) -> FederatedData:
    """Every site's data (through its preprocessing cache) as one :class:`FederatedData`."""
    from medfed.common.intake.site_dataset import build_site_data

    built = [build_site_data(s, image_size, channels) for s in load_site_configs(data_path)]
    infos = [info for info, _, _ in built]
    group_names = {i.group_name for i in infos}
    if len(group_names) > 1:
        raise ConfigError(
            f"sites use different group-attribute values {sorted(map(str, group_names))}: use one"
        )
    values = tuple(sorted({v for i in infos for v in i.group_values}))
    info = dataclasses.replace(infos[0], name="sites", group_values=values)
    sites = tuple(_remap_groups(data, i, values) for (_, data, _), i in zip(built, infos))
    return FederatedData(
        info=info,
        sites=sites,
        central_test=ImageSplit.concat([s.test for s in sites]),
        central_val=ImageSplit.concat([s.val for s in sites]),
    )


def _remap_groups(data: SiteData, info: DatasetInfo, values: tuple[str, ...]) -> SiteData:
    if info.group_name is None:
        return data
    lut = np.array([values.index(v) for v in info.group_values], dtype=np.int64)

    def remap(split: ImageSplit) -> ImageSplit:
        return ImageSplit(split.images, split.labels, lut[split.groups] if len(split) else split.groups)

    return SiteData(data.site_id, remap(data.train), remap(data.val), remap(data.test))
