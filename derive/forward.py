"""Print a traced forward pass back as torch code, one line per node (the spec's own names)."""
from __future__ import annotations

import sympy as sp

from .functions import ELEMENTWISE, TORCH_NAME
from .trace import Graph, Node


def _operand(arg, printer) -> str:
    if isinstance(arg, Node):
        return arg.name
    text = printer.doprint(arg)
    simple = text.isidentifier() or text.replace(".", "").replace("e-", "").isdigit()
    return text if simple and not text.startswith("-") else f"({text})"


def _reduce_args(node: Node, source: Node) -> str:
    axes = node.attrs["axes"]
    if len(axes) == len(source.shape) and not node.attrs["keepdim"]:
        return ""
    return f"{axes[0]}, keepdim={node.attrs['keepdim']}"


def line(node: Node, printer) -> str:
    """The right-hand side that computes ``node`` from its operands."""
    a = [_operand(x, printer) for x in node.args]
    op = node.op
    if op == "mul" and not isinstance(node.args[1], Node) and node.args[1] == -1:
        return f"-{a[0]}"
    if op in ("add", "sub", "mul", "div"):
        return f"{a[0]} {dict(add='+', sub='-', mul='*', div='/')[op]} {a[1]}"
    if op == "pow":
        return f"{a[0]}**{a[1]}"
    if op in ELEMENTWISE:
        return f"{TORCH_NAME.get(op, 'torch.' + op)}({a[0]})"
    if op in ("sum", "mean"):
        return f"{a[0]}.{op}({_reduce_args(node, node.args[0])})"
    if op == "max":
        # a full reduction is a plain tensor (``x.max()``); along an axis it is (values, indices)
        args = _reduce_args(node, node.args[0])
        return f"{a[0]}.max({args}).values" if args else f"{a[0]}.max()"
    if op == "matmul":
        return f"{a[0]} @ {a[1]}"
    if op in ("eq", "ne"):
        return f"{a[0]} {'==' if op == 'eq' else '!='} {a[1]}"
    if op == "embed":
        return f"{a[0]}[{a[1]}]"
    if op == "view":
        return f"{a[0]}.view({', '.join(printer.doprint(s) for s in node.shape)})"
    if op == "pick":
        return f"{a[0]}[torch.arange({a[0]}.shape[0], device={a[0]}.device), {a[1]}]"
    raise ValueError(f"no forward printer for {op!r}")


def forward_lines(graph: Graph, printer) -> list[tuple[str, str]]:
    """``[(code, comment)]`` for every computed node, in order."""
    out = []
    for node in graph.nodes:
        if node.op in ("input", "labels"):
            continue
        source = node.source.split("#")[0].strip()
        comment = f"{node.within or 'spec'} line {node.line}: {source}" if source else ""
        out.append((f"{node.name} = {line(node, printer)}", comment))
    return out


def size_scalars(graph: Graph) -> list[sp.Expr]:
    """The size/constant scalars the forward multiplies by (for example ``1/(n - 1)``)."""
    return [a for n in graph.nodes for a in n.args if not isinstance(a, Node)]
