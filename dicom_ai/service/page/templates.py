"""The page's HTML building blocks: the document, its inline style, tables and badges.

Every text that reaches the page goes through :func:`text` (``html.escape`` with quotes), and
attribute values are built only by :func:`attr`; the page loads nothing from anywhere (the style
is inline, no script), so it renders the same on a workstation without internet access.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

#: Seconds between automatic reloads (a ``<meta http-equiv="refresh">``; the page has no script).
REFRESH_S = 30

STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #1b1f24; }
header { position: sticky; top: 0; background: #fff; padding: .6rem 0;
  border-bottom: 1px solid #ccd; }
h1 { font-size: 1.3rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; }
h3 { font-size: 1rem; margin: .2rem 0; }
.disclaimer { display: inline-block; margin-top: .3rem; padding: .15rem .6rem; font-weight: 700;
  background: #fff3b0; border: 1px solid #c9a400; border-radius: 3px; }
.meta { color: #57606a; font-size: .85rem; }
table { border-collapse: collapse; margin: .3rem 0 .6rem; }
th, td { border: 1px solid #d0d7de; padding: .2rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.uid { font-family: ui-monospace, monospace; font-size: .85rem; word-break: break-all; }
.study { border: 1px solid #d0d7de; border-radius: 6px; padding: .6rem .9rem; margin: .8rem 0; }
.result { margin: .6rem 0 .2rem; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: 9px; font-size: .8rem;
  border: 1px solid #8c959f; }
.ok, .done, .delivered, .complete, .positive { background: #dafbe1; border-color: #4ac26b; }
.pending, .queued, .running, .receiving, .retrying { background: #ddf4ff; border-color: #54aeff; }
.failed, .dead, .rejected, .failing, .error { background: #ffebe9; border-color: #ff8182; }
.thumbs { display: flex; flex-wrap: wrap; gap: .5rem; margin: .3rem 0; }
.thumbs figure { margin: 0; }
.thumbs img { display: block; max-width: 256px; max-height: 256px; border: 1px solid #d0d7de;
  background: #000; }
.thumbs figcaption { font-size: .75rem; color: #57606a; max-width: 256px; word-break: break-all; }
.empty { color: #57606a; font-style: italic; }
"""


def text(value: object) -> str:
    """``value`` as HTML text: ``None`` is empty, everything else is escaped (quotes too)."""
    return "" if value is None else html.escape(str(value), quote=True)


def attr(name: str, value: object) -> str:
    """`` name="value"`` with the value escaped for a double-quoted attribute."""
    return f' {name}="{text(value)}"'


def badge(state: object) -> str:
    """A state as a coloured label; its class is the state when it is a known plain word."""
    word = str(state)
    css = word if word.isascii() and word.isalpha() else ""
    return f'<span class="badge{" " + css if css else ""}">{text(word)}</span>'


def uid(value: object) -> str:
    """A UID in monospace (UIDs are long; the style lets them wrap anywhere)."""
    return f'<span class="uid">{text(value)}</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
          numeric: frozenset[int] = frozenset(), empty: str = "none") -> str:
    """A table; ``rows`` hold cells that are **already HTML** (built with :func:`text` & co).

    Parameters
    ----------
    headers:
        Column titles (plain text, escaped here).
    rows:
        Cells as HTML fragments.
    numeric:
        Indices of right-aligned columns.
    empty:
        Shown instead of the table when there is no row.
    """
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{cell}</td>'
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    if not body:
        return f'<p class="empty">{text(empty)}</p>'
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def document(title: str, header: str, sections: Iterable[str]) -> bytes:
    """The whole page as UTF-8.

    Parameters
    ----------
    title:
        The window title (plain text).
    header:
        HTML of the sticky header (title, disclaimer, generation time).
    sections:
        HTML of the page's sections, in order.
    """
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="refresh" content="{REFRESH_S}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer">'
            # An empty icon: without one the browser asks for /favicon.ico, which is not ours.
            '<link rel="icon" href="data:,">'
            f"<title>{text(title)}</title><style>{STYLE}</style></head>"
            f"<body><header>{header}</header><main>{''.join(sections)}</main></body></html>\n"
            ).encode()


__all__ = ["REFRESH_S", "STYLE", "attr", "badge", "document", "table", "text", "uid"]
