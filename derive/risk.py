"""Which functions a gradient may evaluate: those the spec's own path evaluates, on the same values.

The refold rewrites a gradient in forward quantities by solving definitions for a variable. In
exact arithmetic every solution is as good as another; in floating point a solution can make the
backward evaluate something the spec never did, on values where it breaks:

* ``softplus = log(1 + exp(x))`` solved for ``x`` gives ``log(softplus_arg - 1)``;
* a probability ``p = exp(logp)`` solved for ``logp`` gives ``log(p)``, ``-inf`` once ``p``
  underflows (the spec computed ``logp`` without that ``log``);
* ``tanh``'s ``atanh``, a square root, a new power in a denominator.

So every *risky* atom of a rewritten gradient (a transcendental function, a root, a negative
power, applied to a tensor quantity) must be one the spec's path already has: the same function
applied to the same value. The value is compared with the forward nodes inlined (``t2`` of
``t2 = 1 + exp(x)`` reads as ``1 + exp(x)``), but the function itself is not evaluated
(``log(p)`` is not ``logp``: the spec never took that logarithm). The spec's path is the forward
pass and the unsimplified gradient (the derivative of ``log(u)`` divides by ``u``, as autograd does).
"""
from __future__ import annotations

from functools import lru_cache

import sympy as sp
from sympy.core.function import AppliedUndef

from .elements import Elements
from .functions import Guarded, Relu, Step, Wins
from .symbolic import AxisMax, AxisSum, IsArgmax, Max, Red, substitute_family

# functions that are exact on every float (a sign, a mask, a maximum): never a risk
SAFE = (Relu, Step, Wins, Guarded, sp.Abs, sp.sign, sp.KroneckerDelta, IsArgmax, Red, Max, AxisSum, AxisMax, sp.Piecewise)


def risky_atoms(expr: sp.Expr, full: frozenset | None = None, scalars: frozenset = frozenset()) -> list[sp.Expr]:
    """Function applications and negative or fractional powers of tensor values in ``expr``; with
    ``full`` (the indices of a full-size element), only those of full-size values: a per-row or
    per-column statistic is left to the cost and the battery (``(bnvar + eps)**-1/2`` is cheap).
    With ``scalars`` (the symbols of 0-d tensors), of those too."""
    return list(_risky_atoms(expr, full, scalars))


@lru_cache(maxsize=65536)
def _risky_atoms(expr: sp.Expr, full: frozenset | None, scalars: frozenset = frozenset()) -> tuple:
    # (once per expression and process: the refold asks again for every candidate of every step)
    out = []
    for a in sp.preorder_traversal(expr):
        if isinstance(a, sp.Pow):
            e = a.exp
            if (_counts(a.base, full) or a.base.free_symbols & scalars) and (not e.is_integer or e.is_negative):
                out.append(a)
        elif isinstance(a, sp.Function) and not isinstance(a, SAFE + (AppliedUndef,)):
            if any(_counts(arg, full) or arg.free_symbols & scalars for arg in a.args):
                out.append(a)
    return tuple(out)


@lru_cache(maxsize=65536)
def _counts(arg: sp.Expr, full: frozenset | None) -> bool:
    """Whether ``arg`` is a tensor value (at full size, with ``full``)."""
    return bool(arg.atoms(sp.Indexed)) and (full is None or full <= arg.free_symbols)


def _undoes(value: sp.Expr) -> bool:
    """Whether ``value`` applies the inverse of the function it is applied to: ``atanh(tanh(u))``,
    which SymPy leaves as written unless it knows ``u`` is real."""
    if not isinstance(value, sp.Function) or len(value.args) != 1 or not isinstance(value.args[0], sp.Function):
        return False
    try:
        return value.args[0].inverse() is value.func
    except (AttributeError, TypeError, NotImplementedError):
        return False


class Path:
    """The risky atoms of the spec's own path, as (function, value of its argument) pairs."""

    def __init__(self, el: Elements, gradient: sp.Expr):
        self.el = el
        self._inlined: dict = {}
        # inputs and opaque nodes stay as they are; every other node reads as its definition
        self.inline = [n for n in reversed(el.graph.nodes) if n.op not in ("input", "labels") and n not in el.opaque]
        # a full-size element: one of the largest inputs' (every index a value can vary along)
        tensors = [el.graph.inputs[name] for name in el.graph.layer.tensors]
        largest = max(tensors, key=lambda node: sum(1 for s in node.shape if s != 1))
        self.full = frozenset(i for i in el.free(largest) if i != 0)
        sources = [gradient] + [el.nf[n] for n in el.graph.nodes] + [el.definition[n] for n in el.opaque]
        self.allowed = {self.signature(a) for s in sources for a in risky_atoms(s)}

    def value(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every non-opaque forward node replaced by its definition."""
        if expr not in self._inlined:
            out = expr
            for node in self.inline:
                base = self.el.base(node)
                if isinstance(base, sp.IndexedBase):
                    if any(e.base == base for e in out.atoms(sp.Indexed)):
                        out = substitute_family(out, base, self.el.free(node), self.el.nf[node])
                elif base in out.free_symbols:
                    out = out.xreplace({base: self.el.nf[node]})
            self._inlined[expr] = out
        return self._inlined[expr]

    def signature(self, atom: sp.Expr):
        """What ``atom`` computes: the function and the value of its argument, after inlining the
        forward nodes (``1/t2`` with ``t2 = exp(-x)`` is ``exp(x)``). An atom that inlines to no
        function at all undoes one (``log(p)`` with ``p = exp(logp)`` is ``logp``): it rebuilds a
        forward value through an inverse, which is never what the spec's path computed."""
        value = self.value(atom)
        inlined = risky_atoms(value)
        if not inlined or inlined[0] != value or _undoes(value):
            return ("rebuilt", atom)
        if isinstance(value, sp.Pow):
            return ("pow", value.exp, value.base)
        return (value.func, value.args)

    def new(self, expr: sp.Expr) -> list[sp.Expr]:
        """The risky atoms of ``expr`` that the spec's path does not have: at full size, any; at any
        size, a function that undoes one of the forward's (``atanh`` of a saved ``tanh``, ``log`` of a
        saved ``exp``), whose condition is bad where the forward saturates, however small the value
        (``tanh(tanh(1 - tanh(A.sum())))`` rebuilt its inner scalars as ``atanh`` of the outer)."""
        full = [a for a in risky_atoms(expr, self.full) if self.signature(a) not in self.allowed]
        inverses = [a for a in expr.atoms(sp.Function) if not isinstance(a, SAFE + (AppliedUndef,))
                    and a not in full and a.free_symbols and self.signature(a)[0] == "rebuilt"]
        # at any size, a division by an exponential the spec never divides by: ``exp(x - v1)`` as
        # ``exp(x)/v2`` with ``v2 = exp(v1)`` of a logsumexp ``v1`` is 0/0 where ``v2`` underflows
        # (other quotients of per-row values, ``1/(std + eps)``, are left to the cost and the battery)
        divisions = [a for a in risky_atoms(expr) if isinstance(a, sp.Pow) and a.exp.is_negative and a not in full
                     and self.value(a.base).atoms(sp.exp) and self.signature(a) not in self.allowed]
        return full + inverses + divisions


__all__ = ["Path", "risky_atoms"]
