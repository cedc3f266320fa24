"""The tracer: runs a layer's forward on ``SymTensor``s and records each operation as a ``Node``.

Each recorded node keeps its source line and, once the function returns, the name of the local
variable it was assigned to (``bnmeani``, ``probs``). Sizes are SymPy symbols named after the
declared dimensions (``sizes.py``).
"""
from __future__ import annotations

import difflib
import inspect
import linecache
import sys

import sympy as sp

from ..errors import TraceError
from ..spec import Constant, Labels, Layer, dim_names
from .graph import Graph, Node, Region
from .naming import check_names, name_nodes
from .sizes import Sizes, exact


class Tracer:
    def __init__(self, layer: Layer):
        self.layer = layer
        self.nodes: list[Node] = []
        self.size_table = Sizes(layer.dims)
        self.size_table.fail = self.fail
        self.sizes = self.size_table.symbols
        self.code = layer.fn.__code__
        self.calls: list[Region] = []  # layers being called, innermost last
        self.regions: list[Region] = []

    @property
    def tokens(self) -> dict:
        return self.size_table.tokens

    def size(self, dim: str) -> sp.Expr:
        """The symbolic size of a declared dimension (``"t*e"`` is a product)."""
        return sp.Mul(*[self.sizes[name] for name in dim_names(dim)])

    # -- errors and source positions -------------------------------------------------------
    def where(self) -> tuple[int, str]:
        """Line and source of the innermost spec frame (a called layer's own line, when inside one)."""
        codes = {self.code} | {r.layer.fn.__code__ for r in self.calls}
        frame = sys._getframe()
        while frame is not None and frame.f_code not in codes:
            frame = frame.f_back
        if frame is None:
            return 0, ""
        return frame.f_lineno, linecache.getline(frame.f_code.co_filename, frame.f_lineno)

    def fail(self, problem: str, fix: str):
        line, source = self.where()
        raise TraceError(self.layer.name, problem, fix, line, source)

    # -- recording ---------------------------------------------------------------------------
    def record(self, op, args, shape, **attrs) -> "SymTensor":
        from .tensor import SymTensor

        line, source = self.where()
        node = Node(op, tuple(args), tuple(shape), attrs, line, source,
                    within=self.calls[-1].layer.name if self.calls else "")
        self.nodes.append(node)
        return SymTensor(self, node)

    def scalar(self, value, op: str):
        """A Python/SymPy number, size or constant as an exact SymPy scalar."""
        symbol = getattr(value, "symbol", None)
        if symbol is not None and isinstance(value, int):
            return symbol
        if isinstance(value, bool) or not isinstance(value, (int, float, sp.Expr)):
            self.fail(f"operand of type {type(value).__name__} in {op!r}",
                      "use tensors, Python numbers, sizes from x.shape and declared constants")
        size = self.size_table.as_size_expression(value)
        if size is not None:
            return size
        if isinstance(value, float) and not value == value:
            self.fail(f"the number nan in {op!r}", "use a finite number")
        return exact(value)

    def broadcast(self, a: tuple, b: tuple, op: str) -> tuple:
        out = []
        for k in range(1, max(len(a), len(b)) + 1):
            x = a[-k] if k <= len(a) else 1
            y = b[-k] if k <= len(b) else 1
            if x != 1 and y != 1 and x != y:
                self.fail(f"{op!r} cannot broadcast shapes {a} and {b}",
                          "make the sizes agree or be 1 (check the input declarations)")
            out.append(y if x == 1 else x)
        return tuple(reversed(out))

    def run(self) -> Graph:
        from .tensor import SymTensor

        inputs, args = {}, []
        for name, decl in self.layer.inputs.items():
            if isinstance(decl, Constant):
                args.append(sp.Symbol(name, **decl.assumptions()))
                continue
            shape = tuple(self.size(d) for d in decl.dims)
            op = "labels" if isinstance(decl, Labels) else "input"
            attrs = {"classes": self.sizes[decl.classes]} if isinstance(decl, Labels) else {}
            t = self.record(op, (), shape, **attrs)
            t.node.name, t.node.named = name, True
            inputs[name] = t.node
            args.append(t)
        constants = {n: a for n, a in zip(self.layer.inputs, args) if isinstance(a, sp.Symbol)}
        local_names = {}
        sources = {self.code.co_filename}

        def profile(frame, event, arg):
            if event != "return":
                return
            sources.add(frame.f_code.co_filename)
            if frame.f_code is self.code:
                local_names.update(frame.f_locals)
            elif self.calls and frame.f_code is self.calls[-1].layer.fn.__code__:
                self.calls[-1].local_names.update(frame.f_locals)

        old = sys.getprofile()
        sys.setprofile(profile)
        try:
            result = self.layer.fn(*args)
        except TraceError:
            raise
        except (Exception, SystemExit) as e:  # the spec itself failed on symbolic tensors: say where, not how deep
            raise self.spec_failed(e) from None
        finally:
            sys.setprofile(old)
        if not isinstance(result, SymTensor):
            raise TraceError(self.layer.name, f"the forward returns {type(result).__name__}",
                             "return the layer's output tensor")
        if result.node.op in ("input", "labels"):
            raise TraceError(self.layer.name, f"the forward returns its input {result.node.name!r} unchanged",
                             "return a tensor the layer computes (an identity layer needs no backward)")
        name_nodes(self.nodes, local_names, result.node, self.regions, set(self.sizes))
        check_names(self.layer, self.nodes, self.sizes)
        used = reachable(result.node)
        nodes = [n for n in self.nodes if n in used or n.op in ("input", "labels")]
        for region in self.regions:
            region.nodes = [n for n in region.nodes if n in used]
        return Graph(self.layer, inputs, nodes, result.node, self.sizes, constants, self.regions, frozenset(sources),
                     dict(self.size_table.derived))

    def spec_failed(self, error: Exception) -> TraceError:
        """A Python error raised while the spec ran on symbolic tensors, at the spec's own line."""
        codes = {self.code} | {r.layer.fn.__code__ for r in self.calls} | {r.layer.fn.__code__ for r in self.regions}
        line, source, tb = 0, "", error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                line = tb.tb_lineno
                source = linecache.getline(tb.tb_frame.f_code.co_filename, line)
            tb = tb.tb_next
        declared = ", ".join(f"{k}: ({', '.join(v.dims)})" for k, v in self.layer.tensors.items())
        fix = f"the forward must run on tensors of the declared shapes ({declared}) using supported operations"
        if isinstance(error, NameError) and getattr(error, "name", None):
            close = difflib.get_close_matches(error.name, list(self.layer.inputs), n=1)
            fix = f"use a declared input ({', '.join(self.layer.inputs)})" + (f"; did you mean {close[0]!r}?" if close else "")
        elif "truth value of Relational" in str(error):
            fix = ("the forward must be the same operations at every size: Python control flow on a size "
                   "(if n - 1 > 0:) takes one branch for every size; use sizes only in arithmetic")
        elif "sympy" in type(error).__module__ or "Symbol" in str(error) or "expression" in str(error):
            fix = ("a declared Constant is a symbol while the layer is traced (so is a size computed from several "
                   "sizes): use it in arithmetic with tensors and numbers (x * eps, x / math.sqrt(d), "
                   "x / d ** 0.5), not in Python's math functions or methods")
        return TraceError(self.layer.name, f"the spec raised {type(error).__name__}: {error}", fix, line, source)

    def call(self, layer: Layer, args: tuple, kwargs: dict) -> "SymTensor":
        """A spec calls another layer: record its operations inline, as a region."""
        from .tensor import SymTensor

        try:
            bound = inspect.signature(layer.fn).bind(*args, **kwargs)
        except TypeError as e:
            self.fail(f"calling layer {layer.name!r}: {e}", f"pass {', '.join(layer.inputs)}")
        bound.apply_defaults()
        sizes: dict[str, sp.Expr] = {}
        for name, decl in layer.tensors.items():
            value = bound.arguments[name]
            if not isinstance(value, SymTensor):
                self.fail(f"layer {layer.name!r} gets {type(value).__name__} for tensor input {name!r}",
                          "pass a tensor of the spec")
            shape = value.node.shape
            if len(shape) != len(decl.dims):
                self.fail(f"layer {layer.name!r} expects {name} with {len(decl.dims)} dimension(s) {decl.dims}, "
                          f"got shape {shape}", "pass a tensor of the declared rank")
            pairs = list(zip(decl.dims, shape))
            if isinstance(decl, Labels):
                pairs.append((decl.classes, value.node.attrs.get("classes")))
            for dim, size in pairs:
                if dim_names(dim) == [dim] and sizes.setdefault(dim, size) != size:
                    self.fail(f"layer {layer.name!r}: dimension {dim!r} is {sizes[dim]} and {size}",
                              "pass tensors whose sizes agree with the layer's declaration")
        arguments = {k: v.node if isinstance(v, SymTensor) else self.scalar(v, f"call of {layer.name}")
                     for k, v in bound.arguments.items()}
        region = Region(layer, arguments, [], None, sizes, source=self.where()[1].split("#")[0].strip())
        start = len(self.nodes)
        self.calls.append(region)
        try:
            result = layer.fn(*bound.args, **bound.kwargs)
        finally:
            self.calls.pop()
        region.nodes, region.output = self.nodes[start:], result.node
        self.regions.append(region)
        return result


def reachable(output: Node) -> set:
    seen, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.inputs)
    return seen


def trace(layer: Layer) -> Graph:
    """Trace ``layer`` with generic sizes."""
    return Tracer(layer).run()
