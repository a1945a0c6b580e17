"""Self-contained HTML pages from medfed's Markdown: ``report.html`` of a run, ``explain.html`` of a site.

The page is one file that opens anywhere: images are embedded as base64 ``data:`` URIs, the CSS is
inline, there is no JavaScript, and a Content-Security-Policy forbids loading anything else.

``report.md`` is converted with a small Markdown subset of our own, so that whatever sections the
report gains are rendered without a new dependency: headings, paragraphs, ``-``/``*`` and ``1.``
lists, pipe tables (with ``\\|`` escapes and ``:---:`` alignment), fenced code, block quotes,
horizontal rules, and inline code, ``**bold**``, ``*italic*``, http(s) links and ``![alt](file)``
images. Every piece of text is HTML-escaped; raw HTML in the Markdown stays text.

An image is embedded only when its target is a PNG, JPEG, GIF or WebP file inside the run
directory (after resolving ``..`` and symbolic links), starts with that type's signature and is at
most ``MAX_IMAGE_BYTES`` long; any other target (an absolute path, a URL, a path escaping the run
directory, a missing or corrupt file) is replaced by a visible note and a warning in the log.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from medfed.common.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

HTML_FILE = "report.html"
MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp"}
# First bytes of each type: a file whose content does not match its name is not embedded.
_SIGNATURES = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",),
               "image/gif": (b"GIF87a", b"GIF89a"), "image/webp": (b"RIFF",)}
# Nothing but inline styles and data: images may load; scripts never run.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'"

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_ORDERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_RULE = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,})\s*$")
_FENCE = re.compile(r"^\s*```")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)?(\.\d+)?([eE][-+]?\d+)?\s*(%|s|[KMG]?i?B)?$")
_INLINE = re.compile(
    r"`(?P<code>[^`]+)`"
    r"|!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)(?:\s+\"[^\"]*\")?\)"
    r"|\[(?P<text>[^\]]+)\]\((?P<href>[^)\s]+)(?:\s+\"[^\"]*\")?\)"
    r"|\*\*(?P<bold>.+?)\*\*"
    r"|\*(?P<em>[^\s*](?:[^*]*[^\s*])?)\*"
    r"|\\(?P<escaped>[\\`*_{}\[\]()#+\-.!|<>])"
)
_IMAGE_ONLY = re.compile(r"^\s*!\[[^\]]*\]\([^)\s]+(?:\s+\"[^\"]*\")?\)\s*$")

STYLE = """
:root { color-scheme: light; --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --stripe: #f5f7fa;
        --accent: #2456a6; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1000px; padding: 24px 28px 48px; color: var(--fg);
       font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.75em; border-bottom: 2px solid var(--line); padding-bottom: .3em; }
h2 { font-size: 1.35em; margin-top: 2em; border-bottom: 1px solid var(--line); padding-bottom: .2em; }
h3 { font-size: 1.12em; margin-top: 1.6em; }
a { color: var(--accent); }
code { font: .9em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--stripe);
       padding: .1em .3em; border-radius: 3px; }
pre { background: var(--stripe); padding: 12px; overflow-x: auto; border-radius: 4px; }
pre code { padding: 0; background: none; }
blockquote { margin: 1em 0; padding: .2em 1em; border-left: 4px solid var(--line); color: var(--muted); }
.table-wrap { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: .93em; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f6; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: var(--stripe); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.center, th.center { text-align: center; }
figure { margin: 1.5em 0; text-align: center; }
figure img, p img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .9em; margin-top: .3em; }
nav.toc { background: var(--stripe); padding: 8px 16px; border-radius: 4px; font-size: .93em; }
nav.toc ul { margin: .3em 0; padding-left: 1.2em; columns: 2; }
.missing { color: #a12a2a; font-style: italic; }
footer { margin-top: 3em; color: var(--muted); font-size: .85em; }
@media print { body { max-width: none; } th { position: static; } nav.toc { display: none; } }
"""


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------
def image_data_uri(target: str, base_dir: Path) -> tuple[str | None, str]:
    """``(data URI, "")`` for an image file ``target`` inside ``base_dir``, else ``(None, reason)``."""
    if not target or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith(("/", "\\", "~")):
        return None, "only files inside the run directory are embedded (got a URL or an absolute path)"
    root = base_dir.resolve()
    path = (root / target).resolve()
    if not path.is_relative_to(root):
        return None, "the path leaves the run directory"
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None:
        return None, f"not an image type that is embedded ({', '.join(sorted(IMAGE_TYPES))})"
    if not path.is_file():
        return None, "file not found in the run directory"
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        return None, f"file is {size} bytes, over the {MAX_IMAGE_BYTES}-byte limit"
    data = path.read_bytes()
    if not data.startswith(_SIGNATURES[mime]):
        return None, f"the file is not a valid {path.suffix.lower()[1:].upper()} image"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", ""


def _img(alt: str, target: str, base_dir: Path) -> str:
    uri, reason = image_data_uri(target, base_dir)
    if uri is None:
        logger.warning("Not embedding image %r in %s: %s.", target, HTML_FILE, reason)
        return f'<span class="missing">[image not embedded: {html.escape(target)} ({html.escape(reason)})]</span>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


# ---------------------------------------------------------------------------
# Inline markup
# ---------------------------------------------------------------------------
def render_inline(text: str, base_dir: Path) -> str:
    """HTML of one line or table cell of Markdown; everything that is not markup is escaped."""
    out: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[position:match.start()]))
        position = match.end()
        if match.group("code") is not None:
            out.append(f"<code>{html.escape(match.group('code'))}</code>")
        elif match.group("src") is not None:
            out.append(_img(match.group("alt"), match.group("src"), base_dir))
        elif match.group("href") is not None:
            out.append(_link(match.group("text"), match.group("href"), base_dir))
        elif match.group("bold") is not None:
            out.append(f"<strong>{render_inline(match.group('bold'), base_dir)}</strong>")
        elif match.group("em") is not None:
            out.append(f"<em>{render_inline(match.group('em'), base_dir)}</em>")
        else:
            out.append(html.escape(match.group("escaped")))
    out.append(html.escape(text[position:]))
    return "".join(out)


def _link(text: str, href: str, base_dir: Path) -> str:
    """A link to a web page or an anchor in the page; anything else becomes text plus the target."""
    label = render_inline(text, base_dir)
    if re.match(r"^(https?://|#)", href, re.IGNORECASE):
        return f'<a href="{html.escape(href)}">{label}</a>'
    return f"{label} (<code>{html.escape(href)}</code>)"


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------
def split_row(line: str) -> list[str]:
    """Cells of a pipe-table row; ``\\|`` is a literal pipe inside a cell."""
    row = line.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row)]


def _alignments(separator: str) -> list[str]:
    aligns = []
    for cell in split_row(separator):
        left, right = cell.startswith(":"), cell.endswith(":")
        aligns.append("center" if left and right else "num" if right else "")
    return aligns


def _is_number(text: str) -> bool:
    return bool(_NUMBER.match(text)) and any(c.isdigit() for c in text)


def _numeric_columns(rows: Sequence[Sequence[str]], width: int) -> list[bool]:
    """True for a column whose filled cells (other than n/a) are all numbers, so it is right-aligned."""
    flags = []
    for column in range(width):
        cells = [row[column] for row in rows if row[column] and row[column].lower() != "n/a"]
        flags.append(bool(cells) and all(_is_number(cell) for cell in cells))
    return flags


def _cell(tag: str, text: str, align: str, base_dir: Path) -> str:
    attr = f' class="{align}"' if align else ""
    return f"<{tag}{attr}>{render_inline(text, base_dir)}</{tag}>"


def render_table(lines: Sequence[str], base_dir: Path) -> str:
    """A pipe table: header line, separator line, then body rows (padded or cut to the header).

    Columns marked ``---:`` or holding only numbers are right-aligned, ``:---:`` centred.
    """
    header = split_row(lines[0])
    rows = [(split_row(line) + [""] * len(header))[: len(header)] for line in lines[2:]]
    marked = (_alignments(lines[1]) + [""] * len(header))[: len(header)]
    aligns = [mark or ("num" if numeric else "") for mark, numeric in zip(marked, _numeric_columns(rows, len(header)))]
    head = "".join(_cell("th", cell, align, base_dir) for cell, align in zip(header, aligns))
    body = "".join("<tr>" + "".join(_cell("td", c, a, base_dir) for c, a in zip(row, aligns)) + "</tr>"
                   for row in rows)
    return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, n = base, 2
    while slug in used:
        slug, n = f"{base}-{n}", n + 1
    used.add(slug)
    return slug


def _take(lines: Sequence[str], start: int, keep: Callable[[str], bool]) -> int:
    """Index of the first line at or after ``start`` for which ``keep`` is false."""
    end = start
    while end < len(lines) and keep(lines[end]):
        end += 1
    return end


def _is_table_start(lines: Sequence[str], i: int) -> bool:
    return (i + 1 < len(lines) and "|" in lines[i] and "|" in lines[i + 1]
            and bool(_TABLE_SEP.match(lines[i + 1])))


def _list(lines: Sequence[str], i: int, item: re.Pattern[str], tag: str, base_dir: Path) -> tuple[str, int]:
    items: list[str] = []
    while i < len(lines):
        match = item.match(lines[i])
        if match:
            items.append(match.group(1))
        elif items and lines[i].startswith(("  ", "\t")) and lines[i].strip():
            items[-1] += " " + lines[i].strip()  # continuation line of the last item
        else:
            break
        i += 1
    body = "".join(f"<li>{render_inline(text, base_dir)}</li>" for text in items)
    return f"<{tag}>{body}</{tag}>", i


def render_markdown(text: str, base_dir: Path) -> tuple[str, list[tuple[int, str, str]]]:
    """``(body HTML, headings)`` of Markdown ``text``; headings are ``(level, id, text)``.

    Images are resolved against ``base_dir`` (the run directory) and embedded.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    blocks: list[str] = []
    headings: list[tuple[int, str, str]] = []
    used: set[str] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif _FENCE.match(line):
            end = _take(lines, i + 1, lambda s: not _FENCE.match(s))
            blocks.append(f"<pre><code>{html.escape(chr(10).join(lines[i + 1:end]))}</code></pre>")
            i = end + 1
        elif heading := _HEADING.match(line):
            level, title = len(heading.group(1)), heading.group(2)
            slug = _slug(title, used)
            headings.append((level, slug, title))
            blocks.append(f'<h{level} id="{slug}">{render_inline(title, base_dir)}</h{level}>')
            i += 1
        elif _is_table_start(lines, i):
            end = _take(lines, i + 2, lambda s: "|" in s and bool(s.strip()))
            blocks.append(render_table(lines[i:end], base_dir))
            i = end
        elif _RULE.match(line):
            blocks.append("<hr>")
            i += 1
        elif _BULLET.match(line):
            block, i = _list(lines, i, _BULLET, "ul", base_dir)
            blocks.append(block)
        elif _ORDERED.match(line):
            block, i = _list(lines, i, _ORDERED, "ol", base_dir)
            blocks.append(block)
        elif line.lstrip().startswith(">"):
            end = _take(lines, i, lambda s: s.lstrip().startswith(">"))
            quote = " ".join(s.lstrip()[1:].strip() for s in lines[i:end])
            blocks.append(f"<blockquote><p>{render_inline(quote, base_dir)}</p></blockquote>")
            i = end
        elif _IMAGE_ONLY.match(line):
            match = _INLINE.search(line)
            alt = match.group("alt") if match else ""
            caption = f"<figcaption>{html.escape(alt)}</figcaption>" if alt else ""
            blocks.append(f"<figure>{render_inline(line.strip(), base_dir)}{caption}</figure>")
            i += 1
        else:
            end = _take(lines, i + 1, lambda s: bool(s.strip()) and not _starts_block(lines, s))
            paragraph = " ".join(s.strip() for s in lines[i:end])
            blocks.append(f"<p>{render_inline(paragraph, base_dir)}</p>")
            i = end
    return "\n".join(blocks), headings


def _starts_block(lines: Sequence[str], line: str) -> bool:
    """True when ``line`` would open a block of its own (ends a paragraph)."""
    return bool(_HEADING.match(line) or _FENCE.match(line) or _BULLET.match(line) or _ORDERED.match(line)
                or _RULE.match(line) or _IMAGE_ONLY.match(line) or line.lstrip().startswith(("|", ">")))


# ---------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------
def _toc(headings: Sequence[tuple[int, str, str]]) -> str:
    sections = [(slug, title) for level, slug, title in headings if level == 2]
    if len(sections) < 3:
        return ""
    items = "".join(f'<li><a href="#{slug}">{html.escape(title)}</a></li>' for slug, title in sections)
    return f'<nav class="toc"><strong>Contents</strong><ul>{items}</ul></nav>'


def markdown_page(text: str, base_dir: Path, source_name: str = "report.md") -> str:
    """A complete, self-contained HTML page of Markdown ``text`` (images from ``base_dir``)."""
    body, headings = render_markdown(text, base_dir)
    title = next((t for level, _, t in headings if level == 1), source_name)
    title = re.sub(r"[`*\\]", "", title)
    toc = _toc(headings)
    if headings and headings[0][0] == 1 and toc:  # contents right after the page title
        first, _, rest = body.partition("\n")
        body = f"{first}\n{toc}\n{rest}"
    elif toc:
        body = f"{toc}\n{body}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        f"<footer>Written by medfed from {html.escape(source_name)}; self-contained (images embedded).</footer>\n"
        "</body>\n</html>\n"
    )


def write_report_html(markdown_path: Path | str) -> Path:
    """Write ``report.html`` beside ``markdown_path`` (a run directory's ``report.md``); return its path."""
    markdown_path = Path(markdown_path)
    if not markdown_path.is_file():
        raise FileNotFoundError(
            f"{markdown_path} not found; write it first with 'medfed report RUN_DIR', which writes both files."
        )
    out = markdown_path.with_name(HTML_FILE)
    page = markdown_page(markdown_path.read_text(encoding="utf-8"), markdown_path.parent, markdown_path.name)
    atomic_write_bytes(out, lambda fh: fh.write(page.encode("utf-8")), mode=0o644)  # readable like report.md
    logger.info("Wrote %s", out)
    return out
