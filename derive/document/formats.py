"""The two output formats of a document: how each writes prose, code, inline and displayed math,
links to a sibling document, and its header comments. Templates place the strings these return."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .display import Display
from .notation import md_code, md_doc, tex_code, tex_doc

PREAMBLE = "derivation_preamble.tex.j2"  # shared by every LaTeX document and the combined book


@dataclass(frozen=True)
class Format:
    template: str
    text: Callable[[str], str]  # prose (a docstring, a title)
    code: Callable[[str], str]  # an inline code span (a name, a source line)
    comment: tuple[str, str]  # header comment opener and closer
    math: Callable[[str], str]  # inline math
    display: Callable[[Display], str]  # a displayed equation, ready to place on lines of its own
    link: Callable[[str, str], str]  # (document stem, text) -> a link to that sibling document
    includes: tuple[str, ...] = ()  # templates the main one includes (part of the inputs hash)
    markdown: bool = False

    def displays(self, items: list[Display]) -> list[str]:
        return [self.display(d) for d in items]


def _tex_display(d: Display) -> str:
    # TeX measures: the one-line form where it fits, else the narrower of the two (preamble: \fitpick)
    if d.lines:
        return "\\[\n  \\fitpick{%s}\n  {%s}\n\\]" % (d.one_line, d.broken)
    return "\\[\n  \\fit{%s}\n\\]" % d.one_line


def _markdown_display(d: Display) -> str:
    # a ```math block is a code block to GitHub's Markdown parser: no escape or emphasis touches it
    return "```math\n%s\n```" % (d.broken if d.lines and d.wide else d.one_line)


TEX = Format("derivation.tex.j2", text=tex_doc, code=tex_code, comment=("%", ""), math=lambda s: f"${s}$",
             display=_tex_display, link=lambda stem, text: r"\doclink{%s}{%s}" % (stem, text),
             includes=(PREAMBLE, "derivation_graph.tex.j2"))
MARKDOWN = Format("derivation.md.j2", text=md_doc, code=md_code, comment=("<!--", " -->"),
                  # $`...`$ is GitHub's inline math: its content is a code span, safe from the parser
                  math=lambda s: f"$`{s}`$", display=_markdown_display,
                  link=lambda stem, text: f"[{text}]({stem}.md)", includes=("derivation_graph.md.j2",), markdown=True)

__all__ = ["Format", "TEX", "MARKDOWN", "PREAMBLE"]
