"""The ``medfed`` command line.

Exit codes: 0 success; 2 usage or config error (one line naming the problem); 1 any
other failure (one line). Each subcommand imports its heavy modules only when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medfed.common.errors import ConfigError, MedfedError
from medfed.common.logs import emit

log = logging.getLogger("medfed.cli")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"medfed: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- simulate
_SIM_FLAGS: dict[str, str] = {
    "sites": "num-sites",
    "partition": "partition",
    "alpha": "alpha",
    "strategy": "strategy",
    "rounds": "num-server-rounds",
    "local_epochs": "local-epochs",
    "local_steps": "local-steps",
    "batch_size": "batch-size",
    "lr": "lr",
    "optimizer": "optimizer",
    "task": "task",
    "model": "model",
    "image_size": "image-size",
    "mode": "mode",
    "seed": "seed",
    "min_sites": "min-sites",
    "fraction_train": "fraction-train",
    "proximal_mu": "proximal-mu",
    "selection": "selection",
    "evaluate_every": "evaluate-every",
    "device": "device",
    "epsilon": "epsilon",
    "delta": "delta",
    "max_grad_norm": "max-grad-norm",
    "dp_accountant": "dp-accountant",
    "central_dp": "central-dp",
    "central_noise": "central-noise",
    "central_clip": "central-clip",
    "central_epsilon": "central-epsilon",
    "freeze": "freeze",
}


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated study on Flower's simulation engine (synthetic data by default)",
        description="Split a dataset into sites and run a study: federated (Flower simulation "
        "engine), centralized (pooled data) or local (each site alone), same data and budget.",
    )
    p.add_argument("--config", help="study YAML (flat kebab-case keys, as in [tool.flwr.app.config])")
    p.add_argument("--task", help="classification (default) or segmentation")
    p.add_argument("--data", help="MedMNIST .npz file, or for segmentation an .npz with train_images/"
                   "train_masks/val_.../test_... (default: the built-in synthetic dataset)")
    p.add_argument("--sites", type=int, help="number of sites (default 4)")
    p.add_argument("--site-configs", help="comma-separated site.yaml files: simulate these real sites "
                   "(each reads its own manifest or DICOM folder) instead of splitting a dataset")
    p.add_argument("--partition", help="iid or dirichlet (label skew)")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, fedmedian, "
                   "fedtrimmedavg, krum, multikrum, bulyan, qfedavg, fedbn")
    p.add_argument("--rounds", type=int, help="federated rounds (default 10)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 1)")
    p.add_argument("--local-steps", type=int, help="fixed local optimizer steps per round (overrides epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", help="adam or sgd")
    p.add_argument("--model", help="classification: cnn (default), cnn-dp (small tanh CNN for DP), densenet121, "
                   "resnet18; segmentation: unet (default), basicunet")
    p.add_argument("--image-size", type=int, help="model input side in pixels (default: the data's)")
    p.add_argument("--mode", help="federated (default), centralized or local")
    p.add_argument("--seed", type=int)
    p.add_argument("--min-sites", type=int)
    p.add_argument("--fraction-train", type=float)
    p.add_argument("--proximal-mu", type=float)
    p.add_argument("--selection", help="val-auc (default: best round on validation) or last")
    p.add_argument("--evaluate-every", type=int, help="federated evaluation every N rounds (default 1)")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu or cuda")
    p.add_argument("--epsilon", type=float, help="DP-SGD at every site: each site's epsilon budget for the "
                   "whole study (default 0: no DP)")
    p.add_argument("--delta", type=float, help="DP delta per site (default 1e-5)")
    p.add_argument("--max-grad-norm", type=float, help="DP-SGD per-sample clipping norm (default 1.0)")
    p.add_argument("--dp-accountant", help="rdp (default) or prv")
    p.add_argument("--central-dp", help="off (default) or server-fixed: client-level DP with Flower's wrapper "
                   "(fedavg, every site every round; see README)")
    p.add_argument("--central-noise", type=float, help="central DP noise multiplier (default 1.0)")
    p.add_argument("--central-clip", type=float, help="central DP clipping norm of a site's update (default 1.0)")
    p.add_argument("--central-epsilon", type=float, help="stop before central epsilon exceeds this (default: no cap)")
    p.add_argument("--init", help="transfer learning: start from this checkpoint (a medfed model.pt or a "
                   "plain state_dict file); a head of another size starts fresh")
    p.add_argument("--new-head", action="store_true", default=None, help="with --init: re-initialise the "
                   "classifier head even when its size fits")
    p.add_argument("--freeze", help="with --init: comma-separated parameter-name patterns to freeze "
                   "(e.g. 'features.*'); frozen layers are neither trained nor sent by the sites")
    p.add_argument("--out", help="run directory (default runs/<mode>-<time>)")
    p.add_argument("--resume", help="checkpoint to continue from (its run directory by default)")
    p.set_defaults(func=cmd_simulate)


def _config_task(path: str | None) -> str:
    """The task a study YAML names (classification when none), to read --data for it."""
    if not path:
        return "classification"
    from medfed.common.config import load_yaml_mapping

    return str(load_yaml_mapping(path).get("task", "classification"))


def study_from_args(args: argparse.Namespace) -> Any:
    from medfed.common.config import load_study_config, parse_study_config

    overrides: dict[str, Any] = {}
    for attr, key in _SIM_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    if args.data and args.site_configs:
        raise ConfigError("--data and --site-configs exclude each other: give one")
    if args.data:
        task = args.task or _config_task(args.config)
        overrides["dataset"] = "npz" if task == "segmentation" else "medmnist"
        overrides["data-path"] = str(Path(args.data).resolve())
    if args.site_configs:
        paths = [str(Path(p.strip()).resolve()) for p in args.site_configs.split(",") if p.strip()]
        overrides.update({"dataset": "sites", "data-path": ",".join(paths), "num-sites": len(paths)})
    if args.init:
        overrides["initial-weights"] = str(Path(args.init).resolve())
    if args.new_head:
        overrides["new-head"] = True
    if args.resume:
        overrides["resume"] = str(Path(args.resume).resolve())
    if args.out:
        overrides["out-dir"] = str(Path(args.out).resolve())
    elif args.resume:
        overrides["out-dir"] = str(Path(args.resume).resolve().parent.parent)
    if args.config:
        cfg = load_study_config(args.config, overrides)
    else:
        cfg = parse_study_config(overrides)
    if not args.out and not args.resume and not (args.config and "out-dir" in _yaml_keys(args.config)):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = cfg.replace(out_dir=str(Path("runs", f"{cfg.mode}-{stamp}").resolve()))
    if cfg.data_path and cfg.dataset == "sites":
        cfg = cfg.replace(data_path=",".join(str(Path(p.strip()).resolve()) for p in cfg.data_path.split(",")))
    elif cfg.data_path:
        cfg = cfg.replace(data_path=str(Path(cfg.data_path).resolve()))
    return cfg


def _yaml_keys(path: str) -> set[str]:
    from medfed.common.config import load_yaml_mapping

    return set(load_yaml_mapping(path))


def cmd_simulate(args: argparse.Namespace) -> int:
    from medfed.common.data.federated import load_study_data
    from medfed.server.report import format_site_table

    cfg = study_from_args(args)
    # Load the data once up front: a missing or corrupt file fails here, before any
    # run directory, checkpoint or Ray process exists.
    fed = load_study_data(cfg)
    log.info("study: %s on %s, %d sites (%s), mode %s, %d rounds -> %s", cfg.strategy, fed.info.name,
             cfg.num_sites, ", ".join(str(len(s.train)) for s in fed.sites), cfg.mode,
             cfg.num_server_rounds, cfg.out_dir)
    if cfg.mode == "federated":
        from medfed.server.report import read_summary
        from medfed.simulations.engine import run_on_simulation_engine

        run_on_simulation_engine(cfg)
        summary_path = Path(cfg.out_dir) / "summary.json"
        if not summary_path.is_file():
            raise MedfedError(f"the simulation ended without writing {summary_path}: see the log above")
        summary = read_summary(cfg.out_dir)
    else:
        from medfed.simulations.baselines import run_baseline

        summary = run_baseline(cfg)
    emit(format_site_table(summary))
    emit(f"run directory: {cfg.out_dir}")
    return EXIT_OK


# --------------------------------------------------------------------------- report / data
def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="write report.md (with plots) for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from medfed.server.report import write_report

    try:
        path = write_report(Path(args.run_dir))
    except FileNotFoundError as exc:
        raise MedfedError(str(exc)) from exc
    emit(str(path))
    return EXIT_OK


def _add_data(sub: Any) -> None:
    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    f = dsub.add_parser("fetch", help="download an official MedMNIST file (md5 checked)")
    f.add_argument("name", help="MedMNIST subset, e.g. pneumoniamnist")
    f.add_argument("--dest", default="data", help="folder to write NAME.npz into (default ./data)")
    f.add_argument("--size", type=int, default=28, help="image size: 28, 64, 128 or 224")
    f.set_defaults(func=cmd_data_fetch)
    c = dsub.add_parser("covid-sites", help="site manifests + site.yaml files for the COVID-19 chest X-ray "
                        "collection, split by patient (images stay where they are)")
    c.add_argument("--data", required=True, help="folder with metadata.csv and images/")
    c.add_argument("--num-sites", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="sites/covid", help="folder for the site folders (default sites/covid)")
    c.set_defaults(func=cmd_data_covid_sites)


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from medfed.common.data.fetch import fetch_medmnist

    emit(str(fetch_medmnist(args.name, Path(args.dest), size=args.size)))
    return EXIT_OK


def cmd_data_covid_sites(args: argparse.Namespace) -> int:
    from medfed.common.intake.recipes import covid_sites

    paths = covid_sites(Path(args.data), Path(args.out), args.num_sites, args.seed)
    emit(",".join(str(p) for p in paths))
    return EXIT_OK


# --------------------------------------------------------------------------- deployment
def _add_deployment(sub: Any) -> None:
    from medfed.client import audit_cli, daemon, site_check
    from medfed.common import certs
    from medfed.server import deploy, submit

    server = sub.add_parser("server", help="the coordinator: SuperLink")
    ssub = server.add_subparsers(dest="server_cmd", required=True, parser_class=_Parser)
    deploy.add_server_arguments(ssub)

    site = sub.add_parser("site", help="a hospital site: SuperNode")
    sitesub = site.add_subparsers(dest="site_cmd", required=True, parser_class=_Parser)
    daemon.add_site_arguments(sitesub)
    site_check.add_check_arguments(sitesub)

    run = sub.add_parser("run", help="submit a study to a running server (deployment)")
    submit.add_run_arguments(run)

    c = sub.add_parser("certs", help="create a CA, the server certificate and per-site keys")
    certs.add_certs_arguments(c)

    audit_cli.add_privacy_arguments(sub)

    from medfed.common.generation.cli import add_generate_arguments

    add_generate_arguments(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medfed",
        description="Federated learning across hospital sites: simulation, server and site daemons.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_simulate(sub)
    _add_report(sub)
    _add_data(sub)
    _add_deployment(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from medfed.common.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # Flower's per-message INFO lines drown medfed's per-round progress
        logging.getLogger("flwr").setLevel(logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or EXIT_OK)
    except ConfigError as exc:
        sys.stderr.write(f"medfed: config error: {exc}\n")
        return EXIT_USAGE
    except MedfedError as exc:
        sys.stderr.write(f"medfed: error: {exc}\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        sys.stderr.write("medfed: interrupted\n")
        return 130
    except Exception as exc:
        log.debug("unhandled error", exc_info=True)
        sys.stderr.write(f"medfed: error: {type(exc).__name__}: {exc} (rerun with -v for details)\n")
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
