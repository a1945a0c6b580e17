"""What a site tells the server about its data before a deployed study starts: shape, never content.

A deployed server holds no patient data, so it learns the model's shape from the sites:
at study start each site answers a ``describe`` query with :class:`SiteFacts` (task,
classes, channels, image size, spatial dims, label names, the group attribute's name and
group names, and the kind of source it serves). These are the facts every site already
declares in its site.yaml or that its public dataset defines; no count, path, file name or
value from an image is among them.

The same schema is checked twice, as for metrics (:mod:`medfed.common.reply_schema`): by the
site's privacy boundary before the answer leaves, and by the server when it arrives. Names
are short words from a fixed alphabet, so a facts record cannot carry free text out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medfed.common.constants import MAX_GROUPS, FactKey

SOURCES = ("synthetic", "medmnist", "manifest", "dicom", "partition")
"""What a site serves: a demo shard of the seeded synthetic set, a MedMNIST file (or one of its
shards), a manifest of image files, a DICOM folder, or (simulation) a partition the server made."""
MAX_CLASSES = 64
MAX_NAME_CHARS = 40
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+/-]*")
_INT_LIMITS = {FactKey.NUM_CLASSES: (2, MAX_CLASSES), FactKey.IN_CHANNELS: (1, 64),
               FactKey.IMAGE_SIZE: (1, 4096), FactKey.SPATIAL_DIMS: (2, 3)}
_TASKS = ("classification", "segmentation", "generation")


@dataclass(frozen=True)
class SiteFacts:
    """The non-identifying shape of one site's data (see the module docstring)."""

    task: str
    source: str
    num_classes: int
    in_channels: int
    image_size: int
    spatial_dims: int
    label_names: tuple[str, ...]
    group_attribute: str = ""
    group_names: tuple[str, ...] = ()

    def to_record(self) -> dict[str, Any]:
        """The ConfigRecord mapping a site sends: ints and non-empty strings (names joined by commas).

        Flower cannot size a ConfigRecord holding an empty string or list, so a site without
        group codes leaves both group keys out.
        """
        record: dict[str, Any] = {
            FactKey.TASK.value: self.task, FactKey.SOURCE.value: self.source,
            FactKey.NUM_CLASSES.value: self.num_classes, FactKey.IN_CHANNELS.value: self.in_channels,
            FactKey.IMAGE_SIZE.value: self.image_size, FactKey.SPATIAL_DIMS.value: self.spatial_dims,
            FactKey.LABEL_NAMES.value: ",".join(self.label_names),
        }
        if self.group_attribute:
            record[FactKey.GROUP_ATTRIBUTE.value] = self.group_attribute
            record[FactKey.GROUP_NAMES.value] = ",".join(self.group_names)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteFacts:
        """Parse a facts record; ValueError, naming the field, for anything outside the schema."""
        if problem := facts_problem(record):
            raise ValueError(problem)
        groups = str(record.get(FactKey.GROUP_NAMES.value, ""))
        return cls(
            task=str(record[FactKey.TASK.value]), source=str(record[FactKey.SOURCE.value]),
            num_classes=int(record[FactKey.NUM_CLASSES.value]), in_channels=int(record[FactKey.IN_CHANNELS.value]),
            image_size=int(record[FactKey.IMAGE_SIZE.value]), spatial_dims=int(record[FactKey.SPATIAL_DIMS.value]),
            label_names=tuple(str(record[FactKey.LABEL_NAMES.value]).split(",")),
            group_attribute=str(record.get(FactKey.GROUP_ATTRIBUTE.value, "")),
            group_names=tuple(groups.split(",")) if groups else (),
        )

    def shape(self) -> dict[str, Any]:
        """The facts every site of one study must share, by their key (all but the source and the groups)."""
        return {
            FactKey.TASK.value: self.task, FactKey.NUM_CLASSES.value: self.num_classes,
            FactKey.IN_CHANNELS.value: self.in_channels, FactKey.IMAGE_SIZE.value: self.image_size,
            FactKey.SPATIAL_DIMS.value: self.spatial_dims, FactKey.LABEL_NAMES.value: self.label_names,
        }


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME_CHARS and bool(_NAME.fullmatch(value))


_GROUP_KEYS = frozenset({FactKey.GROUP_ATTRIBUTE.value, FactKey.GROUP_NAMES.value})


def _names(value: Any, count: int | None, most: int) -> bool:
    """A comma-joined list of short names: ``count`` of them, or 1 to ``most``."""
    if not isinstance(value, str) or not value:
        return False
    names = value.split(",")
    return (len(names) == count if count is not None else 1 <= len(names) <= most) and all(map(_is_name, names))


def facts_problem(record: Mapping[str, Any]) -> str | None:
    """Why ``record`` is not a sound facts record, or None. Never echoes a refused value."""
    required = {k.value for k in FactKey} - _GROUP_KEYS
    present = set(record)
    if not required <= present or present - required - _GROUP_KEYS or len(present & _GROUP_KEYS) == 1:
        return (f"the facts record must hold exactly {', '.join(sorted(required))}, and "
                f"{' and '.join(sorted(_GROUP_KEYS))} together or neither")
    if record[FactKey.TASK.value] not in _TASKS:
        return f"{FactKey.TASK.value} must be one of {', '.join(_TASKS)}"
    if record[FactKey.SOURCE.value] not in SOURCES:
        return f"{FactKey.SOURCE.value} must be one of {', '.join(SOURCES)}"
    for key, (low, high) in _INT_LIMITS.items():
        value = record[key.value]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{key.value} must be an integer in [{low}, {high}]"
    if not _names(record[FactKey.LABEL_NAMES.value], record[FactKey.NUM_CLASSES.value], MAX_CLASSES):
        return (f"{FactKey.LABEL_NAMES.value} must join one short name per class with commas (letters, digits, "
                f"' _.+/-', at most {MAX_NAME_CHARS} characters each)")
    if FactKey.GROUP_ATTRIBUTE.value in record:
        if not _is_name(record[FactKey.GROUP_ATTRIBUTE.value]):
            return f"{FactKey.GROUP_ATTRIBUTE.value} must be a short name"
        if not _names(record[FactKey.GROUP_NAMES.value], None, MAX_GROUPS):
            return f"{FactKey.GROUP_NAMES.value} must join 1 to {MAX_GROUPS} short names with commas"
    return None
