"""Table of bench/trust_shortcut.sh: flagged sites per run, site K's z per class, the marker's effect on the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def marker_effect(run: Path, site_index: int) -> tuple[float, float]:
    """Mean P(class 1) on site K's class-0 test images without and with the marker, under the final model."""
    from medfed.client.checkpoint_site import study_config
    from medfed.common.checkpoint import load_checkpoint
    from medfed.common.data.federated import load_study_data
    from medfed.common.data.shortcut import MARKER_CLASS, planted
    from medfed.common.data.splits import ImageSplit
    from medfed.common.privacy_audit import model_from_state

    ckpt = load_checkpoint(run / "model.pt")
    cfg = study_config(ckpt.config).replace(shortcut_site=-1)
    test = load_study_data(cfg).sites[site_index].test
    neg = test.subset(np.nonzero(test.labels == 0)[0])
    marked = planted(ImageSplit(neg.images, np.full(len(neg), MARKER_CLASS), None), 1.0)
    model = model_from_state(ckpt.model, ckpt.state_dict).eval()
    with torch.no_grad():
        p = [float(torch.softmax(model(torch.from_numpy(x)), 1)[:, 1].mean()) for x in (neg.images, marked.images)]
    return p[0], p[1]


def main(out: Path) -> None:
    tally: dict[tuple[str, str], list[bool]] = {}
    for path in sorted(out.glob("*/summary.json")):
        data, marker, seed = path.parent.name.split("-")
        k = int((path.parent / "planted-site").read_text())
        site = f"site-{k}"
        e = json.loads(path.read_text()).get("explain")
        if e is None:  # no site sent saliency aggregates: the run's log says why
            tally.setdefault((data, marker), []).append(False)
            print(f"{data:10s} {seed:3s} marker {marker:3s} K={site} NO explain section (see {path.parent}.log)")
            continue
        zs = {c: round(r.get("z", float("nan")), 1) for c, r in e["sites"].get(site, {}).get("classes", {}).items()}
        ok = (site in e["flagged"]) if marker == "on" else not e["flagged"]
        tally.setdefault((data, marker), []).append(ok)
        before, after = marker_effect(path.parent, k)
        print(f"{data:10s} {seed:3s} marker {marker:3s} K={site} flagged {e['flagged']!s:12s} z({site}) per class {zs}"
              f"  P(class 1 | class-0 image) {before:.2f} -> {after:.2f} with the marker")
    for (data, marker), oks in sorted(tally.items()):
        what = "site K flagged" if marker == "on" else "no site flagged"
        print(f"{data} marker {marker}: {what} in {sum(oks)} of {len(oks)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
