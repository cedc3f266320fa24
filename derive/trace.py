"""Tracing: run a layer's plain PyTorch forward on symbolic tensors and record a graph of primitives.

Sizes are SymPy symbols named after the declared dimensions. ``x.shape[0]`` gives a ``Dim``: an
``int`` subclass (so ``range(n)`` works) whose arithmetic returns SymPy expressions (so
``1/(n-1)`` stays exact and generic). Each recorded node keeps its source line and, once the
function returns, the name of the local variable it was assigned to (``bnmeani``, ``probs``).
"""
from __future__ import annotations

import difflib
import inspect
import sys
from dataclasses import dataclass, field

import sympy as sp
import torch

from .errors import TraceError
from .functions import ELEMENTWISE
from .spec import RESERVED, Constant, Labels, Layer, dim_names

UNARY = tuple(ELEMENTWISE)  # exp, log, tanh, sigmoid, relu, abs, softplus
BINARY = ("add", "sub", "mul", "div", "pow")


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

    def consumers(self, node: Node) -> list[Node]:
        return [m for m in self.nodes if node in m.inputs]


def size_symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, integer=True, positive=True)


_TOKEN_BASE = 1 << 20  # range(n) sees this int; the tracer maps it back to the symbol


class Dim(int):
    """A symbolic size that still passes where Python wants an int (``range(n)``)."""

    def __new__(cls, symbol: sp.Symbol, token: int):
        obj = int.__new__(cls, token)
        obj.symbol = symbol
        return obj

    def __repr__(self):
        return str(self.symbol)

    def _s(self, other):
        return other.symbol if isinstance(other, Dim) else other

    def __add__(self, o): return self.symbol + self._s(o)
    def __radd__(self, o): return self._s(o) + self.symbol
    def __sub__(self, o): return self.symbol - self._s(o)
    def __rsub__(self, o): return self._s(o) - self.symbol
    def __mul__(self, o): return self.symbol * self._s(o)
    def __rmul__(self, o): return self._s(o) * self.symbol
    def __truediv__(self, o): return self.symbol / sp.sympify(self._s(o))
    def __rtruediv__(self, o): return sp.sympify(self._s(o)) / self.symbol
    def __pow__(self, o): return self.symbol ** self._s(o)
    def __neg__(self): return -self.symbol
    def __float__(self): raise TypeError("a symbolic size has no float value")

    # Python control flow on a size (``if n >= 2000000:``) would take the tracing size's branch for
    # every size: a comparison answers only when it holds for every size (``n >= 1``), else it is refused.
    def _decide(self, relation, text: str) -> bool:
        decided = relation(self.symbol)
        if decided in (sp.true, sp.false):
            return bool(decided)
        self.tracer.fail(f"Python control flow on a size ({text}): it holds for some sizes and not for others, "
                         f"so the generated code would take one branch for every size",
                         "the forward must be the same operations at every size: use sizes only in arithmetic "
                         "(1 / (n - 1)), and write a separate layer for each case")

    def _compare(op: str, relation):
        def compare(self, other):
            o = self._s(other)
            if not isinstance(o, (int, sp.Expr)) or isinstance(o, bool):
                return NotImplemented
            return self._decide(lambda s: relation(s, sp.sympify(o)), f"{self.symbol} {op} {o}")
        return compare

    __lt__ = _compare("<", sp.Lt)
    __le__ = _compare("<=", sp.Le)
    __gt__ = _compare(">", sp.Gt)
    __ge__ = _compare(">=", sp.Ge)
    __eq__ = _compare("==", lambda a, b: sp.Eq(a, b))
    __ne__ = _compare("!=", lambda a, b: sp.Ne(a, b))
    __hash__ = int.__hash__
    del _compare


class Tracer:
    def __init__(self, layer: Layer):
        self.layer = layer
        self.nodes: list[Node] = []
        self.sizes = {d: size_symbol(d) for d in layer.dims}
        self.tokens = {_TOKEN_BASE + 7 * k: s for k, s in enumerate(self.sizes.values())}
        self.dims = {s: Dim(s, t) for t, s in self.tokens.items()}
        for dim in self.dims.values():
            dim.tracer = self  # a comparison of sizes is refused at the spec's line
        self.code = layer.fn.__code__
        self.calls: list[Region] = []  # layers being called, innermost last
        self.regions: list[Region] = []

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
        import linecache
        return frame.f_lineno, linecache.getline(frame.f_code.co_filename, frame.f_lineno)

    def fail(self, problem: str, fix: str):
        line, source = self.where()
        raise TraceError(self.layer.name, problem, fix, line, source)

    # -- recording ---------------------------------------------------------------------------
    def record(self, op, args, shape, **attrs) -> "SymTensor":
        line, source = self.where()
        node = Node(op, tuple(args), tuple(shape), attrs, line, source,
                    within=self.calls[-1].layer.name if self.calls else "")
        self.nodes.append(node)
        return SymTensor(self, node)

    def scalar(self, value, op: str):
        """A Python/SymPy number or constant as an exact SymPy scalar."""
        if isinstance(value, Dim):
            return value.symbol
        if isinstance(value, bool) or not isinstance(value, (int, float, sp.Expr)):
            self.fail(f"operand of type {type(value).__name__} in {op!r}",
                      "use tensors, Python numbers, sizes from x.shape and declared constants")
        if isinstance(value, float):
            return sp.nsimplify(value, rational=True)
        return sp.sympify(value)

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
        self.name_nodes(local_names, result.node, self.regions)
        names = {n.name for n in self.nodes}
        for node in self.nodes:
            if node.named and node.name.startswith("d") and node.name[1:] in names:
                raise TraceError(self.layer.name, f"the variable {node.name!r} has the name of the gradient of "
                                 f"{node.name[1:]!r} in the generated backward", f"rename {node.name!r} "
                                 f"(generated code calls the gradient of every tensor d<name>)", node.line, node.source)
            if node.named and node.name in RESERVED:
                raise TraceError(self.layer.name, f"the variable {node.name!r} has a name the generated code uses "
                                 f"for itself", f"rename it (reserved: {', '.join(sorted(RESERVED))})",
                                 node.line, node.source)
            if node.name in self.sizes and node.op not in ("input", "labels"):
                raise TraceError(self.layer.name, f"the variable {node.name!r} has the name of a dimension",
                                 f"rename the dimension {node.name!r} in the declaration (generated code keeps "
                                 f"sizes in variables of their dimension's name)", node.line, node.source)
        used = self.reachable(result.node)
        nodes = [n for n in self.nodes if n in used or n.op in ("input", "labels")]
        for region in self.regions:
            region.nodes = [n for n in region.nodes if n in used]
        return Graph(self.layer, inputs, nodes, result.node, self.sizes, constants, self.regions, frozenset(sources))

    def spec_failed(self, error: Exception) -> TraceError:
        """A Python error raised while the spec ran on symbolic tensors, at the spec's own line."""
        codes = {self.code} | {r.layer.fn.__code__ for r in self.calls} | {r.layer.fn.__code__ for r in self.regions}
        line, source, tb = 0, "", error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                import linecache
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
            fix = ("a declared Constant is a symbol while the layer is traced: use it only in arithmetic "
                   "with tensors and numbers (x * eps, x + eps), not in math functions or methods")
        return TraceError(self.layer.name, f"the spec raised {type(error).__name__}: {error}", fix, line, source)

    def call(self, layer: Layer, args: tuple, kwargs: dict) -> "SymTensor":
        """A spec calls another layer: record its operations inline, as a region."""
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

    def name_nodes(self, local_names: dict, output: Node, regions: list[Region] = ()) -> None:
        """Variable names: the spec's own first, then those inside called layers (never clashing)."""
        for var, value in local_names.items():
            if isinstance(value, SymTensor) and not value.node.name:
                value.node.name, value.node.named = var, True
        taken = {n.name for n in self.nodes if n.name} | set(self.sizes)
        for region in regions:
            for var, value in region.local_names.items():
                if isinstance(value, SymTensor) and not value.node.name and value.node in region.nodes:
                    name, k = var, 1
                    while name in taken:
                        k += 1
                        name = f"{var}_{k}"
                    value.node.name, value.node.named = name, True
                    taken.add(name)
        if not output.name:
            output.name = "out"
        taken = {n.name for n in self.nodes if n.name}
        counter = 0
        for node in self.nodes:
            if not node.name:
                counter += 1
                while f"t{counter}" in taken:
                    counter += 1
                node.name = f"t{counter}"

    @staticmethod
    def reachable(output: Node) -> set:
        seen, stack = set(), [output]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(n.inputs)
        return seen


class SymTensor:
    """A tensor stand-in that records every torch operation applied to it."""

    _op_priority = 100.0  # SymPy scalars defer to our __rmul__ etc.

    def __init__(self, tracer: Tracer, node: Node):
        self._tracer = tracer
        self.node = node

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self._tracer.dims.get(s, s) for s in self.node.shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self):
        return len(self.node.shape)

    def dim(self):
        return self.ndim

    # -- arithmetic --------------------------------------------------------------------------
    def _binary(self, op, other, reverse=False):
        t = self._tracer
        if isinstance(other, SymTensor):
            a, b = (other.node, self.node) if reverse else (self.node, other.node)
            shape = t.broadcast(a.shape, b.shape, op)
        else:
            s = t.scalar(other, op)
            a, b = (s, self.node) if reverse else (self.node, s)
            shape = self.node.shape
        if self.node.op == "labels" or (isinstance(other, SymTensor) and other.node.op == "labels"):
            t.fail(f"arithmetic {op!r} on integer labels", "use labels only to pick: t[range(n), y]")
        if op == "div" and not reverse and not isinstance(other, SymTensor) and b == 0:
            t.fail("division by the number 0", "divide by a non-zero number or a tensor")
        if op == "pow" and isinstance(b, Node):
            t.fail("a tensor exponent in '**'", "use a constant exponent, or exp(b * log(a))")
        return t.record(op, (a, b), shape)

    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, True)
    def __pow__(self, o): return self._binary("pow", o)

    def __rpow__(self, o):
        self._tracer.fail("a tensor exponent in '**'", "use torch.exp(t * math.log(base))")

    def __neg__(self):
        return self._tracer.record("mul", (self.node, sp.S.NegativeOne), self.node.shape)

    def __pos__(self):
        return self

    # -- elementwise functions -------------------------------------------------------------
    def _unary(self, op):
        return self._tracer.record(op, (self.node,), self.node.shape)

    def exp(self): return self._unary("exp")
    def log(self): return self._unary("log")
    def tanh(self): return self._unary("tanh")
    def sigmoid(self): return self._unary("sigmoid")
    def relu(self): return self._unary("relu")
    def abs(self): return self._unary("abs")

    def softplus(self, beta=1, threshold=20):
        """``F.softplus``; above ``threshold`` torch returns x itself (within 2e-9 of the formula)."""
        if beta != 1:
            self._tracer.fail(f"softplus(beta={beta!r})", "use F.softplus(beta * x) / beta")
        return self._unary("softplus")

    def clamp(self, min=None, max=None):
        """``clamp(min=c)`` is ``relu(x - c) + c``; an upper bound is not supported."""
        if max is not None or min is None or isinstance(min, SymTensor):
            self._tracer.fail(f"clamp(min={min!r}, max={max!r})", "use clamp(min=number) (or torch.relu)")
        return self.relu() if min == 0 else (self - min).relu() + min

    clamp_min = clamp

    # -- reductions --------------------------------------------------------------------------
    def _reduce(self, op, dim, keepdim):
        t = self._tracer
        shape = self.node.shape
        if dim is None:
            axes = tuple(range(len(shape)))
        else:
            if not isinstance(dim, int) or isinstance(dim, (bool, Dim)) or not -len(shape) <= dim < len(shape):
                t.fail(f"{op}(dim={dim!r}) on a tensor of rank {len(shape)}", "pass one axis number")
            axes = (dim % len(shape),)
        new = tuple(1 if k in axes else s for k, s in enumerate(shape) if keepdim or k not in axes)
        return t.record(op, (self.node,), new, axes=axes, keepdim=bool(keepdim))

    def sum(self, dim=None, keepdim=False, keepdims=None):
        return self._reduce("sum", dim, keepdim if keepdims is None else keepdims)

    def mean(self, dim=None, keepdim=False, keepdims=None):
        return self._reduce("mean", dim, keepdim if keepdims is None else keepdims)

    def max(self, dim=None, keepdim=False, keepdims=None):
        if dim is None:
            self._tracer.fail("max() over all elements", "use max(dim, keepdim=True).values")
        return _MaxResult(self._reduce("max", dim, keepdim if keepdims is None else keepdims))

    def __matmul__(self, other):
        t = self._tracer
        if not isinstance(other, SymTensor) or self.ndim != 2 or other.ndim != 2:
            t.fail("'@' needs two rank-2 tensors", "reshape to matrices first")
        a, b = self.node.shape, other.node.shape
        if a[1] != b[0]:
            t.fail(f"'@' of shapes {a} and {b}", "the inner sizes must agree")
        return t.record("matmul", (self.node, other.node), (a[0], b[1]))

    # -- indexing ----------------------------------------------------------------------------
    def __getitem__(self, key):
        t = self._tracer
        if isinstance(key, SymTensor) and key.node.op == "labels":
            if key.node.attrs["classes"] != self.node.shape[0]:
                t.fail("an embedding lookup whose index classes differ from the table's rows",
                       "declare the index tensor's classes as the table's first dimension")
            return t.record("embed", (self.node, key.node), key.node.shape + self.node.shape[1:])
        if isinstance(key, tuple) and len(key) == 2 and self.ndim == 2:
            rows, labels = key
            size = self.node.shape[0]
            if self._is_arange(rows, size) and isinstance(labels, SymTensor) and labels.node.op == "labels":
                if labels.node.shape != (size,):
                    t.fail(f"picking with labels of shape {labels.node.shape}", f"labels must have shape ({size},)")
                if labels.node.attrs["classes"] != self.node.shape[1]:
                    t.fail("picking with labels whose classes differ from the tensor's columns",
                           "declare the labels' classes as the size of the picked axis")
                return t.record("pick", (self.node, labels.node), (size,))
        parts = key if isinstance(key, tuple) else (key,)
        floats = [p.node.name for p in parts if isinstance(p, SymTensor) and p.node.op != "labels"]
        if floats:
            t.fail(f"indexing with {floats[0]!r}, which is declared as a floating-point Tensor",
                   f"declare the indices as Labels, e.g. {floats[0]}=Labels('n', classes='k')")
        t.fail(f"indexing with {_describe(key)}", "the supported indexing is picking t[range(n), y] with declared "
               "Labels y, and table[index] with declared Labels index")

    def _is_arange(self, rows, size) -> bool:
        stop = getattr(rows, "stop", None) if isinstance(rows, range) else None
        if isinstance(rows, range) and rows.start == 0 and rows.step == 1:
            return self._tracer.tokens.get(stop) == size
        if isinstance(rows, torch.Tensor) and rows.ndim == 1:
            return self._tracer.tokens.get(len(rows)) == size
        return False

    # -- reshaping ----------------------------------------------------------------------------
    def view(self, *shape):
        t = self._tracer
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        sizes = [s.symbol if isinstance(s, Dim) else sp.sympify(s) if isinstance(s, (int, sp.Expr)) else None
                 for s in shape]
        if None in sizes or sum(1 for s in sizes if s == -1) > 1:
            t.fail(f"view{tuple(shape)!r}", "pass sizes from x.shape, integers, and at most one -1")
        total = sp.Mul(*self.node.shape)
        known = sp.Mul(*[s for s in sizes if s != -1])
        # sizes are products of size symbols and integers: cancel decides their quotients and equality
        sizes = [sp.cancel(total / known) if s == -1 else s for s in sizes]
        if sp.cancel(sp.Mul(*sizes) - total) != 0:
            t.fail(f"view to {tuple(sizes)} of a tensor of shape {self.node.shape}", "keep the number of elements")
        return t.record("view", (self.node,), tuple(sizes))

    reshape = view

    # -- everything else is refused clearly ---------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if not args and "input" in kwargs:  # torch.exp(input=x)
            args = (kwargs.pop("input"),)
        self = next(a for a in (*args, *kwargs.values()) if isinstance(a, SymTensor))
        if name in UNARY + ("sum", "mean", "max", "clamp", "clamp_min") and args and args[0] is self:
            return getattr(self, name)(*args[1:], **kwargs)
        self._tracer.fail(f"torch.{name} is not supported",
                          f"write it from supported primitives: {SUPPORTED}")

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr in ("item", "tolist", "numpy"):
            self._value()
        if attr.endswith("_"):
            self._tracer.fail(f"in-place operation .{attr}(...)", f"use the out-of-place form (a = a.{attr[:-1]}(...) "
                              f"or arithmetic), built from supported primitives: {SUPPORTED}")
        self._tracer.fail(f"tensor method .{attr} is not supported",
                          f"write it from supported primitives: {SUPPORTED}")

    def __bool__(self):
        self._tracer.fail("a tensor's value decides Python control flow (if/while/and/or on a tensor)",
                          "the forward must be the same sequence of operations for every input; "
                          "use arithmetic (for example a mask) instead of branching")

    def __array_ufunc__(self, ufunc, method, *args, **kwargs):
        self._tracer.fail(f"numpy's {ufunc.__name__} on a tensor", f"use torch's (torch.{ufunc.__name__}), or "
                          f"supported primitives: {SUPPORTED}")

    def __array_function__(self, func, types, args, kwargs):
        self._tracer.fail(f"numpy's {func.__name__} on a tensor", f"use torch's, or supported primitives: {SUPPORTED}")

    def _value(self, *a):
        self._tracer.fail("a tensor's value is read as a Python number (float(), int(), len(), .item())",
                          "the forward must not depend on tensor values; sizes come from x.shape")

    __float__ = __int__ = __len__ = __index__ = _value

    def __iter__(self):
        self._tracer.fail("a Python loop over a tensor's rows", "write it with whole-tensor operations "
                          "(a sum over rows is x.sum(0))")

    def __setitem__(self, key, value):
        self._tracer.fail("in-place assignment into a tensor", "build a new tensor instead of mutating one")

    def _inplace(self, *a, **k):
        self._tracer.fail("in-place operation", "use the out-of-place form (a = a + b)")

    __iadd__ = __isub__ = __imul__ = __itruediv__ = _inplace

    def _compare(self, *a):
        self._tracer.fail("a comparison of tensors", "the forward must not branch on tensor values")

    def _label_compare(self, op, other):
        """``y == c`` / ``y != c`` on labels: a 0/1 mask (``keep = y != ignore_index``)."""
        t = self._tracer
        if self.node.op != "labels" or isinstance(other, SymTensor):
            t.fail(f"{'==' if op == 'eq' else '!='} on {'two tensors' if isinstance(other, SymTensor) else 'a float tensor'}",
                   "compare labels with a number only, as a mask: keep = y != ignore_index")
        return t.record(op, (self.node, t.scalar(other, op)), self.node.shape)

    def __eq__(self, other): return self._label_compare("eq", other)
    def __ne__(self, other): return self._label_compare("ne", other)

    __lt__ = __le__ = __gt__ = __ge__ = _compare
    __hash__ = object.__hash__


def _describe(key) -> str:
    """An index as the spec wrote it, near enough: symbolic tensors by name, ranges by their bounds."""
    if isinstance(key, tuple):
        return "[" + ", ".join(_describe(k) for k in key) + "]"
    if isinstance(key, SymTensor):
        return key.node.name or "a tensor"
    if isinstance(key, range):
        return "a range" if key.stop >= _TOKEN_BASE else repr(key)
    return repr(key)


class _MaxResult:
    """What ``t.max(dim)`` returns: ``.values`` is the traced maximum."""

    def __init__(self, values):
        self.values = values

    def __getattr__(self, attr):
        raise AttributeError(f"max(dim) result: only .values is supported, not .{attr}")


SUPPORTED = ("+ - * / with broadcasting, ** with a constant exponent, exp, log, tanh, sigmoid, relu, "
             "clamp(min=c), abs, F.softplus, "
             "labels == c and labels != c (0/1 masks), "
             "sum/mean/max(dim, keepdim), @, view/reshape, t[range(n), y] and table[index] with declared Labels")


def trace(layer: Layer) -> Graph:
    """Trace ``layer`` with generic sizes."""
    return Tracer(layer).run()
