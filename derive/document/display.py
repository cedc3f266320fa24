"""Displayed equations that fit the page: one line where it fits, else one term per line.

Every equation a document shows is a ``Display``: the one-line form, and a form broken over lines
(``aligned``): a long sum one contribution per line, a product with a long sum as its factor
``prefix \\Big( ... \\Big)`` with the sum broken inside, a sum over an index with a long body
``\\sum_r \\Big( ... \\Big)``. The break points come from the expression's own structure, never
from the printed string.

Widths are estimated from the LaTeX (``width``: a fraction is as wide as its wider half, a
subscript counts less than a letter). LaTeX documents give TeX both forms and TeX, which knows the
real widths, takes the one-line form when it fits (``\\fitpick`` in the preamble); Markdown
documents take the broken form when the estimate is over ``MARKDOWN_WIDTH``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import sympy as sp

from ..symbolic import Red
from .notation import Printer, Sigma, exact

LINE_WIDTH = 44.0  # a line of the broken form, in estimated letter widths (about 14 cm at 11 pt)
MARKDOWN_WIDTH = 70.0  # wider than this, a Markdown display is broken (GitHub scrolls a wide one)

_COMMAND = re.compile(r"\\([A-Za-z]+|.)")
_NARROW = {"left", "right", "Big", "big", "Bigg", "bigg", ",", ";", "!", "quad", "qquad", "displaystyle", "limits"}
_ARGUMENT_COMMANDS = {"mathrm": 0.85, "operatorname": 0.85, "mathbf": 1.0, "overline": 1.0, "sqrt": 1.0,
                      "text": 0.8, "texttt": 0.9, "mathit": 1.0, "boldsymbol": 1.0}


def _group(tex: str, start: int) -> tuple[str, int]:
    """The brace group (or single token) starting at ``start``: (its content, the index after it)."""
    while start < len(tex) and tex[start] == " ":
        start += 1
    if start >= len(tex):
        return "", start
    if tex[start] != "{":
        m = _COMMAND.match(tex, start)
        end = m.end() if m else start + 1
        return tex[start:end], end
    depth = 0
    for k in range(start, len(tex)):
        depth += {"{": 1, "}": -1}.get(tex[k], 0)
        if depth == 0:
            return tex[start + 1:k], k + 1
    return tex[start + 1:], len(tex)


def width(tex: str) -> float:
    """The estimated width of math ``tex``, in widths of a letter."""
    total, k = 0.0, 0
    while k < len(tex):
        c = tex[k]
        if c == "\\":
            m = _COMMAND.match(tex, k)
            name, k = m.group(1), m.end()
            if name in _NARROW:
                total += 0.2 if name in (",", ";") else 1.0 if name == "quad" else 0.0
            elif name in ("frac", "dfrac", "tfrac"):
                top, k = _group(tex, k)
                bottom, k = _group(tex, k)
                total += max(width(top), width(bottom)) + 0.4
            elif name in _ARGUMENT_COMMANDS:
                inner, k = _group(tex, k)
                total += _ARGUMENT_COMMANDS[name] * width(inner) + (0.8 if name == "sqrt" else 0)
            elif name in ("begin", "end"):
                _, k = _group(tex, k)
            else:
                total += 1.2  # \sum, \delta, \overline's bar, ...
        elif c in "_^":
            inner, k = _group(tex, k + 1)
            total += 0.7 * width(inner)
        elif c in "{} ":
            k += 1
        elif c in "+-=<>":
            total += 1.6
            k += 1
        else:
            total += 1.0
            k += 1
    return total


@dataclass(frozen=True)
class Display:
    """An equation to display: on one line, and broken over lines (``lines``, each an ``aligned``
    row: the first holds the left-hand side and ``&`` before the relation, each other one continues it)."""

    one_line: str
    lines: tuple[str, ...] = ()

    @property
    def broken(self) -> str:
        """The ``aligned`` form, one line of the source per line of the display."""
        if len(self.lines) < 2:
            return self.one_line
        return "\\begin{aligned}\n" + " \\\\\n".join(self.lines) + "\n\\end{aligned}"

    @property
    def wide(self) -> bool:
        return width(self.one_line) > MARKDOWN_WIDTH


def _signed(p: Printer, term: sp.Expr) -> tuple[str, sp.Expr]:
    if term.could_extract_minus_sign():
        return "-", -term
    return "+", term


def _add_lines(p: Printer, expr: sp.Expr, budget: float) -> list[str]:
    """A sum, its terms packed into lines no wider than ``budget`` (a long term broken itself)."""
    lines: list[str] = []
    for k, term in enumerate(p._as_ordered_terms(expr)):
        sign, magnitude = _signed(p, term)
        pieces = pieces_of(p, magnitude, budget - 2)
        lead = "" if k == 0 and sign == "+" else sign + " "
        if len(pieces) == 1 and isinstance(magnitude, sp.Add):
            pieces = [r"\left(%s\right)" % pieces[0]]
        first = lead + pieces[0]
        if lines and k and len(pieces) == 1 and width(lines[-1]) + width(first) <= budget:
            lines[-1] += " " + first
        else:
            lines.append(first)
        lines += pieces[1:]
    return lines


def pieces_of(p: Printer, expr: sp.Expr, budget: float = LINE_WIDTH) -> list[str]:
    """``expr`` printed over lines of at most about ``budget`` letters, broken where its structure allows."""
    expr = exact(expr)
    one = p.doprint(expr)
    if width(one) <= budget:
        return [one]
    if isinstance(expr, sp.Add):
        return _add_lines(p, expr, budget)
    if isinstance(expr, (Red, Sigma)):
        body, index = expr.args
        head = r"\sum_{%s}" % p._print(index)
        inner = pieces_of(p, body, budget - 3)
        if len(inner) > 1:
            return [head + r" \Big(" + inner[0], *inner[1:-1], inner[-1] + r" \Big)"]
        return [one]
    if isinstance(expr, (sp.Mul, sp.Pow)):
        numerator, denominator = sp.fraction(expr)
        sums = [f for f in sp.Mul.make_args(numerator) if isinstance(f, (sp.Add, Red, Sigma))]
        if not sums:
            return [one]
        longest = max(sums, key=lambda f: width(p.doprint(f)))
        rest = sp.Mul(*[f for f in sp.Mul.make_args(numerator) if f is not longest]) / denominator
        if rest == 1:
            prefix = ""
        elif rest == -1:
            prefix = "-"
        else:
            prefix = p.doprint(rest)
        inner = pieces_of(p, longest, budget - min(width(prefix), budget / 2) - 2)
        if len(inner) == 1:
            return [one]
        if isinstance(longest, (Red, Sigma)):  # already bracketed by its own \Big( ... \Big)
            return [(prefix + r"\," if prefix not in ("", "-") else prefix) + inner[0], *inner[1:]]
        return [prefix + r" \Big(" + inner[0], *inner[1:-1], inner[-1] + r" \Big)"]
    return [one]


def equation(p: Printer, lhs: str, rhs, accumulate: bool = False, relation: str | None = None) -> Display:
    """``lhs = rhs`` (``+=`` when ``accumulate``): ``rhs`` is an expression, or ready LaTeX (a matrix)."""
    op = relation or (r"\mathrel{+}=" if accumulate else "=")
    if isinstance(rhs, str):  # ready LaTeX (a matrix): on the next line when the two do not fit on one
        return Display(f"{lhs} {op} {rhs}", (f"{lhs} &{op}", r"&\quad " + rhs) if lhs else ())
    pieces = pieces_of(p, rhs, LINE_WIDTH - min(width(lhs), LINE_WIDTH / 3))
    one = f"{lhs} {op} {p.doprint(rhs)}"
    if len(pieces) < 2:
        return Display(one)
    return Display(one, (f"{lhs} &{op} {pieces[0]}", *(r"&\quad " + piece for piece in pieces[1:])))


def chain(p: Printer, lhs: str, steps: list[tuple[str, sp.Expr | str]]) -> Display:
    """``lhs = a = b = ...``, one step per line (``steps``: (relation, right-hand side))."""
    texts = [(op, rhs if isinstance(rhs, str) else p.doprint(rhs)) for op, rhs in steps]
    one = lhs + "".join(f" {op} {t}" for op, t in texts)
    lines = [f"{lhs} &{texts[0][0]} {texts[0][1]}"] + [f"&{op} {t}" for op, t in texts[1:]]
    return Display(one, tuple(lines) if len(lines) > 1 else ())


__all__ = ["Display", "equation", "chain", "pieces_of", "width", "LINE_WIDTH", "MARKDOWN_WIDTH"]
