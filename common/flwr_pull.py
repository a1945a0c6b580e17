"""Flower's object pulls retried sooner: the one place medfed shortens Flower's pull backoff.

Flower's ``pull_objects`` (``flwr.supercore.inflatable.inflatable_utils``) retries an object
that is not uploaded yet after 1 s, then 2 s, ... up to 10 s, when its caller passes no backoff
of its own. A message is listed before all its contents have arrived, so a message pulled
right away usually waits one whole second for them. Two callers pass none, and both import
``pull_objects`` into their module's globals:

* the SuperNode pulling a message from the SuperLink (``flwr.supernode.start_client_internal``,
  patched by :mod:`medfed.client.supernode_poll`);
* the ServerApp's grid pulling the sites' replies (``flwr.superlink.grid.http_grid``, patched
  by :mod:`medfed.server.app` in a deployed ServerApp's own process).

:func:`patch_pull` replaces that global by :func:`quick_pull_objects`, Flower's own function
with a first retry after :data:`PULL_BACKOFF_S` and at most :data:`PULL_BACKOFF_CAP_S` between
retries where the caller passes none, after :func:`check_pull` found Flower's original there.
Where it does not (a later Flower), nothing is patched and a warning names the version.

Flower also moves a message's objects (one per array, 25 for medfed's ``cnn``) only two at a
time, one HTTP request each through the SuperLink: 1.3 s for the model to reach a site on two
loaded cores (``bench/task_start.py``). :func:`transfer_concurrency_env`, in the environment of every Flower daemon medfed starts
(:func:`medfed.common.process.start_process_group`: the SuperLink, each site's launcher and
SuperNode), raises that to :data:`DEFAULT_CONCURRENCY` through Flower's own environment
variables (read when Flower is imported, so every process below inherits them: SuperExec and
ServerApps, the warm worker and its tasks); a value the operator set is kept.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Mapping
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

PULL_BACKOFF_S = 0.02  # first retry for contents not uploaded yet (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.5  # longest wait between retries (Flower: 10 s)
PATCHED_PULL = "pull_objects"
PULL_PARAMETERS = ("initial_backoff", "backoff_cap")
HTTP_GRID_MODULE = "flwr.superlink.grid.http_grid"  # the deployed ServerApp's grid


CONCURRENCY_ENV = ("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES")
DEFAULT_CONCURRENCY = 16  # objects moved at once per message (Flower: 2)


def transfer_concurrency_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that let Flower move :data:`DEFAULT_CONCURRENCY` objects at once in a daemon and
    everything below it; a value set in ``env`` (the environment) is kept."""
    env = os.environ if env is None else env
    return {name: env.get(name, str(DEFAULT_CONCURRENCY)) for name in CONCURRENCY_ENV}


class PullPatchMissing(RuntimeError):
    """The module does not hold Flower's ``pull_objects`` as medfed expects."""


def flower_version() -> str:
    from flwr.supercore.version import package_version

    return str(package_version)


def original_pull() -> Callable[..., Any]:
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    return pull_objects


def quick_pull_objects(*args: Any, **kwargs: Any) -> Any:
    """Flower's ``pull_objects`` retrying sooner: a first retry after 0.02 s, then at most every 0.5 s."""
    kwargs.setdefault("initial_backoff", PULL_BACKOFF_S)
    kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP_S)
    return original_pull()(*args, **kwargs)


def check_pull(module: ModuleType) -> None:
    """:class:`PullPatchMissing`, naming the Flower version and the symbol, unless ``module`` can be patched."""
    where = f"Flower {flower_version()} ({module.__name__})"
    pull = getattr(module, PATCHED_PULL, None)
    if pull is not quick_pull_objects and pull is not original_pull():
        raise PullPatchMissing(f"{where} has no global `{PATCHED_PULL}` bound to "
                               "flwr.supercore.inflatable.inflatable_utils.pull_objects: update medfed.common.flwr_pull")
    missing = [p for p in PULL_PARAMETERS if p not in inspect.signature(original_pull()).parameters]
    if missing:
        raise PullPatchMissing(f"{where}: `{PATCHED_PULL}` takes no {', '.join(missing)}: update "
                               "medfed.common.flwr_pull")


def patch_pull(module: ModuleType | str) -> bool:
    """Make ``module``'s pulls retry sooner; False (and a warning) where Flower changed."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    try:
        check_pull(module)
    except PullPatchMissing as exc:
        log.warning("%s; its pulls keep Flower's own 1 s first retry", exc)
        return False
    setattr(module, PATCHED_PULL, quick_pull_objects)
    return True
