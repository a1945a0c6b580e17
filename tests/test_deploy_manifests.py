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
import io
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from medfed.client.daemon import SiteDaemonConfig, load_site_yaml, supernode_command
from medfed.server.deploy import ServerDeployConfig, load_server_yaml, superlink_command

from tests.deploy_checker import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    DOCKERIGNORE,
    K8S,
    README,
    REPO,
    check_compose,
    check_dockerfile,
    check_k8s,
    dockerfile_instructions,
    dockerignore_allows,
    dockerignore_patterns,
    load_k8s_docs,
    pod_of,
)


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
    return pod_of(_find(docs, "Deployment", name))["containers"][0]


def _mount(docs: list[dict], name: str, path: str) -> dict:
    return next(m for m in _container(docs, name)["volumeMounts"] if m["mountPath"] == path)


K8S_BREAKS: dict[str, tuple[Callable[[list], None], str]] = {
    "service port": (lambda d: _find(d, "Service", "medfed-server")["spec"]["ports"][0].update(port=9093),
                     "does not map port 9092"),
    "container port": (lambda d: _container(d, "medfed-server")["ports"][0].update(containerPort=8080),
                       "containerPort [8080]"),
    "secret typo": (lambda d: pod_of(_find(d, "Deployment", "medfed-site-a"))["volumes"][1]["secret"].update(
        secretName="medfed-ca-cert"), "Secret 'medfed-ca-cert' is referenced but not defined"),
    "secret key missing": (lambda d: _find(d, "Secret", "medfed-server-tls")["stringData"].pop("server.key"),
                           "has no key 'server.key'"),
    "data writable": (lambda d: (_mount(d, "medfed-site-a", "/data").pop("readOnly"),
                                 pod_of(_find(d, "Deployment", "medfed-site-a"))["volumes"][4]
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
    "key not provisioned": (lambda d: pod_of(_find(d, "Deployment", "medfed-site-a")).pop("initContainers"),
                            "emptyDir no init container fills"),
    "two replicas": (lambda d: _find(d, "Deployment", "medfed-server")["spec"].update(replicas=2), "replicas: 1"),
    "site dials elsewhere": (lambda d: _find(d, "ConfigMap", "medfed-site-a-config")["data"].update(
        {"site.yaml": _find(d, "ConfigMap", "medfed-site-a-config")["data"]["site.yaml"].replace(
            "medfed-server:9092", "fl.example.org:9092")}), "dials fl.example.org:9092"),
    "root user": (lambda d: pod_of(_find(d, "Deployment", "medfed-server"))["securityContext"].pop("runAsNonRoot"),
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
