"""Vector-Jacobian products in normal form, by reverse mode over the opaque nodes.

For an opaque node ``N`` with definition ``D`` (normal form at its free indices ``i``) and adjoint
``A[i]``, every variable ``V`` read by ``D`` (an input, or an earlier opaque node) receives::

    adj V[p] += sum_i A[i] * dD[i]/dV[p]

SymPy differentiates ``D`` element-wise (``x[i_n, i_d]`` against ``x[p_n, p_d]`` gives Kronecker
deltas) and ``Red`` collapses the deltas, so each step stays closed-form and generic in the sizes.
Because every opaque node is a function of earlier ones only, visiting them in reverse
topological order is the chain rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .elements import CONTRACTIONS, NORMALIZERS, Elements
from .errors import DerivationError
from .symbolic import IsArgmax, Red, expand, extent, index_for, is_contraction, reindex, substitute_family
from .trace import Node


@dataclass
class Step:
    """One reverse-mode step, kept for the derivation document."""

    node: Node  # the opaque node whose adjoint is propagated
    adjoint: sp.Expr  # its adjoint, element-wise
    target: Node  # the variable receiving a contribution
    contribution: sp.Expr  # at the target's free indices


@dataclass
class Gradients:
    """``d<input>`` for each differentiable input, in normal form, plus the steps that built them.

    ``materialized`` lists the nodes whose adjoint the gradients read as a tensor of its own
    (``d<name>``, computed once in the backward), each with that adjoint, in the order computed.
    """

    elements: Elements
    grads: dict[Node, sp.Expr]
    adjoints: dict[Node, sp.Expr]
    steps: list[Step]
    materialized: list[tuple[Node, sp.Expr]] = field(default_factory=list)
    # maxima whose adjoint is zero (a softmax's shift): dropped, see ``replayed_maxima``
    vanished: list[Node] = field(default_factory=list)


def _target_indices(el: Elements, node: Node) -> tuple:
    """Fresh indices ``p_<dim>`` (``p_<dim>_2`` for a second axis of a size) for the element whose
    gradient is taken (never clash with ``i``)."""
    return tuple(0 if i == 0 else index_for(f"p{i.name[1:]}", i.upper + 1) for i in el.free(node))


def _contribution(el: Elements, node: Node, adjoint: sp.Expr, target: Node, definition: sp.Expr | None = None) -> sp.Expr:
    """What ``node``'s ``adjoint`` sends to ``target``, at the target's free indices (``definition``:
    the node's value to differentiate, where it is not an opaque node's own)."""
    if node.op in NORMALIZERS and definition is None:
        indices, definition, adjoint = _through_normalizer(el, node, adjoint)
    else:
        indices, definition = el.free(node), el.definition[node] if definition is None else definition
    p = _target_indices(el, target)
    local = sp.diff(definition, el.ref(target, p))
    if definition is el.definition.get(node) and _reads_its_result(definition):
        # a function whose derivative is written in its own value (``1 - tanh(u)**2``, ``exp(u)``)
        # reads the node's saved result, as autograd's rule does, never the function of its
        # argument again (a sum of x**3 and its tanh computed once more in the backward)
        local = local.xreplace({definition: el.ref(node)})
    total = expand(adjoint * local)
    for i in indices:
        if i != 0:
            total = Red(total, i)
    back = {pi: i for pi, i in zip(p, el.free(target)) if pi != 0}
    return el.recognize(expand(total.xreplace(back)))


def _reads_its_result(definition: sp.Expr) -> bool:
    """Whether ``definition`` is an elementwise function of a value (not a reduction, a maximum or
    an indicator, whose derivatives are read through ``IsArgmax``)."""
    return (isinstance(definition, sp.Function) and not isinstance(definition, (Red, IsArgmax, sp.Max, sp.Min))
            and len(definition.args) == 1)


def _through_normalizer(el: Elements, node: Node, adjoint: sp.Expr) -> tuple[tuple, sp.Expr, sp.Expr]:
    """A softmax, log-softmax or logsumexp's adjoint passed on to its argument, in the node's own
    value (``s*(a - sum(a*s))``, as autograd's), with the argument's indices and normal form: the
    gradients then read the saved softmax, not its exponentials written out again."""
    source = node.args[0]
    axes = node.attrs["axes"]
    z = el.nf[source]  # the argument at its own indices
    own_axes = el.free_axes(source)
    own = el.free(source)
    if node.op in ("softmax", "log_softmax"):
        adjoint = reindex(adjoint, dict(zip(el.free(node), own)))
        s = el.ref(node, own)
        (axis,) = axes
        summed = own_axes[axis]
        taken = set(own)
        bound = []
        for i in summed:
            bound.append(el.bound(extent(i), taken))
            taken.add(bound[-1])

        def total(e):
            e = reindex(e, dict(zip(summed, bound)))
            for j in bound:
                e = Red(e, j)
            return e

        if node.op == "softmax":
            return own, z, s * (adjoint - total(adjoint * s))
        return own, z, adjoint - sp.exp(s) * total(adjoint)
    keepdim = node.attrs["keepdim"]
    kept = [g for k, g in enumerate(own_axes) if k not in axes]
    at = [(0,) if k in axes else g for k, g in enumerate(own_axes)] if keepdim else kept
    flat = tuple(i for g in at for i in g)
    value = el.ref(node, flat)
    return own, z, reindex(adjoint, dict(zip(el.free(node), flat))) * sp.exp(z - value)


def differentiate(el: Elements, replayed: frozenset = frozenset()) -> Gradients:
    """The gradients of ``el``'s layer. The maxima in ``replayed`` keep the adjoint the chain rule
    gives them, zero or not, read from their shifts' adjoints computed as tensors (``el.kept``):
    see ``replayed_maxima``."""
    graph = el.graph
    wanted = [graph.inputs[name] for name in graph.layer.differentiable]
    variables = list(el.opaque) + wanted
    adjoints: dict[Node, sp.Expr] = {graph.output: el.grad_ref(graph.output)}
    steps: list[Step] = []
    materialized: list[tuple[Node, sp.Expr]] = []
    vanished: list[Node] = []
    for node in reversed(el.opaque):
        adjoint = adjoints.get(node)
        if adjoint is None:
            continue
        if node not in replayed and (adjoint == 0 or _vanishes(el, adjoint, materialized)):
            if node.op == "max":
                vanished.append(node)
            continue
        if node is not graph.output and (_materialize(el, node, adjoint)
                                         or node in el.kept and _worth_a_tensor(el, adjoint)):
            # a factor of sizes and constants (the 1/sqrt(d) of attention's scores) stays out: it
            # scales the smaller results of the products that read the adjoint
            scale, adjoint = _scale(el, adjoint)
            # two products summed (``x @ wi + h @ ui``) have one adjoint: computed once, read by both
            same = next((m for m, a in materialized if m.shape == node.shape
                         and a == reindex(adjoint, dict(zip(el.free(node), el.free(m))))), None)
            if same is None:
                materialized.append((node, adjoint))
            adjoint = scale * el.grad_ref(same or node)
        read = el.definition[node]
        for target in variables:
            if target is node or not _reads(el, read, target):
                continue
            part = _contribution(el, node, adjoint, target)
            steps.append(Step(node, adjoint, target, part))
            adjoints[target] = el.recognize(expand(adjoints.get(target, sp.S.Zero) + part))
    grads = {x: adjoints.get(x, sp.S.Zero) for x in wanted}
    _sum_read_once(el, grads, materialized)
    return Gradients(el, grads, adjoints, steps, materialized, vanished)


def replayed_maxima(graph, maxima: list[Node]) -> frozenset:
    """The nodes that read the ``maxima`` (past views), to be kept opaque so that the maxima's
    adjoints are replayed as autograd computes them.

    A softmax written with its shift, ``exp(x - m)/sum(exp(x - m))`` with ``m = x.max(1)``, gives
    ``m`` the adjoint ``-sum(dz)`` (``z = x - m``), exactly zero: the engine drops it, and ``dx`` is
    its closed form. Autograd computes it in floating point and adds it at the argmax, so that
    ``dx`` there is ``dz - sum(dz)``, minus the sum of the row's other entries: on a near one-hot
    row, where the closed form's entry at the argmax is a difference of nearly equal terms, that
    is 7 to 10 times more accurate. Keeping ``z`` opaque, with ``dz`` a tensor, the chain rule gives
    the same sum (``select`` tries this form when the closed one fails the numerical battery)."""
    readers = set()
    for m in maxima:
        # and a computed argument: its adjoint, with the row total at the argmax, is one tensor
        # that every gradient reads (``x*w``'s for ``dx`` and ``dw``), not a formula in each
        readers |= {a for a in m.inputs if a.op not in ("input", "labels")}
        todo = list(graph.consumers(m))
        while todo:
            node = todo.pop()
            if node.op == "view":
                todo += graph.consumers(node)
            else:
                readers.add(node)
    return frozenset(readers)


def _sum_read_once(el: Elements, grads: dict, materialized: list) -> None:
    """Two inputs added (``v1 = w + x``, ``w`` broadcast along rows) and read nowhere else have
    one adjoint, ``dv1``: ``dx = dv1`` and ``dw = dv1.sum(0)``, as autograd computes them. Written
    out in the inputs, ``dw`` repeated ``dx``'s whole formula inside a sum over the rows (the
    gradient of ``tanh(softmax(tanh(w + x)))`` was 3.4x autograd's time). ``dv1`` is then computed
    once, as a tensor (``materialized``), where the sum of ``dx``'s formula is ``dw``'s exactly."""
    graph = el.graph
    for node in graph.nodes:
        if node.op != "add" or len(node.inputs) != 2 or node is graph.output or not node.shape:
            continue
        operands = [n for n in node.inputs if n in grads]
        if len(operands) != 2 or any(graph.consumers(n) != [node] for n in operands):
            continue
        full = next((n for n in operands if el.free(n) == el.free(node)), None)
        adjoint = grads[full] if full is not None else None
        if adjoint is None or not _worth_a_tensor(el, adjoint):
            continue
        ref = el.grad_ref(node)
        reads = {n: _contribution(el, node, ref, n, el.nf[node]) for n in operands}
        # (each gradient read from ``dv1``, with ``dv1`` written out, is the gradient derived)
        if any(expand(substitute_family(reads[n], ref.base, el.free(node), adjoint) - grads[n]) != 0 for n in operands):
            continue
        materialized.append((node, adjoint))
        grads.update(reads)


def _vanishes(el: Elements, adjoint: sp.Expr, materialized: list) -> bool:
    """Whether ``adjoint`` is zero once the materialized adjoints it reads are written out: a
    softmax's shift ``m`` of ``x - m - log(sum(exp(x - m)))`` gets ``-sum(dz) - ds*s`` with
    ``ds = -sum(dz)/s`` materialized, zero, which left as it is costs the backward the one-hot of
    the maximum and two more passes (1.6x autograd's time)."""
    inlined = adjoint
    for node, value in reversed(materialized):  # the latest may read the earlier ones
        ref = el.grad_ref(node)
        if isinstance(ref, sp.Symbol):
            inlined = inlined.xreplace({ref: value})
        elif inlined.has(ref.base):
            inlined = substitute_family(inlined, ref.base, el.free(node), value)
    return inlined != adjoint and expand(inlined) == 0


def _scale(el: Elements, adjoint: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """``(scale, rest)`` with ``adjoint = scale*rest`` and ``scale`` a product of sizes and constants."""
    scalars = set(el.graph.sizes.values()) | set(el.graph.constants.values())
    factored = sp.factor_terms(adjoint)
    scale = sp.Mul(*[f for f in sp.Mul.make_args(factored)
                     if f.free_symbols <= scalars and not f.atoms(sp.Indexed) and not f.is_number])
    return (scale, expand(factored / scale)) if scale != 1 else (sp.S.One, adjoint)


def _materialize(el: Elements, node: Node, adjoint: sp.Expr) -> bool:
    """Whether the backward computes ``node``'s adjoint once, as a tensor, and reads it from there.

    So it does, as autograd does, where the chain rule goes through a matrix product: for the
    product's own output (``dscores`` of ``scores = q @ k.T``: then ``dq = dscores @ k``,
    ``dk = dscores.T @ q``) or the product plus a bias (``dpre``: ``db = dpre.sum(0)``), and for an
    adjoint that is one (``dprobs = dout @ v.T``). Written out
    in the inputs instead, each gradient would repeat those products inside sums over other axes.
    An adjoint that is already one tensor (``dout``, ``2*dout``) is read as it is.
    """
    contraction = node.op in CONTRACTIONS or node in el.affine or any(is_contraction(r) for r in adjoint.atoms(Red))
    # a softmax whose adjoint sums over a row itself (a softmax of a softmax): autograd's
    # ``s*(a - sum(a*s))`` reads the adjoint ``a`` once, as one tensor, and where ``s`` is one-hot the
    # difference is exactly 0; written out, ``a``'s own sum splits into a difference of two sums of
    # products that cancel only to rounding (1e-9 where autograd's is 1e-20)
    # (an adjoint constant along the row, a row total broadcast, stays written out: its structure
    # makes ``a - sum(a*s)`` exactly 0)
    nested = node.op in ("softmax", "log_softmax") and bool(adjoint.atoms(Red)) and any(
        i in adjoint.free_symbols for a in node.attrs["axes"] for i in el.free_axes(node)[a] if i != 0)
    if not (contraction or nested):
        return False
    return _worth_a_tensor(el, adjoint)


def _worth_a_tensor(el: Elements, adjoint: sp.Expr) -> bool:
    """Whether ``adjoint`` is more than one tensor times sizes and constants (``dout``, ``2*dout``
    are read as they are)."""
    scalars = set(el.graph.sizes.values()) | set(el.graph.constants.values())
    tensors = [f for f in sp.Mul.make_args(adjoint) if not (f.free_symbols <= scalars)]
    return not (len(tensors) == 1 and isinstance(tensors[0], (sp.Indexed, sp.Symbol)))


def _reads(el: Elements, expr: sp.Expr, node: Node) -> bool:
    base = el.base(node)
    if isinstance(base, sp.Symbol):
        return base in expr.free_symbols
    return any(e.base == base for e in expr.atoms(sp.Indexed))
