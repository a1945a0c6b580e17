#!/usr/bin/env bash
# Planted shortcut (issue 17 acceptance): is the site whose class-1 images carry a border marker flagged
# by the server's explain rule, and is no site flagged on the same data without it?
# Synthetic default (4 sites) and PneumoniaMNIST (5 Dirichlet(0.5) sites), 5 seeds each, --explain-metrics.
# The marker goes where a model has a reason to learn it: synthetic site-0 (the default's lowest-contrast
# site, where lesions are hardest to see); PneumoniaMNIST: the site holding the most pneumonia training
# images (as in the COVID-19 collections, where positives came mostly from one source). Each line also
# shows the marker's effect on the final model, measured here on site K's class-0 test images with and
# without the marker (mean P(class 1)): the evidence that the model learned the shortcut at all.
# Usage: bash bench/trust_shortcut.sh [OUT_DIR] [SEEDS]   (defaults: runs/trust-shortcut "1 2 3 4 5")
# Finished runs are not rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PNEU="${MEDFED_SHARED_DATA:-../shared/data}/pneumoniamnist/pneumoniamnist.npz"
OUT="${1:-runs/trust-shortcut}"
SEEDS="${2:-1 2 3 4 5}"
mkdir -p "$OUT"
most_positive_site() {  # SEED: index of the PneumoniaMNIST site with the most class-1 training images
  python -c "
import sys
from medfed.common.config import StudyConfig
from medfed.common.data.federated import load_study_data
fed = load_study_data(StudyConfig(dataset='medmnist', data_path=sys.argv[1], num_sites=5, alpha=0.5, seed=int(sys.argv[2])))
print(max(range(5), key=lambda k: int((fed.sites[k].train.labels == 1).sum())))" "$PNEU" "$1"
}
for data in synthetic pneumonia; do
  for seed in $SEEDS; do
    if [[ "$data" == pneumonia ]]; then K=$(most_positive_site "$seed"); else K=0; fi
    for marker in on off; do
      dir="$OUT/$data-$marker-s$seed"
      [[ -f "$dir/summary.json" ]] && continue
      args=(--explain-metrics --seed "$seed" --out "$dir")
      [[ "$data" == pneumonia ]] && args+=(--data "$PNEU" --sites 5 --partition dirichlet --alpha 0.5)
      [[ "$marker" == on ]] && args+=(--shortcut-site "$K")
      medfed simulate "${args[@]}" > "$dir.log" 2>&1 || { echo "FAILED: $dir (see $dir.log)"; exit 1; }
      echo "$K" > "$dir/planted-site"
    done
  done
done
python bench/trust_shortcut_table.py "$OUT"
