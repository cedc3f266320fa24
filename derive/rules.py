"""The vector-Jacobian rules, one per primitive, written once for two interpreters.

Contract (every rule has the same signature)::

    @rule("mul", broadcasts=True)
    def _(ops, grad, result, a, b, **attrs):
        return grad * b, grad * a

* ``grad`` is the upstream gradient (shape of ``result``), ``result`` the forward output, then the
  forward inputs under their own names (``a``, ``b``; a table, labels, ...); ``attrs`` are the
  node's attributes (``axes``, ``keepdim``). Operands may be plain scalars (``1/n``).
* Return one gradient per input, ``None`` where an input has none (labels, an exponent).
* A rule registered with ``broadcasts=True`` (the elementwise binary operations) returns gradients
  in the *result's* shape; the walker de-broadcasts them (sums over broadcast axes) to each
  input's shape, so no rule repeats that. Every other rule returns each input's own shape.
* Where autograd computes a rule in one pass with a kernel of its own (``tanh_backward``,
  ``_softmax_backward_data``), the rule returns ``ops.one_pass(op, formula, grad, saved, ...)``:
  the formula itself where the values are symbolic, the same kernel where code is printed (it
  rounds as autograd does; several ops, each rounding, can be several times worse where the
  formula cancels: ``1 - y**2`` at a saturated ``tanh``, a softmax's gradient summing to 0), with
  the formula beside it for the reader.
* Use only arithmetic, exact SymPy numbers and ``ops``. ``ops`` is either ``CodeOps`` (values are torch code strings, for
  generating the step-by-step backward) or ``ArrayOps`` (values are NumPy arrays of SymPy
  expressions, for proving each rule on small symbolic matrices). A rule is thus proven exactly as
  it is printed.
"""
from __future__ import annotations

from typing import Callable

import sympy as sp  # exact constants only (erf's 2/sqrt(pi))

from .functions import ACTIVATIONS

RULES: dict[str, Callable] = {}
BROADCASTING: set[str] = set()


def rule(op: str, broadcasts: bool = False):
    def register(fn):
        RULES[op] = fn
        if broadcasts:
            BROADCASTING.add(op)
        return fn
    return register


@rule("add", broadcasts=True)
def _add(ops, grad, result, a, b):
    return grad, grad


@rule("sub", broadcasts=True)
def _sub(ops, grad, result, a, b):
    return grad, -grad


@rule("mul", broadcasts=True)
def _mul(ops, grad, result, a, b):
    return grad * b, grad * a


@rule("div", broadcasts=True)
def _div(ops, grad, result, a, b):
    # as autograd computes it: ``a/b/b``, not ``a/b**2`` (which overflows where ``b`` passes 1e19)
    return grad / b, -grad * (result / b)


@rule("pow", broadcasts=True)
def _pow(ops, grad, result, a, exponent):
    return exponent * a ** (exponent - 1) * grad, None


@rule("exp")
def _exp(ops, grad, result, a):
    return result * grad,


@rule("log")
def _log(ops, grad, result, a):
    return grad / a,


@rule("tanh")
def _tanh(ops, grad, result, a):
    return ops.one_pass("tanh", (1 - result**2) * grad, grad, result),


@rule("sigmoid")
def _sigmoid(ops, grad, result, a):
    return ops.one_pass("sigmoid", result * (1 - result) * grad, grad, result),


@rule("softplus")
def _softplus(ops, grad, result, a):
    # (torch's kernel: exp(a)*grad/(exp(a) + 1), which keeps the digits sigmoid(a) rounds to 0 below -88)
    return ops.one_pass("softplus", ops.sigmoid(a) * grad, grad, a),


def _activation_rule(op: str):
    @rule(op)
    def _activation(ops, grad, result, a, *parameters):
        # torch's own backward kernel, given the upstream gradient and the input (what autograd
        # saves), and the activation's numbers (``F.elu``'s alpha); none for the numbers
        return (ops.activation_backward(op, grad, a, parameters),) + (None,) * len(parameters)
    return _activation


for _op in ACTIVATIONS:
    _activation_rule(_op)


@rule("relu")
def _relu(ops, grad, result, a):
    # 0 at a = 0, and where grad is not finite, as torch; autograd's kernel reads the result it saved
    # (one pass: ``torch.where`` of a bool mask is twenty times slower on the CPU)
    return ops.one_pass("relu", ops.select(ops.positive(result), grad, 0), grad, result),


@rule("abs")
def _abs(ops, grad, result, a):
    return grad * ops.sign(a),  # 0 at a = 0, as torch


@rule("sqrt")
def _sqrt(ops, grad, result, a, flat_at_zero=False):
    if flat_at_zero:  # the root of ``std``, ``norm``: 0 where the result is 0, as torch's backward of those
        return ops.select(ops.positive(result), grad / (2 * result), 0),
    return grad / (2 * result),


@rule("rsqrt")
def _rsqrt(ops, grad, result, a):
    return -grad * result**3 / 2,


@rule("erf")
def _erf(ops, grad, result, a):
    return grad * ops.exp(-a**2) * (2 / sp.sqrt(sp.pi)),


@rule("sin")
def _sin(ops, grad, result, a):
    return grad * ops.cos(a),


@rule("cos")
def _cos(ops, grad, result, a):
    return -grad * ops.sin(a),


@rule("log1p")
def _log1p(ops, grad, result, a):
    return grad / (a + 1),


@rule("clamp")
def _clamp(ops, grad, result, a, lo, hi):
    return ops.select(ops.between(a, lo, hi), grad, 0), None, None  # 1 at the bounds, as torch


@rule("where", broadcasts=True)
def _where(ops, grad, result, mask, a, b):
    return None, ops.select(mask, grad, 0), ops.select(mask, 0, grad)


# the operand that wins gets the gradient, each half of it at a tie (as autograd splits it)
@rule("maximum", broadcasts=True)
def _maximum(ops, grad, result, a, b):
    return ops.split_at_ties(grad, a, b, "gt")


@rule("minimum", broadcasts=True)
def _minimum(ops, grad, result, a, b):
    return ops.split_at_ties(grad, a, b, "lt")


def _no_gradient(ops, grad, result, *operands, **attrs):
    """A 0/1 mask (a comparison) is piecewise constant: nothing flows back through it."""
    return (None,) * len(operands)


for _op in ("gt", "ge", "lt", "le", "eq", "ne", "not", "and"):
    rule(_op)(_no_gradient)


@rule("softmax")
def _softmax(ops, grad, result, a, axes):
    return ops.one_pass("softmax", result * (grad - ops.sum(grad * result, axes)), grad, result, axes),


@rule("log_softmax")
def _log_softmax(ops, grad, result, a, axes):
    return ops.one_pass("log_softmax", grad - ops.exp(result) * ops.sum(grad, axes), grad, result, axes),


@rule("logsumexp")
def _logsumexp(ops, grad, result, a, axes, keepdim):
    return ops.exp(a - ops.unreduce(result, axes, keepdim, a)) * ops.unreduce(grad, axes, keepdim, a),


@rule("permute")
def _permute(ops, grad, result, a, perm):
    return ops.permute(grad, tuple(sorted(range(len(perm)), key=perm.__getitem__))),


@rule("expand", broadcasts=True)
def _expand(ops, grad, result, a):
    return grad,


@rule("sum")
def _sum(ops, grad, result, a, axes, keepdim):
    return ops.expand(ops.unreduce(grad, axes, keepdim, a), a),


@rule("mean")
def _mean(ops, grad, result, a, axes, keepdim):
    return ops.expand(ops.unreduce(grad, axes, keepdim, a) / ops.count(a, axes), a),


@rule("max")
def _max(ops, grad, result, a, axes, keepdim, ties="first"):
    if ties == "shared":  # amax: an equal share to each position that ties, as autograd's amax
        return ops.shared_at_ties(ops.unreduce(grad, axes, keepdim, a), a, axes[0],
                                  ops.unreduce(result, axes, keepdim, a)),
    # selected, not multiplied: an infinite gradient of the maximum reaches its position only (0*inf is nan)
    return ops.select(ops.argmax_mask(a, axes[0], result), ops.unreduce(grad, axes, keepdim, a), 0),


@rule("matmul")
def _matmul(ops, grad, result, a, b):  # batched too: (..., n, d) @ (..., d, m), or (..., n, d) @ (d, m)
    # a matrix laid out by columns (``v.T``) gets its gradient in that layout, as autograd's
    # mm_mat1_backward gives it: the same product, transposed (1.4x autograd's time where the
    # elementwise steps after it read the transposed result)
    da = ops.transpose(b @ ops.transpose(grad), True) if ops.column_major(a) else grad @ ops.transpose(b)
    db = ops.transpose(ops.transpose(grad) @ a, True) if ops.column_major(b) else ops.transpose(a) @ grad
    return da, ops.sum_batch(db, b, a)


@rule("pick")
def _pick(ops, grad, result, table, labels):
    # selected, not multiplied: an infinite gradient reaches the label's entry only (0*inf is nan)
    return ops.select(ops.one_hot(labels, table), ops.unsqueeze(grad, 1), 0), None


@rule("embed")
def _embed(ops, grad, result, table, index):
    return ops.index_add(table, index, grad), None


@rule("view")
def _view(ops, grad, result, a, shape):
    return ops.view_as(grad, a),
