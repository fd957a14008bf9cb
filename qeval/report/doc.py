"""The report's document model: blocks (headings, paragraphs, lists, tables, images) rendered to
Markdown and to one self-contained HTML page from the same list, so the two never disagree. User
text (model paths, task and arm names) is escaped in both.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Iterable, Union


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    """One table, rendered to both Markdown and HTML; `numeric[i]` right-aligns column i."""
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.numeric:
            self.numeric = [False] * len(self.header)


@dataclass
class Image:
    alt: str
    filename: str


Block = Union[Heading, Para, Bullets, Table, Image]


@dataclass
class Section:
    """One section's share of the report: its blocks, the PNGs they show, its CSV files, and the
    sentences the report opens with (e.g. a pre-quantized baseline)."""
    blocks: list
    images: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    banners: list = field(default_factory=list)


_MD_ACTIVE = re.compile(r"([\\`*\[\]])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md_text(text: str) -> str:
    """Neutralise Markdown and HTML in text that may come from users (model paths, task and arm
    names): a task called `<script>` or `**x**` or `[a](javascript:..)` reads as itself, not as markup,
    and a newline cannot start a heading. Intra-word underscores (qeval_analogy) stay as they are:
    they cannot start emphasis in GitHub-flavoured Markdown."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    text = _MD_ACTIVE.sub(lambda m: "\\" + m.group(0), text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return ("\\" + text) if text[:1] in ("#", "+", "-", "=") and not text[1:2].isdigit() else text


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|")


def to_markdown(blocks: Iterable[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown; images are relative links to sibling files."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {_md_text(b.text)}")
        elif isinstance(b, Para):
            out.append(_md_text(b.text))
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {_md_text(item)}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "|".join("---:" if num else "---" for num in b.numeric) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.filename})")
        out.append("")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1.25rem; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f0f0f0; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; }
"""


def to_html(blocks: Iterable[Block], images: dict[str, bytes], title: str) -> str:
    """Render blocks as one self-contained HTML page: inline CSS, PNGs as base64 data URIs."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>\n" + "\n".join(f"<li>{e(i)}</li>" for i in b.items) + "\n</ul>")
        elif isinstance(b, Table):
            def cls(num: bool) -> str:
                return ' class="num"' if num else ""
            head = "".join(f"<th{cls(n)}>{e(h)}</th>" for h, n in zip(b.header, b.numeric))
            rows = "\n".join("<tr>" + "".join(f"<td{cls(n)}>{e(c)}</td>" for c, n in zip(row, b.numeric))
                             + "</tr>" for row in b.rows)
            body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
        elif isinstance(b, Image):
            data = base64.b64encode(images[b.filename]).decode("ascii")
            body.append(f'<p><img alt="{e(b.alt)}" src="data:image/png;base64,{data}"></p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
