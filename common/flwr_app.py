"""A minimal Flower app folder for the installed medfed package.

medfed's code is installed at the server and at every site (runtime dependency
installation is disabled), so the app that Flower ships around only needs its
``pyproject.toml``: the ServerApp/ClientApp components and the run config. Both the
simulation engine and ``medfed run`` use this, so they work from a wheel install too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

COMPONENTS = {"serverapp": "medfed.server.app:app", "clientapp": "medfed.client.app:app"}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_flower_app(dest: Path, run_config: Mapping[str, Any]) -> Path:
    """Write ``dest/pyproject.toml`` naming medfed's apps with ``run_config`` as defaults."""
    dest.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "medfed-study"',
        'version = "1.0.0"',
        'description = "medfed study (code installed at the server and the sites)"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "medfed"',
        "",
        "[tool.flwr.app.components]",
        *[f'{k} = "{v}"' for k, v in COMPONENTS.items()],
        "",
        "[tool.flwr.app.config]",
        *[f"{key} = {toml_value(value)}" for key, value in run_config.items()],
    ]
    (dest / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest
