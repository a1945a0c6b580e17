"""Cost figures of issue 17, measured on this machine (prints them; nothing is asserted).

1. Site training time of PGD adversarial training vs standard training: one local round (one
   epoch, batch 64, Adam) of the default cnn on the largest PneumoniaMNIST site of the
   trust.sh partition (5 Dirichlet(0.5) sites, seed 0), standard, PGD-3 and PGD-7 at 2/255 with
   half of each batch adversarial (adv-ratio 0.5), without and with DP-SGD; median of --repeats.
   The nominal forward/backward count per step is 1 + ratio * steps (steps + 1 at ratio 1).
2. The site's evaluation (val and test, the final evaluation's work) with explain-metrics vs without.

Usage: python bench/trust_cost.py [--data PNEUMONIAMNIST.npz] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from medfed.client.site_data import SiteRuntime
    from medfed.client.task import evaluate_round
    from medfed.common.arrays import model_to_arrays
    from medfed.common.config import StudyConfig
    from medfed.common.data.federated import load_study_data
    from medfed.common.dp.engine import DPSettings
    from medfed.common.models import ModelSpec, build_model
    from medfed.common.training import TrainSettings, train

    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(shared / "pneumoniamnist" / "pneumoniamnist.npz"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = StudyConfig(dataset="medmnist", data_path=args.data, num_sites=5, partition="dirichlet", alpha=0.5,
                          out_dir=tmp)
        fed = load_study_data(cfg)
        site = max(fed.sites, key=lambda s: len(s.train))
        spec = ModelSpec("cnn", fed.info.in_channels, fed.info.num_classes, fed.info.image_size)
        print(f"site {site.site_id}: {len(site.train)} training, {len(site.val)} val, {len(site.test)} test images; "
              f"torch threads 1")

        def one_round(steps: int, dp: bool) -> float:
            def run() -> None:
                torch.manual_seed(0)
                model = build_model(spec)
                settings = TrainSettings(epochs=1, batch_size=64, lr=1e-3, adv_eps=2 / 255 if steps else 0.0,
                                         adv_steps=max(steps, 1), adv_ratio=0.5)
                dps = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                 sample_rate=64 / len(site.train)) if dp else None
                train(model, site.train, settings, torch.device("cpu"), dp=dps)
            return _median_time(run, args.repeats)

        print("\nsite training time, one epoch (s)   standard   PGD-3 AT   PGD-7 AT   ratio 3   ratio 7"
              "   nominal 1+0.5*steps")
        for dp in (False, True):
            base, t3, t7 = one_round(0, dp), one_round(3, dp), one_round(7, dp)
            print(f"{'DP-SGD' if dp else 'no DP':35s} {base:8.2f} {t3:10.2f} {t7:10.2f} {t3 / base:9.2f} "
                  f"{t7 / base:9.2f}   2.5 / 4.5")

        runtime = SiteRuntime(site.site_id, fed.info, site, Path(tmp) / "state")
        torch.manual_seed(0)
        arrays = model_to_arrays(build_model(spec))
        final = {"final-evaluation": True}
        off = _median_time(lambda: evaluate_round(cfg, runtime, arrays, final), args.repeats)
        on_cfg = cfg.replace(explain_metrics=True)
        on = _median_time(lambda: evaluate_round(on_cfg, runtime, arrays, final), args.repeats)
        print(f"\nsite evaluation (val + test, {len(site.val) + len(site.test)} images): without explain-metrics "
              f"{off:.3f} s, with {on:.3f} s: {on / off:.2f}x")


if __name__ == "__main__":
    main()
