"""Saliency at a site: MONAI saliency maps, the aggregates a site may share, and the gallery that stays there."""
