"""Shape operations of a traced tensor: views (``view``, ``reshape``, ``flatten``, ``squeeze``,
``unsqueeze``), which keep the elements in order, and permutations of the axes (``.T``, ``.t()``,
``.mT``, ``transpose``, ``permute``), and ``expand``.

A view's sizes may be computed from others: ``x.view(n, G, d // G)`` (or ``-1``) introduces the
size ``d_G`` with the condition that ``G`` divides ``d``, checked when the layer is called.
"""
from __future__ import annotations

import sympy as sp


class Shapes:
    # -- views -------------------------------------------------------------------------------
    def view(self, *shape):
        t = self._tracer
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if len(shape) == 1 and hasattr(shape[0], "node"):  # view(other_tensor) is view_as
            return self.view_as(shape[0])
        sizes = []
        for s in shape:
            if hasattr(s, "symbol"):
                sizes.append(s.symbol)
            elif isinstance(s, sp.Symbol) and not s.is_integer:  # a declared Constant used as a size
                sizes.append(sp.Symbol(s.name, integer=True, positive=True))
            elif isinstance(s, (int, sp.Expr)) and not isinstance(s, bool):
                sizes.append(t.size_table.as_size_expression(s) if isinstance(s, int) and
                              t.size_table.as_size_expression(s) is not None else sp.sympify(s))
            else:
                sizes.append(None)
        if None in sizes or sum(1 for s in sizes if s == -1) > 1:
            t.fail(f"view{tuple(shape)!r}", "pass sizes from x.shape, integers, and at most one -1")
        total = t.size_table.expand(sp.Mul(*self.node.shape))
        known = sp.Mul(*[s for s in sizes if s != -1])
        if -1 in sizes:
            rest = sp.cancel(total / t.size_table.expand(known))
            numerator, denominator = sp.fraction(rest)
            sizes = [t.size_table.size_of(numerator, denominator) if s == -1 else s for s in sizes]
        if sp.cancel(t.size_table.expand(sp.Mul(*sizes)) - total) != 0:
            t.fail(f"view to {tuple(sizes)} of a tensor of shape {self.node.shape}", "keep the number of elements")
        if tuple(sizes) == tuple(self.node.shape):
            return self
        return t.record("view", (self.node,), tuple(sizes))

    reshape = view

    def view_as(self, other):
        return self.view(*other.node.shape)

    reshape_as = view_as

    def flatten(self, start_dim=0, end_dim=-1):
        shape = list(self.node.shape)
        rank = len(shape)
        if rank == 0:
            return self.view(1)
        start, end = start_dim % rank, end_dim % rank
        merged = sp.Mul(*shape[start:end + 1])
        return self.view(*shape[:start], merged, *shape[end + 1:])

    def unflatten(self, dim, sizes):
        shape = list(self.node.shape)
        dim %= len(shape)
        return self.view(*shape[:dim], *sizes, *shape[dim + 1:])

    def squeeze(self, dim=None):
        shape = list(self.node.shape)
        if dim is None:
            return self.view(*[s for s in shape if s != 1])
        axes = self._axes(dim, "squeeze")
        return self.view(*[s for k, s in enumerate(shape) if not (k in axes and s == 1)])

    def unsqueeze(self, dim):
        shape = list(self.node.shape)
        dim = dim % (len(shape) + 1)
        return self.view(*shape[:dim], 1, *shape[dim:])

    # -- permutations of the axes ------------------------------------------------------------
    def permute(self, *dims):
        t = self._tracer
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        rank = len(self.node.shape)
        if sorted(d % rank for d in dims if isinstance(d, int)) != list(range(rank)) or len(dims) != rank:
            t.fail(f"permute{tuple(dims)!r} of a tensor of rank {rank}", "name every axis once")
        perm = tuple(d % rank for d in dims)
        if perm == tuple(range(rank)):
            return self
        if self.node.op == "labels":
            t.fail("a permutation of integer labels", "declare the labels in the order they are used")
        return t.record("permute", (self.node,), tuple(self.node.shape[p] for p in perm), perm=perm)

    def transpose(self, dim0, dim1):
        rank = len(self.node.shape)
        perm = list(range(rank))
        perm[dim0 % rank], perm[dim1 % rank] = perm[dim1 % rank], perm[dim0 % rank]
        return self.permute(*perm)

    swapaxes = swapdims = transpose

    def t(self):
        if len(self.node.shape) > 2:
            self._tracer.fail(f".t() of a tensor of rank {len(self.node.shape)}", "use .transpose(a, b) or .mT")
        return self.permute(*reversed(range(len(self.node.shape))))

    @property
    def T(self):
        return self.permute(*reversed(range(len(self.node.shape))))

    @property
    def mT(self):
        if len(self.node.shape) < 2:
            self._tracer.fail(".mT of a tensor of rank below 2", "use .T")
        return self.transpose(-2, -1)

    # -- broadcasting ------------------------------------------------------------------------
    def expand(self, *sizes):
        t = self._tracer
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        shape = self.node.shape
        target = []
        for k, s in enumerate(sizes):
            own = shape[k - (len(sizes) - len(shape))] if k >= len(sizes) - len(shape) else 1
            size = own if s == -1 else (s.symbol if hasattr(s, "symbol") else sp.sympify(s))
            target.append(size)
        if t.broadcast(shape, tuple(target), "expand") != tuple(target):
            t.fail(f"expand{tuple(sizes)!r} of a tensor of shape {shape}", "expand only axes of size 1")
        if tuple(target) == tuple(shape):
            return self
        return t.record("expand", (self.node,), tuple(target))

    def expand_as(self, other):
        return self.expand(*other.node.shape)
