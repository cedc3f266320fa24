"""Sizes while a spec is traced: SymPy symbols that still pass where Python wants a number.

``x.shape[0]`` is a ``Dim``: an ``int`` subclass whose value is a *token* (so ``range(n)`` works
and the tracer can tell the range of rows from any other) and whose arithmetic returns SymPy
expressions (``1/(n - 1)`` stays exact and generic). Python's ``math`` functions need a real
float: ``float(n)`` is the token too, and ``math.sqrt(n)``, ``1/math.sqrt(n)``, ``math.log(n)`` and
``1/n`` of it are floats no other number is, which ``as_size_expression`` turns back into
``sqrt(n)``, ``1/sqrt(n)``, ``log(n)`` and ``1/n``. So ``scores / math.sqrt(d)`` stays the
symbolic scale it means.
"""
from __future__ import annotations

import math

import sympy as sp

TOKEN_BASE = 1 << 20  # range(n) sees this int; the tracer maps it back to the symbol
TOKEN_STEP = 7


def size_symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, integer=True, positive=True)


def exact(value):
    """A Python float as the exact rational it was written as (``0.5`` -> ``1/2``, ``1e-5`` -> ``1/100000``)."""
    if isinstance(value, float) and math.isfinite(value):
        return sp.nsimplify(value, rational=True)
    return sp.sympify(value)


class Dim(int):
    """A symbolic size that still passes where Python wants an int (``range(n)``)."""

    def __new__(cls, symbol: sp.Symbol, token: int, sizes: "Sizes | None" = None):
        obj = int.__new__(cls, token)
        obj.symbol = symbol
        obj.sizes = sizes
        return obj

    def __repr__(self):
        return str(self.symbol)

    @staticmethod
    def _s(other):
        return other.symbol if isinstance(other, Dim) else exact(other) if isinstance(other, float) else other

    def __add__(self, o): return self.symbol + self._s(o)
    def __radd__(self, o): return self._s(o) + self.symbol
    def __sub__(self, o): return self.symbol - self._s(o)
    def __rsub__(self, o): return self._s(o) - self.symbol
    def __mul__(self, o): return self.symbol * self._s(o)
    def __rmul__(self, o): return self._s(o) * self.symbol
    def __truediv__(self, o): return self.symbol / sp.sympify(self._s(o))
    def __rtruediv__(self, o): return sp.sympify(self._s(o)) / self.symbol
    def __pow__(self, o): return self.symbol ** sp.sympify(self._s(o))
    def __rpow__(self, o): return sp.sympify(self._s(o)) ** self.symbol
    def __neg__(self): return -self.symbol
    def __pos__(self): return self.symbol

    def __floordiv__(self, o):
        if self.sizes is None:
            raise TypeError("a symbolic size divided with //")
        return self.sizes.quotient(self.symbol, self._s(o))

    def __float__(self):
        return float(int(self))  # the token, as a float: math.sqrt and friends map back (see above)

    # Python control flow on a size (``if n >= 2000000:``) would take the tracing size's branch for
    # every size: a comparison answers only when it holds for every size (``n >= 1``), else it is refused.
    def _decide(self, relation, text: str) -> bool:
        decided = relation(self.symbol)
        if decided in (sp.true, sp.false):
            return bool(decided)
        fail = getattr(self.sizes, "fail", None)
        problem = (f"Python control flow on a size ({text}): it holds for some sizes and not for others, "
                   f"so the generated code would take one branch for every size")
        fix = ("the forward must be the same operations at every size: use sizes only in arithmetic "
               "(1 / (n - 1)), and write a separate layer for each case")
        if fail is None:
            raise TypeError(f"{problem}; {fix}")
        fail(problem, fix)

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


class Sizes:
    """The symbolic sizes of one trace: declared dimensions, their tokens, and sizes derived by ``//``."""

    def __init__(self, names: list[str]):
        self.symbols = {d: size_symbol(d) for d in names}
        self.tokens: dict[int, sp.Expr] = {}
        self.dims: dict[sp.Expr, Dim] = {}
        self.derived: dict[sp.Symbol, tuple] = {}  # quotient symbol -> (numerator, divisor)
        self.fail = None  # the tracer's: a comparison of sizes is refused at the spec's line
        for s in self.symbols.values():
            self._register(s)

    def _register(self, symbol: sp.Expr) -> Dim:
        token = TOKEN_BASE + TOKEN_STEP * len(self.tokens)
        self.tokens[token] = symbol
        self.dims[symbol] = Dim(symbol, token, self)
        return self.dims[symbol]

    def dim(self, size):
        """What ``x.shape`` shows for one axis: a ``Dim`` for a symbolic size, else the number."""
        return self.dims.get(size, size)

    def quotient(self, numerator: sp.Expr, divisor) -> Dim:
        """``numerator // divisor``: a size of its own, and the condition that it divides exactly."""
        divisor = sp.sympify(divisor)
        if isinstance(divisor, sp.Symbol) and not divisor.is_integer:  # a declared Constant: a count here
            divisor = sp.Symbol(divisor.name, integer=True, positive=True)
        for symbol, (a, b) in self.derived.items():
            if a == numerator and b == divisor:
                return self.dims[symbol]
        if divisor.is_Integer and divisor > 0 and numerator.is_Integer:
            return numerator // divisor
        name = f"{numerator}_{divisor}".replace("*", "_").replace(" ", "")
        symbol = size_symbol(name if name.isidentifier() else f"size{len(self.derived)}")
        self.derived[symbol] = (numerator, divisor)
        return self._register(symbol)

    def expand(self, expr):
        """``expr`` with every derived size written as the quotient it is (``d_G`` -> ``d/G``)."""
        return sp.sympify(expr).xreplace({s: a / b for s, (a, b) in self.derived.items()})

    def size_of(self, numerator, denominator):
        """The size ``numerator/denominator``: itself when exact, else a derived size. A product
        is divided in its first factor (``(c*l)/G`` is ``(c // G)*l``): the groups of a group norm
        over ``(n, c, l)`` split the channels."""
        if denominator == 1:
            return numerator
        factors = sp.Mul.make_args(numerator)
        if len(factors) > 1 and all(f.is_Symbol for f in factors):
            first = next(f for f in factors if f.is_Symbol)
            return self.quotient(first, denominator).symbol * sp.Mul(*[f for f in factors if f is not first])
        return self.quotient(numerator, denominator).symbol

    def as_size_expression(self, value):
        """An int or float that is a token, or a math function of one, as the SymPy expression it
        stands for (None for any other number)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, Dim):
            return value.symbol
        for token, symbol in self.tokens.items():
            for f, expr in ((float, symbol), (math.sqrt, sp.sqrt(symbol)), (lambda t: 1 / math.sqrt(t), 1 / sp.sqrt(symbol)),
                            (lambda t: 1 / t, 1 / symbol), (math.log, sp.log(symbol))):
                if value == f(token):
                    return expr
        return None
