"""Vector-Jacobian products in normal form, by reverse mode over the opaque nodes.

For an opaque node ``N`` with definition ``D`` (normal form at its free indices ``i``) and adjoint
``A[i]``, every variable ``V`` read by ``D`` (an input, or an earlier opaque node) receives::

    adj V[p] += sum_i A[i] * dD[i]/dV[p]

SymPy differentiates ``D`` element-wise (``x[i_n, i_d]`` against ``x[p_n, p_d]`` gives Kronecker
deltas) and ``Red`` collapses the deltas, so each step stays closed-form and generic in the sizes.
Because every opaque node is a function of earlier ones only, visiting them in reverse
topological order is the chain rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .elements import Elements
from .errors import DerivationError
from .symbolic import IsArgmax, Red, expand, index_for
from .trace import Node


@dataclass
class Step:
    """One reverse-mode step, kept for the derivation document."""

    node: Node  # the opaque node whose adjoint is propagated
    adjoint: sp.Expr  # its adjoint, element-wise
    target: Node  # the variable receiving a contribution
    contribution: sp.Expr  # at the target's free indices


@dataclass
class Gradients:
    """``d<input>`` for each differentiable input, in normal form, plus the steps that built them."""

    elements: Elements
    grads: dict[Node, sp.Expr]
    adjoints: dict[Node, sp.Expr]
    steps: list[Step]


def _target_indices(el: Elements, node: Node) -> tuple:
    """Fresh indices ``p_<dim>`` for the element whose gradient is taken (never clash with ``i``)."""
    return tuple(0 if s == 1 else index_for(f"p_{s}", s) for s in node.shape)


def _contribution(el: Elements, node: Node, adjoint: sp.Expr, target: Node) -> sp.Expr:
    definition = el.definition[node]
    p = _target_indices(el, target)
    local = sp.diff(definition, el.ref(target, p))
    total = expand(adjoint * local)
    for i in el.free(node):
        if i != 0:
            total = Red(total, i)
    back = {pi: el.index[s] for pi, s in zip(p, target.shape) if pi != 0}
    return el.recognize(expand(total.xreplace(back)))


def differentiate(el: Elements) -> Gradients:
    graph = el.graph
    wanted = [graph.inputs[name] for name in graph.layer.differentiable]
    variables = list(el.opaque) + wanted
    adjoints: dict[Node, sp.Expr] = {graph.output: el.grad_ref(graph.output)}
    steps: list[Step] = []
    for node in reversed(el.opaque):
        adjoint = adjoints.get(node)
        if adjoint is None or adjoint == 0:
            continue
        read = el.definition[node]
        for target in variables:
            if target is node or not _reads(el, read, target):
                continue
            part = _contribution(el, node, adjoint, target)
            steps.append(Step(node, adjoint, target, part))
            adjoints[target] = el.recognize(expand(adjoints.get(target, sp.S.Zero) + part))
    grads = {x: adjoints.get(x, sp.S.Zero) for x in wanted}
    return Gradients(el, grads, adjoints, steps)


def _reads(el: Elements, expr: sp.Expr, node: Node) -> bool:
    base = el.base(node)
    if isinstance(base, sp.Symbol):
        return base in expr.free_symbols
    return any(e.base == base for e in expr.atoms(sp.Indexed))
