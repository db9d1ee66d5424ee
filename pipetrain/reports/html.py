"""One self-contained HTML report: figures embedded as base64 PNG, no network needed."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

__all__ = ["Section", "figure_png", "render_html", "write_report"]


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


@dataclass(frozen=True, kw_only=True)
class Section:
    """A report section: an id (anchor), a title, paragraphs, tables and figures."""

    id: str
    title: str
    paragraphs: tuple[str, ...] = ()
    tables: tuple[tuple[tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = ()  # (header, rows)
    figures: tuple[tuple[str, bytes], ...] = ()  # (caption, png bytes)
    extra: dict[str, str] = field(default_factory=dict)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:.8em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:12px;color:#555}
nav a{margin-right:1em} .pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:600}
"""


def render_html(title: str, sections: Sequence[Section], *, subtitle: str = "") -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if subtitle:
        out.append(f"<p>{e(subtitle)}</p>")
    out.append("<nav>" + "".join(f"<a href='#{e(s.id)}'>{e(s.title)}</a>" for s in sections) + "</nav>")
    for s in sections:
        out.append(f"<section id='{e(s.id)}'><h2>{e(s.title)}</h2>")
        out.extend(f"<p>{p}</p>" for p in s.paragraphs)  # paragraphs may hold trusted inline markup
        for header, rows in s.tables:
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
            out.append("</tbody></table>")
        for caption, png in s.figures:
            b64 = base64.b64encode(png).decode("ascii")
            out.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{b64}'><figcaption>{e(caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(path: str | Path, title: str, sections: Sequence[Section], *, subtitle: str = "") -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(render_html(title, sections, subtitle=subtitle), encoding="utf-8")
    tmp.replace(p)
    return p
