"""Before a site joins a federation: does its data give at least one training example?

``medfed site start`` runs :func:`preflight_site` before any SuperNode exists. The data
is built exactly as a training round builds it (:func:`medfed.client.site_data.site_runtime`,
the site's own image size and channels), so a site that passes can train, and one that
fails says so in one line naming the site, the site.yaml key, the file and the fix
(:class:`~medfed.common.site_files.SiteDataError`, exit 2) instead of joining and failing
every task. Reading a manifest or DICOM site once here also warms its preprocessing cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medfed.common.errors import MedfedError
from medfed.common.site_config import SiteConfig
from medfed.common.site_files import (
    SiteDataError,
    check_site_files,
    loader_problem,
    primary_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteReady:
    """What the site will train and evaluate on (counts per split)."""

    site_id: str
    train: int
    val: int
    test: int


def preflight_site(site: SiteConfig, source: str | Path) -> SiteReady:
    """Check the site's files, then build its data as training does; raise :class:`SiteDataError` if unusable."""
    from medfed.client.site_data import site_runtime
    from medfed.common.config import StudyConfig

    check_site_files(site, source)
    key, where = primary_key(site)
    if site.dataset in ("manifest", "dicom"):  # every image is read once (and cached): may take a while
        log.info("site %s: reading its data (%s %s) before joining", site.site_id, key, where)
    try:
        data = site_runtime(site, StudyConfig(task=site.task)).data
    except SiteDataError:
        raise
    except MedfedError as exc:  # the loader's reason (DataError), or a shard that cannot be taken
        problem = loader_problem(site, exc)
        more = "" if "medfed site check" in problem else f" (details: `medfed site check --config {source}`)"
        raise SiteDataError(site.site_id, problem + more) from None
    finally:
        _release_data()
    ready = SiteReady(site.site_id, len(data.train), len(data.val), len(data.test))
    if not ready.train:
        raise SiteDataError(
            site.site_id, f"{key} {where} gives no training example (val {ready.val}, test "
            f"{ready.test}): run `medfed site check --config {source}` to see why"
        )
    log.info("site %s: data ok: %d training, %d validation, %d test examples", site.site_id,
             ready.train, ready.val, ready.test)
    return ready


def _release_data() -> None:
    """The daemon only waits on its SuperNode: drop the arrays the check loaded (tasks load their own)."""
    from medfed.client.site_data import _site_data_cached
    from medfed.common.data.federated import load_federated_cached
    from medfed.common.data.medmnist import load_medmnist_cached

    for cached in (_site_data_cached, load_medmnist_cached, load_federated_cached):
        cached.cache_clear()
