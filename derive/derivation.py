"""Derivation documents a student can read, generated from a Kernel (never written per layer).

A document has these parts, every one read off the kernel and its replayed derivation (``explain.py``):

1. the forward pass, one equation per named line of the spec, in the spec's own names;
2. the compute graph (``figure.py``), fan-outs and broadcasts marked;
3. each reduction's definition in normal form, the sums recognised as named nodes;
4. the reverse-mode steps (``kernel.gradients.steps``): the chain rule written out with its Kronecker
   deltas, each collapse named, the local derivative, then the adjoint substituted;
5. the simplification of each gradient: the sum of its contributions, every refold rewrite the
   engine logged (definition solved, sums split by linearity, sums recognised), the closed form;
6. the fused closed form of every gradient, next to the torch code generated for it and the spec
   lines of the tensors it reads.

All decisions (index letters, escaping, display tidying) are made here; ``derivation.tex.j2`` and
``derivation.md.j2`` only place the strings. ``render_tex`` / ``render_markdown`` return the whole
file, header included, like ``codegen.render_function``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import count, groupby
from typing import Callable

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from . import explain, figure
from .codegen import environment, header
from .explain import Sigma
from .kernel import Kernel
from .memo import ByObject
from .symbolic import Max, Red, expand, extent, reductions, substitute_family
from .trace import Graph, Node

# Index letters: free indices from one pool, bound (summation) indices from another, so a reader
# can tell at a glance which indices an equation holds for and which it sums over.
FREE_LETTERS = "ijklmabc"
BOUND_LETTERS = "rstuvwpqgh"
RESERVED_LETTERS = {"e"}  # e is Euler's number in exp(...) as SymPy prints it


# -- LaTeX of element-wise expressions ---------------------------------------------------------
def tex_name(name: str) -> str:
    """A spec name in math: one letter stays italic (``x``, ``n``), longer names upright."""
    return name if len(name) == 1 else r"\mathrm{%s}" % name.replace("_", r"\_")


def _bar(name: str) -> str:
    """A spec name in math; the placeholder of an adjoint (``explain.ADJOINT``) gets its bar."""
    if name.startswith(explain.ADJOINT):
        return r"\overline{%s}" % tex_name(name[len(explain.ADJOINT):])
    return tex_name(name)


class _Printer(LatexPrinter):
    """``sympy.latex`` with spec names, readable index letters and keepdim axes left out."""

    # not "_latex": the document owns its notation for Red/Max/IsArgmax (see the _print_ methods)
    printmethod = "_derivation_latex"

    def __init__(self, letters: dict[str, str]):
        super().__init__({"mul_symbol": r"\,"})
        self.letters = letters
        self._printed: dict = {}  # one printer serves both formats of a document: each expression once

    def doprint(self, expr) -> str:
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

    def _print_Symbol(self, expr, style="plain"):
        return _bar(expr.name)

    def _print_Idx(self, expr):
        return self.letters[expr.name]

    def _print_Indexed(self, expr):
        return self.element(_bar(str(expr.base)), expr.indices)

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
        return r"\mathbf{1}\left[%s = %s\right]" % (self._print(j), where)


def _letters(kernel: Kernel, exprs: list[sp.Expr]) -> dict[str, str]:
    """Idx name -> letter: free indices in the order of the layer's dimensions, then bound ones."""
    el, dims = kernel.elements, [kernel.graph.sizes[d] for d in kernel.layer.dims]
    taken = RESERVED_LETTERS | set(kernel.layer.dims) | set(kernel.layer.inputs) | {n.name for n in kernel.graph.nodes}
    free = [el.index[s].name for s in dims]
    seen = {i.name: i for e in exprs for i in e.atoms(sp.Idx)}
    rank = {s: k for k, s in enumerate(dims)}
    bound = sorted((n for n in seen if n not in free), key=lambda n: (rank.get(extent(seen[n]), len(rank)), n))
    return {**_assign(free, FREE_LETTERS, taken), **_assign(bound, BOUND_LETTERS, taken)}


def _assign(names: list[str], pool: str, taken: set) -> dict[str, str]:
    # primes only once a pool is used up, so small layers read i, j / r, s
    letters = (letter + "'" * primes for primes in count() for letter in pool if letter not in taken)
    return dict(zip(names, letters))


# -- what the document shows --------------------------------------------------------------------
def _forward_value(kernel: Kernel, node: Node) -> sp.Expr:
    """The node's value in terms of the spec's named variables (unnamed temporaries inlined)."""
    el = kernel.elements
    expr = el.direct(node)
    unnamed = [m for m in reversed(kernel.graph.nodes) if not m.named]
    changed = True
    while changed:
        changed = False
        for m in unnamed:
            base = el.base(m)
            if isinstance(base, sp.Symbol):
                new = expr.xreplace({base: el.direct(m)})
            else:
                new = substitute_family(expr, base, el.free(m), el.direct(m))
            if new != expr:
                expr, changed = new, True
    return expr


TIDY_MAX_OPS = 400  # the largest built-in term has about 200 (Bessel-corrected batchnorm's dx)


@lru_cache(maxsize=4096)
def _tidy(expr: sp.Expr) -> sp.Expr:
    """A display form of a reverse-mode term, closer to what one writes by hand.

    Cancels ``exp(a)*exp(-a)``, gathers one fraction, groups the numerator by its sums (each with a
    factored coefficient) and factors the denominator. Only the document sees this form. A term
    too large to read either way (thousands of operations, from a spec that nests softmaxes) is
    shown as it is: factoring it would take minutes.
    """
    if sp.count_ops(expr) > TIDY_MAX_OPS:
        return expr
    num, den = sp.fraction(sp.together(sp.powsimp(expr)))
    sums = sorted(reductions(num), key=sp.default_sort_key)
    if sums:
        terms = sp.collect(expand(num), sums, evaluate=False)
        num = sp.Add(*[sp.factor(c) * s for s, c in sorted(terms.items(), key=lambda t: sp.default_sort_key(t[0]))])
    return sp.factor_terms(num) / sp.factor(den)


@dataclass(frozen=True)
class _Format:
    """How one output format writes prose, inline code and its header comments."""

    template: str
    text: Callable[[str], str]  # prose (a docstring, a title)
    code: Callable[[str], str]  # an inline code span (a name, a source line)
    comment: tuple[str, str]  # header comment opener and closer
    math: Callable[[str], str] = lambda s: f"${s}$"  # inline math
    includes: tuple[str, ...] = ()  # templates the main one includes (part of the inputs hash)
    link: Callable[[str], str] | None = None  # a link to a sibling file (plain code where there are no links)


def _equation(lhs: str, rhs: str, accumulate: bool = False) -> str:
    op = r"\mathrel{+}=" if accumulate else "="
    return f"{lhs} {op} {rhs}"


_EXPLAINED = ByObject(maxsize=32)  # kernel -> what _explain works out


def _explained(kernel: Kernel) -> tuple:
    """``_explain(kernel)``, once per kernel for both formats."""
    return _EXPLAINED.get(kernel, _explain)


def _explain(kernel: Kernel) -> tuple:
    """The replayed derivation, every expression the document shows and the printer with the index
    letters for all of them: the costly part of a document."""
    why = {id(s): explain.contribution(kernel, s) for s in kernel.gradients.steps}
    definitions = [d for d in explain.definitions(kernel) if d.recognized]
    refolds = explain.refolded(kernel)
    named = [n for n in kernel.graph.nodes if n.named and n.op not in ("input", "labels")]
    values = {n: _forward_value(kernel, n) for n in named}
    steps = [(s, _tidy(s.adjoint), _tidy(s.contribution)) for s in kernel.gradients.steps]
    exprs = [*values.values(), *(e for _, a, c in steps for e in (a, c)), *(f.element for f in kernel.formulas)]
    exprs += [e for w in why.values() for e in (w.chain, w.local, w.named, *(x for r in w.recognized for x in r))]
    exprs += [e for d in definitions for e in (d.inlined, d.value, *(x for r in d.recognized for x in r))]
    exprs += [e for r in refolds for e in _refold_exprs(r)]
    p = _Printer(_letters(kernel, exprs + [kernel.elements.ref(n) for n in kernel.graph.nodes]))
    return why, definitions, refolds, named, values, steps, exprs, p


def _context(kernel: Kernel, fmt: _Format) -> dict:
    """Everything the document says, as ready-to-place strings in ``fmt``."""
    el, code = kernel.elements, fmt.code
    why, definitions, refolds, named, values, steps, exprs, p = _explained(kernel)

    def ref(name: str, node: Node, adjoint: bool = False) -> str:
        return p.element(r"\overline{%s}" % tex_name(name) if adjoint else tex_name(name), el.free(node))

    forward = [dict(name=code(n.name), line=n.line, source=code(n.source.strip()),
                    equation=_equation(ref(n.name, n), p.doprint(values[n]))) for n in named]
    groups = []
    for node, group in groupby(steps, key=lambda t: t[0].node):  # a node's steps are consecutive
        group = list(group)
        sends = [dict(target=code(s.target.name), equation=_equation(ref(s.target.name, s.target, True), p.doprint(c), True),
                      **_why(why[id(s)], kernel, p, fmt, ref(s.target.name, s.target, True)))
                 for s, _, c in group]
        groups.append(dict(node=code(node.name), adjoint=_equation(ref(node.name, node, True), p.doprint(group[0][1])),
                           sends=sends))
    gradients = []
    for f in kernel.formulas:
        lines = [f"{s.name} = {s.code}" for s in kernel.shared if f.position in s.users] + [f"d{f.input} = {f.code}"]
        lhs = ref(f"d{f.input}", kernel.graph.inputs[f.input])
        read = sorted({str(e.base) for e in f.element.atoms(sp.Indexed)} | {str(e) for e in f.element.free_symbols})
        nodes = {n.name: n for n in kernel.graph.nodes}
        reads = [f"{code(nodes[r].name)} (" + (f"line {nodes[r].line}: {code(nodes[r].source.strip())}" if nodes[r].line
                                              and nodes[r].op not in ("input", "labels") else "an input") + ")"
                 for r in read if r in nodes]
        gradients.append(dict(name=code(f"d{f.input}"), code="\n".join(lines), equation=_equation(lhs, p.doprint(f.element)),
                              reads=reads))
    out = kernel.graph.output
    return dict(name=code(kernel.name), doc=fmt.text(kernel.layer.doc), module=code(kernel.layer.module),
                output=code(out.name), grad_output=code(f"d{out.name}"), indices=_legend(kernel, exprs, p),
                forward=forward, steps=groups, silent=_silent(kernel, code), gradients=gradients,
                graph=graph_context(kernel.graph, fmt), definitions=[_definition(d, kernel, p, fmt, ref) for d in definitions],
                simplify=[_simplification(r, kernel, p, fmt, ref) for r in refolds],
                steps_doc=(fmt.link or code)(f"{kernel.name}_steps.{'md' if fmt.link else 'tex'}"),
                saved=", ".join(map(code, kernel.saved)), inputs=", ".join(map(code, kernel.layer.differentiable)),
                ranks=_ranks(kernel, fmt))


def _ranks(kernel: Kernel, fmt: _Format) -> dict | None:
    """The sums that cross ranks in ``<name>_synced.py`` (a declared batch axis), or None."""
    from .synced import has_batch_sums, synced_cached

    if not has_batch_sums(kernel):
        return None
    synced = synced_cached(kernel)
    params = [n for n in kernel.layer.differentiable if synced.batch not in kernel.layer.tensors[n].dims]
    return dict(batch=fmt.code(synced.batch), module=(fmt.link or fmt.code)(f"../{kernel.name}_synced.py"),
                messages=synced.messages, code="\n".join(synced.crossing),
                shares=", ".join(fmt.code(f"d{n}") for n in params))

# -- the simplification, every rule named (explain.py) ---------------------------------------------
def _named_node(kernel: Kernel, value: sp.Expr) -> Node:
    """The opaque node a recognised reduction stands for: the latest one its value reads."""
    names = {str(b) for b in value.atoms(sp.IndexedBase)} | {s.name for s in value.free_symbols}
    return [n for n in kernel.elements.opaque if n.name in names][-1]


def _recognitions(pairs: list, kernel: Kernel, p: _Printer, fmt: _Format) -> list[str]:
    out = []
    for atom, value in pairs:
        node = _named_node(kernel, value)
        out.append(fmt.math(_equation(p.doprint(atom), p.doprint(_tidy(value))))
                   + f": the sum is recognised as the named node {fmt.code(node.name)} (its definition, line {node.line})")
    return list(dict.fromkeys(out))


def _collapse_text(c: explain.Collapse, p: _Printer, fmt: _Format) -> str:
    j, m = p.doprint(c.index), fmt.math
    if c.kind == "delta":
        e = p.doprint(c.value)
        delta = r"\delta_{%s, %s}" % (j, e)
        return f"the Kronecker delta {m(delta)} collapses the sum over {m(j)}: only the term {m(_equation(j, e))} is left"
    term = p.parenthesize(c.value, PRECEDENCE["Add"])
    rule = _equation(r"\sum_{%s} %s" % (j, term), r"%s\,%s" % (p.doprint(c.index.upper + 1), term))
    return f"a term that does not depend on {m(j)}, summed over {m(j)}, is multiplied by the size: {m(rule)}"


def _why(w: explain.Contribution, kernel: Kernel, p: _Printer, fmt: _Format, lhs: str) -> dict:
    """The chain rule written out, the sums it collapses, the reductions it recognises."""
    return dict(chain=_equation(lhs, p.doprint(w.chain), True),
                collapses=[_collapse_text(c, p, fmt) for c in w.collapses],
                local=_equation(lhs, p.doprint(_tidy(w.local)), True),
                recognized=_recognitions(w.recognized, kernel, p, fmt),
                named=_equation(lhs, p.doprint(_tidy(w.named)), True) if w.recognized else "",
                adjoint=fmt.code(w.step.node.name))


def _definition(d: explain.Definition, kernel: Kernel, p: _Printer, fmt: _Format, ref) -> dict:
    lhs = ref(d.node.name, d.node)
    return dict(name=fmt.code(d.node.name), inlined=_equation(lhs, p.doprint(d.inlined)),
                recognized=_recognitions(d.recognized, kernel, p, fmt), value=_equation(lhs, p.doprint(_tidy(d.value))))


def _refold_exprs(r: explain.Refolded) -> list[sp.Expr]:
    out = [r.total, r.refolded, r.closed]
    for w in r.rewrites:
        out += [w.target, w.solution, w.after, *(x for pair in w.recognized for x in pair),
                *(x for pair in explain.linearity(w) for x in pair)]
    return out


def _simplification(r: explain.Refolded, kernel: Kernel, p: _Printer, fmt: _Format, ref) -> dict:
    code, lhs = fmt.code, ref(r.input.name, r.input, True)
    rewrites = []
    for w in r.rewrites:
        node, line = w.node, w.node.line
        rewrites.append(dict(
            title=(f"the value of {code(node.name)} (line {line}: {code(node.source.strip())}), computed by the "
                   f"forward, read where the formula evaluates it again" if w.kind == "read" else
                   f"the definition of {code(node.name)} (line {line}: {code(node.source.strip())}) solved for "
                   f"{code(w.variable.name)}"),
            solved=_equation(p.doprint(w.target), p.doprint(w.solution)),
            linearity=[_equation(p.doprint(a), p.doprint(b)) for a, b in explain.linearity(w)],
            recognized=_recognitions(w.recognized, kernel, p, fmt),
            after=_equation(lhs, p.doprint(_tidy(w.after))), cost=f"{w.cost[0]} to {w.cost[1]}"))
    parts = list(dict.fromkeys(n.name for n in r.parts))
    sent = [_tidy(s.contribution) for s in kernel.gradients.steps if s.target is r.input]
    terms = [r"\left(%s\right)" % p.doprint(c) if c.is_Add or c.could_extract_minus_sign() else p.doprint(c) for c in sent]
    return dict(name=code(f"d{r.input.name}"), input=code(r.input.name), uses=", ".join(map(code, parts)),
                several=len(sent) > 1, sum=_equation(lhs, " + ".join(terms)),
                total=_equation(lhs, p.doprint(_tidy(r.total))), rewrites=rewrites,
                refolded=_equation(lhs, p.doprint(_tidy(r.refolded))), closed=_equation(lhs, p.doprint(r.closed)))


def graph_context(graph: Graph, fmt: _Format) -> dict:
    """The compute graph drawn both ways, and a sentence per fan-out (a node read twice, a broadcast)."""
    def name(n: Node) -> str:  # an unnamed temporary is named by what it does and where
        return fmt.code(n.name) if n.named or n.op in ("input", "labels") else f"the {n.op} on line {n.line}"

    fans = [f"{name(n)} is read {len(c)} times (by {', '.join(name(m) for m in c)})" for n, c in figure.fan_out(graph)]
    fans += [f"{name(a)} is repeated over {' and '.join(fmt.math(tex_name(str(s))) for s in sizes)} by "
             f"{name(m)}: every element is used that many times, so its gradient sums over "
             f"{'that axis' if len(sizes) == 1 else 'those axes'}" for a, m, sizes in figure.broadcasts(graph)]
    return dict(tikz=figure.tikz(graph), mermaid=figure.mermaid(graph), fans=fans)


def _legend(kernel: Kernel, exprs: list[sp.Expr], p: _Printer) -> list[dict]:
    """What each index letter the document uses runs over."""
    seen = {i.name: i for e in exprs for i in e.atoms(sp.Idx)}
    free = {i.name for i in kernel.elements.index.values()}
    return [dict(letter=letter, last=p.doprint(extent(seen[name]) - 1), size=p.doprint(extent(seen[name])),
                 kind="a free index" if name in free else "a summation index")
            for name, letter in p.letters.items() if name in seen]


def _silent(kernel: Kernel, code: Callable[[str], str]) -> list[str]:
    """Why an intermediate has no step of its own (softmax's row max: its contributions cancel)."""
    grads = kernel.gradients
    propagating = {s.node for s in grads.steps}
    return [f"The contributions to {code(n.name)} add up to zero, so nothing flows back through it."
            if n in grads.adjoints else f"No gradient reaches {code(n.name)}."
            for n in kernel.elements.opaque if n not in propagating]


# -- formats --------------------------------------------------------------------------------------
PREAMBLE = "derivation_preamble.tex.j2"  # shared by every LaTeX document and the combined book
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "%": r"\%",
                "_": r"\_", "^": r"\^{}", "~": r"\~{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def tex_text(text: str) -> str:
    """Plain text safe in LaTeX (also inside ``\\texttt{}``)."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


def _tex_doc(text: str) -> str:
    """A docstring in LaTeX: ``code`` spans become typewriter, the rest is escaped text."""
    parts = re.split(r"``(.+?)``", text)
    return "".join(r"\texttt{%s}" % tex_text(s) if k % 2 else tex_text(s) for k, s in enumerate(parts))


def md_code(text: str) -> str:
    """An inline Markdown code span that survives backticks inside ``text``."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _render(kernel: Kernel, fmt: _Format) -> str:
    body = environment().get_template(fmt.template).render(**_context(kernel, fmt)).lstrip("\n")
    return header(kernel, fmt.comment[0], body, fmt.comment[1], templates=[fmt.template, *fmt.includes]) + body


TEX = _Format("derivation.tex.j2", text=_tex_doc, code=lambda s: r"\texttt{%s}" % tex_text(s), comment=("%", ""),
              includes=(PREAMBLE, "derivation_graph.tex.j2"))
MARKDOWN = _Format("derivation.md.j2", text=lambda s: s, code=md_code, comment=("<!--", " -->"),
                   includes=("derivation_graph.md.j2",), link=lambda s: f"[{md_code(s)}]({s})")


def render_tex(kernel: Kernel) -> str:
    """The derivation as a standalone LaTeX document (article class; amsmath, amssymb, geometry, graphicx)."""
    return _render(kernel, TEX)


def render_markdown(kernel: Kernel) -> str:
    """The derivation as GitHub Markdown with ``$...$`` / ``$$...$$`` math."""
    return _render(kernel, MARKDOWN)


__all__ = ["render_tex", "render_markdown", "tex_name", "tex_text", "md_code"]
