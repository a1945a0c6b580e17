"""Scale of a simulation: per-round time and peak memory at 10, 30 and 100 sites. Prints a table.

Each size runs ``medfed simulate`` (PneumoniaMNIST split iid, a few local steps per round)
as a child process. Every ``--interval`` seconds this script sums the memory of that process
and of every process below it: the Ray processes the driver starts (GCS, raylet, agents) and
the ClientApp actors. Reported per size:

- round time: the first round (Ray starts the actors then) and the median of the others,
  from the run's ``metrics.jsonl``;
- peak RSS: the largest sum of resident memory over the tree (counts shared pages, such as
  the torch libraries every actor maps, once per process: an upper bound);
- peak PSS: the same with each shared page divided among the processes mapping it (a fair
  total; Linux only);
- actors: the most ClientApp actor processes alive at once (Flower creates one actor per
  ``site-cpus`` CPUs of the cluster, whatever the number of sites).

Usage:
    OMP_NUM_THREADS=1 python bench/scale.py [--sites 10,30,100] [--rounds 3] [--local-steps 2]
        [--site-cpus N] [--data PNEUMONIAMNIST.npz] [--out runs/scale]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MEDFED_SHARED_DATA", REPO.parent / "shared" / "data")) / (
    "pneumoniamnist/pneumoniamnist.npz"
)
ACTOR_TITLE = "ray::ClientAppActor"
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    rss: int = 0  # bytes
    pss: int = 0
    processes: int = 0
    actors: int = 0


@dataclass
class Result:
    sites: int
    rounds: int
    first_round_s: float
    median_round_s: float
    wall_s: float
    peak_rss_gb: float
    peak_pss_gb: float
    peak_processes: int
    peak_actors: int


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(root: int) -> list[int]:
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _memory(pid: int) -> tuple[int, int, str] | None:
    """(RSS, PSS, command line) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm", encoding="utf-8") as fh:
            rss = int(fh.read().split()[1]) * PAGE
        pss = rss
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass  # no smaps_rollup (old kernel): PSS reads as RSS
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return rss, pss, cmdline


def sample_tree(root: int) -> Sample:
    """Memory of ``root`` and all its descendants now (psutil when installed, /proc otherwise)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    s = Sample()
    if psutil is not None:
        try:
            top = psutil.Process(root)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return s
        for p in procs:
            try:
                info = p.memory_full_info()
                s.rss += info.rss
                s.pss += getattr(info, "pss", info.rss)
                s.processes += 1
                s.actors += " ".join(p.cmdline()).startswith(ACTOR_TITLE)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return s
    for pid in _tree(root):
        mem = _memory(pid)
        if mem is None:
            continue
        s.rss += mem[0]
        s.pss += mem[1]
        s.processes += 1
        s.actors += mem[2].startswith(ACTOR_TITLE)
    return s


class PeakSampler(threading.Thread):
    """Samples a process tree every ``interval`` seconds until stopped; keeps the peaks."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak = Sample()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            s = sample_tree(self.root)
            self.peak = Sample(max(self.peak.rss, s.rss), max(self.peak.pss, s.pss),
                               max(self.peak.processes, s.processes), max(self.peak.actors, s.actors))
            self._stop_event.wait(self.interval)

    def stop(self) -> Sample:
        self._stop_event.set()
        self.join()
        return self.peak


def run_size(sites: int, args: argparse.Namespace) -> Result:
    out = Path(args.out).resolve() / f"sites-{sites}"
    cmd = [sys.executable, "-m", "medfed.common.cli", "simulate", "--data", str(args.data), "--partition", "iid",
           "--sites", str(sites), "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
           "--seed", "0", "--out", str(out)]
    if args.site_cpus:
        cmd += ["--site-cpus", str(args.site_cpus)]
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"sites-{sites}.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        sampler = PeakSampler(proc.pid, args.interval)
        sampler.start()
        code = proc.wait()
        peak = sampler.stop()
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"medfed simulate with {sites} sites failed ({code}): see {log_path}")
    times = [json.loads(line)["time"]["round-s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    rest = times[1:] or times
    return Result(sites, len(times), times[0], statistics.median(rest), wall, peak.rss / 1e9, peak.pss / 1e9,
                  peak.processes, peak.actors)


def format_table(results: list[Result]) -> str:
    head = ("sites", "rounds", "round 1 s", "round s (median 2..)", "wall s", "peak RSS GB", "peak PSS GB",
            "processes", "actors")
    rows = [(str(r.sites), str(r.rounds), f"{r.first_round_s:.1f}", f"{r.median_round_s:.1f}", f"{r.wall_s:.0f}",
             f"{r.peak_rss_gb:.2f}", f"{r.peak_pss_gb:.2f}", str(r.peak_processes), str(r.peak_actors))
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", default="10,30,100", help="comma-separated site counts (default 10,30,100)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--site-cpus", type=float, default=0.0, help="CPUs per site actor (default: medfed's, 2)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", default=str(REPO / "runs" / "scale"))
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    args = p.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: give --data PNEUMONIAMNIST.npz")
    results = []
    for sites in (int(s) for s in args.sites.split(",")):
        results.append(run_size(sites, args))
        sys.stdout.write(f"{sites} sites done: {asdict(results[-1])}\n")
        sys.stdout.flush()
    table = format_table(results)
    meta = (f"PneumoniaMNIST iid, {args.rounds} rounds, {args.local_steps} local steps, "
            f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    (Path(args.out) / "scale.json").write_text(json.dumps({"setup": meta, "results": [asdict(r) for r in results]},
                                                          indent=1))
    sys.stdout.write(f"{meta}\n{table}\n")


if __name__ == "__main__":
    main()
