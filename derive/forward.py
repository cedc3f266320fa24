"""Print a traced forward pass back as torch code, one line per node (the spec's own names)."""
from __future__ import annotations

import builtins

import sympy as sp

from .functions import COMPARISONS, ELEMENTWISE, torch_call
from .spec import RESERVED
from .trace import Graph, Node


def size_names(graph: Graph) -> dict[sp.Symbol, sp.Symbol]:
    """Each size symbol -> the symbol it prints as in generated code.

    A size takes its dimension's name unless the generated code needs that name for something else
    (a spec variable ``m``, the gradient ``dv`` of an input ``v``, an input): it is then
    ``<name>_size``. A size the spec computed (``d // G``) prints as that expression.
    """
    taken = ({n.name for n in graph.nodes} | {f"d{n.name}" for n in graph.nodes} | set(graph.layer.inputs)
             | set(RESERVED) | {"math", "torch", "F", "needs"} | set(dir(builtins)))
    names = {}
    for symbol in graph.sizes.values():
        name = symbol.name
        while name in taken:
            name = f"{name}_size"
        taken.add(name)
        names[symbol] = sp.Symbol(name, **symbol.assumptions0)
    for symbol, (numerator, divisor) in graph.derived.items():
        text = f"({sp.pycode(sp.sympify(numerator).xreplace(names))} // {sp.pycode(sp.sympify(divisor).xreplace(names))})"
        names[symbol] = sp.Symbol(text, **symbol.assumptions0)
    return names


def _operand(arg, printer) -> str:
    if isinstance(arg, Node):
        return arg.name
    text = printer.doprint(arg)
    simple = text.isidentifier() or text.replace(".", "").replace("e-", "").isdigit()
    return text if simple and not text.startswith("-") else f"({text})"


def _axes(axes: tuple) -> str:
    return str(axes[0]) if len(axes) == 1 else str(tuple(axes))


def _reduce_args(node: Node, source: Node) -> str:
    axes = node.attrs["axes"]
    if len(axes) == len(source.shape) and not node.attrs["keepdim"]:
        return ""
    return f"{_axes(axes)}, keepdim={node.attrs['keepdim']}"


def contiguous(graph: Graph) -> bool:
    """Whether every tensor of the graph is laid out in order (no axis permuted): ``view`` then works."""
    return not any(n.op == "permute" for n in graph.nodes)


def line(node: Node, printer, view: str = "view") -> str:
    """The right-hand side that computes ``node`` from its operands."""
    a = [_operand(x, printer) for x in node.args]
    op = node.op
    if op in COMPARISONS:
        return f"{a[0]} {COMPARISONS[op][1]} {a[1]}"
    if op == "not":
        return f"~{a[0]}"
    if op == "and":
        return f"{a[0]} & {a[1]}"
    if op in ("maximum", "minimum"):
        return f"torch.{op}({a[0]}, {a[1]})"
    if op == "where":
        return f"torch.where({a[0]}, {a[1]}, {a[2]})"
    if op == "clamp":
        bounds = [f"{k}={v}" for k, v, x in (("min", a[1], node.args[1]), ("max", a[2], node.args[2])) if x.is_finite]
        return f"{a[0]}.clamp({', '.join(bounds)})"
    if op in ("softmax", "log_softmax"):
        return f"{a[0]}.{op}({_axes(node.attrs['axes'])})"
    if op == "logsumexp":
        return f"{a[0]}.logsumexp({_axes(node.attrs['axes'])}, keepdim={node.attrs['keepdim']})"
    if op == "permute":
        perm = node.attrs["perm"]
        return f"{a[0]}.T" if len(perm) == 2 else f"{a[0]}.permute({', '.join(map(str, perm))})"
    if op == "expand":
        return f"{a[0]}.expand({', '.join(printer.doprint(s) for s in node.shape)})"
    if op == "mul" and not isinstance(node.args[1], Node) and node.args[1] == -1:
        return f"-{a[0]}"
    if "variance_of" in node.attrs:  # x.var(dim), as the spec wrote it: one torch.var
        summed = node.args[0]
        return (f"{node.attrs['variance_of'].name}.var({_axes(summed.attrs['axes'])}, "
                f"correction={node.attrs['correction']}, keepdim={summed.attrs['keepdim']})")
    if op in ("add", "sub", "mul", "div"):
        return f"{a[0]} {dict(add='+', sub='-', mul='*', div='/')[op]} {a[1]}"
    if op == "pow":
        return f"{a[0]}**{a[1]}"
    if op in ELEMENTWISE:
        return torch_call(op, a[0], a[1:])
    if op in ("sum", "mean"):
        return f"{a[0]}.{op}({_reduce_args(node, node.args[0])})"
    if op == "max":
        # a full reduction is a plain tensor (``x.max()``); along an axis it is (values, indices)
        args = _reduce_args(node, node.args[0])
        if node.attrs.get("ties") == "shared":  # amax, as the spec wrote it (its gradient shares ties)
            return f"{a[0]}.amax({args})"
        return f"{a[0]}.max({args}).values" if args else f"{a[0]}.max()"
    if op == "matmul":
        return f"{a[0]} @ {a[1]}"
    if op in ("eq", "ne"):
        return f"{a[0]} {'==' if op == 'eq' else '!='} {a[1]}"
    if op == "embed":
        return f"{a[0]}[{a[1]}]"
    if op == "view":
        sizes = ", ".join(printer.doprint(s) for s in node.shape)
        return f"{a[0]}.{view}({sizes})"
    if op == "pick":
        return f"{a[0]}[torch.arange({a[0]}.shape[0], device={a[0]}.device), {a[1]}]"
    raise ValueError(f"no forward printer for {op!r}")


def forward_lines(graph: Graph, printer) -> list[tuple[str, str]]:
    """``[(code, comment)]`` for every computed node, in order (sizes by their ``size_names``)."""
    names = size_names(graph)

    class Renamed:
        @staticmethod
        def doprint(value):
            return printer.doprint(sp.sympify(value).xreplace(names))

    view = "view" if contiguous(graph) else "reshape"
    out = []
    for node in graph.nodes:
        if node.op in ("input", "labels"):
            continue
        source = node.source.split("#")[0].strip()
        comment = f"{node.within or 'spec'} line {node.line}: {source}" if source else ""
        out.append((f"{node.name} = {line(node, Renamed, view)}", comment))
    return out


def size_scalars(graph: Graph) -> list[sp.Expr]:
    """The size/constant scalars the forward multiplies by (for example ``1/(n - 1)``)."""
    return [a for n in graph.nodes for a in n.args if not isinstance(a, Node)]
