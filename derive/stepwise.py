"""The step-by-step backward (the exercise's first form): the rule table walked in reverse.

``walk`` visits the traced graph from the output back, applies each node's rule, de-broadcasts
each contribution to its input's shape and accumulates it. It is generic in the interpreter:

* ``emit(graph)`` prints readable code: one ``d<name>`` per intermediate, every line commented
  with the forward line it differentiates, a variable used twice accumulated (``dX = dX + ...``,
  never in place, so no gradient aliases another), nothing emitted for what needs no gradient;
* ``evaluate_steps(graph, values)`` computes the same gradients on arrays of SymPy expressions,
  which is how every rule, and every whole backward, is proven.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends import ArrayOps, Code, CodeOps, scalar_array
from .errors import DerivationError
from .rules import BROADCASTING, RULES
from .trace import Graph, Node


def _attrs(node: Node) -> dict:
    if node.op in ("sum", "mean", "max"):
        return {"axes": node.attrs["axes"], "keepdim": node.attrs["keepdim"]}
    if node.op == "view":
        return {"shape": node.shape}
    return {}


def needs_gradient(graph: Graph) -> set:
    """Nodes on a path from a differentiable input to the output."""
    wanted = {graph.inputs[name] for name in graph.layer.differentiable}
    needed = set(wanted)
    for node in graph.nodes:
        if any(a in needed for a in node.inputs):
            needed.add(node)
    return needed


def walk(graph: Graph, ops, value, shape_of, seed, accumulate) -> dict:
    """Reverse mode over ``graph``; returns ``{node: gradient}`` as the interpreter represents it."""
    needed = needs_gradient(graph)
    grads = {graph.output: seed}
    for node in reversed(graph.nodes):
        if node not in grads or node.op in ("input", "labels"):
            continue
        rule = RULES.get(node.op)
        if rule is None:
            raise DerivationError(graph.layer.name, f"no gradient rule for {node.op!r}",
                                  "add one to derive/rules.py", node.line, node.source)
        args = [value(a) if isinstance(a, Node) else ops.scalar(a) for a in node.args]
        contributions = rule(ops, grads[node], value(node), *args, **_attrs(node))
        if len(contributions) != len(node.args):
            raise DerivationError(graph.layer.name, f"the {node.op!r} rule returned {len(contributions)} "
                                  f"gradients for {len(node.args)} inputs", "return one per input (None for none)")
        for arg, part in zip(node.args, contributions):
            if not isinstance(arg, Node) or arg not in needed or part is None:
                continue
            if node.op in BROADCASTING:
                part = ops.unbroadcast(part, shape_of(arg), shape_of(node))
            grads[arg] = accumulate(arg, grads.get(arg), part, node)
    return grads


@dataclass
class Line:
    code: str
    comment: str


def emit(graph: Graph) -> tuple[list[Line], dict[Node, str]]:
    """The step-by-step backward as code lines, and the gradient variable of each node."""
    lines: list[Line] = []
    ops = CodeOps()

    def value(node):
        return Code(node.name, shape=node.shape)

    def accumulate(node, current, part, origin):
        name = f"d{node.name}"
        source = origin.source.split("#")[0].strip()
        comment = f"grad of: {source}" if source else f"grad of {origin.name}"
        if current is None:
            lines.append(Line(f"{name} = {part}", comment))
        else:
            lines.append(Line(f"{name} = {name} + {part.wrap(51)}", comment))
        return Code(name, shape=node.shape)

    seed = Code(f"d{graph.output.name}", shape=graph.output.shape)
    grads = walk(graph, ops, value, lambda n: n.shape, seed, accumulate)
    return lines, {node: str(g) for node, g in grads.items()}


def evaluate_steps(graph: Graph, values: dict, seed: np.ndarray, sizes: dict) -> dict:
    """The same backward on arrays of SymPy expressions (``values`` from ``prove.evaluate``)."""
    ops = ArrayOps(sizes)

    def accumulate(node, current, part, origin):
        return part if current is None else current + part

    return walk(graph, ops, values.__getitem__, lambda n: values[n].shape, np.asarray(seed, dtype=object),
                accumulate)


__all__ = ["walk", "emit", "evaluate_steps", "needs_gradient", "scalar_array"]
