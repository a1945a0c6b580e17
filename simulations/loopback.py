"""The real deployment topology on one machine: a SuperLink and N SuperNodes on 127.0.0.1.

Used by the deployment end-to-end tests and ``bench/fl_overhead.py`` (part c), and handy
to try a deployment before installing it at hospitals. Every process runs in its own
session and is stopped, with all its descendants, when the context exits, also after
an error.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from medfed.common.certs import create_ca, create_server_cert, create_site_keys

log = logging.getLogger(__name__)

RUN_TIMEOUT_S = 900.0


def run_config_string(mapping: dict[str, Any]) -> str:
    """Flower's ``--run-config`` syntax: ``k=v`` pairs, strings quoted."""
    parts = []
    for key, value in mapping.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = "'" + str(value).replace("'", "") + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


@dataclass
class LocalDeployment:
    """SuperLink + ``sites`` SuperNodes on loopback; TLS + site authentication unless insecure.

    ``data``: a MedMNIST ``.npz`` file, each site holding one IID shard of it; ``None``
    gives each site one shard of the synthetic dataset. Like a real coordinator the server
    holds no data: its test metrics are the pool of the sites'. ``server_data=True`` hands it
    ``data`` as well (``data-path`` in the run config), for central evaluation on the same file.
    """

    base: Path
    data: Path | None = None
    sites: int = 2
    insecure: bool = False
    server_data: bool = False
    server: str = ""
    root_cert: Path | None = None
    site_ids: list[str] = field(default_factory=list)
    _procs: list[Any] = field(default_factory=list)
    _logs: list[Path] = field(default_factory=list)
    _sites: dict[str, Any] = field(default_factory=dict)  # site id -> its SuperNode process
    _superlink: Any = None  # the SuperLink process and its deploy config, for kill/restart
    _server_cfg: Any = None

    @property
    def state_dir(self) -> Path:
        return self.base / "server"

    def __enter__(self) -> LocalDeployment:
        from medfed.common.process import free_port
        from medfed.server.deploy import (
            ServerDeployConfig,
            register_site,
            start_superlink,
        )

        self.base.mkdir(parents=True, exist_ok=True)
        certs = self.base / "certs"
        try:
            if not self.insecure:
                create_ca(self.base / "certs-ca")  # the CA key stays out of the folder the server reads
                create_server_cert(certs, self.base / "certs-ca", ["127.0.0.1", "localhost"])
                self.root_cert = certs / "ca.crt"
            cfg = ServerDeployConfig(
                state_dir=self.state_dir, certs_dir=None if self.insecure else certs,
                port=free_port(), insecure=self.insecure, enable_site_auth=not self.insecure,
            )
            self.server = cfg.address
            self._logs.append(self.base / "superlink.log")
            self._server_cfg = cfg
            self._superlink = start_superlink(cfg, log_path=self._logs[-1])
            self._procs.append(self._superlink)
            for index in range(self.sites):
                site_id = f"site-{chr(ord('a') + index)}"
                if not self.insecure:
                    keys = create_site_keys(self.base / "keys", site_id)
                    register_site(self.server, keys.public_key, root_cert=self.root_cert, name=site_id)
                self._site_yaml(site_id, index)
                self._logs.append(self.base / f"{site_id}.log")
                self._start_site(site_id)
                self.site_ids.append(site_id)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_site(self, site_id: str) -> None:
        from medfed.client.daemon import load_site_yaml, start_supernode

        proc = start_supernode(load_site_yaml(self.base / f"{site_id}.yaml"), insecure=self.insecure,
                               log_path=self.base / f"{site_id}.log", env=self._thread_env())
        self._procs.append(proc)
        self._sites[site_id] = proc

    def restart_sites(self) -> None:
        """Kill every site's SuperNode (and its ClientApps), then start each again from its site.yaml."""
        from medfed.common.process import stop_process_group

        for site_id, proc in list(self._sites.items()):
            stop_process_group(proc)
            self._procs.remove(proc)
            self._start_site(site_id)

    def kill_site(self, site_id: str) -> None:
        """SIGKILL one site's SuperNode, its process group and its ClientApps, as a crash or power cut would."""
        from medfed.common.process import stop_process_group

        proc = self._sites.pop(site_id)
        self._procs.remove(proc)
        stop_process_group(proc, crash=True)

    def start_site(self, site_id: str) -> None:
        """Start one site (killed or stopped before) again from its site.yaml and state dir."""
        if site_id in self._sites:
            raise ValueError(f"{site_id} is running: kill_site({site_id!r}) first")
        self._start_site(site_id)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink with its SuperExec and ServerApp; its state dir (superlink.db) stays."""
        from medfed.common.process import stop_process_group

        self._procs.remove(self._superlink)
        stop_process_group(self._superlink, crash=True)
        self._superlink = None

    def restart_superlink(self) -> None:
        """Start the SuperLink again on the same address with the same state dir; sites reconnect."""
        from medfed.server.deploy import start_superlink

        if self._superlink is not None:
            raise ValueError("the SuperLink is running: kill_superlink() first")
        self._superlink = start_superlink(self._server_cfg, log_path=self.base / "superlink.log")
        self._procs.insert(0, self._superlink)

    def _thread_env(self) -> dict[str, str]:
        """Give each site its share of this machine's cores, as if it were its own host.

        Two sites' ClientApps training at once with all cores each oversubscribe the CPU
        (OpenMP threads spin on each other) and run several times slower.
        """
        import os

        threads = str(max(1, (os.cpu_count() or 1) // max(1, self.sites)))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def _site_yaml(self, site_id: str, index: int) -> Path:
        lines = [f"site-id: {site_id}", f"state-dir: {site_id}/state", f"server: '{self.server}'",
                 "task: classification", f"shard-index: {index}", f"shard-count: {self.sites}",
                 "clientappio-port: 0"]
        if self.data is not None:
            lines += [f"data-root: '{self.data.resolve().parent}'", "dataset: medmnist",
                      f"data-file: '{self.data.name}'"]
        else:
            lines += [f"data-root: {site_id}/data", "dataset: synthetic"]
        if not self.insecure:
            lines += ["root-cert: certs/ca.crt", f"auth-key: keys/{site_id}.key"]
        path = self.base / f"{site_id}.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def run_study(self, rounds: int = 2, extra: dict[str, Any] | None = None,
                  out_dir: str = "runs/study", timeout: float = RUN_TIMEOUT_S) -> Path:
        """Submit the medfed app with ``medfed run`` semantics; returns the run directory of a completed study."""
        from medfed.common.errors import MedfedError
        from medfed.server.submit import RUN_COMPLETED, run_exit

        result = self.submit_study(rounds, extra, out_dir, timeout)
        if result.status != RUN_COMPLETED:
            raise MedfedError(f"{run_exit(result)[1]} (see `flwr log {result.run_id}`)")
        return self.state_dir / out_dir

    def submit_study(self, rounds: int = 2, extra: dict[str, Any] | None = None,
                     out_dir: str = "runs/study", timeout: float = RUN_TIMEOUT_S) -> Any:
        """Submit and wait, whatever the outcome; returns the finished run's :class:`RunResult`."""
        from medfed.server.submit import submit_run

        return submit_run(self.server, insecure=self.insecure, root_cert=self.root_cert,
                          run_config=self.study_config(rounds, extra, out_dir), wait=True, timeout=timeout)

    def study_config(self, rounds: int, extra: dict[str, Any] | None, out_dir: str) -> str:
        """The ``--run-config`` string of a study on these sites (the server holds no data: see ``server_data``)."""
        config: dict[str, Any] = {"num-server-rounds": rounds, "num-sites": self.sites,
                                  "min-sites": self.sites, "out-dir": out_dir}
        if self.data is not None and self.server_data:
            config.update({"dataset": "medmnist", "data-path": str(self.data.resolve())})
        config.update(extra or {})
        return run_config_string(config)

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for path in self._logs:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> list[int]:
        """Stop every process started here (and descendants); returns PIDs still alive."""
        from medfed.common.process import descendants, is_alive, stop_process_group

        everything = {pid for p in self._procs for pid in (p.pid, *descendants(p.pid))}
        for proc in reversed(self._procs):
            stop_process_group(proc)
        self._procs.clear()
        return [pid for pid in everything if is_alive(pid)]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        leftovers = self.stop()
        if leftovers:
            log.error("processes still running after stop: %s", shlex.join(map(str, leftovers)))

