"""Site-side augmentation: a site adds images from a trained conditional GAN to its training data.

With ``augment-model`` (a generation study's ``model.pt``), ``augment-classes`` and
``augment-count``, each site appends ``augment-count`` generated images of each chosen class
to its training split, e.g. to fill in a class or a group it has few of; the bias harness
then measures whether that narrows a gap. Evaluation never sees generated images. The
checkpoint is read with ``weights_only`` loading. Privacy: generated images are not records
of the site, and DP-SGD's Poisson sampling covers every real record at the same rate; a
generator trained on this site's data without DP carries that data's privacy risk into
training, so use one trained with DP (``--task generation --epsilon``) or on other data.

The path comes from the server's run config, so a deployed site resolves it only inside its
own ``state-dir`` or ``data-root`` (relative paths against each, in that order; symlinks
resolved) and refuses anything else before touching the file system there, with one error
whether or not a file exists. A simulated partition (one user runs the server and every site)
reads the path as given.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from medfed.client.boundary import PublicSiteError
from medfed.common.config import StudyConfig
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError

log = logging.getLogger(__name__)


def augment_model_path(given: str, roots: Sequence[Path] | None) -> Path:
    """``augment-model`` resolved inside one of ``roots`` (None: a simulated partition, as given)."""
    if roots is None:
        return Path(given).resolve()
    for root in roots:
        base = root.resolve()
        path = (base / given).resolve()  # an absolute ``given`` stays itself
        if path.is_relative_to(base) and path.is_file():
            return path
    raise PublicSiteError(
        "augment-model must name a generator checkpoint inside this site's state-dir or data-root "
        "(a relative path is resolved against each): put the model.pt there and give its relative path"
    )


def training_split(cfg: StudyConfig, site_id: str, train: ImageSplit,
                   roots: Sequence[Path] | None = None) -> ImageSplit:
    """The site's training split, plus generated images when the study asks for them.

    ``roots``: the folders a deployed site reads ``augment-model`` from (its state-dir and
    data-root); None for a simulated partition.
    """
    if not cfg.augment_model:
        return train
    path = augment_model_path(cfg.augment_model, roots)
    gan = _generator(str(path), path.stat().st_mtime_ns)
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
