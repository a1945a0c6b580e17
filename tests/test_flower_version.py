"""The Flower internals medfed relies on exist in the installed flwr, with the signatures medfed calls.

Beyond Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``) medfed reaches
into internals: the simulation engine's ``_run_simulation``, the SuperNode's runtime API client
(the site launcher and its tasks), the privacy accountant, strategy state kept in checkpoints,
Grid's abstract methods, Flower's CLI parsers. A Flower release may move or change any of them
without notice, so every failure here names the installed flwr version, the symbol, and the
medfed module that needs it. Check a new Flower release with this file first, e.g.

    python -m pytest tests/test_flower_version.py tests/test_superlink_db.py

(``tests/test_superlink_db.py`` checks the SQLite settings of Flower's SuperLink state.)
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

FLWR_VERSION = version("flwr")


@dataclass(frozen=True)
class Internal:
    """``module``.``name`` (dotted), used by ``used_by``; ``params``: the parameter names medfed passes."""

    module: str
    name: str
    used_by: str
    params: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


RUNTIME_CLIENT = ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker")
STRATEGY_KWARGS = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                   "min_available_nodes", "weighted_by_key")

INTERNALS: tuple[Internal, ...] = (
    # simulation engine (simulations/engine.py)
    Internal("flwr.simulation.run_simulation", "_run_simulation", "simulations/engine.py",
             ("num_supernodes", "exit_event", "client_app", "server_app", "backend_name", "backend_config",
              "server_app_context", "app_dir", "run", "is_app")),
    Internal("flwr.server.superlink.linkstate.utils", "generate_rand_int_from_bytes", "simulations/engine.py",
             ("num_bytes",)),
    Internal("flwr.supercore.run", "Run.create_empty", "simulations/engine.py", ("run_id",)),
    Internal("flwr.supercore.constant", "NOOP_FEDERATION_ID", "simulations/engine.py"),
    Internal("flwr.supercore.telemetry", "EventType.PYTHON_API_RUN_SIMULATION_LEAVE", "simulations/engine.py"),
    Internal("flwr.common.constant", "RUN_ID_NUM_BYTES", "simulations/engine.py"),
    Internal("flwr.common.constant", "TASK_ID_NUM_BYTES", "simulations/engine.py"),
    Internal("flwr.common.constant", "SUPERLINK_NODE_ID", "simulations/engine.py, server/exchange.py"),
    Internal("flwr.supercore.task_identity", "TaskIdentity", "simulations/engine.py, common/run_console.py, "
             "client/runtime_api.py"),
    # the deployed ServerApp's grid pulls replies sooner (common/flwr_pull.py, server/app.py)
    Internal("flwr.superlink.grid.http_grid", "pull_objects", "common/flwr_pull.py"),
    Internal("flwr.supercore.inflatable.inflatable_utils", "pull_objects", "common/flwr_pull.py",
             ("object_ids", "pull_object_fn", "initial_backoff", "backoff_cap")),
    # the site launcher and its ClientApp tasks (client/app_runner.py, client/runtime_api.py)
    Internal("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", "client/app_runner.py", ("token",)),
    Internal("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", "client/app_runner.py",
             ("component_name",)),
    Internal("flwr.supercore.retry", "make_simple_http_retry_invoker", "client/app_runner.py"),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.from_server_address", "client/app_runner.py",
             RUNTIME_CLIENT),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.AcquireTask", "client/app_runner.py"),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.PullTaskInput", "client/runtime_api.py"),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.PullMessages", "client/runtime_api.py"),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.PullObject", "client/runtime_api.py"),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.ConfirmMessageReceived", "client/runtime_api.py"),
    Internal("flwr.supercore.runtime", "RuntimeHttpClient.close", "client/app_runner.py"),
    Internal("flwr.proto.runtime_pb2", "AcquireTaskRequest", "client/app_runner.py"),
    Internal("flwr.proto.runtime_pb2", "PullTaskInputRequest", "client/runtime_api.py"),
    Internal("flwr.proto.runtime_pb2", "PullAppMessagesRequest", "client/runtime_api.py"),
    Internal("flwr.proto.node_pb2", "Node", "client/runtime_api.py"),
    Internal("flwr.proto.message_pb2", "Metadata", "client/runtime_api.py"),
    Internal("flwr.supercore.constant", "TaskType.CLIENT_APP", "client/app_runner.py"),
    Internal("flwr.supercore.app_utils", "start_parent_process_monitor", "client/app_runner.py", ("parent_pid",)),
    Internal("flwr.supercore.heartbeat", "HeartbeatSender", "client/app_runner.py", ("heartbeat_fn",)),
    Internal("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http", "client/app_runner.py", ("client",)),
    Internal("flwr.supernode.runtime.run_clientapp", "pull_task_input", "client/runtime_api.py (mirrors it)",
             ("client",)),
    Internal("flwr.supernode.runtime.run_clientapp", "push_message", "client/app_runner.py, client/runtime_api.py",
             ("client", "message", "context")),
    Internal("flwr.supernode.runtime.run_clientapp", "push_task_output", "client/app_runner.py, "
             "client/runtime_api.py", ("client", "context", "sub_status", "details")),
    Internal("flwr.supercore.inflatable.inflatable_protobuf_utils", "make_pull_object_fn_protobuf",
             "client/runtime_api.py"),
    Internal("flwr.supercore.inflatable.inflatable_protobuf_utils", "make_confirm_message_received_fn_protobuf",
             "client/runtime_api.py"),
    Internal("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree",
             "client/runtime_api.py", ("object_tree", "pull_object_fn", "confirm_object_received_fn", "return_type",
                                       "initial_backoff", "backoff_cap")),
    Internal("flwr.common.serde", "context_from_proto", "client/runtime_api.py"),
    Internal("flwr.common.serde", "fab_from_proto", "client/runtime_api.py"),
    Internal("flwr.common.serde", "message_from_proto", "client/runtime_api.py"),
    Internal("flwr.common.serde", "run_from_proto", "client/runtime_api.py"),
    Internal("flwr.common.serde_utils", "metadata_to_proto", "client/runtime_api.py"),
    Internal("flwr.common.constant", "ErrorCode.CLIENT_APP_RAISED_EXCEPTION", "client/app_runner.py"),
    Internal("flwr.common.constant", "ErrorCode.CLIENT_APP_CRASHED", "client/runtime_api.py"),
    Internal("flwr.common.constant", "SubStatus.COMPLETED", "client/app_runner.py"),
    Internal("flwr.common.constant", "SubStatus.FAILED", "client/app_runner.py"),
    Internal("flwr.cli.build", "build_fab_from_disk", "client/trusted_app.py", ("app",)),
    # server side
    Internal("flwr.app.message.message", "make_message", "server/limits.py", ("metadata", "error")),
    Internal("flwr.serverapp.exception", "PrivacyBudgetExhausted", "server/federation.py"),
    Internal("flwr.serverapp", "RdpAccountant", "server/central_dp.py", ("config",)),
    Internal("flwr.supercore.privacy_accounting", "PrivacyConfig", "server/central_dp.py",
             ("target_delta", "population_size", "neighboring_relation", "sampling_method", "max_epsilon")),
    Internal("flwr.supercore.privacy_accounting", "NeighboringRelation.ADD_OR_REMOVE_ONE", "server/central_dp.py"),
    Internal("flwr.supercore.privacy_accounting", "SamplingMethod.NO_AMPLIFICATION", "server/central_dp.py"),
    Internal("flwr.supercore.privacy_accounting", "GaussianPrivacyEvent", "server/central_dp.py",
             ("noise_multiplier", "sample_size", "population_size")),
    Internal("flwr.serverapp.strategy", "DifferentialPrivacyServerSideFixedClipping", "server/central_dp.py",
             ("strategy", "noise_multiplier", "clipping_norm", "num_sampled_clients", "accountant")),
    Internal("flwr.serverapp.strategy", "QFedAvg", "server/strategies.py",
             ("client_learning_rate", "q", "train_loss_key", *STRATEGY_KWARGS)),
    Internal("flwr.serverapp.strategy", "FedProx", "server/strategies.py", ("proximal_mu", *STRATEGY_KWARGS)),
    Internal("flwr.serverapp.strategy", "FedAdam", "server/strategies.py", ("eta", "eta_l", "tau", *STRATEGY_KWARGS)),
    Internal("flwr.serverapp.strategy", "FedAvgM", "server/strategies.py",
             ("server_learning_rate", "server_momentum", *STRATEGY_KWARGS)),
    Internal("flwr.serverapp.strategy", "FedTrimmedAvg", "server/strategies.py", ("beta", *STRATEGY_KWARGS)),
    Internal("flwr.serverapp.strategy", "Bulyan", "server/strategies.py", ("num_malicious_nodes", *STRATEGY_KWARGS)),
    # the SuperLink's state (server/superlink_db.py) and Flower's CLI parsers (tests/test_deploy_manifests.py)
    Internal("flwr.supercore.sql_mixin", "SqlMixin.initialize", "server/superlink_db.py"),
    Internal("flwr.superlink.cli.flower_superlink", "_parse_args_run_superlink", "tests/test_deploy_manifests.py"),
    Internal("flwr.supernode.cli.flower_supernode", "_parse_args_run_supernode", "tests/test_deploy_manifests.py"),
    Internal("flwr.common.config", "parse_config_args", "tests/test_deploy_cmds.py"),
    Internal("flwr.cli.supernode.register", "try_load_public_key", "tests/test_certs.py"),
)


def _where(internal: Internal) -> str:
    return f"flwr {FLWR_VERSION}: {internal.qualname} (medfed's {internal.used_by} relies on it)"


def _resolve(internal: Internal) -> object:
    try:
        obj = importlib.import_module(internal.module)
        for part in internal.name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{_where(internal)} is missing: {type(exc).__name__}: {exc}")
    return obj


def _signature_problems(obj: object, params: tuple[str, ...]) -> list[str]:
    sig = inspect.signature(obj)
    kinds = {p.kind for p in sig.parameters.values()}
    problems = []
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        problems += [f"no parameter {name!r}" for name in params if name not in sig.parameters]
    problems += [f"new required parameter {name!r}" for name, p in sig.parameters.items()
                 if p.default is p.empty and name not in params and name != "self"
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return problems


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.qualname)
def test_internal_exists_with_the_parameters_medfed_passes(internal: Internal) -> None:
    obj = _resolve(internal)
    if internal.params:
        problems = _signature_problems(obj, internal.params)
        assert not problems, (f"{_where(internal)} has the signature {inspect.signature(obj)}: "
                              f"{'; '.join(problems)}; medfed passes {', '.join(internal.params)}")


def test_installed_flower_is_within_medfeds_pin() -> None:
    pins = [Requirement(r) for r in requires("medfed") or () if Requirement(r).name == "flwr"]
    assert pins, "medfed's metadata names no flwr requirement"
    assert pins[0].specifier.contains(FLWR_VERSION, prereleases=True), (
        f"flwr {FLWR_VERSION} is installed, outside medfed's pin flwr{pins[0].specifier}: run this file and "
        "tests/test_superlink_db.py against it, then widen the pin in pyproject.toml")


def test_flower_still_reads_the_object_transfer_concurrency_medfed_sets() -> None:
    """medfed's daemons raise Flower's object pulls/pushes per message through these variables (common/flwr_pull.py)."""
    import flwr.supercore.constant as constant

    from medfed.common.flwr_pull import CONCURRENCY_ENV

    source = inspect.getsource(constant)
    for name in CONCURRENCY_ENV:
        assert f'os.getenv("{name}"' in source, (f"flwr {FLWR_VERSION}: flwr.supercore.constant no longer reads "
                                                 f"{name} (common/flwr_pull.py sets it)")


def test_transfer_concurrency_keeps_what_the_operator_set() -> None:
    from medfed.common.flwr_pull import CONCURRENCY_ENV, DEFAULT_CONCURRENCY, transfer_concurrency_env

    assert transfer_concurrency_env({CONCURRENCY_ENV[0]: "4", "OTHER": "1"}) == {
        CONCURRENCY_ENV[0]: "4", CONCURRENCY_ENV[1]: str(DEFAULT_CONCURRENCY)}


def test_task_identity_fields_are_settable() -> None:
    internal = next(i for i in INTERNALS if i.name == "TaskIdentity")
    meta = type(_resolve(internal))
    for field in ("task_id", "run_id", "node_id"):
        prop = getattr(meta, field, None)
        assert isinstance(prop, property) and prop.fset is not None, (
            f"{_where(internal)}: {field} is no longer a settable class property")


def test_run_carries_the_fields_the_engine_sets() -> None:
    from flwr.supercore.run import Run

    run = Run.create_empty(run_id=7)
    for field in ("run_id", "primary_task_id", "federation_id"):
        assert hasattr(run, field), f"flwr {FLWR_VERSION}: flwr.supercore.run.Run has no {field!r} (simulations/engine.py)"


def test_message_metadata_keeps_its_id_in_a_private_field() -> None:
    from flwr.app import Metadata

    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
    assert metadata.__dict__.get("_message_id") == "m", (
        f"flwr {FLWR_VERSION}: Metadata has no '_message_id' attribute; client/runtime_api.py sets it")


def test_node_view_implements_every_abstract_grid_method() -> None:
    from flwr.serverapp import Grid
    from medfed.server.availability import NodeView

    missing = sorted(name for name in Grid.__abstractmethods__ if name not in vars(NodeView))
    assert not missing, (f"flwr {FLWR_VERSION}: Grid has new abstract method(s) {missing}; "
                         "server/availability.py NodeView must forward them")


@pytest.mark.parametrize(("strategy", "attributes"), [
    ("fedadam", ("m_t", "v_t")), ("fedyogi", ("m_t", "v_t")), ("fedadagrad", ("m_t", "v_t")),
    ("fedavgm", ("momentum_vector",)),
])
def test_strategy_state_saved_in_checkpoints_exists(strategy: str, attributes: tuple[str, ...]) -> None:
    from medfed.common.config import StudyConfig
    from medfed.server.strategies import STATEFUL_ATTRIBUTES, build_strategy

    built = build_strategy(StudyConfig(strategy=strategy, num_sites=3, min_sites=2), 3)
    for name in attributes:
        assert name in STATEFUL_ATTRIBUTES
        assert hasattr(built, name), (f"flwr {FLWR_VERSION}: {type(built).__name__} has no attribute {name!r}; "
                                      "server/strategies.py saves it in checkpoints, a resumed run would lose it")


def test_central_dp_wrapper_exposes_what_medfed_reads() -> None:
    from medfed.common.config import StudyConfig
    from medfed.server.central_dp import central_privacy, restore_central_privacy
    from medfed.server.strategies import build_strategy

    cfg = StudyConfig(num_sites=3, min_sites=3, central_dp="server-fixed", central_noise=1.0, central_clip=1.0)
    strategy = build_strategy(cfg, 3)
    for name in ("num_sampled_clients", "noise_multiplier", "clipping_norm", "accountant", "privacy_spent"):
        assert hasattr(strategy, name), (f"flwr {FLWR_VERSION}: DifferentialPrivacyServerSideFixedClipping has no "
                                         f"{name!r} (server/central_dp.py)")
    restore_central_privacy(strategy, 2)
    spent = central_privacy(strategy)
    assert spent is not None and spent["releases"] == 2 and spent["epsilon"] > 0


def test_flower_clis_take_the_flags_medfed_passes(tmp_path: Path) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    from medfed.server.deploy import ServerDeployConfig, superlink_command

    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("x")
    tls = superlink_command(ServerDeployConfig(state_dir=tmp_path, certs_dir=tmp_path, enable_site_auth=True))
    insecure = superlink_command(ServerDeployConfig(state_dir=tmp_path, insecure=True))
    wanted = {"flower-superlink": {a for a in tls + insecure if a.startswith("--")},
              # client/daemon.py supernode_command
              "flower-supernode": {"--superlink", "--insecure", "--root-certificates", "--auth-supernode-private-key",
                                   "--host", "--port", "--node-config", "--isolation"}}
    for cli, parser in (("flower-superlink", _parse_args_run_superlink()),
                        ("flower-supernode", _parse_args_run_supernode())):
        known = {opt for action in parser._actions for opt in action.option_strings}
        missing = sorted(wanted[cli] - known)
        assert not missing, f"flwr {FLWR_VERSION}: {cli} no longer has {missing} (server/deploy.py, client/daemon.py)"
