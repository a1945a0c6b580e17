"""Federated 2D segmentation building blocks: data contract, loaders, models, loss and metrics.

- :mod:`.data`: :class:`SegSplit`, :class:`SegSiteData`, :class:`FederatedSegData`
- :mod:`.synthetic`: :func:`make_synthetic_segmentation` (seeded sites with scanner shift)
- :mod:`.npz`: :func:`load_segmentation_npz`
- :mod:`.masks` and :mod:`.pairs`: image + mask pairs from a site manifest CSV
- :mod:`.models`: :func:`build_seg_model` (DP-safe MONAI UNet / BasicUNet)
- :mod:`.losses`: :func:`seg_loss` (per-image Dice + CE)
- :mod:`.metrics`: per-image Dice and HD95, :class:`SegSums` for exact pooling

Import from the submodules; this package imports nothing heavy on its own.
"""
