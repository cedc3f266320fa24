"""The rule table's third interpreter: tensors at generic indices, for the derivation documents.

``IndexOps`` runs each rule on ``Elt`` values, a shape plus a function from an index tuple to a
SymPy element (``Indexed`` references, ``Red`` sums), so that a rule's result reads as an
element-wise equation (``\\overline{x}_{ij} = ...``). ``_forward`` is the forward twin of the rules.
"""
from __future__ import annotations

import itertools
from typing import Callable

import sympy as sp

from .functions import ACTIVATIONS, COMPARISONS, ELEMENTWISE, mask, EXTREMA, Clamp, NonNeg, Sigmoid, Step, Where, winning
from .symbolic import IsArgmax, IsTiedMax, Max, Red, TiedMax, maximum_of
from .trace import Node

# -- tensors at generic indices: a shape and a function from an index tuple to an element ----------
class Elt:
    """A tensor seen element-wise: ``fn(indices)`` is its element at ``indices`` (0 on size-1 axes).

    Arithmetic broadcasts like torch, so the rules of ``rules.py`` run on it unchanged.
    """

    _op_priority = 100.0

    def __init__(self, shape: tuple, fn: Callable[[tuple], sp.Expr]):
        self.shape, self.fn = tuple(shape), fn

    @staticmethod
    def const(value) -> "Elt":
        value = sp.sympify(value)
        return Elt((), lambda idx: value)

    def apply(self, f) -> "Elt":
        return Elt(self.shape, lambda idx: f(self.fn(idx)))

    def _binary(self, other, f, reverse=False) -> "Elt":
        other = other if isinstance(other, Elt) else Elt.const(other)
        a, b = (other, self) if reverse else (self, other)
        shape = _broadcast(a.shape, b.shape)
        return Elt(shape, lambda idx: f(a.fn(_adapt(idx, a.shape)), b.fn(_adapt(idx, b.shape))))

    def __add__(self, o): return self._binary(o, lambda x, y: x + y)
    def __radd__(self, o): return self._binary(o, lambda x, y: x + y, True)
    def __sub__(self, o): return self._binary(o, lambda x, y: x - y)
    def __rsub__(self, o): return self._binary(o, lambda x, y: x - y, True)
    def __mul__(self, o): return self._binary(o, lambda x, y: x * y)
    def __rmul__(self, o): return self._binary(o, lambda x, y: x * y, True)
    def __truediv__(self, o): return self._binary(o, lambda x, y: x / y)
    def __rtruediv__(self, o): return self._binary(o, lambda x, y: x / y, True)
    def __pow__(self, o): return self._binary(o, lambda x, y: x**y)
    def __rpow__(self, o): return self._binary(o, lambda x, y: x**y, True)

    def __neg__(self):
        return self.apply(lambda x: -x)

    def __matmul__(self, other: "Elt") -> "Elt":
        a, b = self, other
        batch = len(b.shape) - 2  # a matrix (no batch axes) multiplies every matrix of a's batch
        return Elt((*a.shape[:-1], b.shape[-1]),
                   lambda idx: _sum(lambda r: a.fn((*idx[:-1], r)) * b.fn((*idx[len(idx) - 2 - batch:-2], r, idx[-1])),
                                    [a.shape[-1]]))


def _broadcast(a: tuple, b: tuple) -> tuple:
    out = []
    for k in range(1, max(len(a), len(b)) + 1):
        x = a[-k] if k <= len(a) else 1
        y = b[-k] if k <= len(b) else 1
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def _adapt(idx: tuple, shape: tuple) -> tuple:
    """The element of a broadcast operand of ``shape`` read at the result's ``idx``."""
    idx = tuple(idx)[len(idx) - len(shape):] if shape else ()
    return tuple(0 if s == 1 else i for i, s in zip(idx, shape))


_fresh = itertools.count()


def _bound(size) -> sp.Idx:
    # Red and Max rename their index canonically (_r<depth>_<size>), so this name never shows
    return sp.Idx(f"_b{next(_fresh)}", size)


def _sum(body: Callable, sizes: list, combine=Red) -> sp.Expr:
    """``combine`` (a sum) of ``body(*indices)`` over fresh indices of ``sizes``, size-1 axes at 0."""
    indices = [0 if s == 1 else _bound(s) for s in sizes]
    value = body(*indices)
    for j in reversed(indices):
        if j != 0:
            value = combine(value, j)
    return value


def _reduce(a: Elt, shape: tuple, axes: tuple, keepdim: bool, combine=Red) -> Elt:
    def fn(idx):
        it = iter(idx)
        slots, sizes = [], []
        for k, s in enumerate(a.shape):
            if k in axes:
                if keepdim:
                    next(it)
                slots.append(len(sizes))
                sizes.append(s)
            else:
                slots.append(next(it))
        return _sum(lambda *js: a.fn(tuple(js[s] if k in axes else s for k, s in enumerate(slots))), sizes, combine)
    return Elt(shape, fn)


# -- reshaping ----------------------------------------------------------------------------------------
def _view_groups(src: tuple, dst: tuple) -> list[tuple[list, list]]:
    """Axes of ``src`` and ``dst`` (size-1 axes left out) grouped into runs of equal total size."""
    s_axes = [k for k, s in enumerate(src) if s != 1]
    d_axes = [k for k, s in enumerate(dst) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(s_axes) and j < len(d_axes):
        gs, gd = [s_axes[i]], [d_axes[j]]
        ps, pd = src[s_axes[i]], dst[d_axes[j]]
        i, j = i + 1, j + 1
        while sp.cancel(ps - pd) != 0:  # products of sizes: cancel decides equality
            if sp.fraction(sp.cancel(pd / ps))[1] == 1 and i < len(s_axes):
                gs.append(s_axes[i])
                ps, i = ps * src[s_axes[i]], i + 1
            elif j < len(d_axes):
                gd.append(d_axes[j])
                pd, j = pd * dst[d_axes[j]], j + 1
            else:
                return [(s_axes, d_axes)]
        groups.append((gs, gd))
    return groups if i == len(s_axes) and j == len(d_axes) else [(s_axes, d_axes)]


def _view_index(src: tuple, dst: tuple, idx: tuple) -> tuple:
    """The index into a tensor of shape ``src`` of the element at ``idx`` of its view of shape ``dst``."""
    out = [0] * len(src)
    for gs, gd in _view_groups(src, dst):
        linear, stride = sp.S.Zero, sp.S.One
        for k in reversed(gd):
            linear, stride = linear + idx[k] * stride, stride * dst[k]
        stride = sp.S.One
        for n, k in enumerate(reversed(gs)):
            value = linear if len(gs) == 1 else sp.floor(linear / stride)
            out[k] = value if n == len(gs) - 1 or len(gs) == 1 else sp.Mod(value, src[k])
            stride *= src[k]
    return tuple(out)


def _is_merge(src: tuple, dst: tuple) -> bool:
    """True when every group of ``src`` is a single axis (reading ``src`` from ``dst`` needs no floor)."""
    return all(len(gs) == 1 for gs, _ in _view_groups(src, dst))


# -- the rules' third interpreter ----------------------------------------------------------------------
class IndexOps:
    """Rule operations on ``Elt``: a rule's result as a SymPy element at generic indices."""

    def scalar(self, value) -> Elt:
        return Elt.const(value)

    @staticmethod
    def column_major(a) -> bool:  # values, not memory
        return False

    def ones_like(self, a):
        return Elt(a.shape, lambda idx: sp.S.One)

    def expand(self, grad, a):
        return self.ones_like(a) * grad

    def unreduce(self, grad, axes, keepdim, a):
        def fn(idx):
            kept = tuple(0 if k in axes else i for k, i in enumerate(idx)) if keepdim else \
                tuple(i for k, i in enumerate(idx) if k not in axes)
            return grad.fn(_adapt(kept, grad.shape))
        return Elt(a.shape, fn)

    def count(self, a, axes):
        return Elt.const(sp.Mul(*[a.shape[k] for k in axes]))

    def one_pass(self, op, formula, grad, saved, axes=None):
        """The formula itself: a kernel of autograd's computes it (``CodeOps.one_pass``)."""
        return formula

    def argmax_mask(self, a, axis, result, largest=Max, mark=IsArgmax):
        """1 at the position of the maximum along ``axis`` (``max(dim)``'s index), else 0; with
        ``TiedMax`` and ``IsTiedMax``, ``1/c`` at each of the ``c`` positions that tie (``amax``)."""
        def fn(idx):
            m = _sum(lambda j: a.fn(idx[:axis] + (j,) + idx[axis + 1:]), [a.shape[axis]], largest)
            return mark(idx[axis], m)
        return Elt(a.shape, fn)

    def shared_at_ties(self, grad, a, axis, result):
        return grad * self.argmax_mask(a, axis, result, TiedMax, IsTiedMax)

    def transpose(self, b, matrix: bool = False):
        perm = tuple(range(len(b.shape) - 2)) + (len(b.shape) - 1, len(b.shape) - 2)
        return self.permute(b, perm)

    def sum_batch(self, g, like, source):
        extra = len(g.shape) - len(like.shape)
        if extra <= 0:
            return g
        return _reduce(g, g.shape[extra:], tuple(range(extra)), False)

    def permute(self, g, perm):
        inverse = sorted(range(len(perm)), key=perm.__getitem__)
        return Elt(tuple(g.shape[p] for p in perm), lambda idx: g.fn(tuple(idx[k] for k in inverse)))

    def sum(self, x, axes):
        shape = tuple(1 if k in axes else s for k, s in enumerate(x.shape))
        return _reduce(x, shape, tuple(axes), True)

    def exp(self, x):
        return x.apply(sp.exp)

    def sin(self, x):
        return x.apply(sp.sin)

    def cos(self, x):
        return x.apply(sp.cos)

    def compare(self, op, a, b):
        return a._binary(b, COMPARISONS[op][0])

    def between(self, a, lo, hi):
        lo, hi = lo.fn(()), hi.fn(())
        return a.apply(lambda e: NonNeg(e - lo) * NonNeg(hi - e))

    def select(self, mask, x, y):
        return mask * x + (1 - mask) * y

    def split_at_ties(self, grad, a, b, op: str):
        """``grad`` times each operand's share (``functions.winning``: a half at a tie)."""
        def share(x, y):
            return winning(op, x, y)
        return grad * a._binary(b, share), grad * b._binary(a, share)

    def one_hot(self, labels, table):
        return Elt(table.shape, lambda idx: sp.KroneckerDelta(idx[1], labels.fn(idx[:1])))

    def positive(self, a):
        return a.apply(Step)

    def sign(self, a):
        return a.apply(sp.sign)

    def sigmoid(self, a):
        return a.apply(Sigmoid)

    def activation_backward(self, op, grad, a, parameters):
        numbers = [p.fn(()) for p in parameters]
        return grad * a.apply(lambda e: ACTIVATIONS[op].derivative(e, *numbers))

    def unsqueeze(self, grad, axis):
        shape = grad.shape[:axis] + (1,) + grad.shape[axis:]
        return Elt(shape, lambda idx: grad.fn(idx[:axis] + idx[axis + 1:]))

    def index_add(self, table, index, grad):
        def fn(idx):
            return _sum(lambda *rs: sp.KroneckerDelta(idx[0], index.fn(rs)) * grad.fn(rs + tuple(idx[1:])),
                        list(index.shape))
        return Elt(table.shape, fn)

    def view_as(self, grad, a):
        return Elt(a.shape, lambda idx: grad.fn(_view_index(grad.shape, a.shape, idx)))

    def unbroadcast(self, g, shape, result_shape):
        extra = len(result_shape) - len(shape)
        summed = [k for k in range(len(result_shape))
                  if k < extra or (shape[k - extra] == 1 and result_shape[k] != 1)]

        def fn(idx):
            def body(*js):
                it = iter(js)
                full = tuple(next(it) if k in summed else idx[k - extra] for k in range(len(result_shape)))
                return g.fn(_adapt(full, g.shape))
            return _sum(body, [result_shape[k] for k in summed])
        return Elt(shape, fn)


def _normalized(node: Node, x: Elt) -> Elt:
    """softmax, log_softmax and logsumexp over ``axes``, in their stable forms (the maximum subtracted)."""
    axes = node.attrs["axes"]
    kept = tuple(1 if k in axes else s for k, s in enumerate(x.shape))
    top = _reduce(x, kept, axes, True, Max)
    shifted = x - top
    total = _reduce(shifted.apply(sp.exp), kept, axes, True)
    if node.op == "softmax":
        return shifted.apply(sp.exp) / total
    if node.op == "log_softmax":
        return shifted - total.apply(sp.log)
    value = top + total.apply(sp.log)
    if node.attrs["keepdim"]:
        return value
    return Elt(node.shape, lambda idx: value.fn(_unsqueezed(idx, axes)))


def _unsqueezed(idx: tuple, axes: tuple) -> tuple:
    """``idx`` with a 0 inserted at each of ``axes`` (a reduced result read with keepdim)."""
    out, it = [], iter(idx)
    for k in range(len(idx) + len(axes)):
        out.append(0 if k in axes else next(it))
    return tuple(out)


def _forward(node: Node, a: list[Elt]) -> Elt:
    """The node's value from its operands, element-wise (the forward twin of the rules)."""
    op = node.op
    if op in ("add", "sub", "mul", "div", "pow"):
        return {"add": lambda: a[0] + a[1], "sub": lambda: a[0] - a[1], "mul": lambda: a[0] * a[1],
                "div": lambda: a[0] / a[1], "pow": lambda: a[0] ** a[1]}[op]()
    if op in ELEMENTWISE:
        parameters = [p.fn(()) for p in a[1:]]  # (an activation's numbers)
        return a[0].apply(lambda e: ELEMENTWISE[op](e, *parameters))
    if op in COMPARISONS:
        labels = node.args[0].op == "labels"
        return a[0]._binary(a[1], lambda x, y: mask(op, x, y, labels))
    if op == "not":
        return 1 - a[0]
    if op == "and":
        return a[0] * a[1]
    if op in EXTREMA:
        return a[0]._binary(a[1], EXTREMA[op])
    if op == "clamp":
        lo, hi = a[1].fn(()), a[2].fn(())
        return a[0].apply(lambda e: Clamp(e, lo, hi))
    if op == "where":
        m, x, y = a
        shape = node.shape
        return Elt(shape, lambda idx: Where(m.fn(_adapt(idx, m.shape)), x.fn(_adapt(idx, x.shape)),
                                            y.fn(_adapt(idx, y.shape))))
    if op == "permute":
        return IndexOps().permute(a[0], node.attrs["perm"])
    if op == "expand":
        return Elt(node.shape, lambda idx: a[0].fn(_adapt(idx, a[0].shape)))
    if op in ("softmax", "log_softmax", "logsumexp"):
        return _normalized(node, a[0])
    if op in ("sum", "mean", "max"):
        axes, keepdim = node.attrs["axes"], node.attrs["keepdim"]
        largest = maximum_of(node.attrs.get("ties"))
        value = _reduce(a[0], node.shape, axes, keepdim, largest if op == "max" else Red)
        return value / sp.Mul(*[a[0].shape[k] for k in axes]) if op == "mean" else value
    if op == "matmul":
        return a[0] @ a[1]
    if op in ("eq", "ne"):
        same = Elt(node.shape, lambda idx: sp.KroneckerDelta(a[0].fn(idx), a[1].fn(())))
        return same if op == "eq" else 1 - same
    if op == "embed":
        table, index = a
        r = len(index.shape)
        return Elt(node.shape, lambda idx: table.fn((index.fn(idx[:r]),) + tuple(idx[r:])))
    if op == "view":
        src = a[0]
        return Elt(node.shape, lambda idx: src.fn(_view_index(src.shape, node.shape, idx)))
    if op == "pick":
        table, labels = a
        return Elt(node.shape, lambda idx: table.fn((idx[0], labels.fn(idx[:1]))))
    raise ValueError(f"no element-wise form for {op!r}")
