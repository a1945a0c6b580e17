"""``explain.html``: a self-contained gallery of saliency overlays, written at the site for the site.

One PNG per image (the image, and its saliency over it) and one HTML page built by
:mod:`medfed.common.report_html` with the rules of ``report.html`` (images embedded, no
script, a Content-Security-Policy that loads nothing). Binary classifiers are grouped into
true/false positives/negatives, others into correct and misclassified. The page says on top
that it holds patient images and stays at the site. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from medfed.common.atomic import atomic_write_bytes

GALLERY_FILE = "explain.html"
INDEX_FILE = "explain.json"
NOTICE = ("**This page contains patient images and their saliency maps. It stays at the site: "
          "medfed never sends it, nor any image or map in it, anywhere.**")


@dataclass(frozen=True)
class Item:
    """One explained image: where it is in the split, its label, the model's call and the map."""

    index: int
    label: int
    predicted: int
    score: float  # probability of the explained class
    explained: int  # the class whose saliency is shown
    image: np.ndarray  # (C, H, W) in [0, 1]
    saliency: np.ndarray  # (H, W), scaled to [0, 1]

    @property
    def file(self) -> str:
        return f"explain-{self.index:05d}.png"


def outcome(item: Item, binary: bool) -> str:
    if not binary:
        return "correct" if item.predicted == item.label else "misclassified"
    if item.predicted == 1:
        return "true positive" if item.label == 1 else "false positive"
    return "true negative" if item.label == 0 else "false negative"


def _png(item: Item, label_names: Sequence[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = item.image
    shown = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
    fig, axes = plt.subplots(1, 2, figsize=(4.2, 2.3), dpi=110)
    for ax in axes:
        ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_axis_off()
    axes[1].imshow(item.saliency, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    name = label_names[item.explained] if item.explained < len(label_names) else str(item.explained)
    axes[0].set_title("image", fontsize=8)
    axes[1].set_title(f"saliency: {name}", fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _name(names: Sequence[str], cls: int) -> str:
    return names[cls] if cls < len(names) else str(cls)


def render(items: Sequence[Item], label_names: Sequence[str], meta: dict) -> tuple[dict[str, bytes], str, dict]:
    """(PNG bytes by file name, the gallery's Markdown, the index) — nothing written yet."""
    binary = len(label_names) == 2 or (not label_names and max((i.label for i in items), default=0) <= 1)
    pngs: dict[str, bytes] = {}
    groups: dict[str, list[Item]] = {}
    for item in items:
        title = (f"label {_name(label_names, item.label)}, predicted {_name(label_names, item.predicted)}, "
                 f"p={item.score:.3f}")
        pngs[item.file] = _png(item, label_names, title)
        groups.setdefault(outcome(item, binary), []).append(item)
    order = (("true positive", "false negative", "false positive", "true negative") if binary
             else ("misclassified", "correct"))
    lines = [f"# Saliency at site {meta['site']}", "", NOTICE, "",
             f"- model: `{meta['model']}` ({meta['architecture']}, round {meta['round']})",
             f"- data: {meta['data']}, split `{meta['split']}`, {len(items)} image(s)",
             f"- method: {meta['method']} (MONAI `monai.visualize`), layer `{meta['layer']}`; "
             f"explained class: {meta['explained']}",
             f"- decision: {meta['decision']}", ""]
    for name in order:
        members = groups.get(name, [])
        lines += [f"## {name.capitalize()}s ({len(members)})", ""]
        if not members:
            lines += ["None among the explained images.", ""]
            continue
        lines += ["| image and saliency | label | predicted | score |", "|---|---|---|---:|"]
        lines += [f"| ![image {m.index}]({m.file}) | {_name(label_names, m.label)} | "
                  f"{_name(label_names, m.predicted)} | {m.score:.3f} |" for m in members]
        lines.append("")
    index = {**meta, "images": [{"file": i.file, "index": i.index, "label": i.label, "predicted": i.predicted,
                                 "score": i.score, "explained-class": i.explained, "group": outcome(i, binary)}
                                for i in items]}
    return pngs, "\n".join(lines), index


def write_gallery(out: Path, items: Sequence[Item], label_names: Sequence[str], meta: dict) -> Path:
    """Write the PNGs, ``explain.json`` and ``explain.html`` into ``out``; returns the HTML path."""
    from medfed.common.report_html import markdown_page

    pngs, markdown, index = render(items, label_names, meta)  # everything rendered before a file is written
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        atomic_write_bytes(out / name, lambda fh, d=data: fh.write(d), mode=0o600)
    page = markdown_page(markdown, out, "medfed explain")
    atomic_write_bytes(out / INDEX_FILE, lambda fh: fh.write((json.dumps(index, indent=2) + "\n").encode()),
                       mode=0o600)
    atomic_write_bytes(out / GALLERY_FILE, lambda fh: fh.write(page.encode("utf-8")), mode=0o600)
    return out / GALLERY_FILE
