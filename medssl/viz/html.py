"""A self-contained HTML report: tables, plotly figures (offline) and static images in one file.

nbconvert's HTML export drops widgets and, unless plotly's notebook renderer was
used, plotly figures too; this writer embeds plotly.js once, inline, and every
matplotlib figure as a base64 PNG, so the file opens anywhere without a network.
"""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from medssl._files import atomic_write_text

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.provenance{background:#fff6e0;border-left:4px solid #e0a000;padding:.6em 1em;margin:1em 0}
.note{color:#555;font-size:13px}img{max-width:100%}.scroll{overflow-x:auto}
"""


def _render(item: Any, plotly_js_done: list[bool]) -> str:
    if item is None:
        return ""
    if isinstance(item, str):
        return f"<p>{html.escape(item)}</p>"
    if isinstance(item, pd.DataFrame):
        table = item.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0)
        return f'<div class="scroll">{table}</div>'  # wide tables scroll instead of widening the page
    mod = type(item).__module__
    if mod.startswith("pandas.io.formats.style"):  # a Styler: a table with its cell highlights (report comparisons)
        return f'<div class="scroll">{item.to_html()}</div>'
    if mod.startswith("plotly"):
        include = "inline" if not plotly_js_done[0] else False
        plotly_js_done[0] = True
        return item.to_html(full_html=False, include_plotlyjs=include)
    if mod.startswith("matplotlib"):
        buf = io.BytesIO()
        item.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"/>'
    if isinstance(item, (bytes, bytearray)):  # PNG bytes
        return f'<img src="data:image/png;base64,{base64.b64encode(item).decode("ascii")}"/>'
    if isinstance(item, Path) and item.suffix.lower() == ".png":
        return _render(item.read_bytes(), plotly_js_done)
    return f"<pre>{html.escape(str(item))}</pre>"


def write_html_report(
    path: str | os.PathLike,
    title: str,
    sections: Sequence[tuple[str, Sequence[Any]]],
    *,
    provenance: str | None = None,
) -> Path:
    """Write ``sections`` (``[(heading, [items...])]``) to one self-contained HTML file, atomically.

    Items may be str (a paragraph), DataFrame, plotly Figure, matplotlib Figure, PNG bytes or a
    ``.png`` Path. ``provenance`` is shown in a highlighted box at the top.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = [False]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by medssl</p>']
    if provenance:
        parts.append(f'<div class="provenance"><b>Data provenance.</b> {html.escape(provenance)}</div>')
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(_render(it, done) for it in items)
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    return atomic_write_text(path, doc)
