"""The element-wise primitives: the SymPy function each traced op becomes, in one table.

``exp``, ``log``, ``tanh`` and ``abs`` are SymPy's own. SymPy has no logistic sigmoid and no
rectifier, so they are defined here, each with the derivative torch uses:

* ``Sigmoid(x) = 1/(1 + exp(-x))`` with ``Sigmoid' = Sigmoid*(1 - Sigmoid)``; kept as one atom (not
  rewritten into ``exp``) so that the fused formula reads ``torch.sigmoid`` and saves the forward
  result, and so that the proof compares the same atom on both sides.
* ``Relu(x) = max(x, 0)`` with ``Relu' = Step(x)``, the step that is 0 at 0: torch's subgradient
  ``relu'(0) = 0``, written ``Step(Relu(x))`` (the same mask) so that it reads the ReLU's result
  where the forward keeps it, as autograd does. ``Step`` is piecewise constant; its derivative is
  taken as 0 (torch's too), and nothing differentiates it again (generated Functions are
  once-differentiable).
* ``Softplus(x) = log(1 + exp(x))`` (``F.softplus``, computed stably by torch) with
  ``Softplus' = Sigmoid``: a loss written with it has a gradient that never exponentiates a large
  number (binary cross-entropy: ``1 - t - sigmoid(-x)``).
* ``abs`` differentiates to SymPy's ``sign``, which is 0 at 0, as ``torch.sign``.
* ``Root(x)``, the root of ``x.std(dim)`` and ``x.norm(dim)``, is ``sqrt(x)`` with the derivative
  torch's ``std`` and ``norm`` backward take: 0 where the root is 0, not infinite.
* ``Activation``: torch's activations with kernels of their own each way (``F.gelu``, exact and
  ``approximate="tanh"``, ``F.silu``, ``F.elu``, ``F.leaky_relu``), one atom each whose derivative
  (an ``ActivationDerivative``) meets the upstream gradient as torch's backward kernel.

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


class Activation(sp.Function):
    """One of torch's activations that its own kernel computes each way (``F.gelu``, ``F.silu``):
    one atom, printed as the torch call (``forward``), whose derivative ``Derivative`` meets the
    upstream gradient as torch's backward kernel (``backward``, one pass, as autograd through the
    spec computes it). Written out (``formula``) the forward takes several passes and the
    backward more (5x autograd's time for ``F.gelu``). ``formula`` gives its value at a number
    and its second derivative."""

    nargs = 1
    forward = ""  # the torch call, ``{x}`` its argument
    backward = ""  # torch's kernel of the chain rule: ``{g}`` the gradient it is given, ``{x}`` the input
    parameters: tuple = ()  # the names of its numbers after the argument (``F.elu``'s ``alpha``)
    symbol = ""  # its name in a derivation document
    derivative: type  # set below each subclass

    @staticmethod
    def formula(x, *parameters):
        raise NotImplementedError

    @classmethod
    def forward_call(cls, x: str, numbers) -> str:
        """The torch call of it on ``x`` with its ``numbers`` (all printed)."""
        return cls.forward.format(x=x, **dict(zip(cls.parameters, numbers)))

    @classmethod
    def backward_call(cls, g: str, x: str, numbers) -> str:
        """Its backward kernel's call given the gradient ``g``, on ``x`` with its ``numbers`` (printed)."""
        return cls.backward.format(g=g, x=x, **dict(zip(cls.parameters, numbers)))

    @classmethod
    def kernel(cls) -> str:
        """The name of its backward kernel (``torch.ops.aten.gelu_backward``)."""
        return cls.backward.split("(")[0]

    def fdiff(self, argindex=1):
        # (its parameters are numbers of the spec, never differentiated)
        return self.derivative(*self.args) if argindex == 1 else sp.S.Zero

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_evalf(self, prec):  # a number at a number, so it compares
        return self.formula(*self.args)._eval_evalf(prec)

    def _latex(self, printer, exp=None):
        text = r"\operatorname{%s}\left(%s\right)" % (self.symbol, printer._print(self.args[0]))
        return text if exp is None else r"%s^{%s}" % (text, exp)


class ActivationDerivative(sp.Function):
    """The derivative of an ``Activation`` (``activation``), one atom: ``g*derivative(x)`` prints as
    torch's backward kernel given ``g``."""

    nargs = 1
    activation: type

    def _written(self):
        x = sp.Dummy("x", real=True)
        return sp.diff(self.activation.formula(x, *self.args[1:]), x), x

    def fdiff(self, argindex=1):
        if argindex != 1:
            return sp.S.Zero
        written, x = self._written()
        return sp.diff(written, x).xreplace({x: self.args[0]})

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_evalf(self, prec):
        written, x = self._written()
        return written.xreplace({x: self.args[0]})._eval_evalf(prec)

    def _latex(self, printer, exp=None):
        text = r"\operatorname{%s}'\left(%s\right)" % (self.activation.symbol, printer._print(self.args[0]))
        return text if exp is None else r"\left(%s\right)^{%s}" % (text, exp)


class Gelu(Activation):
    """``F.gelu``: ``x*Phi(x)``, ``Phi`` the normal distribution function."""

    forward, backward, symbol = "F.gelu({x})", "torch.ops.aten.gelu_backward({g}, {x})", "gelu"

    @staticmethod
    def formula(x):
        return x / 2 * (1 + sp.erf(x / sp.sqrt(2)))


class GeluTanh(Activation):
    """``F.gelu(approximate="tanh")``: ``x/2*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x**3)))``."""

    forward = 'F.gelu({x}, approximate="tanh")'
    backward = 'torch.ops.aten.gelu_backward({g}, {x}, approximate="tanh")'
    symbol = "gelu_{tanh}"

    @staticmethod
    def formula(x):
        return x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 10**6) * x**3)))


class Silu(Activation):
    """``F.silu``: ``x*sigmoid(x)``."""

    forward, backward, symbol = "F.silu({x})", "torch.ops.aten.silu_backward({g}, {x})", "silu"

    @staticmethod
    def formula(x):
        return x / (1 + sp.exp(-x))


class Elu(Activation):
    """``F.elu``: ``x`` where ``x > 0``, else ``alpha*(exp(x) - 1)``. Written out with ``where``, the
    branch it discards overflowed in the backward (``0*inf``) where torch's kernel is finite."""

    nargs = 2
    forward = "F.elu({x}, {alpha})"
    backward = "torch.ops.aten.elu_backward({g}, {alpha}, 1, 1, False, {x})"
    parameters, symbol = ("alpha",), "elu"

    @staticmethod
    def formula(x, alpha=1):
        return sp.Piecewise((x, x > 0), (alpha * (sp.exp(x) - 1), True))


class LeakyRelu(Activation):
    """``F.leaky_relu``: ``x`` where ``x > 0``, else ``slope*x`` (the slope at 0, as torch's kernel)."""

    nargs = 2
    forward = "F.leaky_relu({x}, {slope})"
    backward = "torch.ops.aten.leaky_relu_backward({g}, {x}, {slope}, False)"
    parameters, symbol = ("slope",), "leaky\\_relu"

    @staticmethod
    def formula(x, slope=sp.Rational(1, 100)):
        return sp.Piecewise((x, x > 0), (slope * x, True))


class GeluDerivative(ActivationDerivative):
    activation = Gelu


class GeluTanhDerivative(ActivationDerivative):
    activation = GeluTanh


class SiluDerivative(ActivationDerivative):
    activation = Silu


class EluDerivative(ActivationDerivative):
    nargs, activation = 2, Elu


class LeakyReluDerivative(ActivationDerivative):
    nargs, activation = 2, LeakyRelu


Gelu.derivative, GeluTanh.derivative, Silu.derivative = GeluDerivative, GeluTanhDerivative, SiluDerivative
Elu.derivative, LeakyRelu.derivative = EluDerivative, LeakyReluDerivative
# traced op -> the activation its element is (its parameters are the node's arguments after the tensor)
ACTIVATIONS = {"gelu": Gelu, "gelu_tanh": GeluTanh, "silu": Silu, "elu": Elu, "leaky_relu": LeakyRelu}


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
        # ``Step`` of the result, which is positive where the argument is: the gradient then reads the
        # value the forward computed (autograd's ``threshold_backward(g, out, 0)``), not the argument again
        return Step(self)

    def _eval_is_nonnegative(self):
        return True

    def _eval_is_real(self):
        return self.args[0].is_real

    def _latex(self, printer, exp=None):
        text = r"\operatorname{relu}\left(%s\right)" % printer._print(self.args[0])
        return text if exp is None else r"%s^{%s}" % (text, exp)


def step_argument(u: sp.Expr) -> sp.Expr:
    """What ``Step(u)`` compares with 0, as printed: a ReLU's derivative is ``Step`` of its result
    (positive where its argument is), which reads the value the forward saved where the kernel
    keeps it; where it does not, the argument itself, not the ReLU computed again."""
    return u.args[0] if isinstance(u, Relu) else u


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


class Guarded(Where):
    """A ``Where`` that only replaces a value where it is 0/0 by the limit torch takes (``Root``'s
    derivative at 0): a selection, exact, no new function of the values for the refold to weigh."""


class Root(sp.Function):
    """``sqrt(x)`` of a value that may be 0 (a variance, a sum of squares), differentiated as torch's
    ``std`` and ``norm`` backward are: ``1/(2*sqrt(x))`` where ``x > 0``, and 0 where it is 0
    (they mask the quotient where the result is 0). ``sqrt``'s own derivative is infinite there: the
    gradient of ``x.std(0)`` of a column whose entries are all equal (a saturated ``tanh``, a ReLU unit
    that never fires) came out NaN where autograd's is 0. Of a positive argument it is ``sqrt``."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_positive or x.is_Number:
            return sp.sqrt(x)

    def fdiff(self, argindex=1):
        return Guarded(Step(self), 1 / (2 * self), sp.S.Zero)

    def _eval_is_nonnegative(self):
        return True

    def _eval_is_real(self):
        return self.args[0].is_nonnegative or None

    def _latex(self, printer, exp=None):
        text = r"\sqrt{%s}" % printer._print(self.args[0])
        return text if exp is None else r"\left(%s\right)^{%s}" % (text, exp)


def _rsqrt(x):
    return 1 / sp.sqrt(x)


def _log1p(x):
    return sp.log(1 + x)


# A definition reading its variable through one of these is never solved for that variable:
# ``out = Relu(x)`` says nothing about a negative ``x``; softplus's inverse would only cost more.
NOT_INVERTIBLE = (Relu, Step, Wins, sp.Abs, sp.sign, Softplus, NonNeg, Equal, Where, Clamp, sp.sin, sp.cos, sp.erf,
                  Activation, ActivationDerivative)

# traced op -> the SymPy function of its element (the forward prints as ``torch.<op>``)
ELEMENTWISE = {"exp": sp.exp, "log": sp.log, "tanh": sp.tanh, "sigmoid": Sigmoid, "relu": Relu, "abs": sp.Abs,
               "softplus": Softplus, "sqrt": sp.sqrt, "rsqrt": _rsqrt, "erf": sp.erf, "sin": sp.sin, "cos": sp.cos,
               "log1p": _log1p, **ACTIVATIONS}
# the torch call a traced op prints as, where it is not ``torch.<op>({x})`` (nor an activation's own)
TORCH_CALL = {"softplus": "F.softplus({x})"}


def torch_call(op: str, x: str, parameters: list) -> str:
    """The torch call of the traced element-wise ``op`` on ``x`` (printed) and its parameters (printed)."""
    if op in ACTIVATIONS:
        return ACTIVATIONS[op].forward_call(x, parameters)
    return TORCH_CALL.get(op, f"torch.{op}({{x}})").format(x=x)

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
