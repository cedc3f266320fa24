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
from .forward import contiguous, size_names
from .functions import MASK_OPS
from .rules import BROADCASTING, RULES
from .select import has_fused_kernel
from .trace import Graph, Node


def _attrs(node: Node) -> dict:
    if node.op == "max" and "ties" in node.attrs:
        return {"axes": node.attrs["axes"], "keepdim": node.attrs["keepdim"], "ties": node.attrs["ties"]}
    if node.op in ("sum", "mean", "max", "logsumexp"):
        return {"axes": node.attrs["axes"], "keepdim": node.attrs["keepdim"]}
    if node.op in ("softmax", "log_softmax"):
        return {"axes": node.attrs["axes"]}
    if node.op == "permute":
        return {"perm": node.attrs["perm"]}
    if node.op == "view":
        return {"shape": node.shape}
    if node.op == "sqrt" and node.attrs.get("flat_at_zero"):
        return {"flat_at_zero": True}
    return {}


def needs_gradient(graph: Graph) -> set:
    """Nodes on a path from a differentiable input to the output."""
    wanted = {graph.inputs[name] for name in graph.layer.differentiable}
    needed = set(wanted)
    for node in graph.nodes:
        if node.op not in MASK_OPS and any(a in needed for a in node.inputs):
            needed.add(node)
    return needed


def walk(graph: Graph, ops, value, shape_of, seed, accumulate, fused=None) -> dict:
    """Reverse mode over ``graph``; returns ``{node: gradient}`` as the interpreter represents it.

    ``fused(region, grad)`` (optional) gives, for a called layer with a fused kernel, the
    contribution to each of its arguments at once; the region's interior is then not walked.
    """
    needed = needs_gradient(graph)
    grads = {graph.output: seed}
    regions = {r.output: r for r in graph.regions if has_fused_kernel(r.layer)} if fused else {}
    for node in reversed(graph.nodes):
        if node not in grads or node.op in ("input", "labels"):
            continue
        if node in regions:
            for arg, part in fused(regions[node], grads[node], needed).items():
                grads[arg] = accumulate(arg, grads.get(arg), part, node)
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
    unreached: bool = False  # the zero gradient of an input the output does not read (no rule made it)
    note: str = ""  # a comment line above it: the formula a call of autograd's own kernel computes


def emit(graph: Graph) -> tuple[list[Line], dict[Node, str]]:
    """The step-by-step backward as code lines, and the gradient variable of each node.

    A call of a layer that has a fused kernel (``hpreact = batchnorm(hprebn, ...)``) becomes that
    kernel's formulas, in the caller's names; everything else follows the rule table.
    """
    lines: list[Line] = []
    ops = CodeOps(contiguous(graph), size_names(graph))

    def fused(region, grad, needed):
        return _fused_region(graph, region, grad, needed, lines)

    def value(node):
        return Code(node.name, shape=node.shape, transposed=node.op == "permute" and node.attrs["perm"] == (1, 0))

    called = {r.output: r for r in graph.regions if has_fused_kernel(r.layer)}

    def accumulate(node, current, part, origin):
        name = f"d{node.name}"
        source = origin.source.split("#")[0].strip()
        comment = f"grad of: {source}" if source else f"grad of {origin.name}"
        if origin in called:
            comment = f"fused {called[origin].layer.name} kernel, grad of: {called[origin].source}"
        formula = getattr(part, "formula", None)
        if current is None:
            note = f"{name} = {formula}" if formula is not None else ""
            lines.append(Line(f"{name} = {part}", comment))
        elif part.scattered:
            note = ""
            axis, indices, values = part.scattered
            lines.append(Line(f"{name} = {name}.scatter_add({axis}, {indices}, {values})", comment))
        else:
            note = f"{name} = {name} + {formula.wrap(51)}" if formula is not None else ""
            lines.append(Line(f"{name} = {name} + {part.wrap(51)}", comment))
        if note:
            lines[-1].note = f"{note}, in one pass, as autograd computes it:"
        return Code(name, shape=node.shape, expanded=current is None and part.expanded)

    seed = Code(f"d{graph.output.name}", shape=graph.output.shape)
    grads = walk(graph, ops, value, lambda n: n.shape, seed, accumulate, fused)
    # A declared differentiable input the output does not read gets no gradient (None), as autograd
    # through the spec gives it none and as the fused kernels return: no n x k zeros written.
    for name in graph.layer.differentiable:
        node = graph.inputs[name]
        if node not in grads:
            lines.append(Line(f"d{name} = None", f"{name} does not reach the output: no gradient, as autograd", True))
            grads[node] = Code(f"d{name}", shape=node.shape)
    return lines, {node: str(g) for node, g in grads.items()}


def region_renaming(kernel, region, upstream: str) -> tuple[dict[str, str], dict]:
    """How a called layer's kernel reads in the caller: ``(tensor names, sizes and constants)``.

    Its nodes take the caller's names for the same nodes, its inputs the caller's arguments, its
    upstream gradient ``upstream``; its sizes and constants become the caller's values.
    """
    inner = [n for n in kernel.graph.nodes if n.op not in ("input", "labels")]
    rename = {a.name: b.name for a, b in zip(inner, region.nodes)}
    rename[f"d{kernel.graph.output.name}"] = upstream
    sizes = {kernel.graph.sizes[d]: size for d, size in region.sizes.items() if d in kernel.graph.sizes}
    for name, arg in region.arguments.items():
        if isinstance(arg, Node):
            rename[name] = arg.name
        elif name in kernel.graph.constants:
            sizes[kernel.graph.constants[name]] = arg
    return rename, sizes


def _fused_region(graph: Graph, region, grad, needed: set, lines: list[Line]) -> dict:
    """The fused kernel of ``region.layer``, printed in the caller's names, as contributions."""
    from .kernel import print_formulas
    from .select import fused_kernel

    kernel = fused_kernel(region.layer)
    inner = [n for n in kernel.graph.nodes if n.op not in ("input", "labels")]
    if len(inner) != len(region.nodes):
        raise DerivationError(graph.layer.name, f"the call of {region.layer.name!r} traced differently inside "
                              f"the spec", "call the layer with tensors of its declared shapes")
    rename, sizes = region_renaming(kernel, region, str(grad))
    shapes = {n.name: n.shape for n in graph.nodes}
    shapes[str(grad)] = region.output.shape
    wanted = [f for f in kernel.formulas if region.arguments[f.input] in needed]
    taken = {n.name for n in graph.nodes} | {f"d{n.name}" for n in graph.nodes} | {line.code.split(" =")[0] for line in lines}
    shared, codes = print_formulas(kernel.layer, kernel.elements, wanted, kernel.frame, shapes, taken, rename, sizes)
    comment = f"fused {region.layer.name} kernel, grad of: {region.source}"
    for s in shared:
        lines.append(Line(f"{s.name} = {s.code}", comment))
    return {region.arguments[f.input]: Code(code, prec=0) for f, (code, *_) in zip(wanted, codes)}


def evaluate_steps(graph: Graph, values: dict, seed: np.ndarray, sizes: dict) -> dict:
    """The same backward on arrays of SymPy expressions (``values`` from ``prove.evaluate``)."""
    ops = ArrayOps(sizes)

    def accumulate(node, current, part, origin):
        return part if current is None else current + part

    return walk(graph, ops, values.__getitem__, lambda n: values[n].shape, np.asarray(seed, dtype=object),
                accumulate)


__all__ = ["walk", "emit", "evaluate_steps", "needs_gradient", "scalar_array"]
