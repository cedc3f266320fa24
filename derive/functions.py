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

    def _latex(self, printer, exp=None):
        text = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


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


# A definition reading its variable through one of these is never solved for that variable:
# ``out = Relu(x)`` says nothing about a negative ``x``; softplus's inverse would only cost more.
NOT_INVERTIBLE = (Relu, Step, sp.Abs, sp.sign, Softplus)

# traced op -> the SymPy function of its element (the forward prints as ``torch.<op>``)
ELEMENTWISE = {"exp": sp.exp, "log": sp.log, "tanh": sp.tanh, "sigmoid": Sigmoid, "relu": Relu, "abs": sp.Abs,
               "softplus": Softplus}
# the torch function a traced op prints as, where it is not ``torch.<op>``
TORCH_NAME = {"softplus": "F.softplus"}
