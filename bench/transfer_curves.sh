#!/usr/bin/env bash
# Transfer learning (issue 5): fine-tuning from a PneumoniaMNIST checkpoint vs training from
# scratch on BreastMNIST, 3 sites (Dirichlet 0.5), FedAvg, same schedule; prints test AUC by round.
# Usage: bash bench/transfer_curves.sh PNEUMONIA_MODEL_PT [OUT_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
INIT="$1"
OUT="${2:-runs/transfer}"
ROUNDS="${3:-20}"
DATA="${MEDFED_SHARED_DATA:-../shared/data}/breastmnist/breastmnist.npz"
common=(--data "$DATA" --sites 3 --partition dirichlet --alpha 0.5 --rounds "$ROUNDS" --batch-size 32
        --lr 0.001 --seed 0)
[ -f "$OUT/scratch/summary.json" ] || medfed simulate "${common[@]}" --out "$OUT/scratch" > "$OUT/scratch.log" 2>&1
[ -f "$OUT/finetune/summary.json" ] || medfed simulate "${common[@]}" --init "$INIT" --new-head \
  --out "$OUT/finetune" > "$OUT/finetune.log" 2>&1
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
curves = {}
for name in ("scratch", "finetune"):
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    curves[name] = [r["test"].get("auc", float("nan")) for r in rows]
    s = json.loads((out / name / "summary.json").read_text())
    print(f"{name:<9} selected round {s['selected-round']:>3}  test AUC {s['test']['auc']:.4f}")
target = json.loads((out / "scratch" / "summary.json").read_text())["test"]["auc"]
print("round " + " ".join(f"{r:>6}" for r in range(1, len(curves['scratch']) + 1)))
for name, c in curves.items():
    print(f"{name:<5} " + " ".join(f"{a:6.3f}" for a in c))
    first = next((i + 1 for i, a in enumerate(c) if a >= target), None)
    print(f"  {name}: first round with test AUC >= the from-scratch final {target:.4f}: {first}")
PY
