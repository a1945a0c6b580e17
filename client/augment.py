"""Site-side augmentation: a site adds images from a trained conditional GAN to its training data.

With ``augment-model`` (a generation study's ``model.pt``), ``augment-classes`` and
``augment-count``, each site appends ``augment-count`` generated images of each chosen class
to its training split, e.g. to fill in a class or a group it has few of; the bias harness
then measures whether that narrows a gap. Evaluation never sees generated images. The
checkpoint is read with ``weights_only`` loading. Privacy: generated images are not records
of the site, and DP-SGD's Poisson sampling covers every real record at the same rate; a
generator trained on this site's data without DP carries that data's privacy risk into
training, so use one trained with DP (``--task generation --epsilon``) or on other data.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from medfed.common.config import StudyConfig
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError

log = logging.getLogger(__name__)


def training_split(cfg: StudyConfig, site_id: str, train: ImageSplit) -> ImageSplit:
    """The site's training split, plus generated images when the study asks for them."""
    if not cfg.augment_model:
        return train
    path = Path(cfg.augment_model).resolve()
    gan = _generator(str(path), path.stat().st_mtime_ns if path.is_file() else 0)
    classes = [int(c) for c in cfg.augment_classes.split(",") if c.strip()]
    bad = [c for c in classes if not 0 <= c < gan.spec.num_classes]
    if bad:
        raise ConfigError(f"augment-classes {bad} are not classes of the generator (0..{gan.spec.num_classes - 1})")
    from medfed.common.generation.samples import augment
    from medfed.common.training import derive_seed

    group = None if train.groups is None else (cfg.augment_group if cfg.augment_group >= 0 else None)
    if train.groups is not None and group is None:
        raise ConfigError("this site's images have group codes: set augment-group, the code generated images count under")
    out = augment(train, gan.generator, gan.spec, {c: cfg.augment_count for c in classes},
                  derive_seed(cfg.seed, "augment", site_id), group)
    log.info("site %s: %d real + %d generated training images (classes %s)", site_id, len(train),
             len(out) - len(train), classes)
    return out


@functools.lru_cache(maxsize=2)
def _generator(path: str, mtime_ns: int):
    del mtime_ns  # cache key only
    from medfed.common.checkpoint import load_checkpoint
    from medfed.common.models import build_model, strip_wrapper_prefix

    ckpt = load_checkpoint(path)
    if ckpt.model.name != "cgan":
        raise ConfigError(f"augment-model {path} holds model {ckpt.model.name!r}: give a generation study's model.pt")
    gan = build_model(ckpt.model)
    gan.load_state_dict(strip_wrapper_prefix(ckpt.state_dict))
    return gan.eval()
