#!/usr/bin/env bash
# Issue 17 figures: adversarial robustness of the federated model, standard FedAvg vs PGD adversarial training
# at the sites (adv-eps 2/255, PGD-3, half of each batch), without DP and with DP-SGD epsilon 8 at every site.
# PneumoniaMNIST, 5 Dirichlet(0.5) sites, 30 rounds, Adam lr 0.002 (the schedule of bench/dp_acceptance.sh: 10
# rounds at lr 0.001 leave the cnn under-trained, at test AUC 0.84, and an under-trained model is flat, not robust),
# seed 0; every site attacks the final model on its own test
# split (white-box FGSM and PGD-10 at 0.5, 1, 2, 4, 8 / 255) and sends only metrics. Then the cost figures:
# bench/trust_cost.py (site training time of PGD-3 and PGD-7 adversarial training vs standard, and the
# evaluation time with explain-metrics vs without).
# The planted-shortcut acceptance is bench/trust_shortcut.sh.
# Usage: bash bench/trust.sh [OUT_DIR]   (default runs/trust; finished runs are not rerun; SKIP_COST=1: no cost part)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA="${MEDFED_SHARED_DATA:-../shared/data}/pneumoniamnist/pneumoniamnist.npz"
OUT="${1:-runs/trust}"
mkdir -p "$OUT"
common=(--data "$DATA" --sites 5 --partition dirichlet --alpha 0.5 --seed 0 --rounds 30 --lr 0.002
        --robustness-eval fgsm,pgd)
dp=(--epsilon 8 --delta 1e-5 --model cnn-dp)  # README "Privacy": the DP-sized model
run() {  # run NAME [simulate flags...]
  local name=$1; shift
  [[ -f "$OUT/$name/summary.json" ]] && return
  medfed simulate "${common[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 \
    || { echo "FAILED: $name (see $OUT/$name.log)"; exit 1; }
}
run standard
run pgd-at --adv-train pgd
run dp8-standard "${dp[@]}"
run dp8-pgd-at "${dp[@]}" --adv-train pgd
run pgd-at-ratio1 --adv-train pgd --adv-ratio 1  # Madry's setting: every example adversarial
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("standard", "pgd-at", "pgd-at-ratio1", "dp8-standard", "dp8-pgd-at"):
    s = json.loads((out / name / "summary.json").read_text())
    r = s["robustness"]
    eps = r["eps"]
    print(f"\n{name}: test AUC {s['test']['auc']:.3f} (pooled, server's test split); "
          f"max epsilon spent {max((v.get('epsilon', 0) for v in s['sites'].values()), default=0):.2f}")
    print(f"{'site':8s} {'clean AUC':>9s} {'clean acc':>9s} " + " ".join(f"{'PGD ' + e:>8s}" for e in eps))
    for site, rec in [*r["sites"].items(), ("pooled", r["pooled"])]:
        clean = rec["clean"]
        auc = clean.get("auc")
        print(f"{site:8s} {auc if auc is None else round(auc, 3)!s:>9s} {clean['accuracy']:9.3f} "
              + " ".join(f"{rec['pgd'][e]['accuracy']:8.3f}" for e in eps))
PY
[[ "${SKIP_COST:-0}" == 1 ]] || python bench/trust_cost.py --data "$DATA"
