"""Self-contained HTML pages: one per run (RUN/index.html, analyze.py) and one per report
(report.py). Every picture is embedded (PNG data URIs), the only script is inline (sortable tables,
and a count of the images that loaded, which the tests read), and nothing is fetched: the page opens
from a file, offline, in any browser, and can be mailed as it is."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; padding: 0 24px; max-width: 1200px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 3px 9px; border-bottom: 1px solid #eee; }
th { cursor: pointer; background: #f6f6f6; text-align: left; } th:hover { background: #e8e8e8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; border: 1px solid #eee; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } .grid figure { margin: 0; width: 132px; font-size: 11px; }
.grid img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f8f8f8; padding: 10px; max-height: 420px; overflow: auto; font-size: 12px; }
.facts span { display: inline-block; margin: 0 18px 6px 0; } .facts b { font-size: 16px; }
"""

SCRIPT = """
function sortTable(th) {
  const table = th.closest('table'), body = table.tBodies[0], k = th.cellIndex;
  const asc = th.dataset.order !== 'asc'; th.dataset.order = asc ? 'asc' : 'desc';
  const key = r => { const t = r.cells[k].dataset.v ?? r.cells[k].textContent; const n = parseFloat(t);
                     return isNaN(n) ? t.toLowerCase() : n; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
                .forEach(r => body.appendChild(r));
}
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def png_uri(source: Path | bytes | np.ndarray) -> str:
    """A data URI for a PNG file, PNG bytes or an (H, W, 3) uint8 image."""
    if isinstance(source, np.ndarray):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(source).save(buffer, format="PNG")
        source = buffer.getvalue()
    elif isinstance(source, Path):
        source = source.read_bytes()
    return "data:image/png;base64," + base64.b64encode(source).decode()


def figure(path: Path, alt: str) -> str:
    """An embedded picture, or a note where the file was not made."""
    if not path.is_file():
        return f"<p><i>{html.escape(alt)}: not made for this run.</i></p>"
    return f'<img class="figure" alt="{html.escape(alt)}" src="{png_uri(path)}">'


def table(rows: list[dict], columns: list[str], table_id: str = "") -> str:
    """A table sortable by any column (click its header); numbers right-aligned, sorted as numbers."""
    head = "".join(f'<th onclick="sortTable(this)">{html.escape(c)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            if isinstance(value, float):
                cells.append(f'<td class="num" data-v="{value}">{value:.2f}</td>')
            elif isinstance(value, int):
                cells.append(f'<td class="num" data-v="{value}">{value:,}</td>')
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def thumbnails(items: list[tuple[np.ndarray, str]]) -> str:
    """Small images with captions, in a wrapping grid."""
    cells = [
        f'<figure><img alt="{html.escape(c)}" src="{png_uri(img)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for img, c in items
    ]
    return f'<div class="grid">{"".join(cells)}</div>'


def facts(pairs: list[tuple[str, str]]) -> str:
    return (
        '<p class="facts">'
        + "".join(f"<span>{html.escape(k)} <b>{html.escape(v)}</b></span>" for k, v in pairs)
        + "</p>"
    )


def write_page(path: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """An HTML page of `sections` ((heading, HTML) pairs; an empty heading: no heading)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append((f"<h2>{html.escape(heading)}</h2>" if heading else "") + body)
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>{''.join(parts)}</body></html>\n"
    )
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
