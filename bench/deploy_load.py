"""Load of a real deployment: a SuperLink and N SuperNodes on 127.0.0.1, a few rounds.

Starts a LocalDeployment (insecure by default, ``--tls`` for TLS + site authentication),
runs a study on synthetic data with a few local steps, and meanwhile samples the memory of
every process it started (SuperLink, SuperExecs, ServerApp, SuperNodes, ClientApps) from
/proc (Linux). Prints the per-round time, the replies per round (sites that trained and that evaluated),
the SuperLink's "database is locked" and HTTP 500 lines, and the peak summed RSS and PSS
per process kind, and writes them to ``OUT/deploy_load.json``. Exits 1 unless every site
answered both phases of every round (issue 16.5: no reply may be lost at 10-20 sites).

    OMP_NUM_THREADS=1 python bench/deploy_load.py --sites 20 --rounds 5 --out runs/deploy_load

It also prints how the memory of the long-lived processes (the warm worker's template, the
site launcher, SuperNode, SuperLink) changed from early in the study to its end: over 100
rounds, ``--sites 2 --rounds 100 --local-steps 1``, a worker's RSS must not grow (issue 16.1).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

from medfed.common.process import descendants
from medfed.simulations.loopback import LocalDeployment

log = logging.getLogger(__name__)

LONG_LIVED = ("warm-template", "site-launcher", "supernode", "superlink", "superexec")

WARM = "medfed.client.app_runner task --warm"  # the warm worker's template; the tasks it forks keep its command line
KINDS = (  # (command-line fragment, kind), first match wins: the site launcher's command names the SuperNode too
    ("medfed.common.guard", "guard"),  # medfed's guard around each daemon: its command line names the daemon too
    (WARM, "warm-template"),
    ("medfed.client.app_runner task", "clientapp"), ("medfed.client.app_runner launcher", "site-launcher"),
    ("flower-superlink", "superlink"), ("flower-supernode", "supernode"), ("flower-superexec", "superexec"),
    ("flwr-serverapp", "serverapp"), ("flwr-clientapp", "clientapp"),
)


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _kind(pid: int) -> str | None:
    cmd = _cmdline(pid)
    if cmd is None:
        return None
    kind = next((kind for fragment, kind in KINDS if fragment in cmd), "other")
    if kind == "warm-template" and WARM in (_cmdline(_parent(pid)) or ""):
        return "clientapp"  # a task the template forked
    return kind


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB; (0, 0) when it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.split()[1:2]}
    return values.get("Rss", 0), values.get("Pss", 0)


class MemorySampler(threading.Thread):
    """Every ``interval`` s, sum RSS and PSS of the deployment's processes by kind; keep the peaks."""

    def __init__(self, roots: callable, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.peak: dict[str, dict[str, float]] = defaultdict(lambda: {"rss-mb": 0.0, "pss-mb": 0.0, "count": 0})
        self.peak_total = {"rss-mb": 0.0, "pss-mb": 0.0, "processes": 0}
        self.samples = 0
        self.series: dict[str, list[tuple[float, float]]] = defaultdict(list)  # kind -> (t, mean RSS MB per process)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            pids = {pid for root in self.roots() for pid in (root, *descendants(root))}
            by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
            for pid in pids:
                kind = _kind(pid)
                if kind is None:
                    continue
                rss, pss = _memory_kb(pid)
                acc = by_kind[kind]
                acc[0] += rss / 1024
                acc[1] += pss / 1024
                acc[2] += 1
            now = time.monotonic()
            for kind, (rss, pss, count) in by_kind.items():
                self.series[kind].append((now, rss / max(count, 1)))
                peak = self.peak[kind]
                peak["rss-mb"], peak["pss-mb"] = max(peak["rss-mb"], rss), max(peak["pss-mb"], pss)
                peak["count"] = max(peak["count"], count)
            rss_total = sum(v[0] for v in by_kind.values())
            pss_total = sum(v[1] for v in by_kind.values())
            if pss_total > self.peak_total["pss-mb"]:
                self.peak_total = {"rss-mb": rss_total, "pss-mb": pss_total, "processes": len(pids)}
            self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def growth(self, kinds: tuple[str, ...] = LONG_LIVED) -> dict[str, dict[str, float]]:
        """Per long-lived process kind: mean RSS per process early in the study (the median of the
        samples between 10 % and 20 % of it: imports and first rounds done) and at its end (the
        median of the last 10 %), and the difference."""
        out = {}
        for kind in kinds:
            samples = self.series.get(kind, [])
            if len(samples) < 10:
                continue
            t0, t1 = samples[0][0], samples[-1][0]
            early = [v for t, v in samples if t0 + 0.1 * (t1 - t0) <= t <= t0 + 0.2 * (t1 - t0)]
            late = [v for t, v in samples if t >= t0 + 0.9 * (t1 - t0)]
            if early and late:
                start, end = statistics.median(early), statistics.median(late)
                out[kind] = {"start-rss-mb": round(start, 1), "end-rss-mb": round(end, 1),
                             "growth-mb": round(end - start, 1)}
        return out


def round_figures(rounds: list[dict]) -> dict[str, list]:
    """Per round: times, quorum, failures and the number of sites whose train / evaluate reply arrived."""
    return {
        "round-s": [round(r["time"]["round-s"], 1) for r in rounds],
        "train-s": [round(r["time"]["train-s"], 1) for r in rounds],
        "evaluate-s": [round(r["time"]["evaluate-s"], 1) for r in rounds],
        "bytes-sent": [r.get("bytes", {}).get("sent") for r in rounds],
        "quorum": [r.get("quorum") for r in rounds],
        "failures": [[f["reason"][:120] for f in r["failures"]] for r in rounds],
        "sites-trained": [sum("train-loss" in row for row in r["sites"].values()) for r in rounds],
        "sites-evaluated": [sum("test-num-examples" in row or "val-num-examples" in row for row in r["sites"].values())
                            for r in rounds],
    }


def superlink_errors(log_path: Path) -> dict[str, int]:
    """How often the SuperLink's log says "database is locked" and answered HTTP 500."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    return {"database-is-locked": text.count("database is locked"), "http-500": text.count('HTTP/1.1" 500')}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--min-sites", type=int, default=None, help="k of k-of-n rounds (default: all sites)")
    parser.add_argument("--round-timeout", type=float, default=300.0, help="seconds a phase waits for replies")
    parser.add_argument("--tls", action="store_true", help="TLS + SuperNode authentication (default: insecure)")
    parser.add_argument("--out", type=Path, default=Path("runs/deploy_load"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dep = LocalDeployment(args.out.resolve() / "dep", sites=args.sites, insecure=not args.tls)
    t0 = time.perf_counter()
    with dep:
        startup_s = time.perf_counter() - t0
        sampler = MemorySampler(lambda: [p.pid for p in dep._procs])
        sampler.start()
        t1 = time.perf_counter()
        study = {"local-steps": args.local_steps, "batch-size": 16, "min-sites": args.min_sites or args.sites,
                 "round-timeout": args.round_timeout}
        error = None
        try:
            dep.run_study(args.rounds, study, out_dir="runs/load", timeout=(2 * args.rounds + 2) * args.round_timeout)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - report what was measured so far
            error = f"{type(exc).__name__}: {exc}"
        study_s = time.perf_counter() - t1
        sampler.stop()
    metrics = dep.state_dir / "runs/load/metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    rounds = [json.loads(line) for line in lines if line.strip()]
    figures = round_figures(rounds)
    every_reply = (error is None and len(rounds) == args.rounds
                   and all(n == args.sites for n in figures["sites-trained"] + figures["sites-evaluated"]))
    result = {
        "sites": args.sites, "rounds": args.rounds, "local-steps": args.local_steps, "tls": args.tls,
        "startup-s": round(startup_s, 1), "study-s": round(study_s, 1),
        **figures,
        "every-reply-arrived": every_reply,
        "superlink-errors": superlink_errors(dep.base / "superlink.log"),
        "peak-memory-by-kind": {k: {m: round(v, 1) for m, v in d.items()} for k, d in sorted(sampler.peak.items())},
        "peak-memory-total": {k: round(v, 1) for k, v in sampler.peak_total.items()},
        "rss-growth": sampler.growth(),
        "samples": sampler.samples,
        "error": error,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_load.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s", json.dumps(result, indent=2))
    for i, seconds in enumerate(figures["round-s"], start=1):
        log.info("round %d: %.1f s, %d/%d sites trained, %d/%d evaluated", i, seconds,
                 figures["sites-trained"][i - 1], args.sites, figures["sites-evaluated"][i - 1], args.sites)
    for kind, g in result["rss-growth"].items():
        log.info("%s: RSS %.1f MB per process early, %.1f MB at the end (%+.1f MB)", kind, g["start-rss-mb"],
                 g["end-rss-mb"], g["growth-mb"])
    log.info("peak memory %.0f MB PSS (%.0f MB RSS) in %d processes; SuperLink: %s; every reply arrived: %s",
             result["peak-memory-total"]["pss-mb"], result["peak-memory-total"]["rss-mb"],
             result["peak-memory-total"]["processes"], result["superlink-errors"], every_reply)
    return 0 if every_reply else 1


if __name__ == "__main__":
    raise SystemExit(main())
