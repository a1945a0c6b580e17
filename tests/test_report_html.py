"""report.html: the Markdown subset renderer (escaping, image containment) and the page in a real
headless Chromium (figures loaded, tables and headings present, nothing fetched from outside)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.common.cli import main
from medfed.common import report_html
from medfed.server import report
from medfed.common.report_html import markdown_page, render_inline, render_markdown
from tests.test_report import make_round, write_run

# A valid 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not installed (Debian: apt-get install -y --no-install-recommends chromium; .ci/run does it)",
)


def _png(path: Path, payload: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG + payload)
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------
# Markdown subset: escaping
# ---------------------------------------------------------------------------
def test_table_cells_and_headings_stay_text(tmp_path):
    md = "\n".join([
        "# Report <b>x</b>",
        "",
        "| site | auc |",
        "|---|---|",
        "| <script>alert(1)</script> | 0.5 |",
        '| <img src=x onerror="alert(2)"> | n/a |',
        "",
        "- a `<b>code</b>` and **<i>bold</i>**",
    ])
    body, _ = render_markdown(md, tmp_path)
    assert "<script" not in body and "<img" not in body and "<i>" not in body and "<b>" not in body
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in body
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in body
    assert '<h1 id="report-b-x-b">Report &lt;b&gt;x&lt;/b&gt;</h1>' in body
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in body
    assert "<strong>&lt;i&gt;bold&lt;/i&gt;</strong>" in body
    # text before, between and after inline markup is escaped too
    assert render_inline("<em>a</em> `b` <i>c</i> **d** <u>", tmp_path) == (
        "&lt;em&gt;a&lt;/em&gt; <code>b</code> &lt;i&gt;c&lt;/i&gt; <strong>d</strong> &lt;u&gt;")


def test_page_title_alt_and_link_are_escaped(tmp_path):
    _png(tmp_path / "p.png")
    page = markdown_page('# "><script>x</script>\n\n![a" onload="alert(1)](p.png)\n', tmp_path)
    assert "<script" not in page
    assert "<title>&quot;&gt;&lt;script&gt;x&lt;/script&gt;</title>" in page
    assert 'alt="a&quot; onload=&quot;alert(1)"' in page
    assert render_inline("[x](javascript:alert(1))", tmp_path).startswith("x (<code>javascript:")
    assert render_inline('[doc](https://example.org/a?b=1&c="2")', tmp_path) == (
        '<a href="https://example.org/a?b=1&amp;c=&quot;2&quot;">doc</a>')


# ---------------------------------------------------------------------------
# Markdown subset: images are embedded only from inside the run directory
# ---------------------------------------------------------------------------
def test_image_inside_run_dir_is_embedded_as_data_uri(tmp_path):
    run = tmp_path / "run"
    _png(run / "plots" / "auc.png")
    body, _ = render_markdown("![AUC by round](plots/auc.png)", run)
    assert body == (f'<figure><img src="data:image/png;base64,{_b64(PNG)}" alt="AUC by round">'
                    "<figcaption>AUC by round</figcaption></figure>")


@pytest.mark.parametrize("target", [
    "../outside.png",            # leaves the run directory
    "plots/../../outside.png",   # leaves it after normalisation
    "link.png",                  # a symbolic link inside that points outside
    "ABSOLUTE",                  # absolute path (filled in below) to an existing PNG
    "file:///etc/passwd",
    "http://example.org/x.png",
    "data:image/png;base64,AAAA",
    "missing.png",
    "notes.txt",                 # not an image type
    "fake.png",                  # named .png but not a PNG
])
def test_image_outside_run_dir_or_invalid_is_not_embedded(tmp_path, caplog, target):
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    outside = _png(tmp_path / "outside.png", payload=b"secret-bytes")
    (run / "link.png").symlink_to(outside)
    (run / "notes.txt").write_text("hello")
    (run / "fake.png").write_bytes(b"<svg onload=alert(1)>")
    target = str(outside) if target == "ABSOLUTE" else target
    with caplog.at_level("WARNING", logger="medfed.common.report_html"):
        body, _ = render_markdown(f"![plot]({target})", run)
    assert "<img" not in body and "data:image" not in body.replace(html.escape(target), "")
    assert _b64(PNG + b"secret-bytes") not in body
    assert '<span class="missing">[image not embedded: ' in body
    assert "Not embedding image" in caplog.text


# ---------------------------------------------------------------------------
# Markdown subset: blocks
# ---------------------------------------------------------------------------
def test_tables_lists_and_paragraphs(tmp_path):
    md = "\n".join([
        "## Failures",
        "",
        "| round | site | reason |",
        "|---|:---:|---|",
        "| 2 | site-1 | timeout \\| no reply |",
        "| 10 | site-2 |",
        "",
        "Two lines of",
        "one paragraph with *emphasis*.",
        "",
        "1. first",
        "2. second",
        "   continued",
        "",
        "```",
        "| not | a table |",
        "```",
    ])
    body, headings = render_markdown(md, tmp_path)
    assert headings == [(2, "failures", "Failures")]
    assert '<th class="num">round</th><th class="center">site</th><th>reason</th>' in body
    assert '<tr><td class="num">2</td><td class="center">site-1</td><td>timeout | no reply</td></tr>' in body
    assert '<tr><td class="num">10</td><td class="center">site-2</td><td></td></tr>' in body  # padded
    assert "<p>Two lines of one paragraph with <em>emphasis</em>.</p>" in body
    assert "<ol><li>first</li><li>second continued</li></ol>" in body
    assert "<pre><code>| not | a table |</code></pre>" in body
    assert body.count("<table>") == 1


def test_numeric_columns_are_right_aligned(tmp_path):
    body, _ = render_markdown("| total | value | n |\n|---|---|---|\n| bytes | 1.73 MiB | n/a |\n"
                              "| time | 36.0 s | 45 |", tmp_path)
    assert '<th>total</th><th class="num">value</th><th class="num">n</th>' in body
    assert '<td>bytes</td><td class="num">1.73 MiB</td><td class="num">n/a</td>' in body


def test_contents_list_and_unique_heading_ids(tmp_path):
    page = markdown_page("# Run\n\n## A\n\n## B\n\n## A\n", tmp_path)
    assert '<h2 id="a">A</h2>' in page and '<h2 id="a-2">A</h2>' in page
    assert '<nav class="toc"><strong>Contents</strong><ul><li><a href="#a">A</a></li>' in page
    assert page.index("<h1") < page.index('<nav class="toc">') < page.index('<h2 id="a">')


# ---------------------------------------------------------------------------
# write_report writes both files; the CLI prints both paths
# ---------------------------------------------------------------------------
@pytest.fixture
def fake_run(tmp_path) -> Path:
    return write_run(tmp_path / "run-1", [make_round(i) for i in (1, 2, 3)])


def _assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    srcs = re.findall(r'\bsrc="([^"]*)"', page)
    assert srcs and all(src.startswith("data:image/png;base64,") for src in srcs)
    assert not re.search(r'\b(?:src|href)="(?!data:|#|https?://)', page)


def test_write_report_also_writes_self_contained_html(fake_run):
    md_path = report.write_report(fake_run)
    page = (fake_run / report_html.HTML_FILE).read_text()
    _assert_self_contained(page)
    plots = re.findall(r"\]\(([^)]+\.png)\)", md_path.read_text())
    assert plots == ["site_val_auc.png", "site_test_auc.png", "train_loss.png"]
    for name in plots:  # every plot of report.md is embedded, byte for byte
        assert f'src="data:image/png;base64,{_b64((fake_run / name).read_bytes())}"' in page
    assert "<td>timeout | no reply</td>" in page
    assert '<tr><td>site-1</td><td class="num">45</td><td class="num">0.7222</td>' in page


def test_cli_report_prints_both_paths(fake_run, capsys):
    assert main(["report", str(fake_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [str(fake_run / "report.md"), str(fake_run / "report.html")]
    assert (fake_run / "report.html").is_file()


def test_write_report_html_without_markdown_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="medfed report RUN_DIR"):
        report_html.write_report_html(tmp_path / "report.md")


# ---------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------
# Runs once the page has loaded; writes what the reader would see into the DOM as JSON.
_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = {
    images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight]),
    alts: imgs.map(i => i.alt),
    tables: document.querySelectorAll("table").length,
    headings: [...document.querySelectorAll("h1, h2")].map(h => h.textContent),
    cells: [...document.querySelectorAll("td")].map(td => td.textContent),
    fetched: performance.getEntriesByType("resource").map(r => r.name),
  };
  const pre = document.createElement("pre");
  pre.id = "medfed-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def render_in_chromium(page_path: Path, work: Path) -> dict:
    """Load a copy of ``page_path`` with the check script in headless Chromium; return the check."""
    page = page_path.read_text()
    assert "script-src 'none'" in page
    # The copy allows inline scripts (for the check only); the image and fetch rules stay as shipped.
    page = page.replace("script-src 'none'", "script-src 'unsafe-inline'").replace("</body>", _CHECK + "</body>")
    copy = page_path.with_name("checked-" + page_path.name)
    copy.write_text(page)
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={work / 'chromium-profile'}", "--virtual-time-budget=10000",
         "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="medfed-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"check did not run (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@needs_chromium
def test_browser_detects_a_broken_image(tmp_path):
    """The browser check itself can fail: an undecodable image counts as not loaded."""
    page = markdown_page("# Broken\n", tmp_path).replace(
        "</main>", '<img alt="broken" src="data:image/png;base64,AAAAAAAA"></main>')
    (tmp_path / "broken.html").write_text(page)
    check = render_in_chromium(tmp_path / "broken.html", tmp_path)
    assert check["images"] == 1 and check["loaded"] == 0


@needs_chromium
def test_fake_run_report_renders_in_chromium(fake_run, tmp_path):
    report.write_report(fake_run)
    check = render_in_chromium(fake_run / report_html.HTML_FILE, tmp_path)
    assert check["images"] == 3 and check["loaded"] == 3, check
    assert all(size == [770, 495] for size in check["sizes"])  # the plots' own pixels
    assert check["fetched"] == []
    assert check["headings"][0] == "Run report: run-1"
    assert {"Test metrics", "Sites", "Time and traffic", "Failures", "Plots"} <= set(check["headings"])
    assert check["tables"] == 4
    assert "timeout | no reply" in check["cells"]


@pytest.fixture(scope="session")
def simulated_run(tmp_path_factory) -> Path:
    """A real federated run directory: synthetic data, 2 sites, 2 rounds of 2 local steps."""
    out = tmp_path_factory.mktemp("report-html") / "fed"
    result = subprocess.run(
        [sys.executable, "-m", "medfed.common.cli", "simulate", "--sites", "2", "--rounds", "2",
         "--local-steps", "2", "--batch-size", "16", "--seed", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@needs_chromium
def test_simulated_run_report_renders_in_chromium(simulated_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "medfed.common.cli", "report", str(simulated_run)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(simulated_run / "report.md"), str(simulated_run / "report.html")]
    page_path = simulated_run / report_html.HTML_FILE
    _assert_self_contained(page_path.read_text())
    figures = re.findall(r"!\[([^\]]*)\]\(", (simulated_run / "report.md").read_text())
    assert len(figures) >= 3  # validation AUC, test AUC, training loss at least
    check = render_in_chromium(page_path, tmp_path)
    assert check["alts"] == figures
    assert check["images"] == len(figures) and check["loaded"] == len(figures), check
    assert check["fetched"] == []
    assert {"Model selection", "Test metrics", "Sites", "Plots"} <= set(check["headings"])
    assert check["tables"] >= 3
    assert "site-0" in check["cells"] and "site-1" in check["cells"]
