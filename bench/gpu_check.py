"""GPU check (issue 16.7): a short ``medfed simulate`` study of each task on CUDA and on the CPU.

Studies, each on 2 synthetic sites: classification (``densenet121``, the largest classifier
Opacus takes) without and with DP-SGD (epsilon 8), U-Net segmentation in 2D (64 px) and 3D
(32^3 volumes), and the conditional GAN (generation). Every study runs on CUDA (3 rounds) and
then on the CPU (2 rounds, same local steps); printed per study and device: seconds for round 1
(CUDA start-up, cuDNN autotuning) and the median of the later rounds, the speedup of CUDA over
the CPU (later rounds), peak GPU memory (``torch.cuda.max_memory_allocated`` where the training
runs in the study's own process, and ``nvidia-smi``'s memory in use, all processes, above what
was in use before the study). Writes ``OUT/gpu_check.json``.

Mode: ``federated`` runs ``medfed simulate``, i.e. Flower's simulation engine (one Ray actor
per site, the sites sharing the GPU). ``inprocess`` runs the same study (the StudyConfig that
``medfed simulate`` builds from the same flags) through the real ServerApp loop and the real
ClientApp handlers, DP-SGD included, in one process, the sites one after the other
(``tests/inprocess_grid.py``): the device machine has no Ray, whose wheel alone is larger than
what travels there. (``medfed simulate --mode centralized`` is no substitute: it ignores
``--epsilon``.) ``auto`` (default): federated where Ray is installed, else inprocess.

    python bench/gpu_check.py run --out runs/gpu-check                   # CUDA, then the CPU references
    python bench/gpu_check.py run --devices cpu --rounds 2 --local-steps 2  # dry run without a GPU
    python bench/gpu_check.py fetch-wheels --dest .whl/gpu-check          # here: what the device machine lacks

``bench/gpu_check.sh`` runs it and fails at once when CUDA is asked for but absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

STUDY_TIMEOUT_S = 180.0
SITES = 2
CPU_PER_SITE = max(1, (os.cpu_count() or SITES) // SITES)
PEAK_TAG = "GPU_CHECK_TORCH_PEAK_MIB"
# medfed's dependencies that the device machine's image lacks, at the versions installed here
# (its python3 holds torch, numpy, scipy, matplotlib, pillow, pyyaml, httpx, typer, rich).
DEVICE_WHEELS = ("flwr", "monai", "opacus", "pydicom", "cryptography", "cffi", "pycparser", "pycryptodome",
                 "iterators", "grpcio", "grpcio-health-checking", "protobuf")
WHEEL_PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                   "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass(frozen=True)
class Study:
    name: str
    flags: tuple[str, ...]


STUDIES = (
    Study("classification", ("--task", "classification", "--model", "densenet121", "--batch-size", "32")),
    Study("classification-dp", ("--task", "classification", "--model", "densenet121", "--batch-size", "32",
                                "--epsilon", "8", "--delta", "1e-5")),
    Study("segmentation-2d", ("--task", "segmentation", "--model", "unet", "--batch-size", "16")),
    Study("segmentation-3d", ("--task", "segmentation", "--model", "unet", "--spatial-dims", "3",
                              "--batch-size", "4")),
    Study("generation", ("--task", "generation", "--batch-size", "32")),
)


class GpuMemorySampler(threading.Thread):
    """Peak ``memory.used`` (MiB) of GPU 0 from ``nvidia-smi`` every 0.5 s; None without nvidia-smi."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.baseline_mib = self._read()
        self.peak_mib = self.baseline_mib
        self._halt = threading.Event()

    @staticmethod
    def _read() -> float | None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        try:
            out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return float(out.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def run(self) -> None:
        while not self._halt.wait(0.5):
            value = self._read()
            if value is not None:
                self.peak_mib = max(self.peak_mib or 0.0, value)

    def stop(self) -> float | None:
        """The peak above the baseline, MiB."""
        self._halt.set()
        self.join(timeout=15)
        if self.peak_mib is None or self.baseline_mib is None:
            return None
        return self.peak_mib - self.baseline_mib


def child(argv: list[str]) -> int:
    """``medfed simulate ARGV`` (``--inprocess``: its study in this process); then torch's peak CUDA memory."""
    import torch

    inprocess = argv[:1] == ["--inprocess"]
    argv = argv[1:] if inprocess else argv
    if inprocess:
        from medfed.common.cli import build_parser, study_from_args
        from medfed.common.logs import setup_logging
        from medfed.server.federation import run_federated

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.inprocess_grid
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        from tests.inprocess_grid import InProcessGrid

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as the engine
        setup_logging()
        cfg = study_from_args(build_parser().parse_args(argv))
        run_federated(InProcessGrid(cfg.num_sites, cfg.to_dict()), cfg, simulation=True)
        rc = 0
    else:
        from medfed.common.cli import main as medfed_main

        rc = medfed_main(argv)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(f"{PEAK_TAG} {peak:.1f}", flush=True)
    return rc


def _torch_peak(log_text: str) -> float | None:
    lines = [line for line in log_text.splitlines() if line.startswith(PEAK_TAG)]
    return float(lines[-1].split()[1]) if lines else None


def run_study(study: Study, device: str, mode: str, rounds: int, steps: int, out: Path) -> dict:
    """One ``medfed simulate`` run in a child process; its per-round figures from metrics.jsonl."""
    run_dir = out / f"{study.name}-{device}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", *(["--inprocess"] if mode == "inprocess" else []),
           "simulate", *study.flags, "--sites", str(SITES), "--rounds", str(rounds), "--local-steps", str(steps),
           "--device", device, "--seed", "0", "--out", str(run_dir)]
    if mode == "federated":  # CUDA: the sites share the GPU; CPU: no GPU share, the cores split between the sites
        cmd += ["--site-gpus", f"{1 / SITES:g}"] if device == "cuda" else ["--site-gpus", "0", "--site-cpus",
                                                                           str(CPU_PER_SITE)]
    sampler = GpuMemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    log_path = out / f"{study.name}-{device}.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc: int | str = proc.wait(timeout=STUDY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            from medfed.common.process import stop_process_group

            stop_process_group(proc)  # the study and what it started (Ray), also outside its group
            rc = f"timeout after {STUDY_TIMEOUT_S:g} s"
    wall_s = time.perf_counter() - t0
    smi_mib = sampler.stop()
    metrics = run_dir / "metrics.jsonl"
    rounds_data = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    round_s = [r["time"]["round-s"] for r in rounds_data]
    trained = min((sum("train-s" in row for row in r["sites"].values()) for r in rounds_data), default=0)
    torch_mib = _torch_peak(log_path.read_text(errors="replace")) if mode == "inprocess" else None
    return {
        "study": study.name, "device": device, "mode": mode, "rounds": rounds, "local-steps": steps, "exit": rc,
        "wall-s": round(wall_s, 1), "rounds-done": len(rounds_data), "sites-trained": trained,
        "first-round-s": round(round_s[0], 2) if round_s else None,
        "round-s": round(statistics.median(round_s[1:] or round_s), 2) if round_s else None,
        "torch-peak-mib": None if torch_mib is None or device != "cuda" else round(torch_mib),
        "smi-peak-mib": None if smi_mib is None or device != "cuda" else round(smi_mib),
        "log": str(log_path),
    }


def _cell(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(results: list[dict]) -> None:
    print(f"{'study':<18} {'device':<6} {'rounds':>6} {'steps':>5} {'round 1 s':>9} {'round s':>8} "
          f"{'speedup':>8} {'torch MiB':>9} {'smi MiB':>8} {'exit':>5} {'wall s':>7}")
    later = {(r["study"], r["device"]): r["round-s"] for r in results}
    for r in results:
        cpu, gpu = later.get((r["study"], "cpu")), later.get((r["study"], "cuda"))
        speedup = f"{cpu / gpu:.1f}x" if r["device"] == "cuda" and cpu and gpu else "-"
        print(f"{r['study']:<18} {r['device']:<6} {r['rounds-done']:>3}/{r['rounds']:<2} {r['local-steps']:>5} "
              f"{_cell(r['first-round-s'], '.2f'):>9} {_cell(r['round-s'], '.2f'):>8} {speedup:>8} "
              f"{_cell(r['torch-peak-mib'], '.0f'):>9} {_cell(r['smi-peak-mib'], '.0f'):>8} {r['exit']!s:>5} "
              f"{r['wall-s']:>7.1f}", flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.local_steps < 1:
        raise SystemExit("--rounds and --local-steps must be at least 1")
    mode = args.mode if args.mode != "auto" else ("federated" if importlib.util.find_spec("ray") else "inprocess")
    args.out.mkdir(parents=True, exist_ok=True)
    if "cuda" in args.devices:
        import torch

        if not torch.cuda.is_available():
            print(f"FAIL: --devices cuda but torch {torch.__version__} sees no CUDA device (a CPU-only torch "
                  "wheel, no driver, or CUDA_VISIBLE_DEVICES hides it); use --devices cpu for a dry run",
                  file=sys.stderr)
            return 2
        print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"mode {mode}, {SITES} sites; CUDA {args.rounds} rounds, CPU {min(2, args.rounds)} rounds, "
          f"{args.local_steps} local steps a round", flush=True)
    start = time.perf_counter()
    results = []
    for device in args.devices:  # every CUDA study first: the CPU references are what a short budget drops
        for study in (s for s in STUDIES if s.name in args.studies):
            rounds = args.rounds if device == "cuda" or args.devices == ["cpu"] else min(2, args.rounds)
            if device == "cpu" and "cuda" in args.devices and time.perf_counter() - start > args.budget:
                print(f"skipped: {study.name} on the CPU (past the {args.budget:g} s budget)", flush=True)
                continue
            print(f"running {study.name} on {device}: {rounds} rounds x {args.local_steps} local steps", flush=True)
            results.append(run_study(study, device, mode, rounds, args.local_steps, args.out))
    print()
    print_table(results)
    print(f"total {time.perf_counter() - start:.0f} s; logs and run directories in {args.out}")
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = [f"{r['study']} on {r['device']}" for r in results
              if r["exit"] != 0 or r["rounds-done"] != r["rounds"] or r["sites-trained"] < SITES]
    if failed:
        print(f"FAIL: {', '.join(failed)}: not every round finished with all {SITES} sites trained; see the logs",
              file=sys.stderr)
        return 1
    return 0


def cmd_fetch_wheels(args: argparse.Namespace) -> int:
    """Download (here, where pip reaches a registry) the wheels the device machine's python lacks."""
    args.dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in DEVICE_WHEELS]
    platforms = [flag for p in WHEEL_PLATFORMS for flag in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           args.python_version, "--implementation", "cp", *platforms, "-d", str(args.dest), *pins]
    rc = subprocess.run(cmd, check=False).returncode
    size = sum(p.stat().st_size for p in args.dest.glob("*.whl")) / 2**20
    print(f"{len(list(args.dest.glob('*.whl')))} wheels, {size:.1f} MiB in {args.dest}")
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        return child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the studies on CUDA and/or the CPU")
    run.add_argument("--devices", nargs="+", default=["cuda", "cpu"], choices=("cuda", "cpu"))
    run.add_argument("--mode", default="auto", choices=("auto", "federated", "inprocess"))
    run.add_argument("--rounds", type=int, default=3, help="rounds on CUDA (default 3); the CPU runs 2")
    run.add_argument("--local-steps", type=int, default=10, help="local steps per site and round (default 10)")
    run.add_argument("--studies", nargs="+", default=[s.name for s in STUDIES], choices=[s.name for s in STUDIES])
    run.add_argument("--budget", type=float, default=270.0, help="seconds; CPU references left then are skipped")
    run.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    run.set_defaults(func=cmd_run)
    fetch = sub.add_parser("fetch-wheels", help="download the wheels the device machine lacks")
    fetch.add_argument("--dest", type=Path, default=Path(".whl/gpu-check"))
    fetch.add_argument("--python-version", default="3.12", help="the device machine's python (default 3.12)")
    fetch.set_defaults(func=cmd_fetch_wheels)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
