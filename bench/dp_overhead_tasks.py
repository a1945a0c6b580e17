"""DP-SGD overhead of the segmentation and generation tasks on the CPU: time per step, DP vs plain.

Measured as ``bench/dp_overhead.py`` measures the classifier, through the code every site runs:

- ``unet`` and ``basicunet`` (MONAI, instance norm, 64x64 grayscale, two classes) trained by
  :func:`medfed.common.training.train` with the segmentation task's Dice + cross-entropy loss;
- ``cgan`` (28x28, two classes): one GAN iteration = a discriminator step on a batch of real
  images and as many fakes, then a generator step, by
  :func:`medfed.common.generation.train.gan_round`; with DP, DP-SGD runs on the discriminator
  only and its per-sample hooks are off during the generator step.

DP: noise multiplier 1.0, clipping 1.0, Poisson sampling at ``q = B / n``, physical batches of
at most ``B + 4*sqrt(B)``. Plain and DP calls are interleaved, ``--repeats`` times, so that load
from other processes slows both alike; reported are the median seconds per step and the
median of the per-repeat DP/plain ratios (the paired figure).

Usage: python bench/dp_overhead_tasks.py [--models unet basicunet cgan] [--batch 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings


def _setup(model_name: str, mode: str, batch: int, n: int):
    import numpy as np
    import torch
    from medfed.common.data.splits import ImageSplit
    from medfed.common.dp.engine import DPSettings
    from medfed.common.models import ModelSpec, build_model
    from medfed.common.segmentation.data import SegSplit
    from medfed.common.tasks import task_of_model
    from medfed.common.training import TrainSettings

    rng = np.random.default_rng(0)
    task = task_of_model(model_name)
    size = 64 if task.name == "segmentation" else 28
    images = rng.random((n, 1, size, size), dtype=np.float32)
    if task.name == "segmentation":
        data = SegSplit(images, (rng.random((n, size, size)) > 0.8).astype(np.int64))
    else:
        data = ImageSplit(images, rng.integers(0, 2, n).astype(np.int64))
    torch.manual_seed(0)
    model = build_model(ModelSpec(model_name, 1, 2, size))
    dp = None
    if mode == "dp":
        from medfed.common.dp.model_check import prepare_dp_model

        model = prepare_dp_model(model)
        dp = DPSettings(1.0, 1.0, batch / n, batch + math.ceil(4 * math.sqrt(batch)))
    cpu = torch.device("cpu")

    def run(k: int, seed: int) -> float:
        settings = TrainSettings(steps=k, batch_size=batch, optimizer="adam", lr=1e-3, seed=seed)
        t0 = time.perf_counter()
        task.train(model, data, settings, cpu, dp=dp)
        return (time.perf_counter() - t0) / k

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["unet", "basicunet", "cgan"])
    ap.add_argument("--batch", type=int, default=16, help="(expected) batch size (default 16)")
    ap.add_argument("--n", type=int, default=512, help="random training images (default 512)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed call (default 10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}  load average before: "
          + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"batch {args.batch}, {args.steps} steps x {args.repeats} repeats, plain/DP interleaved (median s/step)")
    print(f"{'model':<10} {'plain s/step':>12} {'DP s/step':>10} {'ratio':>6} {'per-repeat':>10}")
    for name in args.models:
        runs = {mode: _setup(name, mode, args.batch, args.n) for mode in ("plain", "dp")}
        for run in runs.values():
            run(2, seed=0)  # warm-up
        times: dict[str, list[float]] = {"plain": [], "dp": []}
        for r in range(args.repeats):
            for mode, run in runs.items():
                times[mode].append(run(args.steps, seed=1 + r))
        plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
        paired = statistics.median(d / p for p, d in zip(times["plain"], times["dp"]))
        print(f"{name:<10} {plain:>12.4f} {dp:>10.4f} {dp / plain:>5.2f}x {paired:>9.2f}x", flush=True)
    print("load average after: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
