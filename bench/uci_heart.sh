#!/usr/bin/env bash
# UCI Heart Disease, four real hospitals (FLamby's Fed-Heart-Disease): pooled, local, FedAvg, FedProx
# and FedYogi, same model and hyperparameters, several seeds; prints one accuracy table per model.
# Usage: bash bench/uci_heart.sh [OUT_DIR] [SEEDS] [MODELS]   (defaults: runs/uci-heart "0 1 2 3 4" "mlp logreg")
# Finished runs are not rerun: delete OUT_DIR after changing a hyperparameter.
# Shared hyperparameters (chosen on pooled validation AUC, never on test): Adam, lr 0.01, batch 4,
# 25 local steps per round, 20 rounds. Strategy-specific: FedProx mu, FedYogi server lr (below).
# Features: z-scores from pooled (federated) training statistics, medfed's default feature-scaling.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA="${MEDFED_SHARED_DATA:-../shared/data}/uci_heart_disease"
OUT="${1:-runs/uci-heart}"
SEEDS="${2:-0 1 2 3 4}"
MODELS="${3:-mlp logreg}"
ROUNDS="${ROUNDS:-20}"
MU="${MU:-0.01}"
SERVER_LR="${SERVER_LR:-0.03}"
COMMON=(--data "$DATA" --partition natural --rounds "$ROUNDS" --local-steps 25 --batch-size 4 --lr 0.01
        --optimizer adam)
mkdir -p "$OUT"
printf 'server-lr: %s\n' "$SERVER_LR" > "$OUT/fedyogi.yaml"  # no CLI flag for the server learning rate
for model in $MODELS; do
  for seed in $SEEDS; do
    for run in centralized local fedavg fedprox fedyogi; do
      dir="$OUT/$model-$run-s$seed"
      [[ -f "$dir/summary.json" ]] && continue  # finished cells are not rerun
      case "$run" in
        centralized|local) extra=(--mode "$run") ;;
        fedprox) extra=(--strategy fedprox --proximal-mu "$MU") ;;
        fedyogi) extra=(--config "$OUT/fedyogi.yaml" --strategy fedyogi) ;;
        *) extra=(--strategy "$run") ;;
      esac
      start=$(date +%s)
      medfed simulate "${COMMON[@]}" --model "$model" --seed "$seed" "${extra[@]}" --out "$dir" > "$dir.log" 2>&1
      echo "$model $run seed $seed done in $(( $(date +%s) - start )) s"
    done
  done
done
python - "$OUT" "$DATA" "$SEEDS" "$MODELS" <<'PY'
"""Accuracy on each hospital's test split, as FLamby reports it (threshold 0.5, per-hospital mean),
and the mean at the threshold medfed chose on pooled validation data (what its summary reports)."""
import sys
from pathlib import Path

import numpy as np
import torch
from medfed.common.checkpoint import load_checkpoint
from medfed.common.data.uci_heart import load_uci_heart
from medfed.common.models import build_model
from medfed.common.tasks import get_task

out, data, seeds, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
task, cpu = get_task("classification"), torch.device("cpu")
fed = load_uci_heart(data, 0)  # the test splits do not depend on the seed (FLamby's seed 43)
sites = fed.site_ids
FLAMBY = {"pooled": "0.735", "local": "0.567-0.722", "fedavg": "0.685", "fedprox": "n/a", "fedyogi": "0.731"}

def accuracies(path, threshold=0.5):
    ck = load_checkpoint(path)
    model = build_model(ck.model)
    model.load_state_dict(ck.state_dict)
    thr = ck.selection.get("threshold") if threshold is None else threshold
    return [task.evaluate(model, s.test, cpu, threshold=thr)[0]["accuracy"] for s in fed.sites]

def row(name, at05, atsel, flamby):
    """Per-hospital accuracies (mean over seeds), their mean ± std over seeds, the mean at the chosen threshold."""
    cells = " ".join(f"{v:>11.3f}" for v in np.mean(at05, axis=0))
    spread = f"{np.mean(at05):.3f}±{np.std(np.mean(at05, axis=1)):.3f}"
    print(f"{name:<28} {cells} {spread:>12} {np.mean(atsel):>11.3f} {flamby:>12}")

print(f"seeds {' '.join(seeds)}; accuracy on each hospital's test split (threshold 0.5), its mean over the four "
      "hospitals (FLamby's average), and that mean at medfed's validation-chosen threshold")
for m in models:
    print(f"\nmodel {m}")
    print(f"{'method':<28} " + " ".join(f"{s:>11}" for s in sites) + f" {'mean':>12} {'mean@val-t':>11} {'FLamby':>12}")
    runs = lambda r: [out / f"{m}-{r}-s{s}" for s in seeds]
    row("pooled", [accuracies(d / "model.pt") for d in runs("centralized")],
        [accuracies(d / "model.pt", None) for d in runs("centralized")], FLAMBY["pooled"])
    own = [[accuracies(d / "sites" / s / "model.pt")[k] for k, s in enumerate(sites)] for d in runs("local")]
    own_sel = [[accuracies(d / "sites" / s / "model.pt", None)[k] for k, s in enumerate(sites)] for d in runs("local")]
    row("local, own hospital", own, own_sel, "")
    for s in sites:  # FLamby's local protocol: one hospital's model tested at all four
        row(f"local {s}, all four", [accuracies(d / "sites" / s / "model.pt") for d in runs("local")],
            [accuracies(d / "sites" / s / "model.pt", None) for d in runs("local")], FLAMBY["local"])
    for r in ("fedavg", "fedprox", "fedyogi"):
        row(r, [accuracies(d / "model.pt") for d in runs(r)], [accuracies(d / "model.pt", None) for d in runs(r)],
            FLAMBY[r])
PY
