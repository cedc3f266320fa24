"""What tracing produces: nodes of primitive operations, regions of called layers, the graph."""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from ..spec import Layer


@dataclass(eq=False)
class Node:
    op: str
    args: tuple  # Node or a SymPy scalar
    shape: tuple  # SymPy sizes; 1 for a kept (keepdim) axis
    attrs: dict = field(default_factory=dict)
    line: int = 0
    source: str = ""
    name: str = ""
    named: bool = False  # the spec assigned it to a variable (not an automatic t<k> temporary)
    within: str = ""  # the called layer whose line this is ("" for the spec itself)

    def __repr__(self):
        return f"Node({self.name or '?'} = {self.op})"

    @property
    def inputs(self) -> list["Node"]:
        return [a for a in self.args if isinstance(a, Node)]


@dataclass(eq=False)
class Region:
    """The nodes recorded while a spec called another layer (``hpreact = batchnorm(hprebn, ...)``)."""

    layer: Layer
    arguments: dict  # the called layer's parameter -> the caller's Node or scalar
    nodes: list[Node]
    output: Node
    sizes: dict[str, sp.Expr]  # the called layer's dimension -> the caller's size
    local_names: dict = field(default_factory=dict)
    source: str = ""  # the caller's line that calls the layer


@dataclass
class Graph:
    layer: Layer
    inputs: dict[str, Node]
    nodes: list[Node]  # topological order, inputs first
    output: Node
    sizes: dict[str, sp.Symbol]
    constants: dict[str, sp.Symbol]
    regions: list[Region] = field(default_factory=list)
    # the source files of every Python function that ran while the spec was traced, the spec's own
    # among them (with torch's and the toolkit's): what the generated files depend on besides it
    sources: frozenset = frozenset()
    # sizes the spec computed from others (``d // G``): symbol -> (numerator, divisor)
    derived: dict = field(default_factory=dict)

    def consumers(self, node: Node) -> list[Node]:
        return [m for m in self.nodes if node in m.inputs]
