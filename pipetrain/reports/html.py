"""One self-contained HTML report: figures embedded as base64 PNG, no network needed.

The page is the Jinja2 template ``templates/report.html.j2`` (shipped in the package) rendered
with autoescaping on, so model, topology and plan names and every other string a user can
choose are escaped. A paragraph that needs inline markup is a :class:`markupsafe.Markup` built
with ``Markup(...).format(...)``, which escapes the values it formats in.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
from markupsafe import Markup
from matplotlib.figure import Figure

from pipetrain.serde import write_text_atomic

__all__ = ["Markup", "Section", "figure_png", "render_html", "write_report"]

_TEMPLATE = "report.html.j2"


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


@dataclass(frozen=True, kw_only=True)
class Section:
    """A report section: an id (anchor), a title, paragraphs, tables and figures.

    Paragraphs, titles and cells are plain text (escaped) unless they are :class:`Markup`.
    """

    id: str
    title: str
    paragraphs: tuple[str, ...] = ()
    tables: tuple[tuple[tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = ()  # (header, rows)
    figures: tuple[tuple[str, bytes], ...] = ()  # (caption, png bytes)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # autoescape=True for every template, whatever its file name: the page holds user-chosen names
    return jinja2.Environment(loader=jinja2.PackageLoader("pipetrain.reports", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_html(title: str, sections: Sequence[Section], *, subtitle: str = "") -> str:
    views = [{"id": s.id, "title": s.title, "paragraphs": s.paragraphs, "tables": s.tables,
              "figures": [(caption, base64.b64encode(png).decode("ascii")) for caption, png in s.figures]} for s in sections]
    return _environment().get_template(_TEMPLATE).render(title=title, subtitle=subtitle, sections=views)


def write_report(path: str | Path, title: str, sections: Sequence[Section], *, subtitle: str = "") -> Path:
    return write_text_atomic(path, render_html(title, sections, subtitle=subtitle))
