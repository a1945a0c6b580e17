"""Federated conditional-GAN building blocks: models, one site's round, evaluation, samples.

- :mod:`.models`: a small conditional DCGAN (:class:`~.models.Generator`,
  :class:`~.models.Discriminator`) described by a :class:`~.models.GanSpec`;
- :mod:`.train`: :func:`~.train.gan_round`, one site's local round, with DP-SGD on the
  discriminator (the only network that sees private images) via :mod:`.private`;
- :mod:`.evaluate`: train-on-synthetic/test-on-real AUC and a Fréchet distance on medfed
  classifier features;
- :mod:`.samples`: sampling, writing sample sets with provenance, and site-side augmentation.

Submodules are imported on use (Opacus and torch.optim cost seconds to import).
"""
