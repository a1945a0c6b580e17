#!/usr/bin/env bash
# The spine's acceptance studies: PneumoniaMNIST and BreastMNIST, 5 sites with Dirichlet(0.5)
# label skew, FedAvg vs pooled (centralized) vs site-alone (local), same data and budget.
# Usage: bash bench/acceptance.sh [OUT_DIR] [ROUNDS]   (prints one table at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${MEDFED_SHARED_DATA:-../shared/data}"
OUT="${1:-runs/acceptance}"
ROUNDS="${2:-40}"
mkdir -p "$OUT"
for ds in pneumoniamnist breastmnist; do
  for mode in federated centralized local; do
    start=$(date +%s)
    medfed simulate --data "$DATA/$ds/$ds.npz" --sites 5 --partition dirichlet --alpha 0.5 \
      --strategy fedavg --rounds "$ROUNDS" --local-epochs 1 --mode "$mode" --seed 0 \
      --out "$OUT/$ds-$mode" > "$OUT/$ds-$mode.log" 2>&1
    echo "$ds $mode done in $(( $(date +%s) - start )) s"
  done
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'dataset':<15} {'mode':<12} {'test AUC':>8} {'test ACC':>8} {'bal-ACC':>8} {'round':>6} {'wall s':>7}")
for d in sorted(out.iterdir()):
    if not (d / "summary.json").is_file():
        continue
    s = json.loads((d / "summary.json").read_text())
    t = s["test"]
    sel = s["selected-round"] if isinstance(s["selected-round"], int) else "per-site"
    print(f"{d.name.split('-')[0]:<15} {s['mode']:<12} {t['auc']:>8.4f} {t['accuracy']:>8.4f} "
          f"{t['balanced-accuracy']:>8.4f} {sel!s:>6} {s['wall-s']:>7.0f}")
PY
