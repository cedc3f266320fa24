"""Short sentences of intuition, said where the derivation itself recognises a moment.

Each function takes what the derivation found (a Kronecker delta on a label, a sum that is zero by
a definition, an adjoint whose contributions cancel, a size coefficient left over by factoring)
and says it in words, with the spec's names. None of them is written for a layer: each is worded
from the kind of moment and the expressions involved.
"""
from __future__ import annotations

import sympy as sp

from ..symbolic import Red, extent
from ..trace import Node
from .notation import Printer
from .written import VanishingSum


def onehot(delta: sp.KroneckerDelta, consumer: Node, target: Node, p: Printer, math, code) -> str:
    j, label = delta.args
    return (f"A one-hot appears: {math(p.doprint(delta))} is 1 where {math(p.doprint(j))} is the label "
            f"{math(p.doprint(label))} and 0 elsewhere. {code(consumer.name)} reads only the labelled entry of "
            f"each row of {code(target.name)}, so only that entry receives a gradient.")


def _mean_node(vanishing: VanishingSum, nodes: dict[str, Node]) -> tuple[Node, sp.Expr, sp.Expr] | None:
    """(node, the summed values, the size) when a recognised sum says ``sum_r a_r = size*node``."""
    for atom, value in vanishing.recognized:
        if isinstance(atom, Red):
            size = extent(atom.index)
            for node in nodes.values():
                ref = value / size
                names = {str(b) for b in ref.atoms(sp.IndexedBase)} | {s.name for s in ref.free_symbols}
                if node.name in names and (ref.is_Indexed or ref.is_Symbol):
                    return node, atom, size
    return None


def vanishing(vanishing: VanishingSum, nodes: dict[str, Node], p: Printer, math, code) -> str:
    """Why a sum is zero: its definition inlined, and the named sum that cancels it."""
    named = _mean_node(vanishing, nodes)
    parts = [math(r"%s = %s = 0" % (p.doprint(vanishing.total), p.doprint(vanishing.inlined)))]
    for atom, value in vanishing.recognized:
        parts.append(f"since {math(p.doprint(atom) + ' = ' + p.doprint(value))}")
    text = ", ".join(parts) + "."
    if named is not None:
        node, atom, size = named
        body = vanishing.total.body if isinstance(vanishing.total, Red) else vanishing.total
        summed = body.base if isinstance(body, sp.Indexed) else None
        what = code(str(summed)) if summed is not None else math(p.doprint(body))
        text += (f" {code(node.name)} is the mean of {math(p.doprint(atom.body))} over {math(p.doprint(atom.index))} "
                 f"(line {node.line}), and {what} is those values minus their mean: values minus their mean "
                 f"sum to zero.")
    return text


def cancels(node: Node, p: Printer, math, code) -> str:
    zero = math(r"\overline{%s} = 0" % p.doprint(sp.Symbol(node.name)))
    return (f"Everything {code(node.name)} sends back cancels: its uses' contributions add up to zero, so "
            f"{zero}. The output does not change "
            f"when {code(node.name)} changes (below, substituting the adjoints one line at a time).")


def leftover(closed: sp.Expr, sizes: set, p: Printer, math) -> list[str]:
    """Where a coefficient such as ``n/(n - 1)`` comes from: a size factor pulled out of a sum."""
    if not isinstance(closed, sp.Mul):
        return []
    factors = sp.Mul.make_args(closed)
    scale = sp.Mul(*[f for f in factors if f.free_symbols and f.free_symbols <= sizes and not f.atoms(sp.Indexed)])
    inner = [f for f in factors if isinstance(f, sp.Add)]
    if scale == 1 or not inner:
        return []
    out = []
    for term in inner[0].args:
        coefficient = sp.Mul(*[f for f in sp.Mul.make_args(term) if f.free_symbols <= sizes and not f.atoms(sp.Indexed)
                               and not f.atoms(Red)])
        coefficient = abs(coefficient)
        if coefficient.is_Number or coefficient.is_Symbol or not coefficient.free_symbols:
            continue
        original = sp.factor(coefficient * scale)
        split = math(p.doprint(original) + " = " + p.doprint(scale) + r" \cdot " + p.doprint(coefficient))
        out.append(f"The coefficient {math(p.doprint(coefficient))} is where the sizes meet: the term had "
                   f"{math(p.doprint(original))}, and pulling {math(p.doprint(scale))} out of every term leaves "
                   f"{split}.")
    return list(dict.fromkeys(out))


def sums_to_zero(node: Node, index: sp.Idx, lhs: str, p: Printer, math, code) -> str:
    j = p.doprint(index)
    total = math(r"\sum_{%s} %s = 0" % (j, lhs))
    return (f"The gradient sums to zero over {math(j)}: {total}. A step along it moves the entries of "
            f"{code(node.name)} along {math(j)} against each other and leaves their sum unchanged.")


__all__ = ["onehot", "vanishing", "cancels", "leftover", "sums_to_zero"]
