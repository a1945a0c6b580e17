"""Site-side augmentation with images from a federated GAN's checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.client.augment import training_split
from medfed.client.app import app
from medfed.common.checkpoint import Checkpoint, save_checkpoint
from medfed.common.config import StudyConfig
from medfed.common.data.federated import load_federated_cached
from medfed.common.errors import ConfigError
from medfed.common.models import ModelSpec, build_model
from tests.test_client_app import _context, _message


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture
def gan_ckpt(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("cgan", 1, 2, 28)
    return save_checkpoint(Checkpoint(model=spec, state_dict=build_model(spec).state_dict(),
                                      config={"task": "generation"}), tmp_path / "gan.pt")


def test_a_site_adds_generated_images_of_the_chosen_class_to_training_only(gan_ckpt, tmp_path):
    cfg = StudyConfig(num_sites=3, local_steps=2, out_dir=str(tmp_path), augment_model=str(gan_ckpt),
                      augment_classes="1", augment_count=25)
    site = load_federated_cached("synthetic", "", 3, "dirichlet", 1.0, 0).sites[0]
    plain = site.train if site.train.groups is None else None
    cfg = cfg.replace(augment_group=0) if plain is None else cfg
    out = training_split(cfg, site.site_id, site.train)
    assert len(out) == len(site.train) + 25
    assert np.array_equal(out.images[: len(site.train)], site.train.images)  # the real images come first, unchanged
    assert (out.labels[len(site.train):] == 1).all()
    assert np.array_equal(training_split(cfg, site.site_id, site.train).images, out.images)  # seeded

    reply = app(_message("train"), _context(cfg.to_dict(), {"partition-id": 0, "num-partitions": 3}))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["num-examples"] == len(site.train) + 25


def test_augmentation_settings_are_checked(gan_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="augment-classes"):
        StudyConfig(augment_model=str(gan_ckpt), augment_count=5)
    with pytest.raises(ConfigError, match="must be comma-separated class indices"):
        StudyConfig(augment_model=str(gan_ckpt), augment_classes="pneumonia", augment_count=5)
    site = load_federated_cached("synthetic", "", 3, "dirichlet", 1.0, 0).sites[0]
    cfg = StudyConfig(augment_model=str(gan_ckpt), augment_classes="7", augment_count=5, augment_group=0)
    with pytest.raises(ConfigError, match=r"augment-classes \[7\] are not classes of the generator"):
        training_split(cfg, site.site_id, site.train)
    clf = save_checkpoint(Checkpoint(model=ModelSpec("cnn", 1, 2, 28),
                                     state_dict=build_model(ModelSpec("cnn", 1, 2, 28)).state_dict()), tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="give a generation study's model.pt"):
        training_split(cfg.replace(augment_model=str(clf), augment_classes="1"), site.site_id, site.train)


def test_a_deployed_site_reads_augment_model_only_inside_its_state_dir_or_data_root(tmp_path):
    """The path comes from the server: anywhere else on the site's disk is refused, with one error
    whether or not a file exists there (the server must not learn what the disk holds)."""
    from medfed.client.augment import augment_model_path
    from medfed.client.boundary import PublicSiteError

    state, data, elsewhere = tmp_path / "state", tmp_path / "data", tmp_path / "elsewhere"
    for d in (state, data, elsewhere):
        d.mkdir()
    (state / "gan.pt").write_bytes(b"x")
    (data / "models").mkdir()
    (data / "models" / "g.pt").write_bytes(b"x")
    (elsewhere / "secret.pt").write_bytes(b"x")
    (state / "link.pt").symlink_to(elsewhere / "secret.pt")
    roots = (state, data)
    assert augment_model_path("gan.pt", roots) == (state / "gan.pt").resolve()
    assert augment_model_path("models/g.pt", roots) == (data / "models" / "g.pt").resolve()
    assert augment_model_path(str(state / "gan.pt"), roots) == (state / "gan.pt").resolve()
    errors = []
    for given in (str(elsewhere / "secret.pt"), str(elsewhere / "missing.pt"), "../elsewhere/secret.pt",
                  "link.pt", "/etc/passwd"):
        with pytest.raises(PublicSiteError) as err:
            augment_model_path(given, roots)
        errors.append(str(err.value))
    assert len(set(errors)) == 1, "an existing and a missing file give the same error"
    assert augment_model_path(str(elsewhere / "secret.pt"), None) == elsewhere / "secret.pt"  # simulation
