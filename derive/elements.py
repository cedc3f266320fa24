"""The element-wise view of a traced graph: every node as a SymPy expression at a generic index.

Each axis of a node has a free index named after its dimension: ``i_n`` for the first axis of
size ``n``, ``i_n_2`` for a second one (a square matrix ``A[i_d, i_d_2]``, attention scores
``s[i_n, i_n_2]``); an axis of size 1 is read at ``0``. An operation reads its operands at the
indices its own axes give them: broadcasting lines axes up from the right, a transpose swaps
them, a reduction binds the axes it sums, ``@`` binds the inner one. Where those are the
operand's own indices (distinct dimensions, nothing transposed), its expression is used unchanged.

*Normal form.* Elementwise nodes are inlined into their consumers. A *named* node whose value
involves a reduction (``bnmeani``, ``bnvar``, ``counts_sum``, ``logit_maxes``) stays opaque: it is
read as ``bnvar[0, i_d]`` and keeps its definition aside. So does every matrix product (a
contraction), named or not, and every value with a reduction that a matrix product reads
(``softmax(scores) @ v``): the chain rule then goes through it as autograd's does. Every opaque definition also teaches a *recognition* rule: the
reduction it introduces is that node (``Red(x) -> n*bnmeani``), so the identities a human would
use (the centred values sum to zero, probabilities sum to one) come out of plain linearity.
"""
from __future__ import annotations

from itertools import permutations

import sympy as sp

from .errors import DerivationError
from .atoms import atomic_shape, axis_atoms
from .functions import COMPARISONS, ELEMENTWISE, EXTREMA, Clamp, Root, Where, mask
from .symbolic import (AxisLogSoftmax, AxisLogSumExp, AxisMax, AxisSoftmax, AxisSum, AxisVar, IsArgmax, Max, Red, expand,
                       extent, hide_argmax, index_for, maximum_of, reductions, reindex)
from .trace import Graph, Node

REDUCING_OPS = ("sum", "mean", "max", "matmul", "softmax", "log_softmax", "logsumexp")
CONTRACTIONS = ("matmul",)
# normalizations over an axis, opaque wherever they occur: the chain rule goes through their own
# value (``differentiate._through_normalizer``), as autograd's does
NORMALIZERS = ("softmax", "log_softmax", "logsumexp")
_SAME_SIGN = ("permute", "expand", "view")


def _scalar_sign(a: sp.Expr) -> str:
    """Sign of a size/constant expression wherever it is defined (sizes >= 2: ``1/(n-1) > 0``)."""
    sizes = {s: sp.Symbol(f"{s}_", nonnegative=True, integer=True) + 2
             for s in a.free_symbols if s.is_integer and s.is_positive}
    a = a.xreplace(sizes)
    return "positive" if a.is_positive else "nonnegative" if a.is_nonnegative else "real"


def sign(node: Node, signs: dict) -> str:
    """'positive', 'nonnegative' or 'real' for ``node``, from the signs of its operands."""
    def of(a):
        return signs[a] if isinstance(a, Node) else _scalar_sign(a)

    s = [of(a) for a in node.args]
    pos = lambda v: v == "positive"
    nonneg = lambda v: v in ("positive", "nonnegative")
    op = node.op
    if op in ("exp", "sigmoid", "softplus", "rsqrt", "softmax"):
        return "positive"
    if op in ("relu", "abs", "not", "and") or op in COMPARISONS:
        return "nonnegative"
    if op in _SAME_SIGN:
        return s[0]
    if op == "sqrt":
        return "positive" if pos(s[0]) else "nonnegative"
    if op == "clamp":
        low = node.args[1]
        return "positive" if low.is_positive else "nonnegative" if low.is_nonnegative else "real"
    if op in ("where", "maximum", "minimum"):
        values = s[1:] if op == "where" else s
        return "positive" if all(map(pos, values)) else "nonnegative" if all(map(nonneg, values)) else "real"
    if op == "pow":
        exponent = node.args[1]
        if pos(s[0]):
            return "positive"
        if exponent.is_integer and exponent.is_even:
            return "nonnegative"
    if op in ("add", "mul", "div", "sum", "mean", "max", "matmul") and s:
        if all(pos(v) for v in s):
            return "positive"
        if op == "add" and all(nonneg(v) for v in s) and any(pos(v) for v in s):
            return "positive"
        if all(nonneg(v) for v in s):
            return "nonnegative"
    return "real"


def input_sign(graph: Graph, node: Node) -> str:
    """An input's sign, as its declared domain says (``Tensor(..., domain="positive")``)."""
    domain = getattr(graph.layer.inputs.get(node.name), "domain", "real")
    return {"positive": "positive", "unit": "positive", "probability": "positive", "nonnegative": "nonnegative",
            "binary": "nonnegative"}.get(domain, "real")


def _contracted(binder) -> bool:
    """Whether ``binder`` is (part of) a sum of a product of tensors that prints as a contraction:
    its body, past nested sums, is a product of tensor elements and numbers, none reading every index."""
    body = binder.body
    while isinstance(body, (Red, AxisSum)):
        body = body.body
    if not isinstance(binder, (Red, AxisSum)) or not isinstance(body, sp.Mul):
        return False
    tensors = [set(f.indices) - {0} for f in body.args if isinstance(f, sp.Indexed)]
    rest = [f for f in body.args if not isinstance(f, sp.Indexed)]
    if any(f.atoms(sp.Indexed) or any(isinstance(i, sp.Idx) for i in f.free_symbols) for f in rest):
        return False
    every = set().union(*tensors) if tensors else set()
    return len(tensors) >= 2 and not any(t == every for t in tensors)


class Elements:
    def __init__(self, graph: Graph, kept: frozenset = frozenset()):
        self.graph = graph
        # nodes kept opaque besides the rule's (``differentiate.replayed_maxima``: what a maximum's
        # shift sends back is computed as a tensor, as autograd does)
        self.kept = kept
        self.layer = graph.layer.name
        self.index = {s: index_for(f"i_{s}", s) for s in graph.sizes.values()}  # each dimension's first index
        self.signs: dict[Node, str] = {}
        self.refs: dict[Node, sp.Expr] = {}
        self.nf: dict[Node, sp.Expr] = {}
        self.definition: dict[Node, sp.Expr] = {}  # opaque node -> its value in normal form
        self.opaque: list[Node] = []  # topological order
        self.rules: list[tuple[sp.Expr, tuple, sp.Expr]] = []  # (reduction atom, its free indices, value)
        self.known: dict[Node, int] = {}  # opaque node -> how many rules its definition was recognised with
        self.affine: set[Node] = set()  # a matrix product plus a bias: opaque, its adjoint computed once
        try:
            self.axes = axis_atoms(graph)  # each node's axes as atomic sizes (a view regroups them)
        except DerivationError as e:
            raise DerivationError(self.layer, e.problem, e.fix, e.line, e.source) from None
        for node in graph.nodes:
            self._add(node)

    def nonzero_scalars(self) -> set:
        """Sizes and the constants declared positive: the scalars a formula may divide by."""
        return set(self.graph.sizes.values()) | {c for c in self.graph.constants.values() if c.is_zero is False}

    # -- indices -----------------------------------------------------------------------------
    def nth(self, size: sp.Expr, k: int) -> sp.Idx:
        """The ``k``-th free index of a dimension: ``i_n``, then ``i_n_2``, ``i_n_3``, ..."""
        if k == 0:
            if size not in self.index:
                self.index[size] = index_for(f"i_{sp.sstr(size)}", size)
            return self.index[size]
        return index_for(f"i_{sp.sstr(size)}_{k + 1}", size)

    def free_axes(self, node: Node) -> list[tuple]:
        """The free indices of ``node``, per axis: one per atom of the axis (``atoms.py``; one for an
        axis that no view splits), the k-th atom of a size its k-th index, ``(0,)`` for size 1."""
        seen: dict = {}
        out = []
        for atoms in self.axes[node]:
            group = []
            for a in atoms:
                group.append(self.nth(a, seen.get(a, 0)))
                seen[a] = seen.get(a, 0) + 1
            out.append(tuple(group) or (0,))
        return out

    def free(self, node: Node) -> tuple:
        return tuple(i for axis in self.free_axes(node) for i in axis)

    def shape(self, node: Node) -> tuple:
        """``node``'s shape read at its atoms (``x`` of shape ``(n, d)`` split by a view: ``(n, 2, d_2)``)."""
        return atomic_shape(self.axes[node])

    def bound(self, size: sp.Expr, taken: set) -> sp.Idx:
        """An index of ``size`` for a sum, other than every index in ``taken``."""
        k = 0
        while self.nth(size, k) in taken:
            k += 1
        return self.nth(size, k)

    def frame(self, exprs: list = (), within: list | None = None) -> list[sp.Idx]:
        """The indices of the axes every tensor of a fused kernel is printed on: each dimension's
        (declaration order first) as many times as a value of the graph, or a sum in ``exprs``
        or in a node's value, has axes of that size at once.

        ``within`` (a frame): only the axes ``exprs`` need, in that frame's order, so that a value
        on two axes prints as a matrix (``dlogits``, ``dscores``) in a kernel of four dimensions.
        """
        counts: dict = {}
        if within is None:
            atoms = {a for axes in self.axes.values() for axis in axes for a in axis}
            counts = {s: 1 for s in self.graph.sizes.values() if s in atoms}  # a dimension a view splits is not
            for node in self.graph.nodes:
                shape = self.shape(node)
                for s in set(shape) - {1}:
                    counts[s] = max(counts.get(s, 0), list(shape).count(s))
        values = list(exprs) + (list(self.definition.values()) if within is None else [])
        for expr in values:
            # a sum that is a matrix product is printed as one (@, einsum): it needs no axis for its index
            scopes = [expr] + [b.body for b in expr.atoms(Red, Max, AxisSum, AxisMax) if not _contracted(b)]
            for scope in scopes:
                indices = [i for i in scope.free_symbols if isinstance(i, sp.Idx)]
                for size in {extent(i) for i in indices}:
                    counts[size] = max(counts.get(size, 0), sum(1 for i in indices if extent(i) == size))
        if within is not None:
            taken: dict = {}
            out = []
            for i in within:
                size = extent(i)
                if taken.get(size, 0) < counts.get(size, 0):
                    out.append(i)
                    taken[size] = taken.get(size, 0) + 1
            return out + [self.nth(s, k) for s, c in counts.items() for k in range(taken.get(s, 0), c)]
        # the dimensions in the order the inputs declare them, a dimension a view splits as its atoms;
        # first the batch: the one most values have as their first axis (n of emb, h, logits), so
        # that they print as they are stored. Only a value of two dimensions or more has a say: a
        # vector, or a square matrix, reads as it is stored wherever the batch goes. (A softmax's
        # column total ``s.sum(0)`` with per-feature vectors around it, ``w`` and ``tanh`` of the
        # total, and an unread (k, k) input took ``k`` for the batch; the (n, k) values were printed
        # transposed and reduced along strides, 3x autograd's time.)
        order = []
        for name in self.graph.layer.tensors:
            for axis in self.axes[self.graph.inputs[name]]:
                order += [a for a in axis if a not in order]
        leading = [self.axes[n][0][0] for n in self.graph.nodes
                   if self.axes[n] and self.axes[n][0] and len({a for axis in self.axes[n] for a in axis}) >= 2]
        if leading:
            batch = max(order, key=lambda a: (leading.count(a), -order.index(a)))
            order = [batch] + [a for a in order if a != batch]
        order += [s for s in self.graph.sizes.values() if s not in order]
        order += [s for s in counts if s not in order]
        return [self.nth(s, k) for s in order if s in counts for k in range(counts[s])]

    # -- references --------------------------------------------------------------------------
    def base(self, node: Node) -> sp.IndexedBase | sp.Symbol:
        assumptions = {"integer": True} if node.op == "labels" else {self.signs[node]: True}
        if not node.shape:
            return sp.Symbol(node.name, **assumptions)
        return sp.IndexedBase(node.name, **assumptions)

    def ref(self, node: Node, indices: tuple | None = None) -> sp.Expr:
        base = self.base(node)
        if not node.shape:
            return base
        return base[self.free(node) if indices is None else indices]

    def grad_ref(self, node: Node, indices: tuple | None = None) -> sp.Expr:
        """The upstream gradient ``d<name>`` as an element."""
        if not node.shape:
            return sp.Symbol(f"d{node.name}", real=True)
        return sp.IndexedBase(f"d{node.name}", real=True)[self.free(node) if indices is None else indices]

    # -- building the normal form ------------------------------------------------------------
    def _add(self, node: Node) -> None:
        self.signs[node] = input_sign(self.graph, node) if node.op in ("input", "labels") else sign(node, self.signs)
        if node.op in ("input", "labels"):
            self.nf[node] = self.ref(node)
            return
        value = self._value(node)
        contracted = any(m.op in CONTRACTIONS for m in self.graph.consumers(node))
        # a matrix product plus a bias (x @ W + b): the chain rule goes through the sum, so the bias's
        # gradient sums the adjoint the product's gradients read, db = dpre.sum(0)
        affine = node.op in ("add", "sub") and any(a.op in CONTRACTIONS for a in node.inputs)
        if affine:
            self.affine.add(node)
        # (a maximum too, named or not: the backward reads the forward's value, it has no pass
        # that takes a maximum again; and a value compared in an elementwise maximum or minimum,
        # whose mask the backward reads it for, as autograd saves it: inlined, ``b + x**3/n`` was
        # computed again in the backward, twice, for ``maximum(u, b + x**3/n)``'s mask)
        compared = any(m.op in ("maximum", "minimum") for m in self.graph.consumers(node))
        if node is self.graph.output or node.op in NORMALIZERS or affine or node.op == "max" or node in self.kept or compared or (
                node.op in CONTRACTIONS and node.shape) or (reductions(value) and (node.named or contracted)) or (
                self._squared_difference(node, value)) or (contracted and (self._broadcast_read(node, value)
                                                                           or self._reads_several(value))):
            self.known[node] = len(self.rules)
            value = self.recognize(value)
            self.definition[node] = value
            self.opaque.append(node)
            self._learn(node, value)
            self.nf[node] = self.ref(node)
        else:
            self.nf[node] = value

    def _broadcast_read(self, node: Node, value: sp.Expr) -> bool:
        """Whether ``value``, a matrix product's operand, reads a tensor along fewer axes than its
        own (a row's statistic, a bias, a scalar): then it is a node, and its adjoint one tensor
        (``dv6 = dv7 @ A.T``) that the gradients read, as autograd's. Inlined into the product,
        the statistic's adjoint sums the product's adjoint through the operand's derivative over
        both the row and the product's axis, and that nested sum was printed as a matrix product
        of its own (``((v2 @ A)*dv7).sum(1)`` beside ``dv7 @ A.T``): four products where autograd's
        backward has two (1.7x to 2x its time for a log-softmax written out, then ``@ A``)."""
        if not node.shape:
            return False
        own = {i for i in self.free(node) if i != 0}
        scalars = {self.base(m) for m in self.nf if not m.shape}  # (0-d tensors are symbols)
        return any(not own <= set(e.indices) for e in value.atoms(sp.Indexed)) or bool(value.free_symbols & scalars)

    def _reads_several(self, value: sp.Expr) -> bool:
        """Whether ``value``, a matrix product's operand, reads two or more of the tensors the
        gradients flow through (differentiable inputs, nodes kept whole): then it is a node, and its
        adjoint one tensor (``dv4 = dv6 @ A.T``) that each of their gradients reads, as autograd's.
        Inlined, each one's gradient carries the product's adjoint inside its own formula, and the
        backward computed that matrix product once per tensor (``maximum(2*log_softmax(x), x) @ A``:
        ``dv6 @ A.T`` in ``dv2`` and again in ``dx``, 1.3x autograd's time)."""
        differentiable = {self.base(self.graph.inputs[name]) for name in self.graph.layer.differentiable}
        variables = differentiable | {self.base(m) for m in self.opaque}
        read = {e.base for e in value.atoms(sp.Indexed)} | value.free_symbols
        return len(read & variables) >= 2

    def _squared_difference(self, node: Node, value: sp.Expr) -> bool:
        """A named difference that reads a statistic of the forward (``x - max - log(sum)``, a
        log-softmax written out) and whose square the spec takes, elementwise, into a log, a root or
        a quotient (``log(v*v + 1)``). Inlined, the square is expanded in the derivative's
        denominator (``x**2 - 2*x*m + m**2 + ... + 1`` for ``v**2 + 1``), large terms that cancel:
        2e4x autograd's float32 error at inputs of 10, and the layer fell to the step-by-step
        backward. Kept as a node, the derivative reads it as autograd does. (A sum of the square is
        left inlined: its derivative is linear in the difference, batchnorm's variance.)"""
        if not (node.named and node.shape and value.is_Add):
            return False
        statistics = {self.base(m) for m in self.opaque}
        if not any(s.base in statistics for s in value.atoms(sp.Indexed)) and not value.free_symbols & statistics:
            return False
        todo = [m for m in self.graph.consumers(node) if m.op == "square" or m.op == "pow" and m.inputs[0] is node
                or m.op == "mul" and list(m.inputs).count(node) == 2]
        seen = set()
        while todo:  # on through sums and products into a function whose derivative divides by it
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            for c in self.graph.consumers(m):
                if c.op in ("log", "log1p", "div", "sqrt", "rsqrt", "reciprocal"):
                    return True
                if c.op in ("add", "sub", "mul", "neg"):
                    todo.append(c)
        return False

    def normal_form(self, node: Node, log: list | None = None) -> sp.Expr:
        """The node's value with elementwise nodes inlined and known reductions recognised (into ``log``)."""
        return self.recognize(self._value(node), log, self.rules[:self.known.get(node, len(self.rules))])

    def direct(self, node: Node) -> sp.Expr:
        """The node's value one level deep: its operation applied to its operands' references."""
        return self._value(node, self.ref)

    def literal(self, node: Node, operand) -> sp.Expr:
        """The node's value as the spec writes it, for printing a forward pass.

        Unlike the normal form nothing is expanded: a sum stays ``AxisSum(body, i)`` over the
        axis's own index where it can, so ``((x - mean)**2).sum(0)`` is not turned into the
        cancelling ``sum(x**2) - n*mean**2``, and a body shared with a full-size value (the
        ``exp`` in a softmax) is the same SymPy expression in both places.
        """
        return self._value(node, operand, literal=True)

    def _value(self, node: Node, operand=None, literal: bool = False) -> sp.Expr:
        operand = operand or self.nf.__getitem__
        axes = self.free_axes(node)  # the result's indices, per axis
        result = self.free(node)
        op = node.op

        def read(x, target: list) -> sp.Expr:
            """Operand ``x`` with its axes at ``target`` (per axis: indices, label values, or 0)."""
            flat = [t for group in target for t in group]
            return reindex(operand(x), {o: t for o, t in zip(self.free(x), flat) if o != 0})

        def aligned(x):
            """An operand of an elementwise operation: its axes are the result's last ones (broadcasting)."""
            if not isinstance(x, Node):
                return x
            offset = len(axes) - len(x.shape)
            return read(x, [(0,) if s == 1 else axes[k + offset] for k, s in enumerate(x.shape)])

        def bind(group: tuple, taken: set, own: tuple | None = None) -> tuple:
            """Indices for summing the atoms of an axis: its own ones where no other takes them."""
            out = []
            for k, i in enumerate(group):
                if i == 0:  # an axis of 1 binds nothing (``over`` skips it)
                    out.append(0)
                    continue
                j = own[k] if own is not None and own[k] not in taken else self.bound(extent(i), taken)
                taken.add(j)
                out.append(j)
            return tuple(out)

        total = (AxisSum if literal else Red)
        largest = AxisMax if literal else maximum_of(node.attrs.get("ties"))

        def over(value, indices, combine):
            for j in indices:
                if j != 0:
                    value = combine(value, j)
            return value

        a = [aligned(x) for x in node.args] if op not in ("sum", "mean", "max", "matmul", "pick", "embed", "permute",
                                                         "view", "logsumexp") else []
        if literal and "variance_of" in node.attrs and self._one_bound(node.attrs["variance_of"], node.args[0]):
            # x.var(dim): one torch.var, as the spec computes it (the sums it is derived from, written
            # out, round in the tensor's dtype)
            variance = self._reduction(node.args[0], read, axes, bind, over, total, largest,
                                       node.attrs["variance_of"])
            if isinstance(variance, AxisSum):
                return AxisVar(variance.body, variance.index, node.attrs["correction"])
        if op in ("add", "sub", "mul", "div"):
            return {"add": a[0] + a[1], "sub": a[0] - a[1], "mul": a[0] * a[1], "div": a[0] / a[1]}[op]
        if op == "pow":
            return a[0] ** a[1]
        if op == "sqrt" and node.attrs.get("flat_at_zero"):
            return Root(a[0])  # the root of ``std``, ``norm``: its derivative is 0 where it is 0, as torch's
        if op in ELEMENTWISE:
            return ELEMENTWISE[op](*a)  # (an activation's parameters are numbers after the tensor)
        if op in COMPARISONS:
            # a label compared with a number is a Kronecker delta (0/1), exact for any value
            return mask(op, a[0], a[1], labels=node.args[0].op == "labels")
        if op == "not":
            return 1 - a[0]
        if op == "and":
            return a[0] * a[1]
        if op in EXTREMA:
            return EXTREMA[op](a[0], a[1])
        if op == "clamp":
            return Clamp(*a)
        if op == "where":
            return Where(*a)
        if op == "expand":
            return a[0]
        if op in ("softmax", "log_softmax") and literal and len(axes[axis := node.attrs["axes"][0]]) == 1 \
                and axes[axis][0] != 0:
            return (AxisSoftmax if op == "softmax" else AxisLogSoftmax)(a[0], axes[axis][0])  # one torch op
        if op in ("softmax", "log_softmax"):
            (axis,) = node.attrs["axes"]
            own = axes[axis]
            j = own if literal else bind(own, set(result))
            rename = dict(zip(own, j))
            shifted = a[0] - over(reindex(a[0], rename), j, largest)
            exps = sp.exp(shifted)
            normalizer = over(reindex(exps, rename), j, total)
            return exps / normalizer if op == "softmax" else shifted - sp.log(normalizer)
        if op in ("sum", "mean", "max", "logsumexp"):
            return self._reduction(node, read, axes, bind, over, total, largest)
        if op == "matmul":
            x, y = node.args
            inner = self.free_axes(x)[-1]
            j = (0,) if inner == (0,) else bind(inner, set(result))
            batch = axes[:-2][len(axes) - len(y.shape):] if len(y.shape) > 2 else []  # a matrix y has none
            product = read(x, [*axes[:-1], j]) * read(y, [*batch, j, axes[-1]])
            return over(product, j, total)
        if op == "permute":
            target = [None] * len(axes)
            for k, p in enumerate(node.attrs["perm"]):
                target[p] = axes[k]
            return read(node.args[0], target)
        if op == "view":
            # a view regroups the same atoms (atoms.py): the source read at the result's indices, in order
            source = node.args[0]
            indices = iter(i for i in result if i != 0)
            return read(source, [tuple(0 if i == 0 else next(indices) for i in group) for group in self.free_axes(source)])
        if op == "pick":
            table, labels = node.args
            if len(self.free_axes(table)[1]) != 1:
                raise DerivationError(self.layer, "a pick along an axis a view splits", "pick before the view",
                                      node.line, node.source)
            return read(table, [axes[0], (read(labels, [axes[0]]),)])
        if op == "embed":
            # table[labels]: the table's first index is the label at the labels' own indices
            # (a class weight w[y] of a row is w[y[i_n]]; an embedding row C[X[i_n, i_t], i_e])
            table, labels = node.args
            rank = len(labels.shape)
            if len(self.free_axes(table)[0]) != 1:
                raise DerivationError(self.layer, "a lookup in a table whose rows a view splits",
                                      "look up before the view", node.line, node.source)
            return read(table, [(read(labels, axes[:rank]),), *axes[rank:]])
        raise DerivationError(self.layer, f"operation {op!r} has no element-wise form",
                              "use the supported primitives", node.line, node.source)

    def _one_bound(self, source: Node, reduction: Node) -> bool:
        """Whether ``reduction`` of ``source`` binds one index (one axis, not split by a view)."""
        own = self.free_axes(source)
        return len([j for k in reduction.attrs["axes"] for j in own[k] if j != 0]) == 1

    def _reduction(self, node: Node, read, axes: list, bind, over, total, largest, source: Node | None = None) -> sp.Expr:
        """A sum, mean, max or logsumexp over ``axes``: the kept axes at the result's indices, each
        reduced axis at indices of its own (the axis's own ones where no kept axis takes them).
        ``source`` in place of the node's operand: another value of its shape reduced the same way."""
        source = source or node.args[0]
        reduced, keepdim = node.attrs["axes"], node.attrs["keepdim"]
        kept = iter(axes if not keepdim else [a for k, a in enumerate(axes) if k not in reduced])
        own = self.free_axes(source)
        target = [None if k in reduced else next(kept) for k in range(len(source.shape))]
        taken = {i for group in target if group is not None for i in group}
        for k in reduced:
            target[k] = (0,) if own[k] == (0,) else bind(own[k], taken, own[k])
        value = read(source, target)
        bound = [j for k in reduced for j in target[k] if j != 0]
        if node.op == "logsumexp" and total is AxisSum and len(bound) == 1:
            return AxisLogSumExp(value, bound[0])  # as written: one torch.logsumexp
        if node.op == "logsumexp":
            top = over(value, bound, largest)
            return top + sp.log(over(sp.exp(value - top), bound, total))
        if node.op == "max":
            return over(value, bound, largest)
        for j in bound:
            value = total(value, j)
        if node.op == "mean":  # the sum over every axis divided once, as torch's mean divides
            value = value / sp.Mul(*[extent(j) for j in bound])
        return value

    # -- recognition of reductions -----------------------------------------------------------
    def _learn(self, node: Node, value: sp.Expr) -> None:
        """From ``node = a*R + b`` with one new reduction ``R``, learn ``R -> (node - b)/a``."""
        new = [r for r in reductions(value) if not any(r in reductions(q) for q in reductions(value) if q != r)]
        if len(new) != 1:
            return
        atom = new[0]
        x = sp.Dummy("x")
        linear = expand(value.xreplace({atom: x}))
        a, b = linear.coeff(x, 1), linear.coeff(x, 0)
        if a == 0 or x in a.free_symbols or x in b.free_symbols or linear != expand(a * x + b):
            return
        if not a.free_symbols <= self.nonzero_scalars() and a.is_zero is not False:
            # Red(x) = (out - b)/v1 from out = v1*Red(x) is 0/0 wherever v1 is 0 (a zero-initialized
            # parameter, a constant called with 0): learn only divisions by sizes, constants declared
            # positive and values known to be non-zero
            return
        solved = (self.ref(node) - b) / a
        self.rules.append((atom, tuple(sorted(atom.free_symbols & set(self.index.values()), key=str)), solved))

    def recognize(self, expr: sp.Expr, log: list | None = None, rules: list | None = None) -> sp.Expr:
        """Replace reductions that are known nodes by those nodes, until nothing changes.

        With ``log``, every replacement is appended as ``(reduction, its value)`` so a derivation
        document can name it ("the sum of x over r is n*bnmeani"). ``rules`` defaults to all learned.
        """
        rules = self.rules if rules is None else rules
        expr, restore = hide_argmax(expr)
        for _ in range(20):
            before = expr
            for atom in sorted(reductions(expr), key=lambda r: r.depth):
                for pattern, free, value in rules:
                    match = _match(pattern, free, atom)
                    if match is not None:
                        expr = expr.xreplace({atom: value.xreplace(match)})
                        if log is not None:
                            log.append((atom, value.xreplace(match)))
                        break
            expr = expand(expr)
            if expr == before:
                break
        return restore(expr)


def _match(pattern: sp.Expr, free: tuple, atom: sp.Expr) -> dict | None:
    """An index renaming that makes ``pattern`` equal ``atom``, or None."""
    if type(pattern) is not type(atom) or pattern.index != atom.index:
        return None
    targets = [s for s in atom.free_symbols if isinstance(s, sp.Idx)]
    if len(targets) != len(free):
        return None
    for perm in permutations(targets):
        if all(extent(a) == extent(b) for a, b in zip(free, perm)):
            mapping = dict(zip(free, perm))
            if pattern.xreplace(mapping) == atom:
                return mapping
    return None


__all__ = ["Elements", "IsArgmax"]
