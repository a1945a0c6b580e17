"""Validators for deploy/: the Dockerfile, compose and Kubernetes manifests, checked without Docker.

Used by tests/test_deploy_manifests.py; see its docstring for the rules. Each validator
collects every problem in a Report instead of stopping at the first.
"""

from __future__ import annotations

import contextlib
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

import yaml

from medfed.client.daemon import SiteDaemonConfig, load_site_yaml
from medfed.common.errors import ConfigError
from medfed.server.deploy import ServerDeployConfig, load_server_yaml

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
    workloads.sort(key=lambda d: min(_role_order(c.get("args")) for c in pod_of(d).get("containers") or [{}]))
    for w in workloads:
        pod, name = pod_of(w), f"{w['kind']} {w['metadata']['name']}"
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


def pod_of(w: dict) -> dict:
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
