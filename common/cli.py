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
    "quantity_exponent": "quantity-exponent",
    "min_site_size": "min-site-size",
    "group_proportions": "group-proportions",
    "group_contrast": "group-contrast",
    "shift": "shift",
    "shift_strength": "shift-strength",
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
    "spatial_dims": "spatial-dims",
    "mode": "mode",
    "seed": "seed",
    "min_sites": "min-sites",
    "fraction_train": "fraction-train",
    "proximal_mu": "proximal-mu",
    "selection": "selection",
    "evaluate_every": "evaluate-every",
    "fused_evaluation": "fused-evaluation",
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
    "explain_metrics": "explain-metrics",
    "explain_every": "explain-every",
    "explain_band": "explain-band",
    "shortcut_site": "shortcut-site",
    "shortcut_strength": "shortcut-strength",
    "robustness_eval": "robustness-eval",
    "robustness_eps": "robustness-eps",
    "robustness_steps": "robustness-steps",
    "adv_train": "adv-train",
    "adv_eps": "adv-eps",
    "adv_steps": "adv-steps",
    "adv_ratio": "adv-ratio",
    "ray_address": "ray-address",
    "site_cpus": "site-cpus",
    "site_gpus": "site-gpus",
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
                   "train_masks/val_.../test_..., or the UCI Heart Disease folder (tabular, four "
                   "hospitals: --partition natural) (default: the built-in synthetic dataset)")
    p.add_argument("--sites", type=int, help="number of sites (default 4)")
    p.add_argument("--site-configs", help="comma-separated site.yaml files: simulate these real sites "
                   "(each reads its own manifest or DICOM folder) instead of splitting a dataset")
    _add_partition_arguments(p)
    p.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, fedmedian, "
                   "fedtrimmedavg, krum, multikrum, bulyan, qfedavg, fedbn")
    p.add_argument("--rounds", type=int, help="federated rounds (default 10)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 1)")
    p.add_argument("--local-steps", type=int, help="fixed local optimizer steps per round (overrides epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", help="adam or sgd")
    p.add_argument("--model", help="classification: cnn (default), cnn-dp (small tanh CNN for DP), densenet121, "
                   "resnet18; tabular (uci-heart): logreg (default), mlp; segmentation: unet (default), basicunet")
    p.add_argument("--image-size", type=int, help="model input side in pixels (default: the data's)")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3),
                   help="segmentation: 3 for volumes (3D U-Net; the synthetic default then generates "
                        "volumes); default: the data's")
    p.add_argument("--mode", help="federated (default), centralized or local")
    p.add_argument("--seed", type=int)
    p.add_argument("--min-sites", type=int)
    p.add_argument("--fraction-train", type=float)
    p.add_argument("--proximal-mu", type=float)
    p.add_argument("--selection", help="val-auc (default: best round on validation) or last")
    p.add_argument("--evaluate-every", type=int, help="federated evaluation every N rounds (default 1)")
    p.add_argument("--no-fused-evaluation", dest="fused_evaluation", action="store_false", default=None,
                   help="evaluate each round by its own message, not inside the next round's train message")
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
    _add_trust_arguments(p)
    p.add_argument("--ray-address", help="run the sites on a running Ray cluster: its GCS address HOST:PORT "
                   "(as 'ray start --head' prints it) or auto (default: start a local Ray instance)")
    p.add_argument("--site-cpus", type=float, help="CPUs per site actor; actors = cluster CPUs / this "
                   "(default min(2, cores))")
    p.add_argument("--site-gpus", type=float, help="GPU share per site actor, e.g. 0.25: four per GPU "
                   "(default 1/min(sites, 4) when CUDA is present, else 0)")
    p.add_argument("--attack", help="simulation only, never sent to sites: none (default), sign-flip (send "
                   "global - scale*(local - global)), label-flip (train on flipped labels), weight-inflation "
                   "(claim num-examples=1e12), impersonate (answer as site-<malicious-sites> from round 2) or "
                   "bad-metrics (malformed histograms, NaN metrics)")
    p.add_argument("--malicious-sites", type=int, help="with --attack: how many sites attack, the first ones "
                   "(site-0, ...) (default 1)")
    p.add_argument("--attack-scale", type=float, help="sign-flip and impersonate: the update's scale (default 10)")
    p.add_argument("--out", help="run directory (default runs/<mode>-<time>)")
    p.add_argument("--resume", help="checkpoint to continue from (its run directory by default)")
    p.set_defaults(func=cmd_simulate)


def _add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """Interpretability and robustness (README "Interpretability and robustness")."""
    p.add_argument("--explain-metrics", action="store_true", default=None,
                   help="sites send saliency aggregates of the final model (border share, coarse maps per class)")
    p.add_argument("--explain-every", action="store_true", default=None,
                   help="... and at every federated evaluation")
    p.add_argument("--explain-band", type=float, help="border band per side, share of the side (default 0.1)")
    p.add_argument("--shortcut-site", type=int, help="plant a bright bar near the border of this site's "
                   "class-1 images (train, val, test): a known shortcut (default -1: none)")
    p.add_argument("--shortcut-strength", type=float, help="the bar's blend into the image, 0..1 (default 1)")
    p.add_argument("--robustness-eval", help="sites attack the final model on their test split: fgsm,pgd")
    p.add_argument("--robustness-eps", help="attack radii in 1/255 (default 0.5,1,2,4,8)")
    p.add_argument("--robustness-steps", type=int, help="PGD steps of the evaluation (default 10)")
    p.add_argument("--adv-train", help="none (default) or pgd: Madry PGD adversarial training at the sites")
    p.add_argument("--adv-eps", type=float, help="its radius in 1/255 (default 2)")
    p.add_argument("--adv-steps", type=int, help="its PGD steps (default 3)")
    p.add_argument("--adv-ratio", type=float, help="share of each batch replaced by adversarial examples "
                   "(default 0.5)")


def _add_partition_arguments(p: argparse.ArgumentParser) -> None:
    """How a dataset is split into simulated sites (README "Partitions")."""
    p.add_argument("--partition", help="iid, dirichlet (label skew), quantity (power-law sizes), demographic "
                   "(group skew) or natural (the data's own sites, e.g. UCI Heart's hospitals)")
    p.add_argument("--alpha", type=float, help="dirichlet: concentration (smaller = more skew; default 1)")
    p.add_argument("--quantity-exponent", type=float, help="quantity: site k holds a share (k+1)^-exponent "
                   "(0 equal, 1 default, 2 steep)")
    p.add_argument("--min-site-size", type=int, help="fewest training samples per site (default 2)")
    p.add_argument("--group-proportions", help="demographic: fraction of group code 1 per site, e.g. 0.8,0.2 "
                   "(default: a spread around the global fraction)")
    p.add_argument("--group-contrast", help="synthetic: lesion contrast of group 0 and group 1 (female, male), "
                   "e.g. 0.4,1 to inject a known bias against group 0 (default 1,1)")
    p.add_argument("--shift", help="none (default) or scanner: per-site MONAI intensity, noise, blur and "
                   "resolution transforms, combinable with any partition")
    p.add_argument("--shift-strength", type=float, help="scanner: 0 identical .. 1 default .. 3 strong")


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
        from medfed.common.data.uci_heart import is_uci_heart_dir

        if is_uci_heart_dir(args.data):  # the UCI Heart Disease folder: four real hospitals
            overrides["dataset"] = "uci-heart"
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

    from medfed.simulations.attacks import parse_attack

    cfg = study_from_args(args)
    attack = parse_attack({k: v for k, v in (("attack", args.attack), ("malicious-sites", args.malicious_sites),
                                             ("attack-scale", args.attack_scale)) if v is not None})
    if attack.active and cfg.mode != "federated":
        raise ConfigError(f"--attack simulates poisoned sites of a federated study, not mode={cfg.mode}")
    # Load the data once up front: a missing or corrupt file fails here, before any
    # run directory, checkpoint or Ray process exists.
    fed = load_study_data(cfg)
    from medfed.common.training import check_group_reweight

    check_group_reweight(cfg, [s.train for s in fed.sites])
    log.info("study: %s on %s, %d sites (%s), mode %s, %d rounds -> %s", cfg.strategy, fed.info.name,
             cfg.num_sites, ", ".join(str(len(s.train)) for s in fed.sites), cfg.mode,
             cfg.num_server_rounds, cfg.out_dir)
    if cfg.mode == "federated":
        from medfed.server.report import read_summary
        from medfed.simulations.engine import run_on_simulation_engine

        run_on_simulation_engine(cfg, attack)
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


# --------------------------------------------------------------------------- study
def _add_study(sub: Any) -> None:
    p = sub.add_parser("study", help="bias studies: run a grid of simulations from one YAML file, compare them")
    ssub = p.add_subparsers(dest="study_cmd", required=True, parser_class=_Parser)
    r = ssub.add_parser("run", help="run every cell of a study file not finished before, then write the tables",
                        description="Run the grid of a study file (strategies x partitions x DP settings x "
                        "seeds, plus centralized/local baselines) on Flower's simulation engine; finished "
                        "cells are skipped; writes OUT/comparison.csv and OUT/comparison.md.")
    r.add_argument("file", help="study YAML: name, base, grid, baselines, out (see README)")
    r.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    r.set_defaults(func=cmd_study_run)
    t = ssub.add_parser("table", help="rebuild the comparison tables of a study folder")
    t.add_argument("out", help="the study's out folder")
    t.set_defaults(func=cmd_study_table)


def cmd_study_run(args: argparse.Namespace) -> int:
    from medfed.simulations.study import cell_state, load_study_spec, plan_cells, run_study
    from medfed.simulations.study_table import MD_FILE

    spec = load_study_spec(args.file)
    cells = plan_cells(spec)
    if args.dry_run:
        for cell in cells:
            emit(f"{cell_state(cell):8s} {cell.cell_id}")
        emit(f"{len(cells)} cells -> {spec.out}")
        return EXIT_OK
    outcomes = run_study(spec, cells)
    failed = [o for o in outcomes if o.status == "failed"]
    emit(f"{len(outcomes)} cells: {sum(o.status == 'ran' for o in outcomes)} ran, "
         f"{sum(o.status == 'skipped' for o in outcomes)} skipped, {len(failed)} failed")
    emit(str(spec.out / MD_FILE))
    return EXIT_FAIL if failed else EXIT_OK


def cmd_study_table(args: argparse.Namespace) -> int:
    from medfed.simulations.study_table import write_tables

    for path in write_tables(Path(args.out)):
        emit(str(path))
    return EXIT_OK


# --------------------------------------------------------------------------- report / data
def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="write report.md (with plots) and a self-contained report.html "
                       "for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from medfed.server.report import write_report
    from medfed.common.report_html import HTML_FILE

    try:
        path = write_report(Path(args.run_dir))
    except FileNotFoundError as exc:
        raise MedfedError(str(exc)) from exc
    emit(str(path))
    emit(str(path.with_name(HTML_FILE)))
    return EXIT_OK


def _add_audit(sub: Any) -> None:
    p = sub.add_parser("audit", help="audit trails: check a hash-chained audit.jsonl")
    asub = p.add_subparsers(dest="audit_cmd", required=True, parser_class=_Parser)
    v = asub.add_parser("verify", help="check an audit.jsonl chain: exit 0 when intact, 1 at the first problem",
                        description="Recompute every entry's hash and the seq/prev chain of a server or "
                        "site audit.jsonl. Cut-off tail entries are only detected against a head hash kept "
                        "elsewhere: --expect-head, or 'audit-head' of a summary.json beside FILE.")
    v.add_argument("file", help="RUN_DIR/audit.jsonl (server) or <state-dir>/audit.jsonl (site)")
    v.add_argument("--expect-head", help="a head hash recorded earlier: the log must still contain that entry")
    v.add_argument("--against", metavar="SERVER_LOG",
                   help="a site's log: check it against the server's audit.jsonl, which recorded the head "
                   "of this site's trail with every training reply")
    v.set_defaults(func=cmd_audit_verify)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    import json
    from medfed.common.audit_log import verify
    from medfed.common.hashing import is_sha256_hex

    anchor = args.expect_head
    if anchor is not None and not is_sha256_hex(anchor):
        raise ConfigError(f"--expect-head {anchor!r} is not a sha256 hex digest: give the 64 hex characters")
    if anchor is None and args.against:
        anchor = _site_anchor_from(Path(args.file), Path(args.against))
    summary = Path(args.file).with_name("summary.json")
    if anchor is None and summary.is_file():
        anchor = json.loads(summary.read_text(encoding="utf-8")).get("audit-head")
        if anchor:
            emit(f"checking against audit-head {anchor} of {summary}")
    result = verify(args.file, anchor=anchor or None)
    emit(result.describe())
    return EXIT_OK if result.ok else EXIT_FAIL


def _site_anchor_from(site_log: Path, server_log: Path) -> str:
    from medfed.common.audit_log import read_entries, site_anchor, verify

    server = verify(server_log)
    if not server.ok:
        raise MedfedError(f"{server_log}: {server.describe()}: the server's log cannot vouch for a site's")
    actor = next((e.get("actor") for e in read_entries(site_log)), None)
    anchor = site_anchor(server_log, str(actor)) if actor else None
    if anchor is None:
        raise MedfedError(f"{server_log} recorded no head of site {actor!r}'s trail: give that site's "
                          "server log (the run it trained in), or --expect-head")
    emit(f"checking against the head of site {actor}'s trail recorded in {server_log}: {anchor}")
    return anchor


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
    pt = dsub.add_parser("partition", help="split a dataset into simulated sites and write only the summary "
                         "(partition.json, .md, .png: counts per site x split x label x group)")
    pt.add_argument("--data", help="MedMNIST .npz file or UCI Heart Disease folder (default: synthetic)")
    pt.add_argument("--sites", type=int, help="number of sites (default 4)")
    pt.add_argument("--seed", type=int)
    _add_partition_arguments(pt)
    pt.add_argument("--out", required=True, help="folder to write the summary into")
    pt.set_defaults(func=cmd_data_partition)


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from medfed.common.data.fetch import fetch_medmnist

    emit(str(fetch_medmnist(args.name, Path(args.dest), size=args.size)))
    return EXIT_OK


def cmd_data_partition(args: argparse.Namespace) -> int:
    from medfed.common.config import parse_study_config
    from medfed.common.data.partition_summary import write_study_partition

    keys = {"sites": "num-sites", "seed": "seed", "partition": "partition", "alpha": "alpha",
            **{a: k for a, k in _SIM_FLAGS.items() if k in _PARTITION_KEYS}}
    mapping: dict[str, Any] = {k: getattr(args, a) for a, k in keys.items() if getattr(args, a) is not None}
    if args.data:
        from medfed.common.data.uci_heart import is_uci_heart_dir

        mapping["dataset"] = "uci-heart" if is_uci_heart_dir(args.data) else "medmnist"
        mapping["data-path"] = str(Path(args.data).resolve())
    mapping.update({"min-sites": 1, "out-dir": str(Path(args.out).resolve())})
    for path in write_study_partition(parse_study_config(mapping)):
        emit(str(path))
    return EXIT_OK


_PARTITION_KEYS = ("quantity-exponent", "min-site-size", "group-proportions", "group-contrast", "shift",
                   "shift-strength")


def cmd_data_covid_sites(args: argparse.Namespace) -> int:
    from medfed.common.intake.recipes import covid_sites

    paths = covid_sites(Path(args.data), Path(args.out), args.num_sites, args.seed)
    emit(",".join(str(p) for p in paths))
    return EXIT_OK


# --------------------------------------------------------------------------- deployment
def _add_deployment(sub: Any) -> None:
    from medfed.client import audit_cli, daemon, explain_cli, privacy_reset, robustness_cli, site_check
    from medfed.common import certs
    from medfed.server import deploy, submit

    server = sub.add_parser("server", help="the coordinator: SuperLink")
    ssub = server.add_subparsers(dest="server_cmd", required=True, parser_class=_Parser)
    deploy.add_server_arguments(ssub)

    site = sub.add_parser("site", help="a hospital site: SuperNode")
    sitesub = site.add_subparsers(dest="site_cmd", required=True, parser_class=_Parser)
    daemon.add_site_arguments(sitesub)
    site_check.add_check_arguments(sitesub)
    privacy_reset.add_reset_arguments(sitesub)

    run = sub.add_parser("run", help="submit a study to a running server (deployment)")
    submit.add_run_arguments(run)

    c = sub.add_parser("certs", help="create a CA, the server certificate and per-site keys")
    certs.add_certs_arguments(c)

    audit_cli.add_privacy_arguments(sub)
    explain_cli.add_explain_arguments(sub)
    robustness_cli.add_robustness_arguments(sub)

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
    _add_study(sub)
    _add_report(sub)
    _add_audit(sub)
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
