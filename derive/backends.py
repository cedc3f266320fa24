"""The two interpreters of the rule table: torch code strings, and arrays of SymPy expressions."""
from __future__ import annotations

import itertools

import numpy as np
import sympy as sp

from .functions import Sigmoid, Step

ATOM, POW, UNARY, MUL, ADD = 100, 80, 70, 60, 50


def number_text(value: sp.Rational) -> str:
    """A rational as the float literal it came from (``1e-05``, ``-0.5``) when that is exact, else p/q."""
    as_float = repr(float(value))
    return as_float if sp.nsimplify(float(value), rational=True) == value else f"{value.p}/{value.q}"


# -- code -------------------------------------------------------------------------------------
class Code:
    """A torch expression as text, with its precedence (so parentheses appear only where needed).

    A scalar keeps its SymPy value, so arithmetic between scalars folds (``-1/2 - 1`` -> ``-3/2``).
    """

    _op_priority = 100.0  # SymPy numbers defer to our reflected operators

    def __init__(self, text: str, prec: int = ATOM, shape: tuple | None = None, value: sp.Expr | None = None):
        self.text, self.prec, self.shape, self.value = text, prec, shape, value

    def __str__(self):
        return self.text

    def wrap(self, prec: int) -> str:
        return self.text if self.prec >= prec else f"({self.text})"

    @staticmethod
    def lift(x) -> "Code":
        """A size/constant scalar as code; sizes print as the variables that hold them (``n``)."""
        if isinstance(x, Code):
            return x
        value = sp.sympify(x)
        text = number_text(value) if value.is_Rational and not value.is_Integer else sp.pycode(value)
        simple = text.isidentifier() or (value.is_Integer and value >= 0)
        return Code(text, ATOM if simple else ADD - 1, value=value)


class CodeOps:
    """Rule operations that print torch code."""

    def lift(self, x) -> Code:
        return Code.lift(x)

    def scalar(self, value) -> Code:
        return self.lift(value)

    def ones_like(self, a):
        return Code(f"torch.ones_like({a})")

    def unreduce(self, grad, axes, keepdim, a):
        if keepdim or len(axes) == len(a.shape):
            return grad
        for axis in sorted(axes):
            grad = Code(f"{grad.wrap(ATOM)}.unsqueeze({axis})")
        return grad

    def count(self, a, axes):
        return self.lift(sp.Mul(*[a.shape[k] for k in axes]))

    def argmax_mask(self, a, axis, result):
        if axis == len(a.shape) - 1:
            return Code(f"({a}.max({axis}, keepdim=True).indices == torch.arange({a}.shape[{axis}], "
                        f"device={a}.device)).to({a}.dtype)")
        return Code(f"torch.zeros_like({a}).scatter_({axis}, {a}.argmax({axis}, keepdim=True), 1.0)")

    def transpose(self, b):
        return Code(f"{b.wrap(ATOM)}.T")

    def one_hot(self, labels, table):
        # a comparison, not F.one_hot: torch.func.vmap cannot batch F.one_hot's check of the values
        return Code(f"({labels}.unsqueeze(-1) == torch.arange({table}.shape[1], device={labels}.device))"
                    f".to({table}.dtype)")

    def unsqueeze(self, grad, axis):
        return Code(f"{grad.wrap(ATOM)}.unsqueeze({axis})")

    def positive(self, a):
        return Code(f"({a} > 0)")  # a bool mask; times a gradient it takes the gradient's dtype

    def sign(self, a):
        return Code(f"torch.sign({a})")

    def sigmoid(self, a):
        return Code(f"torch.sigmoid({a})")

    def index_add(self, table, index, grad):
        # out of place: under torch.func.vmap the zeros are not batched while the gradient is
        return Code(f"torch.zeros_like({table}).index_add(0, {index}.view(-1), "
                    f"{grad.wrap(ATOM)}.view(-1, *{table}.shape[1:]))")

    def view_as(self, grad, a):
        return Code(f"{grad.wrap(ATOM)}.view({a}.shape)")

    def unbroadcast(self, g, shape, result_shape):
        """Sum ``g`` (shaped like the result) down to ``shape``: the de-broadcasting step."""
        extra = len(result_shape) - len(shape)
        kept = [k for k in range(len(shape)) if shape[k] == 1 and result_shape[extra + k] != 1]
        if extra:
            g = Code(f"{g.wrap(ATOM)}.sum({_axes(range(extra))})")
        if kept:
            g = Code(f"{g.wrap(ATOM)}.sum({_axes(kept)}, keepdim=True)")
        return g


def _axes(axes) -> str:
    axes = list(axes)
    return str(axes[0]) if len(axes) == 1 else str(tuple(axes))


def _binary(symbol: str, prec: int, fold):
    def op(self, other, reverse=False):
        other = Code.lift(other)
        a, b = (other, self) if reverse else (self, other)
        if a.value is not None and b.value is not None:
            return Code.lift(fold(a.value, b.value))
        simplified = _identity(symbol, a, b)
        if simplified is not None:
            return simplified
        # a right operand of its own precedence keeps its parentheses: ``g * (r / b)`` is not
        # ``g * r / b`` in floating point (the rule is printed as it rounds, as autograd's does)
        right = b.wrap(prec + 1) if symbol in ("-", "/", "**", "@", "*") else b.wrap(prec)
        left = a.wrap(prec + 1) if symbol == "**" else a.wrap(prec)
        return Code(f"{left}{symbol}{right}" if symbol == "**" else f"{left} {symbol} {right}", prec)
    return op


def _identity(symbol, a, b):
    """``1*x``, ``x*1``, ``x**1`` -> ``x``; ``-1*x``, ``x*-1`` -> ``-x``."""
    if symbol == "*" and a.value == 1:
        return b
    if symbol in ("*", "/", "**") and b.value == 1:
        return a
    if symbol == "*" and a.value == -1:
        return -b
    if symbol in ("*", "/") and b.value == -1:
        return -a
    return None


for _name, _symbol, _prec, _fold in [
    ("add", "+", ADD, lambda x, y: x + y), ("sub", "-", ADD, lambda x, y: x - y),
    ("mul", "*", MUL, lambda x, y: x * y), ("truediv", "/", MUL, lambda x, y: x / y),
    ("pow", "**", POW, lambda x, y: x**y), ("matmul", "@", MUL, None),
]:
    _op = _binary(_symbol, _prec, _fold)
    setattr(Code, f"__{_name}__", _op)
    setattr(Code, f"__r{_name}__", (lambda f: lambda self, other: f(self, other, reverse=True))(_op))
Code.__neg__ = lambda self: (Code.lift(-self.value) if self.value is not None
                             else Code(f"-{self.wrap(UNARY)}", UNARY))


# -- arrays of SymPy expressions -----------------------------------------------------------------
def scalar_array(value) -> np.ndarray:
    return np.array(sp.sympify(value), dtype=object)


class ArrayOps:
    """Rule operations on NumPy object arrays of SymPy expressions (for proofs) at concrete sizes."""

    def __init__(self, sizes: dict):
        self.sizes = sizes  # size symbol -> int

    def scalar(self, value):
        return scalar_array(sp.sympify(value).xreplace(self.sizes))

    def ones_like(self, a):
        return np.full(a.shape, sp.S.One, dtype=object)

    def unreduce(self, grad, axes, keepdim, a):
        if keepdim:
            return grad
        for axis in sorted(axes):
            grad = np.expand_dims(grad, axis)
        return grad

    def count(self, a, axes):
        return scalar_array(sp.Mul(*[a.shape[k] for k in axes]))

    def argmax_mask(self, a, axis, result):
        """The derivative of the maximum with respect to each entry (its subgradient one-hot)."""
        r = result if result.ndim == a.ndim else np.expand_dims(result, axis)
        mask = np.empty(a.shape, dtype=object)
        for idx in itertools.product(*[range(s) for s in a.shape]):
            at = tuple(0 if k == axis else i for k, i in enumerate(idx))
            # r[at] is the row's maximum as a function of the row; its partial derivative in the
            # argument at this position (SymPy's chain rule yields the same object).
            mask[idx] = r[at].fdiff(idx[axis] + 1)
        return mask

    def transpose(self, b):
        return b.T

    def one_hot(self, labels, table):
        out = np.full(table.shape, sp.S.Zero, dtype=object)
        for row, label in enumerate(labels):
            out[row, int(label)] = sp.S.One
        return out

    def unsqueeze(self, grad, axis):
        return np.expand_dims(grad, axis)

    def positive(self, a):
        return np.vectorize(Step, otypes=[object])(a)

    def sign(self, a):
        return np.vectorize(sp.sign, otypes=[object])(a)

    def sigmoid(self, a):
        return np.vectorize(Sigmoid, otypes=[object])(a)

    def index_add(self, table, index, grad):
        out = np.full(table.shape, sp.S.Zero, dtype=object)
        rows = grad.reshape((-1,) + table.shape[1:])
        for k, i in enumerate(index.reshape(-1)):
            out[int(i)] = out[int(i)] + rows[k]
        return out

    def view_as(self, grad, a):
        return grad.reshape(a.shape)

    def unbroadcast(self, g, shape, result_shape):
        g = np.asarray(g, dtype=object)
        g = np.broadcast_to(g, tuple(result_shape)) if g.shape != tuple(result_shape) else g
        extra = len(result_shape) - len(shape)
        if extra:
            g = g.sum(axis=tuple(range(extra)))
        kept = tuple(k for k in range(len(shape)) if shape[k] == 1 and result_shape[extra + k] != 1)
        if kept:
            g = g.sum(axis=kept, keepdims=True)
        return g
