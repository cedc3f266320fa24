"""How the documents write math and text: spec names, index letters, numbers, escaping.

A spec name of one letter stays italic (``x``), a longer one is upright (``\\mathrm{bnmeani}``).
Free indices (an equation holds for each of them) come from one pool of letters, summation indices
from another, so a reader tells them apart at a glance. Numbers are written as a person writes
them: ``0.5`` stays ``0.5`` (a SymPy Float is shown as its exact decimal, so ``1.0 x`` is ``x``),
a fraction with a large denominator becomes a short decimal.
"""
from __future__ import annotations

import re
from itertools import count

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from ..symbolic import IsTiedMax, Max, Red, extent

FREE_LETTERS = "ijklmabc"
BOUND_LETTERS = "rstuvwpqgh"
RESERVED_LETTERS = {"e"}  # e is Euler's number in exp(...) as SymPy prints it
ADJOINT = "adjoint:"  # name prefix of a node's adjoint placeholder (printed with a bar)
SHORT_DENOMINATOR = 100  # a fraction p/q with q above this is written as a decimal
DECIMAL_DIGITS = 4  # significant digits of such a decimal


def tex_name(name: str) -> str:
    """A spec name in math: one letter stays italic (``x``, ``n``), longer names upright."""
    return name if len(name) == 1 else r"\mathrm{%s}" % name.replace("_", r"\_")


def bar_name(name: str) -> str:
    """A spec name in math; the placeholder of an adjoint (``ADJOINT`` + name) gets its bar."""
    if name.startswith(ADJOINT):
        return r"\overline{%s}" % tex_name(name[len(ADJOINT):])
    return tex_name(name)


def exact(expr):
    """``expr`` with every Float replaced by the exact decimal it was written as (``0.5`` -> 1/2):
    SymPy then drops a coefficient 1.0 and cancels what a reader would. A fraction whose
    denominator is large (``4281288976356013017/40000000000000000000``, a product of constants)
    becomes a short decimal (``0.1070``); one that is a short decimal already stays exact."""
    if not isinstance(expr, sp.Basic):
        return expr
    floats = expr.atoms(sp.Float)
    if floats:
        expr = expr.xreplace({f: sp.Rational(repr(float(f))) for f in floats})
    long = [q for q in expr.atoms(sp.Rational) if q.q > SHORT_DENOMINATOR]
    return expr.xreplace({q: _short(q) for q in long}) if long else expr


def _short(q: sp.Rational) -> sp.Float:
    denominator = q.q
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    digits = len(str(abs(q.p)))
    if denominator == 1 and digits <= 6:  # a terminating decimal of a few digits: exact
        return sp.Float(q, digits)
    return sp.Float(q, DECIMAL_DIGITS)


class Printer(LatexPrinter):
    """``sympy.latex`` with spec names, readable index letters, short numbers and keepdim axes left out."""

    # not "_latex": the document owns its notation for Red/Max/IsArgmax (see the _print_ methods)
    printmethod = "_derivation_latex"

    def __init__(self, letters: dict[str, str]):
        super().__init__({"mul_symbol": r"\,"})
        self.letters = letters
        self._printed: dict = {}  # one printer serves both formats of a document: each expression once

    def doprint(self, expr) -> str:
        expr = exact(expr)
        try:
            if expr not in self._printed:
                self._printed[expr] = super().doprint(expr)
            return self._printed[expr]
        except TypeError:  # unhashable: printed every time
            return super().doprint(expr)

    def _as_ordered_terms(self, expr, order=None):
        # positive terms first, as by hand: x - m and n - 1 rather than -m + x and -1 + n
        return sorted(super()._as_ordered_terms(expr, order), key=lambda t: t.could_extract_minus_sign())

    def _needs_mul_brackets(self, expr, first=False, last=False) -> bool:
        # as SymPy does for its own Sum: a factor after a sum must not read as part of its body
        return (not last and isinstance(expr, (Red, Max, Sigma))) or super()._needs_mul_brackets(expr, first, last)

    def _print_Float(self, expr):
        # a short decimal (``exact``): its own digits, never an exponent for a constant of a formula
        text = str(expr)
        return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else super()._print_Float(expr)

    def _print_Symbol(self, expr, style="plain"):
        return bar_name(expr.name)

    def _print_Idx(self, expr):
        return self.letters[expr.name]

    def _print_Indexed(self, expr):
        return self.element(bar_name(str(expr.base)), expr.indices)

    def element(self, base: str, indices) -> str:
        # a 0 index is a kept (size-1) axis: it carries no information for the reader
        shown = [self._print(i) for i in indices if i != 0]
        if not shown:
            return base
        glue = "" if all(len(s) == 1 for s in shown) else ", "
        return "%s_{%s}" % (base, glue.join(shown))

    def _print_KroneckerDelta(self, expr, exp=None):
        return r"\delta_{%s, %s}" % (self._print(expr.args[0]), self._print(expr.args[1]))

    def _bound(self, operator: str, index, body, exp=None) -> str:
        text = r"%s_{%s} %s" % (operator, self._print(index), self.parenthesize(body, PRECEDENCE["Add"]))
        # a power of a sum (SymPy's latex passes the exponent in): (\sum_j ...)^{2}
        return text if exp is None else r"\left(%s\right)^{%s}" % (text, exp)

    def _print_Red(self, expr, exp=None):
        return self._bound(r"\sum", expr.index, expr.body, exp)

    _print_GroupedRed = _print_Red  # SymPy's dispatch does not pass a renamed subclass to its parent's method

    def _print_Sigma(self, expr, exp=None):
        return self._bound(r"\sum", expr.args[1], expr.args[0], exp)

    def _print_Max(self, expr, exp=None):
        return self._bound(r"\max", expr.index, expr.body, exp)

    def _print_IsArgmax(self, expr):
        # 1 where the index is the position of the maximum: [j = argmax_s body]
        j, m = expr.args
        if isinstance(m, Max):
            where = r"\operatorname*{arg\,max}_{%s} %s" % (self._print(m.index), self.parenthesize(m.body, PRECEDENCE["Add"]))
        else:  # the maximum's value, a saved forward tensor: the position where it is reached
            where = r"\operatorname{argmax}(%s)" % self._print(m)
        if isinstance(expr, IsTiedMax):  # amax's: an equal share to each position that ties
            return r"\frac{\mathbf{1}\left[%s \in %s\right]}{\left|%s\right|}" % (self._print(j), where, where)
        return r"\mathbf{1}\left[%s = %s\right]" % (self._print(j), where)

    def _print_TiedMax(self, expr, exp=None):
        return self._bound(r"\operatorname{amax}", expr.index, expr.body, exp)

    _print_IsTiedMax = _print_IsArgmax


class Sigma(sp.Function):
    """An unevaluated sum over one index (``Red`` evaluates on construction): what a reader sees
    before the Kronecker deltas collapse."""

    nargs = 2

    def _eval_derivative(self, s):
        return Sigma(sp.diff(self.args[0], s), self.args[1])


def assign(names: list[str], pool: str, taken: set) -> dict[str, str]:
    """Letters for ``names`` from ``pool``; primes only once a pool is used up, so small layers read i, j / r, s."""
    letters = (letter + "'" * primes for primes in count() for letter in pool if letter not in taken)
    return dict(zip(names, letters))


def index_letters(free: list[str], seen: dict[str, sp.Idx], taken: set, rank: dict) -> dict[str, str]:
    """Idx name -> letter: ``free`` (in order) from the free pool, every other index of ``seen`` from
    the summation pool, ordered by the rank of its size."""
    bound = sorted((n for n in seen if n not in free), key=lambda n: (rank.get(extent(seen[n]), len(rank)), n))
    return {**assign(free, FREE_LETTERS, taken), **assign(bound, BOUND_LETTERS, taken)}


# -- text -------------------------------------------------------------------------------------------
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "%": r"\%",
                "_": r"\_", "^": r"\^{}", "~": r"\~{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
_CODE_BREAKS = set("._,([=+-*/")  # a line of code in running text may break after these


def tex_text(text: str) -> str:
    """Plain text safe in LaTeX (also inside ``\\texttt{}``)."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


def tex_code(text: str) -> str:
    """Inline code in LaTeX: typewriter, allowed to break after punctuation so it never runs off the page."""
    return r"\texttt{%s}" % "".join(_TEX_SPECIAL.get(c, c) + (r"\allowbreak{}" if c in _CODE_BREAKS else "")
                                    for c in text)


def tex_doc(text: str) -> str:
    """A docstring in LaTeX: ``code`` spans become typewriter, the rest is escaped text."""
    parts = re.split(r"``(.+?)``", text)
    return "".join(tex_code(s) if k % 2 else tex_text(s) for k, s in enumerate(parts))


def md_code(text: str) -> str:
    """An inline Markdown code span that survives backticks inside ``text``."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_doc(text: str) -> str:
    """A docstring in Markdown: its ``code`` spans (reStructuredText's double backticks) as code spans."""
    parts = re.split(r"``(.+?)``", text)
    return "".join(md_code(s) if k % 2 else s for k, s in enumerate(parts))


__all__ = ["FREE_LETTERS", "BOUND_LETTERS", "RESERVED_LETTERS", "ADJOINT", "tex_name", "bar_name", "exact",
           "Printer", "Sigma", "assign", "index_letters", "tex_text", "tex_code", "tex_doc", "md_code", "md_doc"]
