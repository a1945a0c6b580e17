"""DP-SGD overhead of medfed's training loop on the CPU: time per optimizer step and peak memory.

The default classifier (``build_model(ModelSpec("cnn", 1, 2, 28))``, 28x28 grayscale, two
classes), and the DP classifier ``cnn-dp``, are trained on ``--n`` random images through :func:`medfed.common.training.train`,
the path every site runs, with ``TrainSettings(steps=K, batch_size=B, optimizer="sgd",
lr=0.05)``: plainly, and with DP-SGD (Opacus per-sample gradients, clipping to 1.0, noise
multiplier 1.0, Poisson sampling with ``sample_rate = B / n``).

A Poisson batch exceeds its expected size ``B`` about half the time, so with
``max_physical_batch = B`` those steps would take a second forward/backward pass for the
few extra records. The default physical limit is ``B + 4*sqrt(B)``: one physical chunk per
step in practice; ``--physical-batch 0`` sets it to ``B`` exactly to see that cost.

Time: after warm-up, ``--repeats`` timed calls of ``--steps`` steps each, plain and DP calls
interleaved in one process so that load from other processes slows both alike (the per-call
set-up, e.g. Opacus's wrapping, is included, as in a real round). Reported: the median
seconds per step of each, their ratio, and the median of the per-repeat ratios (the paired
figure, steadier on a busy machine). Torch's default thread count is kept unless
``--threads`` is given: on a machine whose cores are shared with other work, more threads
can be several times slower (OpenMP barriers wait on descheduled threads), so compare
figures at the same thread count. Memory: each configuration in a fresh Python process, its
peak RSS while training minus its RSS just before the first training call (data, model,
torch and Opacus already loaded).

Target: DP <= 2.0x the plain time per step, judged on the paired figure.

Usage:
    python bench/dp_overhead.py [--models cnn cnn-dp] [--batches 64 256] [--n 2048] [--steps 30] [--repeats 3]
                                [--physical-batch -1] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 2.0


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mib() -> float:
    """Current resident set size (not the peak), in MiB."""
    if sys.platform == "darwin":
        raise RuntimeError("the memory figures need Linux's /proc")
    return _status_mib("VmRSS")


def _peak_rss_mib() -> float:
    """Peak RSS of this process, in MiB. Linux's ``ru_maxrss`` also counts the parent's RSS at
    fork (it survives exec), so VmHWM, the peak of this process's own memory, is read too and
    the smaller is used: a child started by a 1.6 GB parent would otherwise report 1.6 GB."""
    return min(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _status_mib("VmHWM"))


def physical_batch(batch: int, option: int) -> int:
    if option < 0:
        return batch + math.ceil(4 * math.sqrt(batch))
    return option or batch


def _setup(mode: str, batch: int, n: int, physical: int, model_name: str = "cnn"):
    """(run(k, seed) -> seconds per step) for one configuration on its own copy of the model."""
    import numpy as np
    import torch
    from medfed.common.data.splits import ImageSplit
    from medfed.common.dp.engine import DPSettings
    from medfed.common.models import ModelSpec, build_model
    from medfed.common.training import TrainSettings, train

    rng = np.random.default_rng(0)
    data = ImageSplit(rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 2, n).astype(np.int64))
    torch.manual_seed(0)
    model = build_model(ModelSpec(model_name, 1, 2, 28))
    dp = None
    if mode == "dp":
        dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=batch / n,
                        max_physical_batch=physical_batch(batch, physical))
    cpu = torch.device("cpu")

    def run(k: int, seed: int) -> float:
        settings = TrainSettings(steps=k, batch_size=batch, optimizer="sgd", lr=0.05, seed=seed)
        t0 = time.perf_counter()
        train(model, data, settings, cpu, dp=dp)
        return (time.perf_counter() - t0) / k

    return run


def time_batch(batch: int, args: argparse.Namespace, model_name: str) -> dict[str, list[float]]:
    """Seconds per step, plain and DP calls interleaved (a busy machine slows both alike)."""
    runs = {mode: _setup(mode, batch, args.n, args.physical_batch, model_name) for mode in ("plain", "dp")}
    for run in runs.values():
        run(args.warmup, seed=0)
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for r in range(args.repeats):
        for mode, run in runs.items():
            times[mode].append(run(args.steps, seed=1 + r))
    return times


def memory_worker(mode: str, batch: int, args: argparse.Namespace, model_name: str) -> dict:
    """In a fresh process: peak RSS while training minus the RSS just before."""
    import opacus  # noqa: F401  (loaded before the baseline in both modes: not training memory)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = _setup(mode, batch, args.n, args.physical_batch, model_name)
    rss_before, peak_before = _rss_mib(), _peak_rss_mib()
    run(args.warmup + args.steps, seed=0)
    peak = _peak_rss_mib()
    return {"rss_before_mib": rss_before, "peak_before_mib": peak_before, "peak_mib": peak,
            "train_mib": peak - rss_before, "threads": torch.get_num_threads()}


def measure_memory(mode: str, batch: int, args: argparse.Namespace, model_name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", mode, "--models", model_name, "--batches", str(batch),
           "--n", str(args.n), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--physical-batch", str(args.physical_batch), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} batch {batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "cnn-dp"], help="classifiers to time (default cnn cnn-dp)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--n", type=int, default=2048, help="random training images (default 2048)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per timed call")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--physical-batch", type=int, default=-1,
                    help="DP max_physical_batch: -1 = B + 4*sqrt(B) (default), 0 = B, else this value")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    ap.add_argument("--memory-worker", choices=["plain", "dp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Opacus's full backward hooks warn on every DP call when the input needs no gradient
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.batches[0], args, args.models[0])))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch threads: {torch.get_num_threads()}  CPUs: {os.cpu_count()}  load average before: {load}")
    print(f"n={args.n} random images 1x28x28, sgd lr 0.05; DP: noise 1.0, clip 1.0, q=B/n; "
          f"{args.steps} steps x {args.repeats} repeats, plain/DP interleaved (median s/step)")
    print(f"{'model':<7} {'batch':>5} {'phys':>5} {'plain s/step':>13} {'DP s/step':>10} {'ratio':>6} {'per-repeat':>10} "
          f"{'plain peak MiB':>15} {'DP peak MiB':>12} {'ratio':>6}")
    worst = 0.0
    for name, b in ((m, b) for m in args.models for b in args.batches):
        times = time_batch(b, args, name)
        plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
        mem = {mode: measure_memory(mode, b, args, name)["train_mib"] for mode in ("plain", "dp")}
        ratio = dp / plain
        paired = statistics.median(d / p for p, d in zip(times["plain"], times["dp"]))
        worst = max(worst, paired)
        mem_ratio = mem["dp"] / mem["plain"] if mem["plain"] > 0 else float("nan")
        print(f"{name:<7} {b:>5} {physical_batch(b, args.physical_batch):>5} {plain:>13.4f} {dp:>10.4f} {ratio:>5.2f}x {paired:>9.2f}x "
              f"{mem['plain']:>15.1f} {mem['dp']:>12.1f} {mem_ratio:>5.2f}x", flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average after: {load}")
    print(f"target DP <= {TARGET:.1f}x plain time per step: {'met' if worst <= TARGET else 'NOT met'} "
          f"(worst per-repeat ratio {worst:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
