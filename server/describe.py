"""A deployed study's first exchange: each site describes the shape of its data, and the sites must agree.

A deployed server holds no patient data (unless the run config names a file it really
holds), so it cannot size the model from data of its own. Before round 1 every connected
site answers a ``describe`` query with :class:`~medfed.common.site_facts.SiteFacts`:
task, classes, channels, image size, spatial dims, label names and its group attribute.
:func:`agreed_info` checks that the sites agree with each other, with the run config's
explicit sizes and with the server's own data when it has some, and returns the
:class:`DatasetInfo` the model and the report use. A disagreement stops the study with
one line naming the site, the fact and the fix (:class:`~medfed.server.outcome.StudyFailed`).

``dataset=synthetic`` in a deployed run is the demo: it is accepted only when every site
itself serves a synthetic shard; the server never builds synthetic data in a deployment.
Sites that join after the start are not described: their first reply is screened like any
other, and a model they cannot load fails at that site with its reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from medfed.common.config import StudyConfig
from medfed.common.constants import ConfigKey, FactKey, QueryKind, RecordKey
from medfed.common.data.splits import DatasetInfo
from medfed.common.site_facts import SiteFacts
from medfed.server.binding import BindingEvent, SiteBinding
from medfed.server.exchange import Deadline, exchange
from medfed.server.limits import bound_replies
from medfed.server.outcome import StudyFailed
from medfed.server.replies import Failure, error_failure, log_failures, site_of

log = logging.getLogger(__name__)

PHASE = QueryKind.DESCRIBE.value
SITE_DATA_NAME = "site-data"  # DatasetInfo.name of what the sites described
_FACT_OF_KEY = {  # run-config key -> the fact it must equal when the run config sets it (non-zero)
    "num-classes": FactKey.NUM_CLASSES, "in-channels": FactKey.IN_CHANNELS,
    "image-size": FactKey.IMAGE_SIZE, "spatial-dims": FactKey.SPATIAL_DIMS,
}
_FIX = ("every site of a study must declare the same task, labels, channels and image size: align its "
        "site.yaml (labels, channels, image-size), or set image-size/in-channels in --run-config so every "
        "site resizes to them, and submit again")


@dataclass
class Described:
    """What the describe exchange established."""

    facts: dict[str, SiteFacts]
    failures: list[Failure] = field(default_factory=list)
    events: list[BindingEvent] = field(default_factory=list)

    def sources(self) -> dict[str, str]:
        return {site: f.source for site, f in sorted(self.facts.items())}


def describe_message(node_id: int) -> Message:
    content = RecordDict({RecordKey.CONFIG.value: ConfigRecord({ConfigKey.QUERY.value: PHASE})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.QUERY, group_id=PHASE)


def describe_sites(grid: Grid, node_ids: list[int], cfg: StudyConfig, binding: SiteBinding) -> Described:
    """Ask every node in ``node_ids`` to describe its data; bind, screen and log the answers."""
    log.info("asking %d site(s) to describe their data", len(node_ids))
    done = exchange(grid, [describe_message(n) for n in node_ids], Deadline(cfg.round_timeout))
    replies = bound_replies(done.replies, cfg.max_reply_mb)
    admitted, refused, events = binding.admit(replies, grid.get_node_ids)
    facts, failures = screen_describe_replies(admitted)
    failures = binding.name(refused + failures + done.missing)
    log_failures(PHASE, failures)
    for site, f in sorted(facts.items()):
        log.info("site %s (node %s) serves %s data: %d classes (%s), %d channel(s), %d px, %dD", site,
                 binding.node_of.get(site), f.source, f.num_classes, ", ".join(f.label_names), f.in_channels,
                 f.image_size, f.spatial_dims)
    return Described(facts, failures, events)


def screen_describe_replies(replies: list[Message]) -> tuple[dict[str, SiteFacts], list[Failure]]:
    """Each site's facts, and the failures (error replies, replies outside the facts schema)."""
    facts: dict[str, SiteFacts] = {}
    failures: list[Failure] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if (error := error_failure(msg)) is not None:
            failures.append(error)
            continue
        site = site_of(msg)
        record = msg.content.get(RecordKey.FACTS.value) if msg.has_content() else None
        if site is None or not isinstance(record, ConfigRecord):
            failures.append(Failure(site, node, "describe reply lacks the site id or the facts record"))
            continue
        if set(msg.content.keys()) != {RecordKey.FACTS.value, RecordKey.SITE.value}:
            failures.append(Failure(site, node, "describe reply holds records other than facts and site"))
            continue
        try:
            facts[site] = SiteFacts.from_record(dict(record))
        except ValueError as exc:
            failures.append(Failure(site, node, f"facts refused: {exc}"))
    return dict(sorted(facts.items())), failures


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def agreed_info(facts: dict[str, SiteFacts], cfg: StudyConfig, central: DatasetInfo | None = None) -> DatasetInfo:
    """The data shape every described site shares; :class:`StudyFailed` names the first site that disagrees."""
    if not facts:
        raise StudyFailed("no site described its data")
    counts = Counter(repr(sorted(f.shape().items())) for f in facts.values())
    ref_site, ref = next((s, f) for s, f in sorted(facts.items())
                         if counts[repr(sorted(f.shape().items()))] == max(counts.values()))
    for site, f in sorted(facts.items()):
        diff = [k for k, v in f.shape().items() if v != ref.shape()[k]]
        if diff:
            shown = "; ".join(f"{k} {_shown(f.shape()[k])} (site {ref_site}: {_shown(ref.shape()[k])})" for k in diff)
            raise StudyFailed(f"site {site} disagrees with site {ref_site} on {shown}: {_FIX}")
    grouped = sorted(((s, f) for s, f in facts.items() if f.group_attribute), key=lambda pair: pair[0])
    for site, f in grouped[1:]:
        first_site, first = grouped[0]
        if (f.group_attribute, f.group_names) != (first.group_attribute, first.group_names):
            raise StudyFailed(f"site {site} names its groups {f.group_attribute}={_shown(f.group_names)} but site "
                              f"{first_site} {first.group_attribute}={_shown(first.group_names)}: sites must share "
                              "one group attribute with the same group names (site.yaml group-attribute) for their "
                              "per-group counts to pool")
    if ref.task != cfg.task:
        raise StudyFailed(f"site {ref_site} serves task {ref.task} but the study's task={cfg.task}: set task="
                          f"{ref.task} in --run-config, or the site's task in its site.yaml")
    for key, fact in _FACT_OF_KEY.items():
        wanted = getattr(cfg, key.replace("-", "_"))
        actual = ref.shape()[fact.value]
        if wanted and wanted != actual:
            raise StudyFailed(f"the run config sets {key}={wanted} but site {ref_site}'s data has {key}={actual}: "
                              f"drop {key} from --run-config (the sites' own value is used) or change the sites")
    if central is not None:
        server = {FactKey.NUM_CLASSES.value: central.num_classes, FactKey.IN_CHANNELS.value: central.in_channels,
                  FactKey.IMAGE_SIZE.value: central.image_size, FactKey.SPATIAL_DIMS.value: central.spatial_dims}
        diff = [k for k, v in server.items() if v != ref.shape()[k]]
        if diff:
            raise StudyFailed(f"site {ref_site} disagrees with the server's own data-path={cfg.data_path} on "
                              + ", ".join(f"{k} ({ref.shape()[k]} vs {server[k]})" for k in diff)
                              + ": drop data-path from --run-config (the sites' test splits are then pooled) or "
                              "point it at data of the sites' shape")
    if cfg.dataset == "synthetic":
        real = {s: f.source for s, f in facts.items() if f.source != "synthetic"}
        if real:
            site, source = sorted(real.items())[0]
            raise StudyFailed(f"the run config has dataset=synthetic but site {site} serves its own {source} data: "
                              "a deployed server builds no data of its own; submit with `medfed run` (its default "
                              f"is dataset={SITE_DATA_NAME}) or pass --run-config \"dataset='{SITE_DATA_NAME}'\"")
    group = grouped[0][1] if grouped else None
    return DatasetInfo(
        name=SITE_DATA_NAME, num_classes=ref.num_classes, in_channels=ref.in_channels, image_size=ref.image_size,
        label_names=ref.label_names, group_name=group.group_attribute if group else None,
        group_values=group.group_names if group else (), spatial_dims=ref.spatial_dims,
    )
