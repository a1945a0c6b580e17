"""The container and Kubernetes manifests in deploy/ hold together, without Docker or a cluster.

Every file is parsed (``yaml.safe_load_all``; the Dockerfile with a small line parser) and
cross-checked: each ``medfed ...`` command a container runs parses with medfed's real
argparse parser; the server.yaml/site.yaml it names is a file shipped in deploy/ (found by
mapping the container path back through the mounts) and loads with ``load_server_yaml`` /
``load_site_yaml``; ports agree (server.yaml = container port = Service/published port);
site data is mounted read-only, state sits on persistent volumes, keys and certificates on
read-only mounts; referenced Secrets, ConfigMaps, claims and volumes exist; no ``latest``
tags and no ``--insecure``. The flags medfed hands to ``flower-superlink`` and
``flower-supernode`` are parsed by the installed Flower's own argument parsers.

The validators collect every problem and the tests assert the list is empty; broken copies
of the manifests show that each rule can fail.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import json
import re
import shlex
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from medfed.client.daemon import SiteDaemonConfig, load_site_yaml, supernode_command
from medfed.common.errors import ConfigError
from medfed.server.deploy import ServerDeployConfig, load_server_yaml, superlink_command

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
README = DEPLOY / "README.md"
ENTRYPOINT = ["medfed"]
PERSISTENT = ("volume", "pvc")  # compose named volume, Kubernetes PersistentVolumeClaim
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")


# --------------------------------------------------------------------------- shared checks
@dataclass(frozen=True)
class Mount:
    """One path a container sees: where it comes from and whether it is read-only."""

    target: PurePosixPath
    kind: str  # bind | volume | pvc | secret | configmap | emptydir
    source: str  # host path (bind) or the volume / claim / Secret / ConfigMap name
    read_only: bool
    data: Mapping[str, str] | None = None  # files of a Secret / ConfigMap
    provisioned: bool = False  # an emptyDir an init container fills
    shipped: bool = False  # a bind mount of a file in the deploy/ folder


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    commands: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (where, medfed argv)
    server: tuple[str, int] | None = None  # (name sites dial, port)
    site_ids: dict[str, str] = field(default_factory=dict)  # site-id -> where
    registered: set[str] = field(default_factory=set)
    state_sources: dict[str, str] = field(default_factory=dict)  # persistent volume -> where


@lru_cache(maxsize=1)
def _medfed_parser() -> Any:
    from medfed.common.cli import build_parser

    return build_parser()


def parse_medfed(argv: list[str]) -> Any:
    """Parse ``medfed ARGV`` with the real CLI parser; None for ``--help``; ValueError when refused."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return _medfed_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            return None
        raise ValueError(f"`medfed {shlex.join(argv)}` is refused by medfed's parser: {err.getvalue().strip()}") from None


def find_mount(mounts: Iterable[Mount], path: str | Path) -> Mount | None:
    p = PurePosixPath(str(path))
    hits = [m for m in mounts if p == m.target or m.target in p.parents]
    return max(hits, key=lambda m: len(m.target.parts), default=None)


def mounted_file_problems(where: str, what: str, path: Any, mounts: list[Mount]) -> list[str]:
    """A certificate / key a container reads: on a read-only mount that holds it."""
    m = find_mount(mounts, path)
    if m is None:
        return [f"{where}: {what} {path} is on no mounted volume"]
    problems = []
    if not m.read_only:
        problems.append(f"{where}: {what} {path} is on a writable mount ({m.kind} {m.source}): mount it read-only")
    rel = str(PurePosixPath(str(path)).relative_to(m.target))
    if m.data is not None and rel not in m.data:
        problems.append(f"{where}: {what} {path}: {m.kind} {m.source} has no key {rel!r} (keys: {sorted(m.data)})")
    if m.kind == "emptydir" and not m.provisioned:
        problems.append(f"{where}: {what} {path} is on an emptyDir no init container fills")
    if m.kind in PERSISTENT:
        problems.append(f"{where}: {what} {path} is on the state volume {m.source}: mount it from a Secret or host file")
    return problems


def mounted_text(path: Any, mounts: list[Mount]) -> str:
    """The text of a config file a container reads, from the repo file or ConfigMap behind the mount."""
    m = find_mount(mounts, path)
    if m is None:
        raise ValueError(f"config {path} is on no mounted volume")
    rel = PurePosixPath(str(path)).relative_to(m.target)
    if m.kind == "bind":
        host = Path(m.source) / rel
        if not m.shipped:
            raise ValueError(f"config {path} is mounted from {host}, not from a file shipped in deploy/")
        if not host.is_file():
            raise ValueError(f"config {path} is mounted from {host}, which does not exist")
        return host.read_text(encoding="utf-8")
    if m.kind == "configmap" and m.data is not None and str(rel) in m.data:
        return m.data[str(rel)]
    raise ValueError(f"config {path} is not a file of a ConfigMap or of deploy/ (it is on {m.kind} {m.source})")


def load_mounted(path: Any, mounts: list[Mount], loader: Callable[[Path], Any]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / PurePosixPath(str(path)).name
        local.write_text(mounted_text(path, mounts), encoding="utf-8")
        return loader(local)


def image_problems(where: str, image: Any) -> list[str]:
    if not isinstance(image, str) or not image:
        return [f"{where}: no image"]
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if not tag or tag == "latest":
        return [f"{where}: image {image!r} needs an explicit version tag, not latest"]
    return []


def state_problems(r: Report, where: str, what: str, path: Any, mounts: list[Mount]) -> None:
    m = find_mount(mounts, path)
    if m is None or m.kind not in PERSISTENT:
        r.problems.append(f"{where}: {what} {path} is not on a persistent volume (named volume / PVC): it would be lost")
        return
    if m.read_only:
        r.problems.append(f"{where}: {what} {path} is on a read-only mount")
    other = r.state_sources.setdefault(m.source, where)
    if other != where:
        r.problems.append(f"{where}: state volume {m.source} is also used by {other}")


def check_medfed_command(r: Report, where: str, argv: list[str], mounts: list[Mount]) -> Any:
    """Parse one medfed command; check what it names against the mounts. Returns (role, config)."""
    r.commands.append((where, tuple(argv)))
    if "--insecure" in argv:
        r.problems.append(f"{where}: `medfed {shlex.join(argv)}` turns TLS off (--insecure)")
    try:
        ns = parse_medfed(argv)
    except ValueError as exc:
        r.problems.append(f"{where}: {exc}")
        return None, None
    if ns is None:
        return "help", None
    role = (ns.command, getattr(ns, "server_cmd", None) or getattr(ns, "site_cmd", None))
    try:
        if role == ("server", "start"):
            cfg = load_mounted(ns.config, mounts, load_server_yaml)
            check_server_config(r, where, cfg, mounts)
            return role, cfg
        if role == ("site", "start"):
            cfg = load_mounted(ns.config, mounts, load_site_yaml)
            check_site_config(r, where, cfg, mounts)
            return role, cfg
    except (ValueError, ConfigError) as exc:
        r.problems.append(f"{where}: {exc}")
        return role, None
    if role == ("server", "register-site"):
        r.problems += mounted_file_problems(where, "public key", ns.public_key, mounts)
        r.problems += mounted_file_problems(where, "root-cert", ns.root_cert, mounts)
        if PurePosixPath(str(ns.public_key)).name != f"{ns.name}.pub":
            r.problems.append(f"{where}: registers {ns.public_key} under the name {ns.name!r}: use the site-id")
        r.registered.add(ns.name)
        check_server_address(r, where, ns.server)
    elif ns.command == "run":
        from flwr.common.config import parse_config_args

        from medfed.common.config import StudyConfig

        r.problems += mounted_file_problems(where, "root-cert", ns.root_cert, mounts)
        check_server_address(r, where, ns.server)
        unknown = set(parse_config_args([ns.run_config] if ns.run_config else [])) - set(StudyConfig().to_dict())
        if unknown:
            r.problems.append(f"{where}: --run-config keys {sorted(unknown)} are not StudyConfig keys")
    return role, None


def check_server_address(r: Report, where: str, address: str) -> None:
    if r.server is None:
        r.problems.append(f"{where}: dials {address} but no container runs `medfed server start`")
    elif address != f"{r.server[0]}:{r.server[1]}":
        r.problems.append(f"{where}: dials {address}, the server is {r.server[0]}:{r.server[1]}")


def check_server_config(r: Report, where: str, cfg: ServerDeployConfig, mounts: list[Mount]) -> None:
    if cfg.host not in ("0.0.0.0", "::"):
        r.problems.append(f"{where}: server.yaml host {cfg.host}: a container must listen on 0.0.0.0")
    if not cfg.enable_site_auth:
        r.problems.append(f"{where}: server.yaml must set enable-site-auth: true")
    for name, path in zip(("ca.crt", "server.crt", "server.key"), cfg.tls_files):
        r.problems += mounted_file_problems(where, name, path, mounts)
    state_problems(r, where, "state-dir", cfg.state_dir, mounts)


def check_site_config(r: Report, where: str, cfg: SiteDaemonConfig, mounts: list[Mount]) -> None:
    data = find_mount(mounts, cfg.data_root)
    if data is None or not data.read_only:
        r.problems.append(f"{where}: data-root {cfg.data_root} must be a read-only mount of the site's data")
    state_problems(r, where, "state-dir", cfg.state_dir, mounts)
    if cfg.root_cert is None or cfg.auth_key is None:
        r.problems.append(f"{where}: site.yaml needs root-cert (TLS) and auth-key (site authentication)")
    else:
        r.problems += mounted_file_problems(where, "root-cert", cfg.root_cert, mounts)
        r.problems += mounted_file_problems(where, "auth-key", cfg.auth_key, mounts)
    if cfg.clientappio_port == 0:
        r.problems.append(f"{where}: give clientappio-port a fixed value inside a container")
    other = r.site_ids.setdefault(cfg.site_id, where)
    if other != where:
        r.problems.append(f"{where}: site-id {cfg.site_id} is also used by {other}")
    check_server_address(r, where, cfg.server)


def check_all_registered(r: Report) -> None:
    missing = sorted(set(r.site_ids) - r.registered)
    if missing:
        r.problems.append(f"no register-site command for site(s) {missing}")


def insecure_problems(where: str, docs: Any) -> list[str]:
    """Comments aside, the text must never mention --insecure."""
    return [f"{where}: contains --insecure"] if "--insecure" in json.dumps(docs) else []


def _role_order(argv: Any) -> int:
    """Process the server first: sites and one-shot jobs are checked against its address."""
    return 0 if list(argv or [])[:2] == ["server", "start"] else 1


# --------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            allowed = neg
    return allowed


def dockerignore_patterns(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def check_dockerfile(text: str, ignore: list[str]) -> Report:
    r = Report()
    instrs = dockerfile_instructions(text)
    args = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    froms = [rest for word, rest in instrs if word == "FROM"]
    if not froms:
        r.problems.append("Dockerfile: no FROM")
    for rest in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), rest.split()[0])
        if image not in {f.split()[-1] for f in froms if " AS " in f.upper()}:
            r.problems += image_problems("Dockerfile FROM", image)
    final = instrs[max(i for i, (w, _) in enumerate(instrs) if w == "FROM"):] if froms else instrs
    users = [rest for word, rest in final if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        r.problems.append("Dockerfile: the final stage must switch to a non-root USER")
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    if not entry or json.loads(entry[-1]) != ENTRYPOINT:
        r.problems.append(f"Dockerfile: ENTRYPOINT must be the exec form {json.dumps(ENTRYPOINT)}")
    for rest in (rest for word, rest in final if word == "CMD"):
        check_medfed_command(r, "Dockerfile CMD", json.loads(rest), [])
    for rest in (rest for word, rest in instrs if word == "RUN"):  # e.g. the build's `medfed --help`
        for segment in re.split(r"&&|;", rest):
            tokens = shlex.split(segment.split(">")[0])
            if tokens[:1] == ["medfed"]:
                check_medfed_command(r, "Dockerfile RUN", tokens[1:], [])
    if "/cpu" not in args.get("TORCH_INDEX", ""):
        r.problems.append("Dockerfile: ARG TORCH_INDEX must default to the CPU wheel index")
    if args.get("TORCH_VERSION") != version("torch").split("+")[0]:
        r.problems.append(f"Dockerfile: TORCH_VERSION={args.get('TORCH_VERSION')} but medfed is tested with torch {version('torch')}")
    runs = " ".join(rest for word, rest in instrs if word == "RUN")
    if "torch==${TORCH_VERSION}" not in runs or "${TORCH_INDEX}" not in runs:
        r.problems.append("Dockerfile: no RUN installs torch==${TORCH_VERSION} from ${TORCH_INDEX}")
    if not re.search(r"pip install [^&]*\"?/src[\[\"\s]", runs):
        r.problems.append("Dockerfile: medfed is not installed from the repository (pip install /src)")
    for word, rest in instrs:
        if word in ("COPY", "ADD") and "--from" not in rest:
            for src in rest.split()[:-1]:
                if not dockerignore_allows(ignore, src.rstrip("/")):
                    r.problems.append(f"Dockerfile: {word} {src}, which .dockerignore keeps out of the context")
    if "9092" not in " ".join(rest for word, rest in final if word == "EXPOSE"):
        r.problems.append("Dockerfile: EXPOSE 9092 (the SuperLink port)")
    r.problems += insecure_problems("Dockerfile", instrs)
    return r


# --------------------------------------------------------------------------- compose
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str, where: str, problems: list[str]) -> str:
    """Compose variables as on a host with none set: ``${VAR:-default}`` -> default."""

    def _sub(m: re.Match[str]) -> str:
        if m.group(2) is None:
            problems.append(f"{where}: ${{{m.group(1)}}} has no default: give one (${{{m.group(1)}:-...}})")
            return ""
        return m.group(2)

    return _VAR.sub(_sub, value)


def compose_mounts(r: Report, where: str, svc: dict, named: set[str], base: Path) -> list[Mount]:
    mounts = []
    for v in svc.get("volumes") or []:
        if not isinstance(v, dict):
            r.problems.append(f"{where}: volume {v!r}: use the long syntax (type, source, target, read_only)")
            continue
        kind, ro = v.get("type"), bool(v.get("read_only", False))
        source = interpolate(str(v.get("source", "")), where, r.problems)
        if kind == "bind":
            host = (base / source).resolve()
            if not ro:
                r.problems.append(f"{where}: bind mount {source} -> {v.get('target')} must be read_only")
            shipped = base.resolve() in host.parents
            mounts.append(Mount(PurePosixPath(v["target"]), "bind", str(host), ro, shipped=shipped))
        elif kind == "volume":
            if source not in named:
                r.problems.append(f"{where}: volume {source!r} is not declared under top-level volumes")
            mounts.append(Mount(PurePosixPath(v["target"]), "volume", source, ro))
        else:
            r.problems.append(f"{where}: volume type {kind!r} (use bind or volume)")
    return mounts


def check_compose(doc: dict, base: Path = DEPLOY) -> Report:
    r = Report()
    services: dict[str, dict] = doc.get("services") or {}
    named = set(doc.get("volumes") or {})
    for name, svc in sorted(services.items(), key=lambda kv: _role_order(kv[1].get("command"))):
        where = f"compose service {name}"
        r.problems += image_problems(where, svc.get("image"))
        if "build" not in svc:
            r.problems.append(f"{where}: no build section for the local image {svc.get('image')}")
        if "entrypoint" in svc:
            r.problems.append(f"{where}: keeps the image's ENTRYPOINT {ENTRYPOINT}; drop entrypoint")
        r.problems += [f"{where}: depends on unknown service {d}" for d in svc.get("depends_on") or {} if d not in services]
        mounts = compose_mounts(r, where, svc, named, base)
        argv = svc.get("command")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            r.problems.append(f"{where}: command must be a list of strings (exec form)")
            continue
        role, cfg = check_medfed_command(r, where, argv, mounts)
        if role == ("server", "start") and cfg is not None:
            r.server = (name, cfg.port)
            published = [str(p).split("/")[0].rsplit(":", 1)[-1] for p in svc.get("ports") or []]
            if str(cfg.port) not in published:
                r.problems.append(f"{where}: ports {svc.get('ports')} do not publish server.yaml's port {cfg.port}")
            if str(cfg.port) not in json.dumps(svc.get("healthcheck", {}).get("test")):
                r.problems.append(f"{where}: the healthcheck does not probe port {cfg.port}")
    check_all_registered(r)
    r.problems += insecure_problems("compose.yaml", doc)
    return r


# --------------------------------------------------------------------------- Kubernetes
def load_k8s_docs(root: Path = K8S) -> list[dict]:
    docs = []
    for path in sorted(root.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return docs


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _object_data(obj: dict) -> dict[str, str]:
    return {**(obj.get("data") or {}), **(obj.get("stringData") or {})}


def pod_mounts(r: Report, where: str, pod: dict, container: dict, objects: dict) -> list[Mount]:
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    filled = {m["name"] for c in pod.get("initContainers") or [] for m in c.get("volumeMounts") or []
              if not m.get("readOnly")}
    mounts = []
    for vm in container.get("volumeMounts") or []:
        v = volumes.get(vm["name"])
        if v is None:
            r.problems.append(f"{where}: volumeMount {vm['name']!r} names no volume of the pod")
            continue
        ro, target = bool(vm.get("readOnly")), PurePosixPath(vm["mountPath"])
        if "secret" in v:
            name = v["secret"].get("secretName")
            obj = objects.get(("Secret", name))
            if obj is None:
                r.problems.append(f"{where}: Secret {name!r} is referenced but not defined (deploy/k8s/templates/)")
            mounts.append(Mount(target, "secret", name, ro, _object_data(obj or {})))
        elif "configMap" in v:
            name = v["configMap"].get("name")
            obj = objects.get(("ConfigMap", name))
            if obj is None:
                r.problems.append(f"{where}: ConfigMap {name!r} is referenced but not defined")
            mounts.append(Mount(target, "configmap", name, ro, _object_data(obj or {})))
        elif "persistentVolumeClaim" in v:
            name = v["persistentVolumeClaim"].get("claimName")
            if ("PersistentVolumeClaim", name) not in objects:
                r.problems.append(f"{where}: PersistentVolumeClaim {name!r} is referenced but not defined")
            mounts.append(Mount(target, "pvc", name, ro or bool(v["persistentVolumeClaim"].get("readOnly"))))
        elif "emptyDir" in v:
            mounts.append(Mount(target, "emptydir", vm["name"], ro, provisioned=vm["name"] in filled))
        else:
            r.problems.append(f"{where}: volume {vm['name']!r} has a kind this check does not know")
    return mounts


def container_problems(where: str, c: dict) -> list[str]:
    problems = image_problems(where, c.get("image"))
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        for key in ("cpu", "memory"):
            if key not in (res.get(part) or {}):
                problems.append(f"{where}: resources.{part}.{key} is not set")
    if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
    return problems


def check_k8s(docs: list[dict]) -> Report:
    r = Report()
    objects: dict[tuple[str, str], dict] = {}
    for d in docs:
        key = (d.get("kind"), (d.get("metadata") or {}).get("name"))
        if key in objects:
            r.problems.append(f"k8s: {key[0]} {key[1]} is defined twice")
        objects[key] = d
    workloads = [d for d in docs if d.get("kind") in WORKLOADS]
    workloads.sort(key=lambda d: min(_role_order(c.get("args")) for c in _pod(d).get("containers") or [{}]))
    for w in workloads:
        pod, name = _pod(w), f"{w['kind']} {w['metadata']['name']}"
        sec = pod.get("securityContext") or {}
        if not sec.get("runAsNonRoot") or not sec.get("runAsUser"):
            r.problems.append(f"k8s {name}: pod securityContext must set runAsNonRoot and a runAsUser")
        claims = [v for v in pod.get("volumes") or [] if "persistentVolumeClaim" in v
                  and not v["persistentVolumeClaim"].get("readOnly")]
        if w["kind"] == "Deployment" and claims and (
            w["spec"].get("replicas", 1) != 1 or (w["spec"].get("strategy") or {}).get("type") != "Recreate"
        ):
            r.problems.append(f"k8s {name}: a writable claim needs replicas: 1 and strategy Recreate")
        for c in pod.get("initContainers") or []:
            where = f"k8s {name} init {c.get('name')}"
            r.problems += container_problems(where, c)
            pod_mounts(r, where, pod, c, objects)
        for c in pod.get("containers") or []:
            where = f"k8s {name} container {c.get('name')}"
            r.problems += container_problems(where, c)
            mounts = pod_mounts(r, where, pod, c, objects)
            command = c.get("command")
            if command and PurePosixPath(command[0]).name != "medfed":
                continue  # not a medfed command (insecure_problems still reads it)
            argv = [*(command or ENTRYPOINT)[1:], *(c.get("args") or [])]
            role, cfg = check_medfed_command(r, where, argv, mounts)
            if role == ("server", "start") and cfg is not None:
                check_server_service(r, where, w, c, cfg, objects)
    check_all_registered(r)
    r.problems += insecure_problems("k8s", docs)
    return r


def _pod(w: dict) -> dict:
    if w.get("kind") == "Pod":
        return w.get("spec") or {}
    return ((w.get("spec") or {}).get("template") or {}).get("spec") or {}


def check_server_service(r: Report, where: str, w: dict, c: dict, cfg: ServerDeployConfig, objects: dict) -> None:
    ports = {p.get("containerPort"): p.get("name") for p in c.get("ports") or []}
    if cfg.port not in ports:
        r.problems.append(f"{where}: containerPort {sorted(ports)} is not server.yaml's port {cfg.port}")
    labels = ((w["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
    services = [o for (kind, _), o in objects.items() if kind == "Service"
                and _labels_match((o.get("spec") or {}).get("selector") or {}, labels)]
    if len(services) != 1:
        r.problems.append(f"{where}: {len(services)} Services select the server pod; want exactly one")
        return
    svc = services[0]
    if not any(p.get("port") == cfg.port and p.get("targetPort") in (cfg.port, ports.get(cfg.port))
               for p in svc["spec"].get("ports") or []):
        r.problems.append(f"{where}: Service {svc['metadata']['name']} does not map port {cfg.port} to the container's {cfg.port}")
    r.server = (svc["metadata"]["name"], cfg.port)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    return load_k8s_docs()


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ignore() -> list[str]:
    return dockerignore_patterns(DOCKERIGNORE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the real manifests
def test_every_deploy_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert COMPOSE in files and len(list(K8S.rglob("*.yaml"))) >= 3
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        assert docs and all(isinstance(d, dict) for d in docs if d is not None), path


def test_dockerfile_is_one_nonroot_medfed_image(dockerfile_text, ignore):
    assert check_dockerfile(dockerfile_text, ignore).problems == []


def test_dockerignore_keeps_data_keys_and_runs_out(ignore):
    for inside in ("pyproject.toml", "README.md", "server/deploy.py", "common/dp/ledger.py", "simulations/loopback.py"):
        assert dockerignore_allows(ignore, inside), inside
    for outside in (".venv/bin/python", "runs/compose/certs/ca.key", "runs/x/superlink.db", ".git/config",
                    "tests/test_cli.py", "deploy/compose.yaml", "server/leaked.key", "common/x.pem",
                    "common/data/site.npz", "server/__pycache__/deploy.cpython-311.pyc"):
        assert not dockerignore_allows(ignore, outside), outside


def test_compose_is_consistent(compose_doc):
    r = check_compose(compose_doc)
    assert r.problems == []
    assert r.server == ("server", 9092)
    assert set(r.site_ids) == {"site-a", "site-b"} == r.registered


def test_k8s_manifests_are_consistent(k8s_docs):
    r = check_k8s(k8s_docs)
    assert r.problems == []
    assert r.server == ("medfed-server", 9092)
    assert set(r.site_ids) == {"site-a"} == r.registered


def test_every_role_has_a_real_medfed_command(compose_doc, k8s_docs):
    """The extraction found the commands; an empty search cannot pass the checks above."""
    for report in (check_compose(compose_doc), check_k8s(k8s_docs)):
        roles = {argv[:2] for _, argv in report.commands}
        assert {("server", "start"), ("site", "start"), ("server", "register-site")} <= roles


def test_config_files_named_by_compose_ship_in_deploy(compose_doc):
    sources = {v["source"] for svc in compose_doc["services"].values() for v in svc.get("volumes") or []
               if v["target"].startswith("/etc/medfed/config/")}
    assert sources == {"./compose/server.yaml", "./compose/site-a.yaml", "./compose/site-b.yaml"}
    for source in sources:
        assert (DEPLOY / source).is_file()
    assert load_server_yaml(DEPLOY / "compose/server.yaml").port == 9092
    assert {load_site_yaml(DEPLOY / f"compose/site-{s}.yaml").site_id for s in "ab"} == {"site-a", "site-b"}


def test_readme_names_existing_services_and_files(compose_doc):
    texts = README.read_text(encoding="utf-8") + COMPOSE.read_text(encoding="utf-8")
    texts += "".join(p.read_text(encoding="utf-8") for p in K8S.rglob("*.yaml"))
    services = set(compose_doc["services"])
    named = set(re.findall(r"docker compose -f deploy/compose\.yaml (?:run --rm|up -d) ([\w-]+)", texts))
    assert named and named <= services | {"server"}, named - services
    files = set(re.findall(r"-f (deploy/[\w./-]+\.yaml)", texts))
    assert files and all((REPO / f).is_file() for f in files), files
    assert "Containers (Docker / compose)" in texts and "Kubernetes" in texts


# --------------------------------------------------------------------------- Flower's own parsers
def _flower_parse(which: str, argv: list[str]) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = {"flower-superlink": _parse_args_run_superlink, "flower-supernode": _parse_args_run_supernode}[which]()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit:
        raise ValueError(f"{which} refuses {shlex.join(argv)}: {err.getvalue().strip()}") from None


@pytest.fixture
def tls_folder(tmp_path: Path) -> Path:
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("x")
    key = tmp_path / "site-a.key"
    key.write_text("x")
    key.chmod(0o600)
    return tmp_path


@pytest.mark.parametrize(("insecure", "auth"), [(False, True), (False, False), (True, False)])
def test_superlink_flags_are_accepted_by_flower(tls_folder, insecure, auth):
    base = load_server_yaml(DEPLOY / "compose/server.yaml")
    cfg = ServerDeployConfig(state_dir=tls_folder / "state", certs_dir=tls_folder, host=base.host,
                             port=base.port, insecure=insecure, enable_site_auth=auth)
    cmd = superlink_command(cfg)
    assert Path(cmd[0]).name == "flower-superlink"
    assert ("--enable-supernode-auth" in cmd) == auth and ("--ssl-keyfile" in cmd) == (not insecure)
    _flower_parse("flower-superlink", cmd[1:])


@pytest.mark.parametrize("variant", ["tls+auth", "tls", "insecure"])
def test_supernode_flags_are_accepted_by_flower(tls_folder, variant):
    site = load_site_yaml(DEPLOY / "compose/site-a.yaml")
    cfg = SiteDaemonConfig(
        site_id=site.site_id, data_root=site.data_root, state_dir=tls_folder / "state", site_config=site.site_config,
        server=site.server, root_cert=tls_folder / "ca.crt", auth_key=tls_folder / "site-a.key" if variant == "tls+auth" else None,
        clientappio_port=site.clientappio_port,
    )
    cmd = supernode_command(cfg, insecure=variant == "insecure")
    assert Path(cmd[0]).name == "flower-supernode"
    assert ("--auth-supernode-private-key" in cmd) == (variant == "tls+auth")
    _flower_parse("flower-supernode", cmd[1:])


def test_flower_parsers_refuse_an_unknown_flag(tls_folder):
    cmd = superlink_command(ServerDeployConfig(state_dir=tls_folder, certs_dir=tls_folder))
    with pytest.raises(ValueError, match="--enable-site-auth"):
        _flower_parse("flower-superlink", [*cmd[1:], "--enable-site-auth"])  # medfed's name, not Flower's
    with pytest.raises(ValueError, match="flower-supernode refuses"):
        _flower_parse("flower-supernode", ["--superlink", "server:9092", "--auth-key", "k"])


# --------------------------------------------------------------------------- broken copies are rejected
def _svc(doc: dict, name: str) -> dict:
    return doc["services"][name]


def _vol(svc: dict, target: str) -> dict:
    return next(v for v in svc["volumes"] if v["target"] == target)


COMPOSE_BREAKS: dict[str, tuple[Callable[[dict], None], str]] = {
    "data writable": (lambda d: _vol(_svc(d, "site-a"), "/data").update(read_only=False), "must be read_only"),
    "insecure flag": (lambda d: _svc(d, "server")["command"].append("--insecure"), "turns TLS off"),
    "typo in flag": (lambda d: _svc(d, "site-b")["command"].__setitem__(2, "--confg"), "refused by medfed's parser"),
    "config not mounted": (lambda d: _svc(d, "site-a")["command"].__setitem__(3, "/etc/medfed/site.yaml"),
                           "on no mounted volume"),
    "unknown volume": (lambda d: d["volumes"].pop("site-b-state"), "not declared under top-level volumes"),
    "shared state": (lambda d: _vol(_svc(d, "site-b"), "/var/lib/medfed/site").update(source="site-a-state"),
                     "also used by"),
    "latest tag": (lambda d: _svc(d, "site-a").update(image="medfed:latest"), "not latest"),
    "port drift": (lambda d: _svc(d, "server").update(ports=["9093:9093"]), "do not publish"),
    "key not mounted": (lambda d: _svc(d, "site-b")["volumes"].pop(2), "auth-key /etc/medfed/keys/site-b.key is on no"),
    "unregistered": (lambda d: d["services"].pop("register-site-b"), "no register-site command for site(s) ['site-b']"),
    "wrong server": (lambda d: _svc(d, "register-site-a")["command"].__setitem__(3, "server:9093"), "dials server:9093"),
    "bad run-config": (lambda d: _svc(d, "submit")["command"].__setitem__(6, "num-rounds=2"), "not StudyConfig keys"),
    "state not persistent": (lambda d: _svc(d, "server")["volumes"].pop(), "not on a persistent volume"),
}


@pytest.mark.parametrize("case", sorted(COMPOSE_BREAKS))
def test_broken_compose_copy_is_rejected(compose_doc, case):
    broken = copy.deepcopy(compose_doc)
    mutate, expected = COMPOSE_BREAKS[case]
    mutate(broken)
    problems = check_compose(broken).problems
    assert any(expected in p for p in problems), problems


def test_site_yaml_errors_surface_through_the_mount(compose_doc, tmp_path):
    """A bad site.yaml behind a bind mount is loaded with load_site_yaml and reported."""
    bad = tmp_path / "deploy"
    (bad / "compose").mkdir(parents=True)
    for f in (DEPLOY / "compose").iterdir():
        (bad / "compose" / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    with (bad / "compose/site-a.yaml").open("a", encoding="utf-8") as f:
        f.write("shard-idx: 1\n")
    problems = check_compose(compose_doc, base=bad).problems
    assert any("shard-idx" in p and "site-a" in p for p in problems), problems


def _find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(docs: list[dict], name: str) -> dict:
    return _pod(_find(docs, "Deployment", name))["containers"][0]


def _mount(docs: list[dict], name: str, path: str) -> dict:
    return next(m for m in _container(docs, name)["volumeMounts"] if m["mountPath"] == path)


K8S_BREAKS: dict[str, tuple[Callable[[list], None], str]] = {
    "service port": (lambda d: _find(d, "Service", "medfed-server")["spec"]["ports"][0].update(port=9093),
                     "does not map port 9092"),
    "container port": (lambda d: _container(d, "medfed-server")["ports"][0].update(containerPort=8080),
                       "containerPort [8080]"),
    "secret typo": (lambda d: _pod(_find(d, "Deployment", "medfed-site-a"))["volumes"][1]["secret"].update(
        secretName="medfed-ca-cert"), "Secret 'medfed-ca-cert' is referenced but not defined"),
    "secret key missing": (lambda d: _find(d, "Secret", "medfed-server-tls")["stringData"].pop("server.key"),
                           "has no key 'server.key'"),
    "data writable": (lambda d: (_mount(d, "medfed-site-a", "/data").pop("readOnly"),
                                 _pod(_find(d, "Deployment", "medfed-site-a"))["volumes"][4]
                                 ["persistentVolumeClaim"].pop("readOnly")), "read-only mount of the site's data"),
    "claim undefined": (lambda d: d.remove(_find(d, "PersistentVolumeClaim", "medfed-server-state")),
                        "PersistentVolumeClaim 'medfed-server-state' is referenced but not defined"),
    "mount undefined": (lambda d: _mount(d, "medfed-site-a", "/data").update(name="images"), "names no volume"),
    "insecure": (lambda d: _container(d, "medfed-site-a")["args"].append("--insecure"), "turns TLS off"),
    "configmap unknown key": (lambda d: _find(d, "ConfigMap", "medfed-site-a-config")["data"].update(
        {"site.yaml": _find(d, "ConfigMap", "medfed-site-a-config")["data"]["site.yaml"] + "root-certs: x\n"}),
        "root-certs"),
    "latest image": (lambda d: _container(d, "medfed-server").update(image="registry.example.org/medfed"),
                     "explicit version tag"),
    "no resources": (lambda d: _container(d, "medfed-site-a").pop("resources"), "resources.limits.memory"),
    "key not provisioned": (lambda d: _pod(_find(d, "Deployment", "medfed-site-a")).pop("initContainers"),
                            "emptyDir no init container fills"),
    "two replicas": (lambda d: _find(d, "Deployment", "medfed-server")["spec"].update(replicas=2), "replicas: 1"),
    "site dials elsewhere": (lambda d: _find(d, "ConfigMap", "medfed-site-a-config")["data"].update(
        {"site.yaml": _find(d, "ConfigMap", "medfed-site-a-config")["data"]["site.yaml"].replace(
            "medfed-server:9092", "fl.example.org:9092")}), "dials fl.example.org:9092"),
    "root user": (lambda d: _pod(_find(d, "Deployment", "medfed-server"))["securityContext"].pop("runAsNonRoot"),
                  "runAsNonRoot"),
}


@pytest.mark.parametrize("case", sorted(K8S_BREAKS))
def test_broken_k8s_copy_is_rejected(k8s_docs, case):
    broken = copy.deepcopy(k8s_docs)
    mutate, expected = K8S_BREAKS[case]
    mutate(broken)
    problems = check_k8s(broken).problems
    assert any(expected in p for p in problems), problems


DOCKERFILE_BREAKS: dict[str, tuple[Callable[[str], str], str]] = {
    "root": (lambda t: t.replace("USER medfed", "USER root"), "non-root USER"),
    "no user": (lambda t: t.replace("USER medfed\n", ""), "non-root USER"),
    "entrypoint": (lambda t: t.replace('ENTRYPOINT ["medfed"]', 'ENTRYPOINT ["sh", "-c"]'), "ENTRYPOINT"),
    "latest base": (lambda t: t.replace("python:3.11-slim-bookworm", "python:latest"), "not latest"),
    "gpu default": (lambda t: t.replace("whl/cpu", "whl/cu128"), "CPU wheel index"),
    "torch drift": (lambda t: t.replace("TORCH_VERSION=2.13.0", "TORCH_VERSION=2.2.0"), "TORCH_VERSION=2.2.0"),
    "copies runs": (lambda t: t.replace("COPY server /src/server", "COPY runs /src/runs"), "keeps out of the context"),
    "bad cmd": (lambda t: t.replace('CMD ["--help"]', 'CMD ["serve"]'), "refused by medfed's parser"),
    "bad run": (lambda t: t.replace("medfed --help", "medfed --hlep"), "`medfed --hlep` is refused"),
}


@pytest.mark.parametrize("case", sorted(DOCKERFILE_BREAKS))
def test_broken_dockerfile_copy_is_rejected(dockerfile_text, ignore, case):
    mutate, expected = DOCKERFILE_BREAKS[case]
    broken = mutate(dockerfile_text)
    assert broken != dockerfile_text
    problems = check_dockerfile(broken, ignore).problems
    assert any(expected in p for p in problems), problems


def test_dockerfile_parser_joins_continuations_and_drops_comments():
    text = "# c\nFROM a:1 AS b\nRUN x \\\n  # inner comment\n  && y\nUSER u\n"
    instrs = dockerfile_instructions(text)
    assert [(w, rest.split()) for w, rest in instrs] == [("FROM", ["a:1", "AS", "b"]), ("RUN", ["x", "&&", "y"]), ("USER", ["u"])]
