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
    var: str = ""  # the spec's variable where its name differs (``x = torch.tanh(x)``: ``x_2``, var ``x``)

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

    def fitted(self, sizes: dict[str, int]) -> dict[str, int]:
        """``sizes`` with a dimension made larger where a size the spec divides (``d // G``) would
        not divide exactly: the first dimension of the divided size grows until it does."""
        sizes = dict(sizes)
        for numerator, divisor in self.derived.values():
            names = [str(f) for f in sp.Mul.make_args(sp.sympify(numerator)) if f.is_Symbol and str(f) in sizes]
            for _ in range(1000):
                values = self._numbers(sizes)
                top, bottom = int(sp.sympify(numerator).xreplace(values)), int(sp.sympify(divisor).xreplace(values))
                if not names or bottom <= 0 or top % bottom == 0:
                    break
                sizes[names[0]] += 1
        return sizes

    def _numbers(self, sizes: dict[str, int]) -> dict:
        """Declared sizes and constants (at their defaults) by symbol; a constant used as a size is
        matched by name."""
        values = {self.sizes[d]: sp.Integer(v) for d, v in sizes.items() if d in self.sizes}
        for name, symbol in self.constants.items():
            default = sp.sympify(self.layer.inputs[name].default)
            values[symbol] = default
            values[sp.Symbol(name, integer=True, positive=True)] = default
        return values

    def size_values(self, sizes: dict[str, int]) -> dict[sp.Symbol, int]:
        """Each size symbol's value at the concrete ``sizes`` (dimension name -> int), the sizes the
        spec computed (``d // G``, with a Constant at its default) included."""
        numbers = self._numbers(sizes)
        values = {**{k: int(v) for k, v in numbers.items() if k.is_integer and sp.sympify(v).is_Integer},
                  **{self.sizes[d]: v for d, v in sizes.items() if d in self.sizes}}
        for symbol, (numerator, divisor) in self.derived.items():
            values[symbol] = int(sp.sympify(numerator).xreplace(numbers)) // int(sp.sympify(divisor).xreplace(numbers))
        return values
