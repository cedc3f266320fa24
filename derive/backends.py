"""The two interpreters of the rule table: torch code strings, and arrays of SymPy expressions."""
from __future__ import annotations

import itertools

import numpy as np
import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from .functions import ACTIVATIONS, Sigmoid, Step

ATOM, POW, UNARY, MUL, ADD = 100, 80, 70, 60, 50


def number_text(value: sp.Rational) -> str:
    """A rational as the float literal it came from (``1e-05``, ``-0.5``) when that is exact, else p/q."""
    as_float = repr(float(value))
    return as_float if sp.nsimplify(float(value), rational=True) == value else f"{value.p}/{value.q}"


class _ScalarPrinter(PythonCodePrinter):
    """Python code of a size/constant scalar that needs no ``math`` import: roots as powers
    (``d**0.5``), numbers such as ``2/sqrt(pi)`` as float literals."""

    def _print_Pow(self, expr, rational=False):
        base, e = expr.as_base_exp()
        if e.is_Rational and not e.is_Integer:
            return f"{self.parenthesize(base, PRECEDENCE['Pow'])}**({float(e)!r})"
        return super()._print_Pow(expr, rational)

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Expr) and expr.is_number and not expr.is_Rational:
            return repr(float(expr))
        return super()._print(expr, **kwargs)

    def _print_Function(self, expr):
        return (f"torch.tensor({self._print(expr.args[0])}, dtype=torch.float64)."
                f"{type(expr).__name__}().item()")

    _print_log = _print_exp = _print_Function

    def _print_NumberSymbol(self, expr):
        return repr(float(expr))

    _print_Pi = _print_Exp1 = _print_NumberSymbol


def scalar_code(value: sp.Expr) -> str:
    """``value`` (sizes, constants and numbers) as Python code."""
    if value.is_number and not value.is_Rational:
        return repr(float(value))
    return _ScalarPrinter().doprint(value)


# -- code -------------------------------------------------------------------------------------
class Code:
    """A torch expression as text, with its precedence (so parentheses appear only where needed).

    A scalar keeps its SymPy value, so arithmetic between scalars folds (``-1/2 - 1`` -> ``-3/2``).
    """

    _op_priority = 100.0  # SymPy numbers defer to our reflected operators

    def __init__(self, text: str, prec: int = ATOM, shape: tuple | None = None, value: sp.Expr | None = None,
                 formula: "Code | None" = None, transposed: bool = False, scattered: tuple | None = None,
                 expanded: bool = False, argmax: tuple | None = None, positive: "Code | None" = None):
        self.text, self.prec, self.shape, self.value = text, prec, shape, value
        self.formula = formula  # what a call of one of autograd's kernels computes, for the reader
        self.transposed = transposed  # a matrix laid out by columns (the spec's ``x.T``, a view)
        # zeros but for ``values`` at ``indices`` along ``axis``: ``(axis, indices, values)``, so that
        # adding it to a gradient is one ``scatter_add`` rather than a full-size select and sum
        self.scattered = scattered
        self.expanded = expanded  # a view that repeats entries (``expand``), which ``view`` refuses
        self.argmax = argmax  # a maximum's one-hot mask: ``(tensor, axis, indices)``, which ``select`` scatters
        # the value without its sign, where this one is a negation (``-g``, ``-g * r``): a sum of it is
        # the sum of that, negated (``-g.sum(0)``), exactly the same numbers without a full-size pass
        # that negates every entry (autograd's sub backward negates the summed gradient too)
        self.positive = positive

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
        text = number_text(value) if value.is_Rational and not value.is_Integer else scalar_code(value)
        simple = text.isidentifier() or (value.is_Integer and value >= 0)
        return Code(text, ATOM if simple else ADD - 1, value=value)


# F.softplus's beta and threshold: the last arguments of autograd's one-pass softplus kernel
SOFTPLUS_ARGUMENTS = "1, 20"


class CodeOps:
    """Rule operations that print torch code.

    ``contiguous`` is False for a graph that permutes axes: a gradient may then be a transposed
    view, which ``view`` refuses, so shapes are changed with ``reshape``.
    """

    def __init__(self, contiguous: bool = True, names: dict | None = None):
        self.contiguous = contiguous
        self.names = names or {}  # size symbol -> the symbol it prints as (``forward.size_names``)

    def lift(self, x) -> Code:
        if isinstance(x, Code):
            return x
        return Code.lift(sp.sympify(x).xreplace(self.names))

    def scalar(self, value) -> Code:
        return self.lift(value)

    def ones_like(self, a):
        return Code(f"torch.ones_like({a})")

    def expand(self, grad, a):
        """``grad``, which broadcasts to ``a``, as a view of ``a``'s shape: what autograd's own sum and
        mean backward return, with no full-size pass (``torch.ones_like(a) * grad`` writes one)."""
        if grad.value is not None or a.shape is None:  # a number, or a shape unknown here
            return self.ones_like(a) * grad
        if not a.shape or grad.shape == a.shape:
            return grad
        return Code(f"{grad.wrap(ATOM)}.expand({', '.join(self.lift(size).text for size in a.shape)})", expanded=True)

    def unreduce(self, grad, axes, keepdim, a):
        if keepdim or len(axes) == len(a.shape):
            return grad
        for axis in sorted(axes):
            grad = Code(f"{grad.wrap(ATOM)}.unsqueeze({axis})")
        return grad

    def count(self, a, axes):
        return self.lift(sp.Mul(*[a.shape[k] for k in axes]))

    def argmax_mask(self, a, axis, result):
        """A bool mask of each maximum's position along ``axis`` (the first one at a tie, as autograd);
        ``select`` of it prints a scatter at the indices ``max`` returns, as autograd's backward does."""
        indices = f"{a.wrap(ATOM)}.max({axis}, keepdim=True).indices"
        return Code(f"torch.zeros_like({a}, dtype=torch.bool).scatter_({axis}, {indices}, True)",
                    argmax=(a, axis, indices))

    def shared_at_ties(self, grad, a, axis, result):
        """``grad`` shared evenly among the positions equal to the maximum ``result`` (read at
        ``a``'s rank), as autograd's ``amax`` computes it: ``grad / mask.sum(axis) * mask``."""
        mask = f"({a} == {result.wrap(ATOM)})"
        return Code(f"{grad.wrap(MUL)} / {mask}.sum({axis}, keepdim=True) * {mask}", prec=MUL)

    # autograd's own one-pass kernels for a rule's formula (``rules.py``), by operation
    # (``saved``: what autograd saves for it, the result or, for softplus, the input)
    KERNELS = {
        "tanh": "torch.ops.aten.tanh_backward({grad}, {saved})",
        "relu": "torch.ops.aten.threshold_backward({grad}, {saved}, 0)",
        "sigmoid": "torch.ops.aten.sigmoid_backward({grad}, {saved})",
        "softplus": "torch.ops.aten.softplus_backward({grad}, {saved}, " + SOFTPLUS_ARGUMENTS + ")",
        "softmax": "torch._softmax_backward_data({grad}, {saved}, {axis}, {saved}.dtype)",
        "log_softmax": "torch._log_softmax_backward_data({grad}, {saved}, {axis}, {saved}.dtype)",
    }

    def one_pass(self, op, formula, grad, saved, axes=(0,)):
        """``formula`` as autograd computes it: one call of its kernel, which rounds as autograd
        through the spec does; the formula rides along for the comment beside it."""
        (axis,) = axes
        return Code(self.KERNELS[op].format(grad=grad, saved=saved, axis=axis), formula=formula)

    @staticmethod
    def column_major(a) -> bool:
        """Whether the matrix ``a`` is laid out by columns (a transposed view): autograd then gives
        its gradient that layout too, so the operations after it read memory in order."""
        return a.transposed and a.shape is not None and len(a.shape) == 2

    def transpose(self, b, matrix: bool = False):
        """The last two axes swapped (``.T`` of a matrix, also where ``matrix`` says ``b`` is one,
        ``.mT`` of a batch of them)."""
        return Code(f"{b.wrap(ATOM)}.{'T' if matrix or (b.shape is not None and len(b.shape) == 2) else 'mT'}")

    def sum_batch(self, g, like, source):
        """``g``, with ``source``'s rank, summed over the leading axes ``like`` does not have."""
        extra = len(source.shape) - len(like.shape)
        return g if extra <= 0 else _summed(g, lambda g: Code(f"{g.wrap(ATOM)}.sum({_axes(range(extra))})"))

    def permute(self, g, perm):
        if len(perm) == 2:
            return Code(f"{g.wrap(ATOM)}.T")
        return Code(f"{g.wrap(ATOM)}.permute({', '.join(map(str, perm))})")

    def sum(self, x, axes):
        return _summed(x, lambda x: Code(f"{x.wrap(ATOM)}.sum({_axes(axes)}, keepdim=True)"))

    def exp(self, x):
        return Code(f"torch.exp({x})")

    def sin(self, x):
        return Code(f"torch.sin({x})")

    def cos(self, x):
        return Code(f"torch.cos({x})")

    def compare(self, op, a, b):
        symbol = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[op]
        return Code(f"({a.wrap(ADD)} {symbol} {b.wrap(ADD)})")

    def between(self, a, lo, hi):
        """The mask of ``lo <= a <= hi`` (an infinite bound drops out)."""
        parts = [f"({a.wrap(ADD)} >= {lo})" if lo.value is None or lo.value.is_finite else "",
                 f"({a.wrap(ADD)} <= {hi})" if hi.value is None or hi.value.is_finite else ""]
        return Code(" & ".join(p for p in parts if p), prec=0)

    def select(self, mask, x, y):
        """``torch.where(mask, x, y)``; a mask is a bool tensor, so this never computes ``1 - mask``."""
        x, y = Code.lift(x), Code.lift(y)
        if mask.argmax and y.value == 0:
            a, axis, indices = mask.argmax
            if a.shape is not None and len(a.shape) == 1:  # the maximum of a vector: a 0-d gradient
                x = Code(f"{x.wrap(ATOM)}.reshape(1)")
            return Code(f"torch.zeros_like({a}).scatter({axis}, {indices}, {x})", scattered=(axis, indices, x))
        return Code(f"torch.where({mask}, {x}, {y})")

    def split_at_ties(self, grad, a, b, op: str):
        """The gradients of ``a`` and ``b`` through ``maximum`` (``op`` ``"gt"``) or ``minimum``
        (``"lt"``): ``grad`` to the one that wins, half of it to each at a tie, as autograd splits
        it: ``(where(a > b, g, 0) + where(a >= b, g, 0)) / 2``."""
        other = {"gt": "lt", "lt": "gt"}[op]

        def half(strict):
            loose = strict[0] + "e"
            return (self.select(self.compare(strict, a, b), grad, 0) + self.select(self.compare(loose, a, b), grad, 0)) / 2
        return half(op), half(other)

    def one_hot(self, labels, table):
        # a comparison, not F.one_hot: torch.func.vmap cannot batch F.one_hot's check of the values
        # (a bool mask, for ``select``)
        return Code(f"{labels}.unsqueeze(-1) == torch.arange({table}.shape[1], device={labels}.device)", prec=0)

    def unsqueeze(self, grad, axis):
        return Code(f"{grad.wrap(ATOM)}.unsqueeze({axis})")

    def positive(self, a):
        return Code(f"({a} > 0)")  # a bool mask; times a gradient it takes the gradient's dtype

    def sign(self, a):
        return Code(f"torch.sign({a})")

    def sigmoid(self, a):
        return Code(f"torch.sigmoid({a})")

    def activation_backward(self, op, grad, a, parameters):
        """``grad`` through one of torch's activations (``functions.Activation``): its own backward
        kernel, one pass, as autograd computes it; the formula beside it for the reader."""
        return Code(ACTIVATIONS[op].backward_call(grad, a, map(str, parameters)), formula=Code(f"{op}'({a})") * grad)

    def index_add(self, table, index, grad):
        # out of place: under torch.func.vmap the zeros are not batched while the gradient is
        return Code(f"torch.zeros_like({table}).index_add(0, {index}.view(-1), "
                    f"{self._reshaped(grad, f'-1, *{table}.shape[1:]')})")

    def view_as(self, grad, a):
        return Code(self._reshaped(grad, f"{a}.shape"))

    def _reshaped(self, grad, shape: str) -> str:
        """``grad.view(shape)``, as the spec writes it, or ``reshape`` where the gradient may be a
        view ``view`` refuses (of a graph that permutes axes, or an ``expand``)."""
        return f"{grad.wrap(ATOM)}.{'view' if self.contiguous and not grad.expanded else 'reshape'}({shape})"

    def unbroadcast(self, g, shape, result_shape):
        """Sum ``g`` (shaped like the result) down to ``shape``: the de-broadcasting step. Both kinds
        of axes at once are one sum, then the leading axes dropped, as autograd's ``sum_to`` does:
        summed axis after axis (``g.sum(0).sum(0, keepdim=True)``) rounds in another order, up to 8x
        autograd's error on a total of terms that cancel."""
        extra = len(result_shape) - len(shape)
        kept = [k for k in range(len(shape)) if shape[k] == 1 and result_shape[extra + k] != 1]
        if (extra or kept) and g.positive is not None:
            return -self.unbroadcast(g.positive, shape, result_shape)
        if extra and kept:
            summed = Code(f"{g.wrap(ATOM)}.sum({_axes([*range(extra), *(extra + k for k in kept)])}, keepdim=True)")
            return Code(f"{summed.wrap(ATOM)}.squeeze({_axes(range(extra))})")
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
        positive = None
        if symbol in ("*", "/") and (a.positive is None) != (b.positive is None):  # -a * b is -(a * b)
            positive = op(a.positive or a, b.positive or b)
        return Code(f"{left}{symbol}{right}" if symbol == "**" else f"{left} {symbol} {right}", prec,
                    positive=positive)
    return op


def _summed(g: Code, total) -> Code:
    """``total(g)``, a sum of ``g``; of a negation, the negated sum of what it negates."""
    return -total(g.positive) if g.positive is not None else total(g)


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
Code.__neg__ = lambda self: (Code.lift(-self.value) if self.value is not None else self.positive
                             if self.positive is not None else Code(f"-{self.wrap(UNARY)}", UNARY, positive=self))


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

    def expand(self, grad, a):
        return self.ones_like(a) * grad

    @staticmethod
    def column_major(a) -> bool:  # values, not memory
        return False

    def unreduce(self, grad, axes, keepdim, a):
        if keepdim:
            return grad
        for axis in sorted(axes):
            grad = np.expand_dims(grad, axis)
        return grad

    def count(self, a, axes):
        return scalar_array(sp.Mul(*[a.shape[k] for k in axes]))

    def one_pass(self, op, formula, grad, saved, axes=None):
        """The formula itself: a kernel of autograd's computes it (``CodeOps.one_pass``)."""
        return formula

    def shared_at_ties(self, grad, a, axis, result):
        """``grad`` at the maximum's position: entries of symbols do not tie."""
        return grad * self.argmax_mask(a, axis, result)

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

    def transpose(self, b, matrix: bool = False):
        return np.swapaxes(b, -1, -2)

    def permute(self, g, perm):
        return np.transpose(g, perm)

    def sum_batch(self, g, like, source):
        extra = g.ndim - np.ndim(like)
        return g if extra <= 0 else g.sum(axis=tuple(range(extra)))

    def sum(self, x, axes):
        return np.asarray(x, dtype=object).sum(axis=tuple(axes), keepdims=True)

    def exp(self, x):
        return np.vectorize(sp.exp, otypes=[object])(x)

    def sin(self, x):
        return np.vectorize(sp.sin, otypes=[object])(x)

    def cos(self, x):
        return np.vectorize(sp.cos, otypes=[object])(x)

    def compare(self, op, a, b):
        from .functions import COMPARISONS
        return np.vectorize(COMPARISONS[op][0], otypes=[object])(a, b)

    def between(self, a, lo, hi):
        from .functions import NonNeg
        lo, hi = sp.sympify(np.asarray(lo).item()), sp.sympify(np.asarray(hi).item())
        return np.vectorize(lambda e: NonNeg(e - lo) * NonNeg(hi - e), otypes=[object])(a)

    def select(self, mask, x, y):
        return mask * x + (1 - mask) * y  # finite values only: the arithmetic is exact

    def split_at_ties(self, grad, a, b, op: str):
        """``grad`` times each operand's share (``functions.winning``: a half at a tie)."""
        from .functions import winning
        share = np.vectorize(lambda x, y: winning(op, x, y), otypes=[object])
        return grad * share(a, b), grad * share(b, a)

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

    def activation_backward(self, op, grad, a, parameters):
        numbers = [sp.sympify(np.asarray(p).item()) for p in parameters]
        return grad * np.vectorize(lambda e: ACTIVATIONS[op].derivative(e, *numbers), otypes=[object])(a)

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
