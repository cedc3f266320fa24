"""Proof on small symbolic matrices: the generic fused formula equals SymPy's element-wise derivative.

At concrete sizes (n = 2..5, a few columns) the spec's graph is evaluated on arrays of SymPy
symbols (``x_0_1``). Its output is differentiated element by element, the plain way, with no
index calculus: ``d x_p_q = diff(sum(dout * out), x_p_q)``. The generic formula is expanded at the
same sizes (sums written out, saved quantities replaced by their concrete values) and the two
must agree exactly: their difference is zero (``_equal``: as a rational function of stand-in
symbols first, then by ``cancel``, last by ``simplify``).

A maximum over a row is an *undefined* function of that row, so the proof holds for any shift
(it is what makes softmax's max-subtraction cancel), not only for the maximum.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import sympy as sp

from .errors import ProofFailure
from .functions import COMPARISONS, ELEMENTWISE, EXTREMA, Clamp, Where, mask
from .kernel import Kernel
from .spec import Labels, Layer, concrete_shape, sizes_text
from .symbolic import IsArgmax, Max, Red, extent, substitute_family
from .trace import Graph, Node


@dataclass
class Proof:
    layer: str
    sizes: dict[str, int]
    gradients: list[str]
    elements_checked: int
    seconds: float
    skipped: str = ""  # why the proof stopped before every element: an element-wise derivative too large


# The largest element-wise derivative a proof compares (SymPy's, or the fused formula written out
# element by element): the built-in layers' largest has about 2,100 operations (a 3-d batchnorm at
# 5x2x2); a spec nesting softmaxes three deep reaches 178,000, which SymPy takes hours to cancel.
# Such a layer is reported as not proven (its generated code is still held against autograd in
# float64 before it is written).
PROOF_MAX_OPS = 20_000


def _operations_past_limit(expr: sp.Expr) -> int:
    """``sp.count_ops(expr)`` where it exceeds ``PROOF_MAX_OPS``, else 0.

    Counting the tree's nodes first is 8x faster: an operation is counted at a node with at least
    one argument and its arguments are nodes too, so the count of operations is always below the
    count of nodes (tests/test_prove.py), and a tree of at most ``PROOF_MAX_OPS`` nodes is small enough.
    """
    stack, nodes = [expr], 0
    while stack:
        nodes += 1
        if nodes > PROOF_MAX_OPS:
            operations = sp.count_ops(expr)
            return operations if operations > PROOF_MAX_OPS else 0
        stack.extend(stack.pop().args)
    return 0


# The maximum of a row, kept opaque: its derivative in an entry is a symbol of its own (the one-hot
# of the argmax), the same object whether it comes from SymPy's chain rule or from a formula's
# IsArgmax. One function for every max(): two maxima of the same entries are the same value.
ROW_MAX = sp.Function("row_max", real=True)


# what the proof may assume of an input's entries, by its declared domain
DOMAIN_ASSUMPTIONS = {"real": {"real": True}, "positive": {"positive": True}, "nonnegative": {"nonnegative": True},
                      "unit": {"positive": True}, "probability": {"positive": True}, "binary": {"nonnegative": True}}


def _symbols(name: str, shape: tuple, domain: str = "real") -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for idx in itertools.product(*[range(s) for s in shape]):
        out[idx] = sp.Symbol(f"{name}_{'_'.join(map(str, idx))}" if idx else name, **DOMAIN_ASSUMPTIONS[domain])
    return out


def _labels(shape: tuple, classes: int, variant: int) -> np.ndarray:
    """Deterministic label arrays; different variants hit different classes."""
    flat = [(k * (variant + 1) + variant) % classes for k in range(int(np.prod(shape)))]
    return np.array(flat, dtype=object).reshape(shape)


def _reduce(values: np.ndarray, axes: tuple, keepdim: bool, combine) -> np.ndarray:
    for axis in sorted(axes, reverse=True):
        moved = np.moveaxis(values, axis, -1)
        reduced = np.empty(moved.shape[:-1], dtype=object)
        for idx in itertools.product(*[range(s) for s in reduced.shape]):
            reduced[idx] = combine(list(moved[idx]))
        values = np.expand_dims(reduced, axis) if keepdim else reduced
    return values


def evaluate(graph: Graph, sizes: dict[sp.Symbol, int], inputs: dict[str, np.ndarray]) -> dict[Node, np.ndarray]:
    """The concrete symbolic value of every node."""
    values: dict[Node, np.ndarray] = {}
    subs = {**sizes}
    elementwise = ELEMENTWISE
    for node in graph.nodes:
        a = [values[x] if isinstance(x, Node) else x.xreplace(subs) for x in node.args]
        op = node.op
        if op in ("input", "labels"):
            v = inputs[node.name]
        elif op in ("add", "sub", "mul", "div"):
            v = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](a[0], a[1])
        elif op == "pow":
            v = np.vectorize(lambda e: e ** a[1], otypes=[object])(a[0])
        elif op in elementwise:
            v = np.vectorize(lambda e: elementwise[op](e, *a[1:]), otypes=[object])(a[0])
        elif op == "sum":
            v = _reduce(a[0], node.attrs["axes"], node.attrs["keepdim"], lambda xs: sp.Add(*xs))
        elif op == "mean":
            count = int(np.prod([a[0].shape[k] for k in node.attrs["axes"]]))
            total = _reduce(a[0], node.attrs["axes"], node.attrs["keepdim"], lambda xs: sp.Add(*xs))
            v = np.vectorize(lambda e: e / count, otypes=[object])(total)
        elif op == "max":
            v = _reduce(a[0], node.attrs["axes"], node.attrs["keepdim"], lambda xs: ROW_MAX(*xs))
        elif op == "matmul":
            v = np.matmul(a[0], a[1])
        elif op == "embed":
            v = a[0][np.vectorize(int)(a[1]).astype(np.int64)]
        elif op == "view":
            v = a[0].reshape(tuple(int(sp.sympify(s).xreplace(subs)) for s in node.shape))
        elif op == "pick":
            v = np.array([a[0][r, int(a[1][r])] for r in range(a[0].shape[0])], dtype=object)
        elif op in COMPARISONS:
            labels = node.args[0].op == "labels"
            v = np.vectorize(lambda x, y: mask(op, x, y, labels), otypes=[object])(a[0], a[1])
        elif op == "not":
            v = 1 - a[0]
        elif op == "and":
            v = a[0] * a[1]
        elif op in EXTREMA:
            v = np.vectorize(EXTREMA[op], otypes=[object])(a[0], a[1])
        elif op == "clamp":
            v = np.vectorize(lambda e: Clamp(e, a[1], a[2]), otypes=[object])(a[0])
        elif op == "where":
            v = np.vectorize(Where, otypes=[object])(a[0], a[1], a[2])
        elif op == "permute":
            v = np.transpose(a[0], node.attrs["perm"])
        elif op == "expand":
            v = np.broadcast_to(a[0], tuple(int(sp.sympify(s).xreplace(subs)) for s in node.shape)).copy()
        elif op in ("softmax", "log_softmax", "logsumexp"):
            v = _normalized(op, a[0], node.attrs["axes"], node.attrs.get("keepdim", True))
        else:
            raise ValueError(f"no concrete evaluation for {op!r}")
        values[node] = np.asarray(v, dtype=object).reshape(tuple(int(sp.sympify(s).xreplace(subs)) for s in node.shape))
    return values


def _normalized(op: str, x: np.ndarray, axes: tuple, keepdim: bool) -> np.ndarray:
    """softmax, log_softmax or logsumexp over ``axes``, each shifted by the (opaque) maximum."""
    top = _reduce(x, axes, True, lambda xs: ROW_MAX(*xs))
    shifted = x - top
    exps = np.vectorize(sp.exp, otypes=[object])(shifted)
    total = _reduce(exps, axes, True, lambda xs: sp.Add(*xs))
    if op == "softmax":
        return exps / total
    logs = np.vectorize(sp.log, otypes=[object])(total)
    if op == "log_softmax":
        return shifted - logs
    value = top + logs
    return value if keepdim else value.reshape([s for k, s in enumerate(value.shape) if k not in axes])


def _expand_generic(expr: sp.Expr, kernel: Kernel, values: dict, sizes: dict, position: dict, labels: dict) -> sp.Expr:
    """The generic formula at concrete sizes and one output position."""
    by_name = {n.name: values[n] for n in kernel.graph.nodes}
    by_name.update(labels)

    def element(e: sp.Indexed):
        idx = tuple(int(sp.sympify(i).xreplace(position)) for i in e.indices)
        return by_name[str(e.base)][idx]

    def visit(e):
        if isinstance(e, Red):
            n = int(extent(e.index).xreplace(sizes))
            return sp.Add(*[visit(e.body.xreplace({e.index: k})) for k in range(n)])
        if isinstance(e, Max):
            n = int(extent(e.index).xreplace(sizes))
            return ROW_MAX(*[visit(e.body.xreplace({e.index: k})) for k in range(n)])
        if isinstance(e, IsArgmax):  # the maximum's derivative in the entry at this position
            return visit(e.args[1]).fdiff(int(visit(e.args[0])) + 1)
        if isinstance(e, sp.Indexed):
            resolved = e.func(e.base, *[visit(i) for i in e.indices])
            return element(resolved)
        if isinstance(e, sp.Idx):
            return position[e]
        if isinstance(e, sp.KroneckerDelta):
            a, b = (visit(x) for x in e.args)
            return sp.KroneckerDelta(a, b)  # 0/1 for two positions; symbolic for a label vs a constant
        if isinstance(e, sp.Symbol) and e.name in by_name and not np.shape(by_name[e.name]):
            return by_name[e.name][()]  # a scalar (0-d) forward value or input
        if e.is_Atom:
            return e.xreplace(sizes)
        return e.func(*[visit(a) for a in e.args])

    return visit(expr)


def concrete(graph: Graph, sizes: dict[str, int], label_variant: int = 0):
    """Symbolic inputs at ``sizes``, every node's value, the upstream gradient and the objective
    ``sum(dout*out)`` (an ``Objective``, which differentiates it)."""
    size_subs = graph.size_values(sizes)
    inputs = {}
    for name, decl in graph.layer.tensors.items():
        shape = concrete_shape(decl.dims, sizes)
        inputs[name] = (_labels(shape, sizes[decl.classes], label_variant) if isinstance(decl, Labels)
                        else _symbols(name, shape, decl.domain))
    values = evaluate(graph, size_subs, inputs)
    out = values[graph.output]
    upstream = _symbols(f"d{graph.output.name}", out.shape)
    objective = Objective(list(upstream.flat), list(out.flat))
    return size_subs, inputs, values, upstream, objective


class Objective:
    """``sum(dout * out)`` over every output entry, differentiated the plain way.

    ``diff(x)`` is SymPy's derivative of that sum in one input entry. It differentiates only the
    output entries that read ``x`` (the others contribute zero): the same expression
    ``sp.diff(sum, x)`` gives, in about two thirds of the time.
    """

    def __init__(self, upstream: list, outputs: list):
        # each output's free symbols are taken once: SymPy walks the whole tree for them every time
        self.terms = [(u, o, o.free_symbols) for u, o in zip(upstream, outputs)]

    def diff(self, x: sp.Symbol) -> sp.Expr:
        return sp.Add(*[u * sp.diff(o, x) for u, o, reads in self.terms if x in reads])


def prove_steps(graph: Graph, sizes: dict[str, int], label_variant: int = 0) -> Proof:
    """Check the step-by-step backward (the rule table, walked) against the element-wise derivative."""
    from .stepwise import evaluate_steps

    start = time.perf_counter()
    size_subs, inputs, values, upstream, objective = concrete(graph, sizes, label_variant)
    grads = evaluate_steps(graph, values, upstream, size_subs)
    checked = 0
    for name in graph.layer.differentiable:
        x, g = inputs[name], grads.get(graph.inputs[name])
        for idx in itertools.product(*[range(s) for s in x.shape]):
            ours = sp.S.Zero if g is None else g[idx]
            if not _equal(objective.diff(x[idx]), ours, tuple(np.asarray(upstream).flat)):
                raise ProofFailure(f"{graph.layer.name}: step-by-step d{name}{list(idx)} at sizes {sizes_text(sizes)} differs "
                                   f"from the element-wise derivative")
            checked += 1
    return Proof(graph.layer.name, dict(sizes), [f"d{n}" for n in graph.layer.differentiable], checked,
                 time.perf_counter() - start)


def prove(kernel: Kernel, sizes: dict[str, int], label_variant: int = 0) -> Proof:
    """Check every fused gradient of ``kernel`` at ``sizes`` against the element-wise derivative."""
    start = time.perf_counter()
    graph = kernel.graph
    size_subs, inputs, values, upstream, objective = concrete(graph, sizes, label_variant)
    el = kernel.elements

    def atomic(node: Node) -> tuple:  # a node's concrete shape at its atoms (atoms.py)
        return tuple(int(sp.sympify(s).xreplace(size_subs)) for s in el.shape(node))

    # the formulas read every tensor at its atoms: x of shape (n, d) split by a view as x[i_n, i_2, i_d_2]
    values_with_grad = {n: np.asarray(v, dtype=object).reshape(atomic(n)) for n, v in values.items()}
    labels = {n: inputs[n] for n, d in kernel.layer.tensors.items() if isinstance(d, Labels)}
    grad_node = Node("input", (), graph.output.shape, name=f"d{graph.output.name}")
    values_with_grad[grad_node] = np.asarray(upstream, dtype=object).reshape(atomic(graph.output))
    kernel_view = _KernelWithGrad(kernel, grad_node)
    upstream_symbols = tuple(np.asarray(upstream).flat)
    checked = 0
    for formula in kernel.formulas:
        x = inputs[formula.input]
        node = graph.inputs[formula.input]
        free = el.free(node)
        for idx in itertools.product(*[range(s) for s in x.shape]):
            # a broadcast axis ("1") has no index: the formula reads it at 0
            at = np.unravel_index(np.ravel_multi_index(idx, x.shape), atomic(node)) if x.shape else ()
            position = {i: int(k) for i, k in zip(free, at) if i != 0}
            expected = objective.diff(x[idx])
            generic = _expand_generic(with_adjoints(kernel, formula.element), kernel_view, values_with_grad, size_subs,
                                      position, labels)
            size = max(_operations_past_limit(expected), _operations_past_limit(generic))
            if size:
                return Proof(kernel.name, dict(sizes), [f"d{f.input}" for f in kernel.formulas], checked,
                             time.perf_counter() - start, skipped=f"d{formula.input}{list(idx)} has {size} operations "
                                                                  f"(more than {PROOF_MAX_OPS})")
            if not _equal(expected, generic, upstream_symbols):
                raise ProofFailure(f"{kernel.name}: d{formula.input}{list(idx)} at sizes {sizes_text(sizes)} differs from the "
                                   f"element-wise derivative")
            checked += 1
    return Proof(kernel.name, dict(sizes), [f"d{f.input}" for f in kernel.formulas], checked,
                 time.perf_counter() - start)


def with_adjoints(kernel: Kernel, element: sp.Expr) -> sp.Expr:
    """``element`` with every materialized adjoint it reads (``dscores[i, j]``) written out as its
    own formula: what is proven is the whole gradient."""
    nodes = {n.name: n for n in kernel.graph.nodes}
    for adjoint in reversed(kernel.adjoints):
        node = nodes[adjoint.input]
        base = kernel.elements.grad_ref(node).base if node.shape else None
        if base is None:
            element = element.xreplace({kernel.elements.grad_ref(node): adjoint.element})
        elif any(e.base == base for e in element.atoms(sp.Indexed)):
            element = substitute_family(element, base, kernel.elements.free(node), adjoint.element)
    return element


class _KernelWithGrad:
    """A kernel view whose node list includes the upstream gradient ``d<out>`` as a tensor."""

    def __init__(self, kernel: Kernel, grad_node: Node):
        self.name = kernel.name
        self.graph = type("G", (), {"nodes": list(kernel.graph.nodes) + [grad_node]})


def _generators(expr: sp.Expr) -> dict:
    """Each root and transcendental atom of ``expr`` -> a power of a fresh symbol:
    ``(v + eps)**(-3/2)`` -> ``t**-3`` with ``t`` standing for ``(v + eps)**(1/2)``, ``exp(z)`` -> ``u``.

    Substituting the atoms back gives ``expr`` again, so a rational function of these symbols that
    is zero proves ``expr`` zero. Two relations are kept, because the fused formula and SymPy's
    derivative write the same value both ways: the root's base itself becomes ``t**2``
    (``1/(v + eps)`` is ``t**-2``), and ``exp(-z)`` becomes ``1/u``.
    """
    atoms = expr.atoms(sp.Pow, sp.Function, sp.Derivative, sp.Subs)  # one walk of a large tree
    roots: dict = {}
    out = {}
    for p in (a for a in atoms if a.is_Pow):
        base, e = p.as_base_exp()
        if e.is_Rational and not e.is_Integer and base.free_symbols:
            key = (base, e.q)
            roots.setdefault(key, sp.Dummy("t"))
            out[p] = roots[key] ** e.p
    for (base, q), t in roots.items():
        out.setdefault(base, t ** q)
    exps: dict = {}
    for f in (a for a in atoms if isinstance(a, sp.exp)):
        z = f.args[0]
        negated = z.could_extract_minus_sign()
        u = exps.setdefault(-z if negated else z, sp.Dummy("u"))
        out[f] = 1 / u if negated else u
    # an irrational number (pi, sqrt(2), from erf's 2/sqrt(pi) or a scale 1/sqrt(2)) as a symbol of its own
    for number in expr.atoms(sp.NumberSymbol) | {p for p in atoms if p.is_Pow and p.is_number and not p.is_Rational}:
        out.setdefault(number, sp.Dummy("c"))
    # a maximum's derivative (Derivative, Subs of the opaque row_max) is one whole atom too: replaced
    # first (xreplace replaces the outermost match), so that no row_max inside it becomes a constant
    for f in atoms:
        if not f.is_Pow and f.free_symbols:
            out.setdefault(f, sp.Dummy("u"))
    return out


def _rational_zero(expr: sp.Expr) -> bool:
    """Whether ``expr``, a rational function of its symbols, is identically zero.

    Built in SymPy's sparse field of fractions over the rationals: exact, like ``cancel(together(expr))``,
    at a half to a quarter of the time, since no expression tree is rebuilt between the operations.
    An atom the field cannot hold (``pi``, ``sqrt(2)``, a symbolic exponent) makes it fall back to
    ``cancel``.
    """
    symbols = sorted(expr.free_symbols, key=sp.default_sort_key)
    if not symbols:
        return expr == 0
    try:
        return sp.field(symbols, sp.QQ)[0].from_expr(expr) == 0
    except (ValueError, sp.polys.polyerrors.PolynomialError):
        return sp.cancel(sp.together(expr)) == 0


def _groups_zero(expr: sp.Expr) -> bool:
    """Whether ``expr`` is zero because each group of its terms that shares no symbols with the
    others (but those every term reads: the upstream gradient) is: a sufficient test, one row at a
    time. A gradient summed over the rows (``dw`` of a per-feature parameter) is a sum of one
    term per row, each with its own row's sums in its denominators; as one rational function it
    has their product in its common denominator (minutes at 4 rows)."""
    terms = [t for a in sp.Add.make_args(expr) for t in sp.Add.make_args(sp.expand(a, deep=False))]
    if len(terms) < 2:
        return False
    symbols = [t.free_symbols for t in terms]
    shared = set.intersection(*symbols)
    groups: list[tuple[set, list]] = []  # (the symbols of its own the group reads, its terms)
    for term, own in zip(terms, symbols):
        own, members, apart = own - shared, [term], []
        for read, grouped in groups:
            # (the terms that read only the shared symbols are one group: they belong to no row)
            if read & own or not (read or own):
                own, members = own | read, grouped + members
            else:
                apart.append((read, grouped))
        groups = apart + [(own, members)]
    return len(groups) > 1 and all(_rational_zero(sp.Add(*members)) for _, members in groups)


def _inverses(expr: sp.Expr) -> sp.Expr:
    """``expr`` with each function applied to its inverse replaced by the argument: ``atanh(tanh(u)) = u``,
    ``log(exp(u)) = u``, true for the real ``u`` every value of a layer is (SymPy cannot tell that
    ``x/T - max`` is real: ``T`` could be 0, where the formula is undefined anyway). The refold
    writes a saved ``tanh`` or ``exp`` output back as its argument this way."""
    pairs = ((sp.atanh, sp.tanh), (sp.log, sp.exp), (sp.asinh, sp.sinh))
    for outer, inner in pairs:
        expr = expr.replace(lambda e: isinstance(e, outer) and isinstance(e.args[0], inner),
                            lambda e: e.args[0].args[0])
    return expr


def _equal(a: sp.Expr, b: sp.Expr, upstream: tuple = ()) -> bool:
    """Whether ``a`` and ``b`` are the same function of the inputs (and the ``upstream`` gradient).

    Both are linear in the upstream gradient, a sum over the output's entries. Where the difference
    reads several of them and divides by several sums (a softmax's per row), it is zero when its
    value at an upstream of 0 and its derivative in each entry are: each of those reads one output
    entry, with its own row's sum in the denominator, where together they would bring every row's
    sum into one common denominator (minutes, for a softmax with a learned temperature).
    """
    difference = a - b
    if difference == 0:
        return True
    if difference.has(sp.atanh, sp.asinh, sp.log):
        difference = _inverses(difference)
        if difference == 0:
            return True
    read = [u for u in upstream if u in difference.free_symbols]
    sums = {p.base for p in difference.atoms(sp.Pow) if p.exp.is_negative and p.base.is_Add}
    if len(read) > 1 and len(sums) > 1:
        return _same(difference.xreplace({u: 0 for u in read})) and all(_same(sp.diff(difference, u)) for u in read)
    return _same(difference)


def _same(difference: sp.Expr) -> bool:
    """Whether ``difference`` is zero: as a rational function of its atoms first, then by ``cancel``,
    last by ``simplify``."""
    if difference == 0:
        return True
    # Sufficient and cheap: zero as a rational function of the inputs and of independent symbols
    # standing for the roots and transcendental functions (a zero there is zero for any value of them).
    generators = _generators(difference)
    rational = difference.xreplace(generators)
    # a maximum's derivatives (the one-hots of the argmax) are symbols of their own: the difference
    # is zero when it is at 0 and so is its derivative in each. Each of those reads the rows of one
    # maximum, where the whole would bring every row's sum into one common denominator (a softmax
    # written with its shift whose zero adjoint is replayed: ``differentiate.replayed_maxima``)
    # (a Subs holds a Derivative: only the outer one is replaced)
    onehots = [u for a, u in generators.items()
               if isinstance(a, (sp.Derivative, sp.Subs)) and u in rational.free_symbols]
    if len(onehots) > 1:
        split = [rational.xreplace({u: 0 for u in onehots})] + [sp.diff(rational, u) for u in onehots]
        if all(_groups_zero(part) or _rational_zero(part) for part in split):
            return True
    elif _rational_zero(rational):
        return True
    quick = sp.cancel(sp.together(difference))
    if quick == 0:
        return True
    return sp.simplify(difference) == 0


PROOF_ELEMENTS = 12  # largest product of all sizes proven; a 3-d layer at 5x2x2 takes a minute


def default_sizes(layer: Layer) -> list[dict[str, int]]:
    """The sizes a layer is proven at, each dimension at two values at least.

    Up to two dimensions: n = 2, 3, 4, 5 for the first; the second is 3 when n is even, every other
    2. Sizes whose product exceeds ``PROOF_ELEMENTS`` are left out (a proof's cost grows with the
    square of a reduction's length), but never the first two. Three dimensions or more: every
    dimension 2, then each dimension in turn 3 (four combinations for three dimensions; for more,
    the all-2 one is left out: each dimension still takes two values). A size the spec divides
    (``d // G``) is made to divide."""
    from .trace import trace

    graph = trace(layer)
    dims = layer.dims
    out = []
    if len(dims) >= 3:
        combos = ([{d: 2 for d in dims}] if len(dims) == 3 else []) + \
                 [{d: 3 if d == raised else 2 for d in dims} for raised in dims]
        for sizes in combos:
            sizes = graph.fitted(sizes)
            if sizes not in out:
                out.append(sizes)
        return out
    for n in (2, 3, 4, 5):
        sizes = graph.fitted({d: (n if k == 0 else (3 if n % 2 == 0 and k == 1 else 2)) for k, d in enumerate(dims)})
        if (len(out) < 2 or math.prod(sizes.values()) <= PROOF_ELEMENTS) and sizes not in out:
            out.append(sizes)
    return out
