"""Tracing: run a layer's plain PyTorch forward on symbolic tensors and record a graph of primitives.

``trace(layer)`` calls the layer's function with a ``SymTensor`` per declared tensor input and a
SymPy symbol per constant; every torch operation the function performs is recorded as a ``Node``
of the ``Graph``, with its source line and, once the function returns, the name of the variable
it was assigned to. Sizes are SymPy symbols named after the declared dimensions (``sizes.py``).

Modules, by job: ``graph`` (what is produced), ``sizes`` (symbolic sizes), ``tracer`` (recording,
calls of other layers), ``naming`` (variable names), ``tensor`` with ``elementwise``,
``reductions``, ``shapes`` and ``indexing`` (the operations), ``functions`` (torch's functions).
"""
from .functions import SUPPORTED
from .graph import Graph, Node, Region
from .sizes import Dim, size_symbol
from .tensor import SymTensor
from .tracer import Tracer, trace

BINARY = ("add", "sub", "mul", "div", "pow")

__all__ = ["trace", "Tracer", "Graph", "Node", "Region", "SymTensor", "Dim", "size_symbol", "SUPPORTED", "BINARY"]
