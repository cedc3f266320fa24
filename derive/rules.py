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
* Use only arithmetic and ``ops``. ``ops`` is either ``CodeOps`` (values are torch code strings, for
  generating the step-by-step backward) or ``ArrayOps`` (values are NumPy arrays of SymPy
  expressions, for proving each rule on small symbolic matrices). A rule is thus proven exactly as
  it is printed.
"""
from __future__ import annotations

from typing import Callable

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
    return (1 - result**2) * grad,


@rule("sigmoid")
def _sigmoid(ops, grad, result, a):
    return result * (1 - result) * grad,


@rule("softplus")
def _softplus(ops, grad, result, a):
    return ops.sigmoid(a) * grad,


@rule("relu")
def _relu(ops, grad, result, a):
    return grad * ops.positive(a),  # 0 at a = 0, as torch


@rule("abs")
def _abs(ops, grad, result, a):
    return grad * ops.sign(a),  # 0 at a = 0, as torch


@rule("sum")
def _sum(ops, grad, result, a, axes, keepdim):
    return ops.ones_like(a) * ops.unreduce(grad, axes, keepdim, a),


@rule("mean")
def _mean(ops, grad, result, a, axes, keepdim):
    return ops.ones_like(a) * ops.unreduce(grad, axes, keepdim, a) / ops.count(a, axes),


@rule("max")
def _max(ops, grad, result, a, axes, keepdim):
    return ops.argmax_mask(a, axes[0], result) * ops.unreduce(grad, axes, keepdim, a),


@rule("matmul")
def _matmul(ops, grad, result, a, b):
    return grad @ ops.transpose(b), ops.transpose(a) @ grad


@rule("pick")
def _pick(ops, grad, result, table, labels):
    return ops.one_hot(labels, table) * ops.unsqueeze(grad, 1), None


@rule("embed")
def _embed(ops, grad, result, table, index):
    return ops.index_add(table, index, grad), None


@rule("view")
def _view(ops, grad, result, a, shape):
    return ops.view_as(grad, a),
