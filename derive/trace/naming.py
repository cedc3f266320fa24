"""Names of traced nodes: the spec's own variables, then those inside called layers, then ``t<k>``;
and the names the generated code cannot let a spec variable take."""
from __future__ import annotations

from ..errors import TraceError
from ..spec import RESERVED, Layer
from .graph import Node


def name_nodes(nodes: list[Node], local_names: dict, output: Node, regions: list, sizes: set) -> None:
    """Variable names: the spec's own first, then those inside called layers (never clashing)."""
    from .tensor import SymTensor

    # (a spec may bind an input's name again, ``x = torch.tanh(x)``: the new value is ``x_2``)
    taken = {n.name for n in nodes if n.name}
    for var, value in local_names.items():
        if isinstance(value, SymTensor) and not value.node.name:
            value.node.name, value.node.named = _free(var, taken), True
            value.node.var = var if value.node.name != var else ""
            taken.add(value.node.name)
    taken |= set(sizes)
    for region in regions:
        for var, value in region.local_names.items():
            if isinstance(value, SymTensor) and not value.node.name and value.node in region.nodes:
                name = _free(var, taken)
                value.node.name, value.node.named = name, True
                taken.add(name)
    # (nor does a generated name take a spec variable's that holds another node: ``t1 = ...; out =
    # t1`` names that node ``out``, and a ``t1`` of another would be read as the spec's ``t1``)
    taken = {n.name for n in nodes if n.name} | {var for var, v in local_names.items() if isinstance(v, SymTensor)}
    if not output.name:
        # a spec variable may itself be called ``out`` (``out = torch.tanh(x); return (out*x).sum()``)
        output.name = _free("out", taken | set(sizes))
        taken.add(output.name)
    counter = 0
    for node in nodes:
        if not node.name:
            counter += 1
            while f"t{counter}" in taken:
                counter += 1
            node.name = f"t{counter}"


def _free(name: str, taken: set) -> str:
    """``name``, or ``name_2``, ``name_3``, ... where it is taken."""
    free, k = name, 1
    while free in taken:
        k += 1
        free = f"{name}_{k}"
    return free


def check_names(layer: Layer, nodes: list[Node], sizes: dict) -> None:
    """Refuse spec variables the generated code would shadow: a gradient's name, a reserved name.
    (A variable named like a dimension is fine: the generated code then names that size ``<dim>_size``.)"""
    names = {n.name for n in nodes}
    for node in nodes:
        if node.named and node.name.startswith("d") and node.name[1:] in names:
            raise TraceError(layer.name, f"the variable {node.name!r} has the name of the gradient of "
                             f"{node.name[1:]!r} in the generated backward", f"rename {node.name!r} "
                             f"(generated code calls the gradient of every tensor d<name>)", node.line, node.source)
        if node.named and node.name in RESERVED:
            raise TraceError(layer.name, f"the variable {node.name!r} has a name the generated code uses "
                             f"for itself", f"rename it (reserved: {', '.join(sorted(RESERVED))})",
                             node.line, node.source)
