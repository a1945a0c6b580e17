"""Adversarial robustness of image classifiers: white-box L-infinity attacks (FGSM, PGD) and
robust accuracy, AUC and sensitivity per attack strength and per group (``medfed robustness``)."""
