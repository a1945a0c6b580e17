#!/usr/bin/env bash
# DP acceptance: PneumoniaMNIST, 5 sites (Dirichlet 0.5), FedAvg, record-level DP-SGD at every
# site with epsilon 1, 3, 8 (delta 1e-5) over the whole study, and no DP; then a membership-
# inference audit of each final model against site 0's training data vs its held-out data.
# Usage: bash bench/dp_acceptance.sh [OUT_DIR] [ROUNDS]   (prints one table at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${MEDFED_SHARED_DATA:-../shared/data}/pneumoniamnist/pneumoniamnist.npz"
OUT="${1:-runs/dp-acceptance}"
ROUNDS="${2:-30}"
mkdir -p "$OUT"
for eps in none 8 3 1; do
  flags=()
  [ "$eps" != none ] && flags=(--epsilon "$eps" --delta 1e-5 --max-grad-norm 1.0)
  start=$(date +%s)
  medfed simulate --data "$DATA" --sites 5 --partition dirichlet --alpha 0.5 --strategy fedavg \
    --rounds "$ROUNDS" --local-epochs 1 --batch-size 64 --lr 0.002 --seed 0 "${flags[@]}" \
    --out "$OUT/eps-$eps" > "$OUT/eps-$eps.log" 2>&1
  medfed privacy audit --model "$OUT/eps-$eps/model.pt" --out "$OUT/eps-$eps/privacy-audit.json" \
    > "$OUT/eps-$eps-audit.log" 2>&1
  echo "epsilon $eps done in $(( $(date +%s) - start )) s"
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'epsilon':<8} {'spent (max site)':>16} {'test AUC':>8} {'test ACC':>8} {'round':>6} {'wall s':>7} "
      f"{'MIA loss AUC':>12} {'MIA LiRA AUC':>12} {'TPR@1%':>7}")
for eps in ("none", "8", "3", "1"):
    d = out / f"eps-{eps}"
    if not (d / "summary.json").is_file():
        continue
    s = json.loads((d / "summary.json").read_text())
    spent = max((r.get("epsilon", 0.0) for r in s["sites"].values()), default=0.0)
    a = json.loads((d / "privacy-audit.json").read_text())["attacks"] if (d / "privacy-audit.json").is_file() else {}
    loss, lira = a.get("loss-threshold", {}), a.get("lira-offline", {})
    print(f"{eps:<8} {spent:>16.3f} {s['test']['auc']:>8.4f} {s['test']['accuracy']:>8.4f} "
          f"{s['selected-round']!s:>6} {s['wall-s']:>7.0f} {loss.get('auc', float('nan')):>12.3f} "
          f"{lira.get('auc', float('nan')):>12.3f} {lira.get('tpr@fpr=1%', float('nan')):>7.3f}")
PY
