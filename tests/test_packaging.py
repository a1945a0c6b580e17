"""The distribution installs one `medfed` namespace, never bare top-level packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_medfed_namespace(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("medfed-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"medfed"}
    for pkg in ("server", "client", "common", "simulations"):
        assert f"medfed/{pkg}/__init__.py" in names
    assert "medfed/__init__.py" not in names, "medfed is an implicit namespace"
    assert "medfed/common/data/federated.py" in names
    for folder in ("server", "client", "common", "simulations"):  # every subpackage, e.g. common/dp
        for init in (REPO / folder).rglob("__init__.py"):
            assert f"medfed/{init.relative_to(REPO).as_posix()}" in names, f"{init.parent} is not in the wheel"
    assert not any(n.startswith(("server/", "client/", "common/", "tests/")) for n in names)


def test_installed_import_paths_point_into_the_repo_folders():
    import medfed.client
    import medfed.common
    import medfed.server
    import medfed.simulations

    for mod, folder in ((medfed.server, "server"), (medfed.client, "client"),
                        (medfed.common, "common"), (medfed.simulations, "simulations")):
        assert Path(mod.__file__).parent.name == folder
