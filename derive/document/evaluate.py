"""Numbers for an element-wise formula: the formula evaluated on real arrays, every index at once.

A document's formulas are SymPy expressions at generic indices (``bndiff[i_n, i_d]``, sums
``Red(body, j)``, maxima, one-hots, Kronecker deltas). ``evaluate`` gives one of them a value for
every value of its free indices, with NumPy: each index is an axis, a sum is ``sum`` over its axis,
an element ``x[i, y[i]]`` is fancy indexing. The worked examples and the tests (every adjoint a
document prints, against autograd) read formulas this way, so what is checked is what is printed.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import sympy as sp

from ..functions import ACTIVATIONS, Clamp, Equal, Guarded, Maximum, Minimum, NonNeg, Relu, Root, Sigmoid, Softplus, Step, Where, Wins
from ..symbolic import IsArgmax, Max, Red, extent
from .notation import Sigma

_FUNCTIONS = {sp.exp: np.exp, sp.log: np.log, sp.tanh: np.tanh, sp.Abs: np.abs, sp.sign: np.sign,
              Sigmoid: lambda v: 1 / (1 + np.exp(-v)), Relu: lambda v: np.maximum(v, 0.0),
              Step: lambda v: (v > 0).astype(float), NonNeg: lambda v: (v >= 0).astype(float), Softplus: lambda v: np.logaddexp(0.0, v),
              sp.atanh: np.arctanh, sp.sqrt: np.sqrt, Root: np.sqrt, sp.cosh: np.cosh, sp.sinh: np.sinh,
              Equal: lambda v: (v == 0).astype(float), Where: lambda m, a, b: np.where(m != 0, a, b), Guarded: lambda m, a, b: np.where(m != 0, a, b),
              Maximum: lambda m, a, b: np.maximum(a, b), Minimum: lambda m, a, b: np.minimum(a, b),
              Wins: lambda v: (v > 0) + 0.5 * (v == 0),
              Clamp: lambda v, lo, hi: np.minimum(np.maximum(v, lo), hi),
              sp.Min: lambda *v: np.minimum.reduce(np.broadcast_arrays(*v)),
              sp.Max: lambda *v: np.maximum.reduce(np.broadcast_arrays(*v))}


_ERF = np.vectorize(math.erf, otypes=[float])
_FUNCTIONS[sp.erf] = _ERF


def _numeric(activation, derivative: bool = False) -> callable:
    """A NumPy function of an activation's formula, or of its derivative, of the argument and the
    activation's numbers."""
    x = sp.Dummy("x", real=True)
    numbers = [sp.Dummy(name, real=True) for name in activation.parameters]
    written = activation.formula(x, *numbers)
    return sp.lambdify([x, *numbers], sp.diff(written, x) if derivative else written, modules=[{"erf": _ERF}, "numpy"])


for _f in ACTIVATIONS.values():
    _FUNCTIONS[_f], _FUNCTIONS[_f.derivative] = _numeric(_f), _numeric(_f, derivative=True)


class Unsupported(ValueError):
    """A formula holds something this evaluator has no numbers for."""


def evaluate(expr: sp.Expr, arrays: dict[str, np.ndarray], scalars: dict[sp.Symbol, float],
             free: tuple[sp.Idx, ...]) -> np.ndarray:
    """``expr`` for every value of the indices ``free`` (the result has one axis per index).

    ``arrays`` maps a tensor's name (an ``IndexedBase``, or a 0-d tensor's ``Symbol``) to its
    values; ``scalars`` maps sizes and constants to numbers. A 0 index reads a kept axis.
    """
    sizes = dict(scalars)
    axes = [i for i in free if i != 0]  # a 0 is a kept axis of size 1
    value = _Evaluator(arrays, sizes).run(sp.sympify(expr), axes)
    shape = tuple(int(sp.sympify(extent(i)).xreplace(sizes)) for i in axes)
    full = tuple(1 if i == 0 else int(sp.sympify(extent(i)).xreplace(sizes)) for i in free)
    return np.broadcast_to(value, shape).reshape(full).copy()


class _Evaluator:
    def __init__(self, arrays: dict, scalars: dict):
        self.arrays, self.scalars = arrays, scalars

    def size(self, index: sp.Idx) -> int:
        return int(sp.sympify(extent(index)).xreplace(self.scalars))

    def axis(self, index: sp.Idx, axes: list) -> np.ndarray:
        shape = [1] * len(axes)
        k = axes.index(index)
        shape[k] = self.size(index)
        return np.arange(shape[k]).reshape(shape)

    def fit(self, value, axes: list) -> np.ndarray:
        value = np.asarray(value, dtype=float if not np.issubdtype(np.asarray(value).dtype, np.integer) else None)
        return value.reshape(value.shape + (1,) * (len(axes) - value.ndim)) if value.ndim < len(axes) else value

    def run(self, e, axes: list):
        if isinstance(e, sp.Idx):
            return self.axis(e, axes)
        if e.is_number:  # a number, or a constant such as pi or sqrt(2) (the exact GELU's erf(x/sqrt(2)))
            return np.asarray(float(e)).reshape((1,) * len(axes))
        if isinstance(e, sp.Symbol):
            if e in self.scalars:
                return np.asarray(float(self.scalars[e])).reshape((1,) * len(axes))
            if e.name in self.arrays:
                return np.asarray(self.arrays[e.name], dtype=float).reshape((1,) * len(axes))
            raise Unsupported(f"no value for {e}")
        if isinstance(e, sp.Indexed):
            table = np.asarray(self.arrays[str(e.base)])
            if table.ndim != len(e.indices) and all(isinstance(i, sp.Idx) or i == 0 for i in e.indices):
                # read in a frame where a view splits an axis (``gamma[i_2, i_c_2]`` of a (c,) array)
                split = tuple(1 if i == 0 else self.size(i) for i in e.indices)
                if int(np.prod(split)) == table.size:
                    table = table.reshape(split)
            where = []
            for i in e.indices:
                v = self.run(i, axes) if not (isinstance(i, sp.Integer) or i == 0) else np.zeros((1,) * len(axes))
                where.append(np.rint(v).astype(int))
            where = np.broadcast_arrays(*where)
            return table[tuple(where)].astype(float)
        if isinstance(e, (Red, Sigma)):
            body, j = e.args
            return self.run(body, axes + [j]).sum(axis=-1)
        if isinstance(e, Max):
            return self.run(e.body, axes + [e.index]).max(axis=-1)
        if isinstance(e, IsArgmax):
            j, m = e.args
            if not isinstance(m, Max):
                raise Unsupported("a one-hot of a maximum whose argument is not shown")
            inner = np.broadcast_to(self.run(m.body, axes + [m.index]),
                                    np.broadcast_shapes(self.run(m.body, axes + [m.index]).shape,
                                                        (1,) * len(axes) + (self.size(m.index),)))
            first = inner.argmax(axis=-1)
            return (self.run(j, axes) == first).astype(float)
        if isinstance(e, sp.KroneckerDelta):
            a, b = (self.run(x, axes) for x in e.args)
            return (np.rint(a) == np.rint(b)).astype(float)
        if isinstance(e, sp.Add):
            return sum(self.run(a, axes) for a in e.args)
        if isinstance(e, sp.Mul):
            out = np.ones((1,) * len(axes))
            for a in e.args:
                out = out * self.run(a, axes)
            return out
        if isinstance(e, sp.Pow):
            base, power = self.run(e.base, axes), self.run(e.exp, axes)
            return np.power(base.astype(float), power)
        function = _FUNCTIONS.get(e.func)
        if function is None and isinstance(e, sp.Function) and len(e.args) == 1:
            function = _lambdified(e.func)
        if function is not None:
            return function(*[self.run(a, axes) for a in e.args])
        raise Unsupported(f"no numbers for {type(e).__name__}")


@lru_cache(maxsize=64)
def _lambdified(func):
    """``func`` on arrays: NumPy's where it has the function, else Python's ``math`` one entry at a
    time (``erf`` of the exact GELU: NumPy has none, and ``math.erf`` of an array is a TypeError)."""
    s = sp.Symbol("s")
    vector = sp.lambdify(s, func(s), "numpy")
    entries = np.vectorize(sp.lambdify(s, func(s), "math"), otypes=[float])

    def apply(a):
        try:
            return vector(a)
        except TypeError:
            return entries(a)

    return apply




def complete(el, values: dict[str, np.ndarray], scalars: dict) -> dict[str, np.ndarray]:
    """``values`` with every node of the graph that has none (an unnamed temporary such as ``t7``,
    which a fused formula may read) computed from its definition, in the graph's order."""
    out = dict(values)
    for node in el.graph.nodes:
        if node.name not in out and node.op not in ("input", "labels"):
            out[node.name] = evaluate(el.direct(node), out, scalars, el.free(node))
    return out


__all__ = ["evaluate", "complete", "Unsupported"]
