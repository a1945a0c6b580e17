#!/usr/bin/env bash
# DP acceptance (issue 4): PneumoniaMNIST, 5 sites (Dirichlet 0.5), FedAvg, 30 rounds, record-level
# DP-SGD at every site with epsilon 1, 3, 8 (delta 1e-5) over the whole study, and no DP; the DP
# classifier cnn-dp (6k parameters, tanh) throughout, plus the default cnn without DP for scale.
# Then a membership-inference audit (loss threshold + offline LiRA) of each final model against
# site 0's training data vs its held-out data.
# A second pair, "leaky", trains the default cnn on BreastMNIST split between 2 iid sites (273
# training images each) for 15 rounds of 100 local steps at batch 32 (about 12 epochs a round),
# which overfits enough for the attacks to see it, without DP and with epsilon 8: same
# schedule, same model, only DP differs; both sites are audited.
# Usage: bash bench/dp_acceptance.sh [OUT_DIR] [ROUNDS]   (prints one table at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
DATA="${MEDFED_SHARED_DATA:-../shared/data}/pneumoniamnist/pneumoniamnist.npz"
OUT="${1:-runs/dp-acceptance}"
ROUNDS="${2:-30}"
mkdir -p "$OUT"
common=(--data "$DATA" --sites 5 --partition dirichlet --alpha 0.5 --strategy fedavg --batch-size 64
        --lr 0.002 --seed 0)
run() {  # run NAME [simulate flags...]
  local name=$1; shift
  local start; start=$(date +%s)
  if [ ! -f "$OUT/$name/summary.json" ]; then
    medfed simulate "${common[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  fi
  if [ ! -f "$OUT/$name/privacy-audit.json" ]; then
    medfed privacy audit --model "$OUT/$name/model.pt" --out "$OUT/$name/privacy-audit.json" \
      > "$OUT/$name-audit.log" 2>&1
  fi
  echo "$name done in $(( $(date +%s) - start )) s"
}
dp() { echo --epsilon "$1" --delta 1e-5 --max-grad-norm 1.0; }
run none-cnn --model cnn --rounds "$ROUNDS" --local-epochs 1
run none --model cnn-dp --rounds "$ROUNDS" --local-epochs 1
for eps in 8 3 1; do
  # shellcheck disable=SC2046
  run "eps-$eps" --model cnn-dp --rounds "$ROUNDS" --local-epochs 1 $(dp "$eps")
done
BREAST="${MEDFED_SHARED_DATA:-../shared/data}/breastmnist/breastmnist.npz"
leaky=(--data "$BREAST" --sites 2 --partition iid --model cnn --rounds 15 --local-steps 100 --batch-size 32)
run leaky-none "${leaky[@]}"
# shellcheck disable=SC2046
run leaky-eps-8 "${leaky[@]}" $(dp 8)
for name in leaky-none leaky-eps-8; do  # the leaky pair's second site too
  [ -f "$OUT/$name/privacy-audit-site1.json" ] || medfed privacy audit --model "$OUT/$name/model.pt" \
    --site-index 1 --out "$OUT/$name/privacy-audit-site1.json" > "$OUT/$name-audit1.log" 2>&1
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':<12} {'model':<7} {'eps spent':>9} {'test AUC':>8} {'test ACC':>8} {'round':>5} {'wall s':>6} "
      f"{'MIA loss AUC':>12} {'MIA LiRA AUC':>12} {'LiRA TPR@1%':>11}")
for name in ("none-cnn", "none", "eps-8", "eps-3", "eps-1", "leaky-none", "leaky-eps-8"):
    d = out / name
    if not (d / "summary.json").is_file():
        continue
    s = json.loads((d / "summary.json").read_text())
    spent = max((r.get("epsilon", 0.0) for r in s["sites"].values()), default=0.0)
    for audit in ("privacy-audit.json", "privacy-audit-site1.json"):
        if not (d / audit).is_file():
            continue
        a = json.loads((d / audit).read_text())
        loss, lira = a["attacks"].get("loss-threshold", {}), a["attacks"].get("lira-offline", {})
        label = name if audit == "privacy-audit.json" else f"  ({a['site']})"
        print(f"{label:<12} {s['config']['model']:<7} {spent:>9.3f} {s['test']['auc']:>8.4f} "
              f"{s['test']['accuracy']:>8.4f} {s['selected-round']!s:>5} {s['wall-s']:>6.0f} "
              f"{loss.get('auc', float('nan')):>12.3f} {lira.get('auc', float('nan')):>12.3f} "
              f"{lira.get('tpr@fpr=1%', float('nan')):>11.3f}")
PY
