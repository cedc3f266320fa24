"""The element-wise view of a traced graph: every node as a SymPy expression at a generic index.

Each dimension ``n`` has one free index ``i_n``; a node of shape ``(n, 1)`` is read at
``(i_n, 0)``. Because broadcast axes share the dimension's index, an operand's expression can be
used by its consumer unchanged.

*Normal form.* Elementwise nodes are inlined into their consumers. A *named* node whose value
involves a reduction (``bnmeani``, ``bnvar``, ``counts_sum``, ``logit_maxes``) stays opaque: it is
read as ``bnvar[0, i_d]`` and keeps its definition aside. Every opaque definition also teaches a
*recognition* rule: the reduction it introduces is that node (``Red(x) -> n*bnmeani``), so the
identities a human would use (the centred values sum to zero, probabilities sum to one) come out
of plain linearity.
"""
from __future__ import annotations

from itertools import permutations

import sympy as sp

from .errors import DerivationError
from .functions import ELEMENTWISE
from .symbolic import AxisMax, AxisSum, IsArgmax, Max, Red, expand, extent, hide_argmax, index_for, pick, reductions
from .trace import Graph, Node

REDUCING_OPS = ("sum", "mean", "max", "matmul")


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
    if op in ("exp", "sigmoid", "softplus"):
        return "positive"
    if op in ("relu", "abs", "eq", "ne"):
        return "nonnegative"
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


class Elements:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.layer = graph.layer.name
        self.index = {s: index_for(f"i_{s}", s) for s in graph.sizes.values()}
        self.signs: dict[Node, str] = {}
        self.refs: dict[Node, sp.Expr] = {}
        self.nf: dict[Node, sp.Expr] = {}
        self.definition: dict[Node, sp.Expr] = {}  # opaque node -> its value in normal form
        self.opaque: list[Node] = []  # topological order
        self.rules: list[tuple[sp.Expr, tuple, sp.Expr]] = []  # (reduction atom, its free indices, value)
        self.known: dict[Node, int] = {}  # opaque node -> how many rules its definition was recognised with
        for node in graph.nodes:
            self._add(node)

    def nonzero_scalars(self) -> set:
        """Sizes and the constants declared positive: the scalars a formula may divide by."""
        return set(self.graph.sizes.values()) | {c for c in self.graph.constants.values() if c.is_zero is False}

    # -- references --------------------------------------------------------------------------
    def free(self, node: Node) -> tuple:
        return tuple(0 if s == 1 else self.index[s] for s in node.shape)

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
        if len(set(s for s in node.shape if s != 1)) != len([s for s in node.shape if s != 1]):
            raise DerivationError(self.layer, f"{node.name} has two axes of the same size {node.shape}",
                                  "give every axis of a tensor its own dimension", node.line, node.source)
        self.signs[node] = "real" if node.op in ("input", "labels") else sign(node, self.signs)
        if node.op in ("input", "labels"):
            self.nf[node] = self.ref(node)
            return
        value = self._value(node)
        if node is self.graph.output or (reductions(value) and node.named):
            self.known[node] = len(self.rules)
            value = self.recognize(value)
            self.definition[node] = value
            self.opaque.append(node)
            self._learn(node, value)
            self.nf[node] = self.ref(node)
        else:
            self.nf[node] = value

    def normal_form(self, node: Node, log: list | None = None) -> sp.Expr:
        """The node's value with elementwise nodes inlined and known reductions recognised (into ``log``)."""
        return self.recognize(self._value(node), log, self.rules[:self.known.get(node, len(self.rules))])

    def direct(self, node: Node) -> sp.Expr:
        """The node's value one level deep: its operation applied to its operands' references."""
        return self._value(node, self.ref)

    def literal(self, node: Node, operand) -> sp.Expr:
        """The node's value as the spec writes it, for printing a forward pass.

        Unlike the normal form nothing is expanded: a sum stays ``AxisSum(body, i)`` over the
        dimension's own index (the axis it sums), so ``((x - mean)**2).sum(0)`` is not turned into
        the cancelling ``sum(x**2) - n*mean**2``, and a body shared with a full-size value (the
        ``exp`` in a softmax) is the same SymPy expression in both places.
        """
        return self._value(node, operand, literal=True)

    def _value(self, node: Node, operand=None, literal: bool = False) -> sp.Expr:
        operand = operand or self.nf.__getitem__
        a = [operand(x) if isinstance(x, Node) else x for x in node.args]
        op = node.op
        if op in ("add", "sub", "mul", "div"):
            return {"add": a[0] + a[1], "sub": a[0] - a[1], "mul": a[0] * a[1], "div": a[0] / a[1]}[op]
        if op == "pow":
            return a[0] ** a[1]
        if op in ELEMENTWISE:
            return ELEMENTWISE[op](a[0])
        if op in ("sum", "mean", "max"):
            source = node.args[0]
            value = a[0]
            for axis in node.attrs["axes"]:
                size = source.shape[axis]
                if size == 1:
                    continue
                j = self.index[size]
                if literal:
                    value = AxisMax(value, j) if op == "max" else AxisSum(value, j)
                else:
                    value = Max(value, j) if op == "max" else Red(value, j)
                if op == "mean":
                    value = value / size
            return value
        if op == "matmul":
            inner = node.args[0].shape[1]
            return (AxisSum if literal else Red)(a[0] * a[1], self.index[inner])
        if op == "pick":
            table, labels = node.args
            return pick(a[0], self.index[table.shape[1]], operand(labels))
        if op in ("eq", "ne"):
            # a label compared with a number: the mask is a Kronecker delta (0/1), exact for any value
            same = sp.KroneckerDelta(a[0], a[1])
            return same if op == "eq" else 1 - same
        if op == "embed":
            # table[labels]: the table's first index is the label at the labels' own indices
            # (a class weight w[y] of a row is w[y[i_n]]; an embedding row C[X[i_n, i_t], i_e])
            table, labels = node.args
            return pick(a[0], self.index[table.shape[0]], operand(labels))
        raise DerivationError(self.layer, f"operation {op!r} has no element-wise form",
                              "use the supported primitives", node.line, node.source)

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
