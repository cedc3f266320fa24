"""The fused derivation replayed with every rewrite named, for the derivation documents.

The engine (``elements.py``, ``differentiate.py``, ``simplify.py``) applies a handful of rule kinds;
this module replays a kernel's derivation and records which rule fired where, so a document can show
each step and say why it holds, with nothing written per layer:

* *normal form*: elementwise nodes inlined into a reduction's definition; a reduction that is a
  named node is recognised as that node (``sum_r x_rj = n*bnmeani_j``);
* *chain rule*: ``adj V[p] += sum_i adj N[i] * dN[i]/dV[p]``, written out with its Kronecker deltas
  before any sum is evaluated, then each delta that collapses a sum and each sum of a term that does
  not depend on the summed index (``sum_r c = n*c``);
* *adding the contributions* of every use of a variable (its fan-out);
* *refold*: a definition solved for a variable and substituted everywhere, sums split by linearity,
  reductions recognised, terms cancelling (``simplify.refold``'s own log);
* *closed form*: terms collected by their tensor part and their size coefficients factored.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .differentiate import Step, _target_indices
from .kernel import Kernel
from .simplify import Rewrite
from .symbolic import Red, expand, index_for, reductions, substitute_family
from .trace import Node


class Sigma(sp.Function):
    """An unevaluated sum over one index (``Red`` evaluates on construction): what a reader sees
    before the Kronecker deltas collapse."""

    nargs = 2

    def _eval_derivative(self, s):
        return Sigma(sp.diff(self.args[0], s), self.args[1])


def unevaluated(expr: sp.Expr) -> sp.Expr:
    return expr.replace(lambda e: isinstance(e, Red), lambda e: Sigma(e.body, e.index))


def evaluated(expr: sp.Expr) -> sp.Expr:
    return expand(expr.replace(lambda e: isinstance(e, Sigma), lambda e: Red(*e.args)))


@dataclass
class Collapse:
    """A rule applied while a sum is evaluated: ``delta`` (``sum_j delta(j, e) f(j) = f(e)``) or
    ``constant`` (``sum_j c = extent(j)*c``)."""

    kind: str
    index: sp.Idx
    value: sp.Expr  # what the index becomes (delta) or the summed term (constant)


ADJOINT = "adjoint:"  # name prefix of the placeholder for a node's adjoint (printed with a bar)


@dataclass
class Contribution:
    """One reverse-mode step, explained. The adjoint of the node stays a placeholder
    (``adjoint:bnvar``) until the last line, so the local derivative is what the reader sees."""

    step: Step
    chain: sp.Expr  # sum_i adj N[i] * dN[i]/dV[p], in display indices (V's free indices, N's summed)
    collapses: list[Collapse]
    local: sp.Expr  # the sums evaluated: adj N times the local derivative, at V's free indices
    recognized: list[tuple[sp.Expr, sp.Expr]]  # reductions recognised in ``local``
    named: sp.Expr  # ``local`` after recognition
    collapsed: sp.Expr  # the same with the adjoint itself in place of the placeholder (what the engine sums)


@dataclass
class Definition:
    """An opaque node's definition in normal form, before and after recognising reductions."""

    node: Node
    inlined: sp.Expr
    recognized: list[tuple[sp.Expr, sp.Expr]]
    value: sp.Expr


@dataclass
class Refolded:
    """The simplification of one input's gradient, from the sum of its contributions to the closed form."""

    input: Node
    parts: list[Node]  # the nodes whose steps sent it a contribution (its uses)
    total: sp.Expr  # normal form
    rewrites: list[Rewrite]
    refolded: sp.Expr
    closed: sp.Expr  # the kernel's formula


def definitions(kernel: Kernel) -> list[Definition]:
    el, out = kernel.elements, []
    for node in el.opaque:
        log: list = []
        value = el.normal_form(node, log)
        out.append(Definition(node, el._value(node), log, value))
    return out


def _collapses(expr: sp.Expr) -> list[Collapse]:
    out = []
    for s in sorted(expr.atoms(Sigma), key=sp.default_sort_key):
        body, j = s.args
        for f in sorted(body.atoms(sp.KroneckerDelta), key=sp.default_sort_key):
            other = f.args[1] if f.args[0] == j else f.args[0] if f.args[1] == j else None
            if other is not None and j not in other.free_symbols:
                out.append(Collapse("delta", j, other))
        if not any(c.index == j for c in out):
            out += [Collapse("constant", j, t) for t in sp.Add.make_args(expand(body)) if j not in t.free_symbols]
    unique = {}
    for c in out:
        unique.setdefault((c.kind, c.index, c.value), c)
    return list(unique.values())


def adjoint_placeholder(el, node: Node, indices: tuple | None = None) -> sp.Expr:
    name = ADJOINT + node.name
    if not node.shape:
        return sp.Symbol(name, real=True)
    return sp.IndexedBase(name, real=True)[el.free(node) if indices is None else indices]


def contribution(kernel: Kernel, step: Step) -> Contribution:
    el = kernel.elements
    node, target = step.node, step.target
    p = _target_indices(el, target)
    local = sp.diff(unevaluated(el.definition[node]), el.ref(target, p))
    bar = adjoint_placeholder(el, node)
    chain = bar * local
    own = [i for i in el.free(node) if i != 0]
    for i in reversed(own):
        chain = Sigma(chain, i)
    # the display reads the target at its own free indices; the node's indices become summed ones
    back = {pi: i for pi, i in zip(p, el.free(target)) if pi != 0}
    summed = {i: index_for(f"_o_{i.name}", i.upper + 1) for i in own}
    shown = chain.xreplace({**summed, **back})
    short = evaluated(chain).xreplace(back)
    log: list = []
    named = el.recognize(short, log)
    collapsed = expand(evaluated(chain.xreplace({bar: step.adjoint})).xreplace(back))
    return Contribution(step, shown, _collapses(shown), short, log, named, collapsed)


def refolded(kernel: Kernel) -> list[Refolded]:
    """Each gradient's simplification, as the kernel's build logged it."""
    grads = kernel.gradients
    out = []
    for f in kernel.formulas:
        node = kernel.graph.inputs[f.input]
        parts = [s.node for s in grads.steps if s.target is node]
        out.append(Refolded(node, parts, grads.grads[node], f.rewrites, f.refolded, f.element))
    return out


def linearity(rewrite: Rewrite) -> list[tuple[sp.Expr, sp.Expr]]:
    """Each sum the substitution changed, with what it became: ``(sum before, sum after)``."""
    target, solution = rewrite.target, rewrite.solution
    out = []
    if rewrite.kind == "read":  # a saved value read in place of its function: no sum is split
        return out
    sums = reductions(rewrite.before)
    for r in sorted(sums, key=sp.default_sort_key):
        if not isinstance(r, Red) or any(q != r and r in q.atoms(Red) for q in sums):
            continue  # the outermost sums are enough to see the split
        if isinstance(target, sp.Symbol):
            new = r.xreplace({target: solution})
        else:
            new = substitute_family(r, target.base, tuple(target.indices), solution)
        if new != r:
            out.append((r, new))
    return out


__all__ = ["ADJOINT", "adjoint_placeholder", "Sigma", "Collapse", "Contribution", "Definition", "Refolded", "definitions", "contribution",
           "refolded", "linearity", "unevaluated", "evaluated"]
