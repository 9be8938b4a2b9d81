"""Render EDA sections (text, tables, figures) as Markdown and as one HTML page.

Both formats come from the same sections so they never disagree; figures are linked by file name
(the PNGs sit beside the summaries), so the folder can be moved or served as is.
"""
from __future__ import annotations

import html
import numbers
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (caption, table)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, file name)


def _cell(value) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return f"{float(value):,.2f}"


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """Index as first column, numbers formatted once for both renderings."""
    out = table.reset_index() if table.index.name is not None else table
    return out.astype(object).map(_cell)


def markdown_table(table: pd.DataFrame) -> str:
    shown = _display(table)
    escape = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(escape(c) for c in shown.columns) + " |",
             "|" + "|".join("---" for _ in shown.columns) + "|"]
    lines += ["| " + " | ".join(escape(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}", ""]
    for s in sections:
        parts += [f"## {s.title}", ""]
        for t in s.text:
            parts += [t, ""]
        for caption, table in s.tables:
            parts += [f"**{caption}**", "", markdown_table(table), ""]
        for caption, name in s.figures:
            parts += [f"![{caption}]({name})", ""]
    return "\n".join(parts)


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #4c72b0; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f5f9; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
.caption { font-weight: 600; margin-bottom: .2em; }
"""


def to_html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{esc(s.title)}</h2>")
        body += [f"<p>{esc(t)}</p>" for t in s.text]
        for caption, table in s.tables:
            body.append(f'<div class="caption">{esc(caption)}</div>')
            body.append(_display(table).to_html(index=False, border=0, escape=True))
        for caption, name in s.figures:
            body.append(f'<figure><img src="{esc(name)}" alt="{esc(caption)}">'
                        f"<figcaption>{esc(caption)}</figcaption></figure>")
    head = f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{esc(title)}</title>'
    return head + f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
