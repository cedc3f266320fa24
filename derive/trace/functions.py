"""torch's functions on traced tensors: ``torch.exp(x)``, ``F.softmax(x, dim=1)``, ``torch.where(m, a, b)``.

Most are the tensor method of the same name (``METHODS``); a few take no tensor first
(``torch.where``) or are losses and layers torch writes as one call, traced as the primitives
they are made of (``F.cross_entropy`` is a ``log_softmax`` and a pick). Everything else is refused
with what is supported (``SUPPORTED``, also the README's list).
"""
from __future__ import annotations

from .elementwise import _extremum, where

# torch.<name>(tensor, ...) / F.<name>(tensor, ...) -> tensor.<name>(...)
METHODS = {
    "exp", "log", "tanh", "sigmoid", "relu", "abs", "absolute", "softplus", "sqrt", "rsqrt", "square", "reciprocal",
    "erf", "sin", "cos", "log1p", "silu", "gelu", "leaky_relu", "elu", "clamp", "clip", "clamp_min", "clamp_max",
    "sum", "mean", "max", "min", "amax", "amin", "softmax", "log_softmax", "logsumexp", "var", "std", "norm",
    "matmul", "mm", "bmm", "dot", "reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "swapaxes", "swapdims", "t", "expand", "expand_as", "gather", "masked_fill", "pow", "add", "sub",
    "mul", "div", "multiply", "divide", "subtract", "true_divide", "gt", "ge", "lt", "le", "eq", "ne",
    "greater", "greater_equal", "less", "less_equal", "logical_not", "logical_and", "neg", "negative",
}


def _neg(x):
    return -x


def _cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    tracer = logits._tracer
    if weight is not None or label_smoothing or ignore_index != -100 or logits.ndim != 2:
        tracer.fail("F.cross_entropy with weight, ignore_index, label_smoothing or other than (n, k) logits",
                    "write it out: -logits.log_softmax(1)[range(n), y] (times a mask or weight), then .mean()")
    return _nll(logits.log_softmax(1), target, reduction)


def _nll(logprobs, target, reduction="mean", **unused):
    n = logprobs.shape[0]
    picked = -logprobs[range(n), target]
    return _reduced(picked, reduction, logprobs._tracer)


def _reduced(value, reduction, tracer):
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    if reduction == "none":
        return value
    tracer.fail(f"reduction={reduction!r}", "use 'mean', 'sum' or 'none'")


def _nll_loss(logprobs, target, weight=None, ignore_index=-100, reduction="mean", **unused):
    if weight is not None or ignore_index != -100:
        logprobs._tracer.fail("F.nll_loss with weight or ignore_index", "write it out with a mask or w[y]")
    return _nll(logprobs, target, reduction)


def _mse_loss(pred, target, reduction="mean", **unused):
    return _reduced((pred - target) ** 2, reduction, pred._tracer)


def _l1_loss(pred, target, reduction="mean", **unused):
    return _reduced((pred - target).abs(), reduction, pred._tracer)


def _bce_with_logits(logits, target, weight=None, reduction="mean", pos_weight=None, **unused):
    if weight is not None or pos_weight is not None:
        logits._tracer.fail("F.binary_cross_entropy_with_logits with weights", "write it out with F.softplus")
    return _reduced((1 - target) * logits + (-logits).softplus(), reduction, logits._tracer)


def _linear(x, weight, bias=None):
    out = x @ weight.T
    return out if bias is None else out + bias


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    axes = tuple(range(x.ndim - len(tuple(normalized_shape)), x.ndim))
    mean = x.mean(axes, keepdim=True)
    centred = x - mean
    out = centred * ((centred ** 2).mean(axes, keepdim=True) + eps).rsqrt()
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _normalize(x, p=2.0, dim=1, eps=1e-12):
    if p != 2:
        x._tracer.fail(f"F.normalize(p={p!r})", "the 2-norm is supported")
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def _embedding(index, weight, *unused, **kwargs):
    return weight[index]


FUNCTIONS = {
    "where": where, "maximum": lambda a, b: _extremum(a, b, "maximum"),
    "minimum": lambda a, b: _extremum(a, b, "minimum"), "neg": _neg, "negative": _neg,
    "cross_entropy": _cross_entropy, "nll_loss": _nll_loss, "mse_loss": _mse_loss, "l1_loss": _l1_loss,
    "binary_cross_entropy_with_logits": _bce_with_logits, "linear": _linear, "layer_norm": _layer_norm,
    "normalize": _normalize, "embedding": _embedding,
}

SUPPORTED = ("+ - * / with broadcasting, ** with a constant exponent, exp, log, log1p, tanh, sigmoid, relu, abs, "
             "sqrt, rsqrt, square, reciprocal, erf, sin, cos, F.softplus, F.silu, F.gelu, F.leaky_relu, F.elu, "
             "clamp/clip(min, max), torch.maximum/minimum, comparisons as masks (x > 0, y != c) with "
             "torch.where(mask, a, b) and masked_fill, "
             "sum/mean/max/min/amax(dim or dims, keepdim), var/std/norm(dim), softmax/log_softmax(dim), "
             "logsumexp(dim), @ (matrices, batches, vectors), "
             "view/reshape/flatten/squeeze/unsqueeze/x[:, None], .T/.t()/.mT/transpose/permute, expand, "
             "t[range(n), y] and t.gather(1, y[:, None]) and table[index] with declared Labels, "
             "F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.binary_cross_entropy_with_logits, "
             "F.linear, F.layer_norm, F.normalize, F.embedding")


def dispatch(func, args: tuple, kwargs: dict):
    """The traced result of ``func(*args, **kwargs)`` (a torch function with a traced tensor among its arguments)."""
    name = getattr(func, "__name__", str(func))
    if not args and "input" in kwargs:  # torch.exp(input=x)
        args = (kwargs.pop("input"),)
    tensor = next(a for a in (*args, *kwargs.values()) if hasattr(a, "_tracer"))
    if kwargs.get("inplace"):
        tensor._tracer.fail(f"{name}(..., inplace=True)", "use the out-of-place form (inplace=False)")
    # torch passes every keyword of a functional (``size_average=None``, ``out=None``, ``inplace=False``):
    # those left at their defaults change nothing
    kwargs = {k: v for k, v in kwargs.items()
              if not (v is None or (k == "inplace" and v is False) or (k == "_stacklevel"))}
    if name in FUNCTIONS:
        return FUNCTIONS[name](*args, **kwargs)
    if name in METHODS and args and args[0] is tensor:
        return getattr(tensor, name)(*args[1:], **kwargs)
    tensor._tracer.fail(f"torch.{name} is not supported", f"write it from supported primitives: {SUPPORTED}")
