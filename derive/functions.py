"""The element-wise primitives: the SymPy function each traced op becomes, in one table.

``exp``, ``log``, ``tanh`` and ``abs`` are SymPy's own. SymPy has no logistic sigmoid and no
rectifier, so they are defined here, each with the derivative torch uses:

* ``Sigmoid(x) = 1/(1 + exp(-x))`` with ``Sigmoid' = Sigmoid*(1 - Sigmoid)``; kept as one atom (not
  rewritten into ``exp``) so that the fused formula reads ``torch.sigmoid`` and saves the forward
  result, and so that the proof compares the same atom on both sides.
* ``Relu(x) = max(x, 0)`` with ``Relu' = Step(x)``, the step that is 0 at 0: torch's subgradient
  ``relu'(0) = 0``. ``Step`` is piecewise constant; its derivative is taken as 0 (torch's too), and
  nothing differentiates it again (generated Functions are once-differentiable).
* ``Softplus(x) = log(1 + exp(x))`` (``F.softplus``, computed stably by torch) with
  ``Softplus' = Sigmoid``: a loss written with it has a gradient that never exponentiates a large
  number (binary cross-entropy: ``1 - t - sigmoid(-x)``).
* ``abs`` differentiates to SymPy's ``sign``, which is 0 at 0, as ``torch.sign``.

* ``NonNeg(x)``, 1 where ``x >= 0``: with ``Step`` the masks of comparisons (``a > b`` is
  ``Step(a - b)``, ``a >= b`` is ``NonNeg(a - b)``), piecewise constant, so their derivative is 0.
* ``Where(m, a, b)`` is ``torch.where``: ``a`` where the 0/1 mask ``m`` is 1, else ``b``; its
  derivative is ``m`` in ``a`` and ``1 - m`` in ``b``. Kept as a function (not ``m*a + (1 - m)*b``)
  so that the forward reads ``torch.where``, which never multiplies a value it discards.
* ``Clamp(x, lo, hi)`` is ``torch.clamp`` (``lo``/``hi`` may be infinite); its derivative is 1
  where ``lo <= x <= hi`` (bounds included, as torch's).

To add a primitive: a SymPy function here (with ``fdiff`` and ``_latex``), its entry in
``ELEMENTWISE``, its rule in ``rules.py`` and its printing in ``printer.py`` (fused) and
``forward.py`` (the forward line, ``torch.<op>``).
"""
from __future__ import annotations

import sympy as sp


class Sigmoid(sp.Function):
    """The logistic function ``1/(1 + exp(-x))``."""

    nargs = 1

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def inverse(self, argindex=1):
        # lets the refold solve ``out = Sigmoid(x)`` for ``x`` and write the gradient in ``out``
        return Logit

    def _eval_is_positive(self):
        return self.args[0].is_real

    def _eval_is_real(self):
        return self.args[0].is_real

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.S.Half
        if isinstance(x, Logit):
            return x.args[0]

    def _eval_evalf(self, prec):  # a number at a number, so it compares (``Clamp`` of it)
        return (1 / (1 + sp.exp(-self.args[0])))._eval_evalf(prec)

    def _latex(self, printer, exp=None):
        text = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class SplitExp(sp.Function):
    """``exp`` of one part of an exponent, kept apart from the others' (SymPy multiplies ``exp(a)*exp(b)``
    back into ``exp(a + b)``): a full-size ``exp(logp)`` that every term of a gradient shares, times
    ``exp`` of a value per row, in place of one full-size ``exp(logp + c*logp[y])`` per term. Only
    ever printed (``kernel._exponentials_split``)."""

    nargs = 1

    def _eval_evalf(self, prec):
        return sp.exp(self.args[0])._eval_evalf(prec)


class Logit(sp.Function):
    """``log(p/(1 - p))``, the inverse of ``Sigmoid``; only ever an intermediate of the refold."""

    nargs = 1

    @classmethod
    def eval(cls, p):
        if isinstance(p, Sigmoid):
            return p.args[0]

    def fdiff(self, argindex=1):
        p = self.args[0]
        return 1 / (p * (1 - p))

    def _eval_evalf(self, prec):
        return sp.log(self.args[0] / (1 - self.args[0]))._eval_evalf(prec)


class Step(sp.Function):
    """1 where ``x > 0``, else 0 (``x = 0`` included): the derivative of ``Relu`` as torch takes it."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_positive:
            return sp.S.One
        if x.is_nonpositive:
            return sp.S.Zero

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_is_nonnegative(self):
        return True

    def _latex(self, printer, exp=None):
        text = r"\mathbb{1}\left[%s > 0\right]" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class Softplus(sp.Function):
    """``log(1 + exp(x))``."""

    nargs = 1

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])

    def _eval_is_positive(self):
        return self.args[0].is_real

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_evalf(self, prec):  # a number at a number, so it compares: Clamp(Softplus(13/5), -1, 1/2)
        return sp.log(1 + sp.exp(self.args[0]))._eval_evalf(prec)

    def _latex(self, printer, exp=None):
        text = r"\operatorname{softplus}\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class Relu(sp.Function):
    """``max(x, 0)``."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_nonnegative:
            return x
        if x.is_nonpositive:
            return sp.S.Zero

    def fdiff(self, argindex=1):
        return Step(self.args[0])

    def _eval_is_nonnegative(self):
        return True

    def _eval_is_real(self):
        return self.args[0].is_real

    def _latex(self, printer, exp=None):
        text = r"\operatorname{relu}\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class NonNeg(sp.Function):
    """1 where ``x >= 0``, else 0: the mask of ``a >= b`` (as ``NonNeg(a - b)``)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_extended_nonnegative:
            return sp.S.One
        if x.is_extended_negative:
            return sp.S.Zero

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_is_nonnegative(self):
        return True

    def _latex(self, printer, exp=None):
        text = r"\mathbb{1}\left[%s \geq 0\right]" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class Equal(sp.Function):
    """1 where ``x == 0``, else 0: the mask of ``a == b`` (as ``Equal(a - b)``) for floating-point values.
    (Labels compared with a number are a ``KroneckerDelta``: integers, exactly 0 or 1.)"""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.S.One
        if x.is_zero is False:
            return sp.S.Zero

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_is_nonnegative(self):
        return True

    def _latex(self, printer, exp=None):
        text = r"\mathbb{1}\left[%s = 0\right]" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


class Where(sp.Function):
    """``a`` where the 0/1 mask ``m`` is 1, else ``b`` (``torch.where``)."""

    nargs = 3

    @classmethod
    def eval(cls, m, a, b):
        if m == 1 or a == b:
            return a
        if m == 0:
            return b
        if a == 1 and b == 0:
            return m
        if a == 0 and b == 1:
            return 1 - m

    def fdiff(self, argindex=1):
        m = self.args[0]
        return {1: sp.S.Zero, 2: m, 3: 1 - m}[argindex]

    def _eval_is_real(self):
        return self.args[1].is_real and self.args[2].is_real

    def _latex(self, printer, exp=None):
        m, a, b = (printer._print(x) for x in self.args)
        text = r"\begin{cases} %s & \text{if } %s = 1 \\ %s & \text{otherwise} \end{cases}" % (a, m, b)
        return text if exp is None else r"\left(%s\right)^{%s}" % (text, exp)


class Wins(sp.Function):
    """1 where ``x > 0``, 1/2 at ``x = 0``, 0 where ``x < 0``: the derivative of ``maximum(a, b)`` in
    ``a`` is ``Wins(a - b)``, half the gradient to each operand at a tie, as autograd splits it."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_positive:
            return sp.S.One
        if x.is_negative:
            return sp.S.Zero
        if x.is_zero:
            return sp.S.Half

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_is_nonnegative(self):
        return True

    def halves(self) -> sp.Expr:
        """The same value as two masks, ``(Step(x) + NonNeg(x))/2``: how the printers compute it."""
        return (Step(self.args[0]) + NonNeg(self.args[0])) / 2

    def _latex(self, printer, exp=None):
        # the two masks it is (a reader knows them): 1/2 at a tie
        text = r"\left(%s\right)" % printer._print(self.halves())
        return text if exp is None else r"%s^{%s}" % (text, exp)


def winning(op: str, a, b) -> sp.Expr:
    """The share of the gradient ``a`` gets from ``maximum(a, b)`` (``op`` ``"gt"``) or ``minimum``
    (``"lt"``): 1 where it wins, 1/2 at a tie, 0 where it loses. The fused derivative and the exact
    checks of the step-by-step rule read this one atom."""
    return Wins({"gt": 1, "lt": -1}[op] * (a - b))


class Extremum(Where):
    """``torch.maximum(a, b)`` as ``Maximum(Step(a - b), a, b)``, ``torch.minimum`` as
    ``Minimum(Step(b - a), a, b)``: the value of ``Where``, the derivative split at a tie (``winning``)."""

    op = "gt"  # the comparison ``a`` wins by

    def fdiff(self, argindex=1):
        if argindex == 1:
            return sp.S.Zero
        _, a, b = self.args
        return winning(self.op, a, b) if argindex == 2 else winning(self.op, b, a)


class Maximum(Extremum):
    op = "gt"


class Minimum(Extremum):
    op = "lt"


class Clamp(sp.Function):
    """``x`` clamped to ``[lo, hi]`` (either bound may be infinite)."""

    nargs = 3

    @classmethod
    def eval(cls, x, lo, hi):
        if x.is_comparable and lo.is_comparable and hi.is_comparable:
            return sp.Min(sp.Max(x, lo), hi)

    def fdiff(self, argindex=1):
        x, lo, hi = self.args
        if argindex != 1:
            return sp.S.Zero
        return NonNeg(x - lo) * NonNeg(hi - x)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _latex(self, printer, exp=None):
        x, lo, hi = (printer._print(a) for a in self.args)
        text = r"\operatorname{clamp}\left(%s, %s, %s\right)" % (x, lo, hi)
        return text if exp is None else r"%s^{%s}" % (text, exp)


def _rsqrt(x):
    return 1 / sp.sqrt(x)


def _log1p(x):
    return sp.log(1 + x)


# A definition reading its variable through one of these is never solved for that variable:
# ``out = Relu(x)`` says nothing about a negative ``x``; softplus's inverse would only cost more.
NOT_INVERTIBLE = (Relu, Step, Wins, sp.Abs, sp.sign, Softplus, NonNeg, Equal, Where, Clamp, sp.sin, sp.cos, sp.erf)

# traced op -> the SymPy function of its element (the forward prints as ``torch.<op>``)
ELEMENTWISE = {"exp": sp.exp, "log": sp.log, "tanh": sp.tanh, "sigmoid": Sigmoid, "relu": Relu, "abs": sp.Abs,
               "softplus": Softplus, "sqrt": sp.sqrt, "rsqrt": _rsqrt, "erf": sp.erf, "sin": sp.sin, "cos": sp.cos,
               "log1p": _log1p}
# the torch function a traced op prints as, where it is not ``torch.<op>``
TORCH_NAME = {"softplus": "F.softplus"}

# comparisons: traced op -> (mask of a and b, the Python operator); 0/1 values, never differentiated
COMPARISONS = {"gt": (lambda a, b: Step(a - b), ">"), "ge": (lambda a, b: NonNeg(a - b), ">="),
               "lt": (lambda a, b: Step(b - a), "<"), "le": (lambda a, b: NonNeg(b - a), "<="),
               "eq": (lambda a, b: Equal(a - b), "=="), "ne": (lambda a, b: 1 - Equal(a - b), "!=")}
# labels compared with a number: a Kronecker delta of integers
LABEL_COMPARISONS = {"eq": lambda a, b: sp.KroneckerDelta(a, b), "ne": lambda a, b: 1 - sp.KroneckerDelta(a, b)}


def mask(op: str, a, b, labels: bool = False):
    """The 0/1 value of the comparison ``op`` of ``a`` and ``b`` (``labels``: integer labels)."""
    return LABEL_COMPARISONS[op](a, b) if labels else COMPARISONS[op][0](a, b)
# the larger (smaller) of two tensors: a where a > b (a < b), else b
EXTREMA = {"maximum": lambda a, b: Maximum(Step(a - b), a, b), "minimum": lambda a, b: Minimum(Step(b - a), a, b)}
# ops whose values are 0/1 masks: nothing flows back through them
MASK_OPS = set(COMPARISONS) | {"not", "and"}
# the 0/1 masks of one comparison each (``Wins``, a comparison split at ties, is two)
COMPARISON_MASKS = (Step, NonNeg, Equal)
