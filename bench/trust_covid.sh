#!/usr/bin/env bash
# Real data, no pass mark (issue 17): border shares of the saliency of a model trained on the COVID-19 chest X-ray
# collection (142 images from many publications, the kind of mixed sources shortcut studies start from), as two
# sites split by patient. The sites are small: min-eval-n 5 so that their test splits report at all, and classes
# under 5 test images stay suppressed. Prints each site's border share per class and its hot spot.
# Usage: bash bench/trust_covid.sh [OUT_DIR]   (default runs/trust-covid)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA="${MEDFED_SHARED_DATA:-../shared/data}/covid_chestxray_demographics"
OUT="${1:-runs/trust-covid}"
mkdir -p "$OUT"
if [[ ! -f "$OUT/run/summary.json" ]]; then
  rm -rf "$OUT/sites"
  medfed data covid-sites --data "$DATA" --num-sites 2 --out "$OUT/sites" > /dev/null
  for f in "$OUT"/sites/site-*/site.yaml; do echo "min-eval-n: 5" >> "$f"; done
  medfed simulate --site-configs "$OUT/sites/site-1/site.yaml,$OUT/sites/site-2/site.yaml" --explain-metrics \
    --rounds 10 --out "$OUT/run" > "$OUT/run.log" 2>&1 || { echo "FAILED (see $OUT/run.log)"; exit 1; }
fi
python - "$OUT/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
e = s.get("explain")
print(f"test AUC {s['test'].get('auc')}; flagged {e and e['flagged']} (the rule needs 3 sites)")
for site, rec in (e or {}).get("sites", {}).items():
    classes = {c: (r["n"], round(r["border-share"], 3)) for c, r in rec.get("classes", {}).items()}
    print(f"{site}: {rec['n']} test images, border share {rec['border-share']:.3f}; per class (n, share) {classes}")
PY
