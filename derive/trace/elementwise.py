"""Element-wise operations of a traced tensor: arithmetic with broadcasting, comparisons (0/1
masks), the element-wise functions of ``derive/functions.py``, ``clamp``, ``where``, and the
activations torch writes as one call (``F.silu``, ``F.leaky_relu``, ...) as the primitives they are."""
from __future__ import annotations

import sympy as sp

MASKS = ("gt", "ge", "lt", "le", "eq", "ne", "not", "and")  # 0/1 masks, never differentiated
_FLIPPED = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge", "eq": "eq", "ne": "ne"}


class Elementwise:
    # -- arithmetic --------------------------------------------------------------------------
    def _operand(self, other, op):
        """``other`` as a node (a traced tensor) or an exact SymPy scalar."""
        if hasattr(other, "node") and hasattr(other, "_tracer"):
            return other.node
        return self._tracer.scalar(other, op)

    def _binary(self, op, other, reverse=False):
        t = self._tracer
        b = self._operand(other, op)
        a = self.node
        if reverse:
            a, b = b, a
        shapes = [x.shape for x in (a, b) if hasattr(x, "shape") and hasattr(x, "op")]
        shape = t.broadcast(*shapes, op) if len(shapes) == 2 else shapes[0]
        if any(getattr(x, "op", "") == "labels" for x in (a, b)):
            t.fail(f"arithmetic {op!r} on integer labels", "use labels only to pick: t[range(n), y]")
        if op == "div" and not reverse and not hasattr(b, "op") and b == 0:
            t.fail("division by the number 0", "divide by a non-zero number or a tensor")
        if op == "pow" and hasattr(b, "op"):
            t.fail("a tensor exponent in '**'", "use a constant exponent, or exp(b * log(a))")
        if any(not hasattr(x, "op") and x.has(sp.oo, -sp.oo, sp.zoo, sp.nan) for x in (a, b)):
            t.fail(f"an infinite number in {op!r}", "use a large finite number (-1e9 masks a score before a softmax)")
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

    add, sub, mul, div = __add__, __sub__, __mul__, __truediv__
    multiply, divide, subtract, true_divide = mul, div, sub, div

    def pow(self, exponent):
        return self ** exponent

    # -- comparisons: 0/1 masks --------------------------------------------------------------
    def _compare(self, op, other, reverse=False):
        t = self._tracer
        b = self._operand(other, op)
        if self.node.op == "labels" and op not in ("eq", "ne"):
            t.fail(f"a comparison {op!r} of labels", "compare labels with == or != only, as a mask: keep = y != c")
        if self.node.op == "labels" and hasattr(b, "op"):
            t.fail("== or != of labels with a tensor", "compare labels with a number only, as a mask: keep = y != c")
        a = self.node
        if reverse:
            op = _FLIPPED[op]
        shape = t.broadcast(a.shape, b.shape, op) if hasattr(b, "op") else a.shape
        return t.record(op, (a, b), shape)

    def __gt__(self, o): return self._compare("gt", o)
    def __ge__(self, o): return self._compare("ge", o)
    def __lt__(self, o): return self._compare("lt", o)
    def __le__(self, o): return self._compare("le", o)
    def __eq__(self, o): return self._compare("eq", o)
    def __ne__(self, o): return self._compare("ne", o)
    gt, ge, lt, le, eq, ne = __gt__, __ge__, __lt__, __le__, __eq__, __ne__
    greater, greater_equal, less, less_equal = gt, ge, lt, le

    def logical_not(self):
        return self._tracer.record("not", (self._mask("~").node,), self.node.shape)

    def __invert__(self):
        return self.logical_not()

    def __and__(self, other):
        if not hasattr(other, "node"):
            self._tracer.fail("& of a mask and a number", "combine two masks: (x > a) & (x < b)")
        shape = self._tracer.broadcast(self.node.shape, other.node.shape, "&")
        return self._tracer.record("and", (self._mask("&").node, other._mask("&").node), shape)

    logical_and = __and__

    def _mask(self, op):
        """This tensor, when its values are 0 or 1 (a comparison, or masks combined); else refused."""
        if self.node.op not in MASKS:
            self._tracer.fail(f"{op} of a tensor that is not a comparison", "use a mask such as (x > 0) or (y != c)")
        return self

    # -- element-wise functions --------------------------------------------------------------
    def _unary(self, op, *parameters):
        """``op`` of this tensor; an activation's numbers (``F.elu``'s ``alpha``) are arguments of its node."""
        if self.node.op == "labels":
            self._tracer.fail(f"{op} of integer labels", "use labels only to pick: t[range(n), y]")
        numbers = tuple(self._tracer.scalar(p, op) for p in parameters)
        return self._tracer.record(op, (self.node, *numbers), self.node.shape)

    def exp(self): return self._unary("exp")
    def log(self): return self._unary("log")
    def tanh(self): return self._unary("tanh")
    def sigmoid(self): return self._unary("sigmoid")
    def relu(self): return self._unary("relu")
    def abs(self): return self._unary("abs")
    def sqrt(self): return self._unary("sqrt")
    def rsqrt(self): return self._unary("rsqrt")
    def erf(self): return self._unary("erf")
    def sin(self): return self._unary("sin")
    def cos(self): return self._unary("cos")
    def log1p(self): return self._unary("log1p")
    def square(self): return self ** 2
    def reciprocal(self): return self ** -1
    absolute = abs

    def softplus(self, beta=1, threshold=20):
        """``F.softplus``; above ``threshold`` torch returns x itself (within 2e-9 of the formula)."""
        if beta != 1:
            return (self * beta).softplus() / beta
        return self._unary("softplus")

    # torch's activations with kernels of their own each way: one primitive each (``functions.Activation``)
    def silu(self):
        return self._unary("silu")

    def gelu(self, approximate="none"):
        if approximate not in ("none", "tanh"):
            self._tracer.fail(f"F.gelu(approximate={approximate!r})", "use approximate='none' or 'tanh'")
        return self._unary("gelu_tanh" if approximate == "tanh" else "gelu")

    def leaky_relu(self, negative_slope=0.01):
        return self._unary("leaky_relu", negative_slope)

    def elu(self, alpha=1.0):
        return self._unary("elu", alpha)

    def clamp(self, min=None, max=None):
        """``clamp``/``clip`` to numbers: one primitive, whose gradient passes where min <= x <= max (as torch's)."""
        t = self._tracer
        if min is None and max is None:
            t.fail("clamp() without bounds", "pass min=, max= or both")
        if hasattr(min, "node") or hasattr(max, "node"):
            t.fail("clamp to a tensor bound", "use torch.maximum(x, bound) / torch.minimum(x, bound)")
        lo = sp.S.NegativeInfinity if min is None else t.scalar(min, "clamp")
        hi = sp.S.Infinity if max is None else t.scalar(max, "clamp")
        return t.record("clamp", (self.node, lo, hi), self.node.shape)

    clip = clamp

    def clamp_min(self, min):
        return self.clamp(min=min)

    def clamp_max(self, max):
        return self.clamp(max=max)

    def where(self, condition, other):
        """``x.where(condition, other)``: ``x`` where the mask is 1, ``other`` elsewhere."""
        return where(condition, self, other)

    def masked_fill(self, mask, value):
        return where(mask, value, self)

    def maximum(self, other):
        return _extremum(self, other, "maximum")

    def minimum(self, other):
        return _extremum(self, other, "minimum")


def where(condition, a, b):
    """``torch.where(condition, a, b)``: a 0/1 mask chooses between two tensors or numbers."""
    tracer = next(x._tracer for x in (condition, a, b) if hasattr(x, "_tracer"))
    if not hasattr(condition, "node"):
        tracer.fail("torch.where with a condition that is not a traced mask", "compare tensors: torch.where(x > 0, x, 0.1 * x)")
    condition._mask("torch.where")
    operands = [x.node if hasattr(x, "node") else tracer.scalar(x, "where") for x in (a, b)]
    for x in operands:
        if not hasattr(x, "op") and x.has(sp.oo, -sp.oo, sp.zoo, sp.nan):
            tracer.fail("an infinite fill value in torch.where / masked_fill",
                        "use a large finite number (-1e9 masks a score before a softmax)")
        if getattr(x, "op", "") == "labels":
            tracer.fail("torch.where choosing integer labels", "choose between floating-point tensors")
    shapes = [x.shape for x in (condition.node, *operands) if hasattr(x, "op")]
    shape = shapes[0]
    for s in shapes[1:]:
        shape = tracer.broadcast(shape, s, "where")
    return tracer.record("where", (condition.node, *operands), shape)


def _extremum(a, b, op):
    tracer = next(x._tracer for x in (a, b) if hasattr(x, "_tracer"))
    if not (hasattr(a, "node") and hasattr(b, "node")):
        bound = b if hasattr(a, "node") else a
        tensor = a if hasattr(a, "node") else b
        return tensor.clamp(min=bound) if op == "maximum" else tensor.clamp(max=bound)
    shape = tracer.broadcast(a.node.shape, b.node.shape, op)
    return tracer.record(op, (a.node, b.node), shape)
