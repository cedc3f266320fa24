"""Reductions of a traced tensor: ``sum``/``mean``/``max`` over one or several axes, the
normalizations over an axis (``softmax``, ``log_softmax``, ``logsumexp``, each one primitive in its
stable form), the statistics written from them (``var``, ``std``, ``norm``), and ``@``."""
from __future__ import annotations

import sympy as sp


class Reductions:
    def _axes(self, dim, op: str, several: bool = True) -> tuple:
        """``dim`` (None, an axis, or a tuple of axes; negative counts from the end) as sorted axes."""
        rank = len(self.node.shape)
        if dim is None:
            return tuple(range(rank))
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if not several and len(dims) != 1:
            self._tracer.fail(f"{op}(dim={dim!r}): one axis at a time", "pass one axis number")
        axes = []
        for d in dims:
            if not isinstance(d, int) or isinstance(d, bool) or hasattr(d, "symbol") or not -rank <= d < rank:
                self._tracer.fail(f"{op}(dim={dim!r}) on a tensor of rank {rank}",
                                  "pass an axis number (or a tuple of them) within the tensor's rank")
            axes.append(d % rank)
        if len(set(axes)) != len(axes):
            self._tracer.fail(f"{op}(dim={dim!r}) names an axis twice", "name each axis once")
        return tuple(sorted(axes))

    def _reduce(self, op, dim, keepdim, several=True, **attrs):
        t = self._tracer
        if self.node.op == "labels":
            t.fail(f"{op} of integer labels", "use labels only to pick: t[range(n), y]")
        shape = self.node.shape
        axes = self._axes(dim, op, several)
        new = tuple(1 if k in axes else s for k, s in enumerate(shape) if keepdim or k not in axes)
        return t.record(op, (self.node,), new, axes=axes, keepdim=bool(keepdim), **attrs)

    @staticmethod
    def _keep(keepdim, keepdims):
        return keepdim if keepdims is None else keepdims

    def sum(self, dim=None, keepdim=False, keepdims=None, axis=None, dtype=None):
        return self._reduce("sum", axis if dim is None else dim, self._keep(keepdim, keepdims))

    def mean(self, dim=None, keepdim=False, keepdims=None, axis=None, dtype=None):
        return self._reduce("mean", axis if dim is None else dim, self._keep(keepdim, keepdims))

    def max(self, dim=None, keepdim=False, keepdims=None, axis=None):
        dim = axis if dim is None else dim
        if hasattr(dim, "node"):
            return self.maximum(dim)
        if dim is None:
            self._tracer.fail("max() over all elements", "use max(dim, keepdim=True).values")
        return _MaxResult(self._reduce("max", dim, self._keep(keepdim, keepdims), several=False))

    def min(self, dim=None, keepdim=False, keepdims=None, axis=None):
        dim = axis if dim is None else dim
        if hasattr(dim, "node"):
            return self.minimum(dim)
        if dim is None:
            self._tracer.fail("min() over all elements", "use min(dim, keepdim=True).values")
        return _MaxResult(-(-self).max(dim, keepdim, keepdims).values)

    def amax(self, dim=None, keepdim=False):
        # autograd shares amax's gradient among tied positions; max(dim) routes it to one index
        if dim is None:
            self._tracer.fail("amax() over all elements", "use amax(dim, keepdim=True)")
        return self._reduce("max", dim, keepdim, several=False, ties="shared")

    def amin(self, dim=None, keepdim=False):
        return -(-self).amax(dim, keepdim)

    def _along(self, op, dim, **attrs):
        if dim is None:
            self._tracer.fail(f"{op} without dim", f"pass the axis: {op}(x, dim=-1)")
        axes = self._axes(dim, op, several=op == "logsumexp")
        if self.node.op == "labels":
            self._tracer.fail(f"{op} of integer labels", "use labels only to pick: t[range(n), y]")
        shape = self.node.shape
        if op == "logsumexp":
            keepdim = attrs["keepdim"]
            shape = tuple(1 if k in axes else s for k, s in enumerate(shape) if keepdim or k not in axes)
        return self._tracer.record(op, (self.node,), shape, axes=axes, **attrs)

    def softmax(self, dim=None, dtype=None, _stacklevel=3):
        return self._along("softmax", dim)

    def log_softmax(self, dim=None, dtype=None, _stacklevel=3):
        return self._along("log_softmax", dim)

    def logsumexp(self, dim=None, keepdim=False):
        return self._along("logsumexp", dim, keepdim=bool(keepdim))

    def var(self, dim=None, unbiased=None, keepdim=False, correction=None, **kwargs):
        if isinstance(unbiased, (int, tuple, list)) and not isinstance(unbiased, bool):  # var(x, dim) positionally
            dim, unbiased = unbiased, None
        correction = correction if correction is not None else (0 if unbiased is False else 1)
        axes = self._axes(dim, "var")
        count = sp.Mul(*[self.node.shape[k] for k in axes])
        centred = self - self.mean(axes, keepdim=True)
        variance = (centred ** 2).sum(axes, keepdim=keepdim) / (count - correction)
        # derived from the primitives above; its value is computed as torch computes it (one
        # ``torch.var``, accumulated in double on the CPU: the two passes in float32 are 0.01 off at
        # an offset of 1e6), so the node remembers what it is the variance of
        variance.node.attrs.update(variance_of=self.node, correction=correction)
        return variance

    def std(self, dim=None, unbiased=None, keepdim=False, correction=None, **kwargs):
        return self.var(dim, unbiased, keepdim, correction)._root()

    def norm(self, p="fro", dim=None, keepdim=False, dtype=None):
        if p not in ("fro", 2, 2.0):
            self._tracer.fail(f"norm(p={p!r})", "the 2-norm is supported: (x**2).sum(dim).sqrt()")
        return (self ** 2).sum(dim, keepdim=keepdim)._root()

    def _root(self):
        """The root of a variance or of a sum of squares, as ``std`` and ``norm`` take it: torch's
        backward of those is 0 where the result is 0 (``sqrt``'s is infinite there)."""
        root = self.sqrt()
        root.node.attrs.update(flat_at_zero=True)
        return root

    # -- products ------------------------------------------------------------------------------
    def __matmul__(self, other):
        t = self._tracer
        if not hasattr(other, "node"):
            t.fail("'@' with a number", "multiply by a number with *")
        a, b = self.node.shape, other.node.shape
        if self.node.op == "labels" or other.node.op == "labels":
            t.fail("'@' of integer labels", "use labels only to pick: t[range(n), y]")
        if len(a) == 1 and len(b) == 1:
            return (self * other).sum()
        if len(a) == 1:
            return (self.unsqueeze(0) @ other).squeeze(-2)
        if len(b) == 1:
            return (self @ other.unsqueeze(-1)).squeeze(-1)
        if a[-1] != b[-2]:
            t.fail(f"'@' of shapes {a} and {b}", "the inner sizes must agree")
        if a[:-2] != b[:-2] and len(b) != 2:
            t.fail(f"'@' of shapes {a} and {b}: batch axes that broadcast",
                   "give both operands the same batch axes, or the second none (a matrix)")
        return t.record("matmul", (self.node, other.node), (*a[:-1], b[-1]))

    def __rmatmul__(self, other):
        self._tracer.fail("'@' with a tensor that is not traced", "use declared inputs")

    matmul = mm = bmm = __matmul__

    def dot(self, other):
        return (self * other).sum()


class _MaxResult:
    """What ``t.max(dim)`` returns: ``.values`` (or ``[0]``) is the traced maximum."""

    def __init__(self, values):
        self.values = values

    def __getitem__(self, k):
        if k == 0:
            return self.values
        raise AttributeError("max(dim) result: only .values (or [0]) is supported, not the indices")

    def __iter__(self):
        raise AttributeError("max(dim) result: use .values; the indices are not supported")

    def __getattr__(self, attr):
        raise AttributeError(f"max(dim) result: only .values is supported, not .{attr}")
